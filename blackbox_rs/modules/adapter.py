"""Frozen off-the-shelf denoiser + small fitted adapter: ``denoiser_adapter``.

``A(x) = d + r_θ([d, x])`` with ``d = D(x)``, where ``D`` is a frozen denoiser (``diffusion``,
:mod:`blackbox_rs.modules.diffusion`, or ``frozen``, :mod:`blackbox_rs.modules.frozen`) and ``r_θ`` a
small conv stack (head, ReLU, ``depth − 2`` hidden convs, tail) that sees the denoised image and, with
``use_input`` (default), the noisy input too, so it can put back detail the denoiser removed.

Guarantees:

- The tail of ``r_θ`` is zero-initialised, so at initialisation ``A(x) == D(x)`` exactly (the module is
  exactly its frozen base, as the input-module contract asks of modules built on a base).
- Only ``r_θ`` is trainable (:meth:`~blackbox_rs.modules.base.InputModule.trainable_parameters`): the
  existing fit strategies (denoise, surrogate, zeroth-order, pass-through) fit it through the black
  box exactly as any other module; ``D`` runs under ``no_grad`` and never changes.
- Deterministic and per sample (no normalisation, no dropout; ``D`` is deterministic by contract).
- Identity: :meth:`DenoiserAdapter.digest` covers the frozen denoiser's own digest (its file or
  directory content digest, t*, parametrisation ...), the adapter settings and the adapter weights.
  A saved module stores the adapter weights (safetensors) and the denoiser's config; loading rebuilds
  the denoiser from its files and re-checks their digest.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from blackbox_rs.binding import hash_state
from blackbox_rs.errors import ConfigError
from blackbox_rs.modules.base import InputModule, ModuleConfig
from blackbox_rs.modules.denoiser import ConvStack
from blackbox_rs.modules.diffusion import DiffusionDenoiser, DiffusionDenoiserConfig
from blackbox_rs.modules.frozen import FrozenDenoiser, FrozenDenoiserConfig
from blackbox_rs.modules.registry import create_module, register_module

__all__ = ["DenoiserAdapter", "DenoiserAdapterConfig"]


class DenoiserAdapterConfig(ModuleConfig):
    """Configuration of :class:`DenoiserAdapter`: the frozen denoiser's config and the adapter's size."""

    name: Literal["denoiser_adapter"] = "denoiser_adapter"
    denoiser: Annotated[DiffusionDenoiserConfig | FrozenDenoiserConfig, Field(discriminator="name")] = Field(
        description="config of the frozen denoiser (a 'diffusion' or 'frozen' module)"
    )
    depth: int = Field(default=3, ge=2, le=32, description="conv layers of the adapter (>= 2)")
    width: int = Field(default=16, ge=1, le=512, description="hidden channels of the adapter")
    kernel_size: int = Field(default=3, ge=1, le=9, description="odd kernel size of every conv")
    use_input: bool = Field(default=True, description="feed the noisy input to the adapter beside the denoised image")

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {v}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _inherit_shape(cls, data: Any) -> Any:
        """A nested denoiser config without ``input_shape`` takes the adapter's (one shape for both)."""
        if isinstance(data, dict) and isinstance(data.get("denoiser"), dict) and "input_shape" in data \
                and "input_shape" not in data["denoiser"]:
            data = {**data, "denoiser": {**data["denoiser"], "input_shape": data["input_shape"]}}
        return data

    @model_validator(mode="after")
    def _same_shape(self) -> DenoiserAdapterConfig:
        if tuple(self.denoiser.input_shape) != tuple(self.input_shape):
            raise ValueError(
                f"denoiser.input_shape {tuple(self.denoiser.input_shape)} differs from input_shape {tuple(self.input_shape)}"
            )
        return self


@register_module("denoiser_adapter")
class DenoiserAdapter(InputModule):
    """A frozen denoiser followed by a zero-initialised residual adapter (see the module docstring)."""

    config_class = DenoiserAdapterConfig
    spatially_flexible = False
    config: DenoiserAdapterConfig

    def __init__(self, config: DenoiserAdapterConfig, *, denoiser: DiffusionDenoiser | FrozenDenoiser | None = None) -> None:
        super().__init__(config)
        if denoiser is None:
            denoiser = create_module(config.denoiser)  # type: ignore[assignment]
        elif not isinstance(denoiser, (DiffusionDenoiser, FrozenDenoiser)):
            raise ConfigError(f"denoiser_adapter needs a 'diffusion' or 'frozen' denoiser, got {type(denoiser).__name__}")
        assert denoiser is not None
        if tuple(denoiser.config.input_shape) != tuple(config.input_shape):
            raise ConfigError(
                f"the denoiser takes {tuple(denoiser.config.input_shape)}, the adapter {tuple(config.input_shape)}"
            )
        self.denoiser = denoiser
        c = config.input_shape[0]
        self.net = ConvStack(2 * c if config.use_input else c, c, config.depth, config.width, config.kernel_size)
        self.config = config.model_copy(update={"denoiser": denoiser.config})

    @classmethod
    def from_denoiser(cls, denoiser: DiffusionDenoiser | FrozenDenoiser, **settings: Any) -> DenoiserAdapter:
        """An adapter after an already built denoiser (e.g. a ``frozen`` one around an ``nn.Module``);
        ``settings`` are the adapter fields (depth, width, kernel_size, use_input)."""
        config = DenoiserAdapterConfig(input_shape=denoiser.config.input_shape, denoiser=denoiser.config, **settings)
        return cls(config, denoiser=denoiser)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.denoiser(x)
        h = torch.cat([d, x], dim=1) if self.config.use_input else d
        return d + self.net(h)

    @property
    def exact_identity(self) -> bool:  # type: ignore[override]
        """As exact as the frozen denoiser's identity (its digest is part of this one)."""
        return bool(getattr(self.denoiser, "exact_identity", True))

    @torch.no_grad()
    def digest(self) -> str:
        """``"module:denoiser_adapter:sha256:<hex>"`` over the adapter settings, the frozen denoiser's
        :meth:`digest` (not its file location) and every adapter tensor."""
        data = self.config.model_dump(mode="json")
        data["denoiser"] = self.denoiser.digest()
        h = hashlib.sha256(b"blackbox-rs/module-digest/v1\0")
        h.update(json.dumps(data, sort_keys=True).encode())
        hash_state(h, self.state_dict())
        return f"module:{self.name}:sha256:{h.hexdigest()}"
