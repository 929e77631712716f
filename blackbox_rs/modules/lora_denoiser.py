"""LoRA-parametrised DnCNN denoiser: a frozen base denoiser with low-rank adapters on its convolutions.

``A(x) = x + net_{W + ΔW}(x)`` where every targeted ``Conv2d`` weight ``W`` is frozen and
``ΔW = (α / r) · B·A`` is a rank-``r`` update injected by ``peft`` (``LoraConfig`` with Conv2d
targets: ``A`` is a ``k×k`` conv to ``r`` channels, ``B`` a ``1×1`` conv back). Only ``A`` and ``B``
are trainable, which keeps θ small: what makes zeroth-order fitting through queries feasible.

Guarantees:

- peft zero-initialises ``B``, so at initialisation the module computes exactly what its base
  computes; with a random (zero-tail) base that is exactly the identity.
- No dropout (``lora_dropout=0``): the forward pass is deterministic and per-sample.
- ``save`` stores the base weights and the adapter weights (the whole state dict) as safetensors;
  ``load_module`` rebuilds the peft structure from the config and loads them strictly.

``peft`` is imported lazily (it costs seconds): importing this file does not import it.
"""

from __future__ import annotations

import os
import re
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from blackbox_rs.errors import ConfigError, ModuleCheckpointError
from blackbox_rs.modules.base import InputModule
from blackbox_rs.modules.denoiser import DnCNN, DnCNNArchConfig, DnCNNConfig, build_dncnn_net
from blackbox_rs.modules.registry import register_module

__all__ = ["LoRADnCNN", "LoRADnCNNConfig"]

_ADAPTER = "default"


class LoRADnCNNConfig(DnCNNArchConfig):
    """Configuration of :class:`LoRADnCNN`: the base DnCNN architecture plus the LoRA settings."""

    name: Literal["lora_dncnn"] = "lora_dncnn"
    rank: int = Field(default=4, ge=1, le=256, description="LoRA rank r.")
    alpha: float | None = Field(
        default=None,
        gt=0,
        description="LoRA alpha; the update is scaled by alpha / rank. None: alpha = rank.",
    )
    target_modules: tuple[str, ...] | None = Field(
        default=None,
        description="Conv layers of the base that get adapters, by name ('head', 'body.0.conv', ..., "
        "'tail'). None: every conv.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None:
            if not v:
                raise ValueError("target_modules must name at least one conv (or be None for all)")
            if len(set(v)) != len(v):
                raise ValueError(f"target_modules has duplicates: {list(v)}")
        return v

    def base_config(self) -> DnCNNConfig:
        """The :class:`DnCNNConfig` of the frozen base denoiser."""
        return DnCNNConfig(**self.architecture())


@register_module("lora_dncnn")
class LoRADnCNN(InputModule):
    """Frozen DnCNN base + peft LoRA adapters on its convs; only the adapters are trainable."""

    config_class = LoRADnCNNConfig
    spatially_flexible = True
    config: LoRADnCNNConfig

    def __init__(self, config: LoRADnCNNConfig) -> None:
        super().__init__(config)
        from peft import LoraConfig, inject_adapter_in_model

        net = build_dncnn_net(config)
        available = net.conv_names()
        targets = list(config.target_modules) if config.target_modules is not None else available
        unknown = [t for t in targets if t not in available]
        if unknown:
            raise ConfigError(
                f"lora_dncnn: target_modules {unknown} are not convs of the base; available: {available}"
            )
        self.targets: tuple[str, ...] = tuple(targets)
        lora_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha if config.alpha is not None else config.rank,
            # a regex is matched with re.fullmatch by peft: exact names, no suffix surprises
            target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$",
            lora_dropout=0.0,
            bias="none",
            init_lora_weights=True,
        )
        self.net = inject_adapter_in_model(lora_config, net, adapter_name=_ADAPTER)
        # peft freezes everything but the adapters already; make it explicit and independent of peft.
        for n, p in self.net.named_parameters():
            p.requires_grad_(".lora_" in n)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)

    # ------------------------------------------------------------------ base <-> adapters
    def _base_key(self, dncnn_key: str) -> str:
        """Map a key of a plain :class:`DnCNN` state dict to the key of the same tensor here."""
        if not dncnn_key.startswith("net."):
            raise ModuleCheckpointError(f"unexpected denoiser tensor {dncnn_key!r}")
        module_path, _, leaf = dncnn_key[len("net.") :].rpartition(".")
        if module_path in self.targets:
            return f"net.{module_path}.base_layer.{leaf}"
        return dncnn_key

    @torch.no_grad()
    def load_base(self, base: DnCNN | str | os.PathLike[str]) -> None:
        """Copy the weights of a fitted :class:`DnCNN` (an instance, or a directory written by
        ``DnCNN.save``) into the frozen base, and reset the adapters to zero (``B = 0``), so the
        module then computes exactly what ``base`` computes. Architectures must match."""
        if not isinstance(base, DnCNN):
            base = DnCNN.load(base)
        own_arch = self.config.base_config()
        if base.config != own_arch:
            raise ConfigError(
                f"base denoiser config {base.config.model_dump()} does not match this module's base "
                f"{own_arch.model_dump()}"
            )
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        for k, v in base.state_dict().items():
            key = self._base_key(k)
            if key not in state:
                raise ModuleCheckpointError(f"base tensor {k!r} has no counterpart {key!r} in lora_dncnn")
            state[key] = v.detach().clone()
        for k in state:
            if ".lora_B." in k:
                state[k] = torch.zeros_like(state[k])
        self.load_tensors(state, source="base denoiser")

    @classmethod
    def from_denoiser(
        cls,
        base: DnCNN | str | os.PathLike[str],
        *,
        rank: int = 4,
        alpha: float | None = None,
        target_modules: tuple[str, ...] | None = None,
    ) -> LoRADnCNN:
        """A LoRA module whose frozen base is the fitted denoiser ``base`` (instance or saved directory).
        At construction it computes exactly what ``base`` computes."""
        if not isinstance(base, DnCNN):
            base = DnCNN.load(base)
        b = base.config
        config = LoRADnCNNConfig(**b.architecture(), rank=rank, alpha=alpha, target_modules=target_modules)
        module = cls(config)
        module.load_base(base)
        return module

    @torch.no_grad()
    def merged(self) -> DnCNN:
        """A plain :class:`DnCNN` with the adapters folded into its weights (``W + ΔW``): same outputs
        up to floating-point rounding, no peft needed at inference."""
        out = DnCNN(self.config.base_config())
        state = {}
        own = self.state_dict()
        modules = dict(self.net.named_modules())
        for k in out.state_dict():
            key = self._base_key(k)
            t = own[key].detach().clone()
            module_path, _, leaf = k[len("net.") :].rpartition(".")
            if module_path in self.targets and leaf == "weight":
                layer = modules[module_path]
                t = t + layer.get_delta_weight(_ADAPTER).to(t.dtype)
            state[k] = t
        out.load_tensors(state, source="merged lora_dncnn")
        return out

    def adapter_layers(self) -> dict[str, nn.Module]:
        """The peft LoRA layers, by base conv name."""
        modules = dict(self.net.named_modules())
        return {t: modules[t] for t in self.targets}
