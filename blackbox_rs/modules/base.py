"""The input-module contract: :class:`InputModule`, its :class:`ModuleConfig`, and safe save/load.

An input module ``A_θ`` sits between the noisy input ``x + δ`` and the opaque model:
``g(x) = argmax_c P[f(A_θ(x + δ)) = c]``. Guarantees every registered module keeps:

- ``forward(x)`` maps an ``N×C×H×W`` float tensor to a tensor of the same shape, dtype and device.
  Inputs are noisy images and may lie outside ``[0, 1]``; the output is **not** clipped here (the
  smoother clamps to ``[0, 1]`` afterwards).
- ``forward`` is a deterministic, per-sample function: no dropout, no batch statistics. One sample's
  output never depends on the other samples in its batch. This is what keeps ``A_θ`` part of a fixed
  base classifier, so the smoothing certificate stays valid.
- At initialisation the module is exactly the identity (``torch.equal(A(x), x)``), or, for modules
  built on top of a fitted base, exactly that base. An unfitted module never hurts.
- The configuration is a frozen pydantic model (``extra="forbid"``) whose ``name`` is a literal equal
  to the registry name, and which records ``input_shape = (C, H, W)``.

On disk a module is a directory with two files:

- ``module_config.json``: ``{"format", "format_version", "sdk_version", "module", "config"}``;
- ``module.safetensors``: the state-dict tensors and nothing else.

:func:`load_module` reads them with ``json`` and ``safetensors`` only: never pickle, never
``torch.load``. Unknown config keys (from a newer SDK) are dropped with a
:class:`~blackbox_rs.errors.CompatibilityWarning`; a missing, unexpected or wrongly shaped tensor
raises :class:`~blackbox_rs.errors.ModuleCheckpointError` naming the tensor.

Imports run one way: :mod:`blackbox_rs.modules.registry` imports this file, never the reverse. The
table of registered classes, :data:`MODULES`, lives here with the contract so that
:func:`load_module` can find a class by name; ``register_module`` (in the registry file) validates a
class and adds it to that table.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from blackbox_rs._version import __version__
from blackbox_rs.binding import hash_state
from blackbox_rs.connectors.base import check_images
from blackbox_rs.errors import (
    CompatibilityWarning,
    ConfigError,
    InvalidInputError,
    ModuleCheckpointError,
    RegistryError,
    UnknownModuleError,
)
from blackbox_rs.paths import atomic_path, atomic_write
from blackbox_rs.registry import Registry

__all__ = [
    "CONFIG_FILENAME",
    "FORMAT",
    "FORMAT_VERSION",
    "MODULES",
    "WEIGHTS_FILENAME",
    "InputModule",
    "ModuleConfig",
    "load_module",
    "validate_config",
]

CONFIG_FILENAME = "module_config.json"
WEIGHTS_FILENAME = "module.safetensors"
FORMAT = "blackbox-rs/input-module"
FORMAT_VERSION = 1

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Every registered input-module class by name; filled only through
#: :func:`blackbox_rs.modules.registry.register_module` (which validates the class first).
MODULES: Registry[type[InputModule]] = Registry("input module", unknown=UnknownModuleError, duplicate=RegistryError)


class ModuleConfig(BaseModel):
    """Base configuration of an input module.

    Subclasses narrow ``name`` to a ``Literal`` equal to their registry name and add their own
    validated fields. Instances are immutable and reject unknown keys.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Registry name of the module (a literal in every subclass).")
    input_shape: tuple[int, int, int] = Field(
        description="(C, H, W) of the images the module receives (before the batch dimension)."
    )

    @field_validator("input_shape")
    @classmethod
    def _positive_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(d < 1 for d in v):
            raise ValueError(f"input_shape must be three positive integers (C, H, W), got {v}")
        return v


def _format_validation_error(err: ValidationError, where: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    return f"invalid {where}: " + "; ".join(parts)


def validate_config(
    config_cls: type[ModuleConfig],
    data: dict[str, Any],
    *,
    drop_unknown: bool = False,
    source: str = "config",
) -> ModuleConfig:
    """Validate ``data`` as ``config_cls``; raise :class:`ConfigError` naming each bad field.

    With ``drop_unknown=True`` (used when loading a saved module), keys the current version does not
    know, at any nesting depth, are removed with a :class:`CompatibilityWarning` and validation is
    retried; every other problem still raises.
    """
    data = copy.deepcopy(data) if drop_unknown else data  # unknown keys are deleted from the copy
    dropped: list[str] = []
    for _ in range(64):  # each round removes at least one key; bounded for safety
        try:
            config = config_cls.model_validate(data)
        except ValidationError as err:
            extra = [e for e in err.errors() if e["type"] == "extra_forbidden"]
            if not drop_unknown or len(extra) != len(err.errors()):
                raise ConfigError(
                    _format_validation_error(err, f"{config_cls.__name__} ({source})")
                ) from None
            for e in extra:
                *parents, key = e["loc"]
                node: Any = data
                for p in parents:
                    node = node[p]
                node.pop(key, None)
                dropped.append(".".join(str(p) for p in e["loc"]))
            continue
        if dropped:
            warnings.warn(
                f"{source}: ignored config keys unknown to blackbox-rs {__version__}: {sorted(dropped)} "
                "(written by another version?)",
                CompatibilityWarning,
                stacklevel=3,
            )
        return config
    raise ConfigError(f"invalid {config_cls.__name__} ({source}): could not remove unknown keys")


class InputModule(nn.Module):
    """Base class of trainable input modules ``A_θ`` (see the module docstring for the guarantees).

    Subclasses set ``config_class``, build their layers in ``__init__(config)`` and implement
    :meth:`_forward`. They are registered with :func:`blackbox_rs.modules.register_module`.
    """

    config_class: ClassVar[type[ModuleConfig]] = ModuleConfig
    #: True when the module is fully convolutional and accepts any H, W (only C is checked).
    spatially_flexible: ClassVar[bool] = False

    def __init__(self, config: ModuleConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config: ModuleConfig = config

    @property
    def name(self) -> str:
        """Registry name of this module."""
        return self.config.name

    @property
    def device(self) -> torch.device:
        """Where the module computes: the device of its first parameter or buffer (the CPU for a module
        with neither). Move it with ``module.to(device)``; :meth:`save` works from any device and
        :func:`load_module` always returns a CPU module. Modules that hold a network outside their
        state (frozen denoisers) say where that network is."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ forward
    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`InvalidInputError` unless ``x`` is a float ``N×C×H×W`` tensor of the configured
        shape (any height and width if the module is spatially flexible), on the module's device and
        (outside autocast) of its parameters' dtype. The image part is
        :func:`~blackbox_rs.connectors.base.check_images` without a value range: noisy inputs lie
        outside [0, 1]."""
        c, h, w = self.config.input_shape
        check_images(
            x, shape=(c, None, None) if self.spatially_flexible else (c, h, w), value_range=None,
            dtypes=_FLOAT_DTYPES, what=f"{self.name}: input",
            owner=f"the module (input_shape={self.config.input_shape})",
        )
        p = next(self.parameters(), None)
        if p is not None:
            if x.device != p.device:
                raise InvalidInputError(
                    f"{self.name}: input is on {x.device} but the module is on {p.device}; move one of them"
                )
            if x.dtype != p.dtype and not torch.is_autocast_enabled(x.device.type):
                raise InvalidInputError(
                    f"{self.name}: input is {x.dtype} but the module's parameters are {p.dtype}; "
                    f"call module.to({x.dtype}) or cast the input"
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``A_θ(x)``: same shape, dtype and device as ``x``; not clipped."""
        self.check_input(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ parameters
    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` for every parameter with ``requires_grad``, in registration order."""
        for n, p in self.named_parameters():
            if p.requires_grad:
                yield n, p

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters θ that fitting changes (``requires_grad=True``), in a fixed order."""
        return [p for _, p in self.named_trainable_parameters()]

    def num_trainable(self) -> int:
        """Number of trainable scalars: the dimension of :meth:`flat_parameters`."""
        return sum(p.numel() for p in self.trainable_parameters())

    def flat_parameters(self) -> torch.Tensor:
        """A detached copy of θ as one 1-D tensor (order of :meth:`trainable_parameters`)."""
        params = self.trainable_parameters()
        if not params:
            return torch.zeros(0, device=self.device)
        return torch.cat([p.detach().reshape(-1) for p in params]).clone()

    def _check_flat(self, vec: torch.Tensor, what: str) -> None:
        n = self.num_trainable()
        if not isinstance(vec, torch.Tensor) or vec.dim() != 1 or vec.numel() != n:
            shape = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise InvalidInputError(f"{self.name}: {what} must be a 1-D tensor of {n} elements, got {shape}")
        if not vec.is_floating_point():
            raise InvalidInputError(f"{self.name}: {what} must be floating point, got {vec.dtype}")
        if not torch.isfinite(vec).all():
            raise InvalidInputError(f"{self.name}: {what} contains non-finite values")

    @torch.no_grad()
    def set_flat_parameters(self, vec: torch.Tensor) -> None:
        """Copy ``vec`` (as returned by :meth:`flat_parameters`) into θ, in place.

        The parameters keep their own dtype and device; ``vec`` is not aliased.
        """
        self._check_flat(vec, "flat parameter vector")
        offset = 0
        for p in self.trainable_parameters():
            k = p.numel()
            p.copy_(vec[offset : offset + k].view_as(p))
            offset += k

    @torch.no_grad()
    def set_flat_gradient(self, vec: torch.Tensor) -> None:
        """Write ``vec`` into the ``.grad`` of θ, so any ``torch.optim`` optimizer can step on a
        zeroth-order gradient estimate."""
        self._check_flat(vec, "flat gradient")
        offset = 0
        for p in self.trainable_parameters():
            k = p.numel()
            g = vec[offset : offset + k].view_as(p).to(device=p.device, dtype=p.dtype).clone()
            p.grad = g
            offset += k

    # ------------------------------------------------------------------ identity
    #: whether :meth:`digest` determines the module's function exactly (config + every tensor); a module
    #: wrapping something the digest cannot fully read (an in-memory ``nn.Module``) says False, and its
    #: certification answers are then cached by payload bytes, never by the digest
    exact_identity: bool = True

    @torch.no_grad()
    def digest(self) -> str:
        """Identity of exactly this module: ``"module:<name>:sha256:<hex>"`` over its config (canonical
        JSON, SDK version excluded) and every state-dict tensor (name, dtype, shape, bytes, in name
        order). Two modules with the same digest compute the same function; any changed weight,
        buffer or setting changes it. Certificates and resume files are bound to it."""
        h = hashlib.sha256(b"blackbox-rs/module-digest/v1\0")
        h.update(json.dumps(self.config.model_dump(mode="json"), sort_keys=True).encode())
        hash_state(h, self.state_dict())
        return f"module:{self.name}:sha256:{h.hexdigest()}"

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``module_config.json`` and ``module.safetensors`` into ``directory`` (created if needed),
        from any device (the tensors are copied to the CPU; the module stays where it is).

        Each file is written durably under a temporary name and moved into place atomically
        (:func:`blackbox_rs.paths.atomic_path`): the config is written first, then the weights are
        written and moved into place, then the config is moved into place. A failure while writing
        either file leaves the previous pair untouched (only a failing last move can leave the new
        weights beside the old config). A file that cannot be written raises :class:`ConfigError`
        naming it. Returns the directory. Only state-dict tensors are stored (no code, no pickle).
        """
        from safetensors.torch import save_file

        d = Path(directory)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sdk_version": __version__,
            "module": self.name,
            "config": self.config.model_dump(mode="json"),
        }
        metadata = {"format": "pt", "module": self.name, "sdk_version": __version__}
        with atomic_path(d / CONFIG_FILENAME, ConfigError) as tmp_config:
            tmp_config.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            atomic_write(d / WEIGHTS_FILENAME, lambda p: save_file(tensors, str(p), metadata=metadata), ConfigError)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> InputModule:
        """Load a saved module (see :func:`load_module`) and check it is an instance of ``cls``."""
        module = load_module(directory)
        if not isinstance(module, cls):
            raise ModuleCheckpointError(
                f"{directory}: holds a {type(module).__name__} ({module.name!r}), not a {cls.__name__}"
            )
        return module

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], *, source: str = "state dict") -> None:
        """Copy ``tensors`` into this module's state, strictly.

        Raises :class:`ModuleCheckpointError` naming the first missing, unexpected or wrongly shaped
        tensor. Values are cast to the module's dtype; nothing is loaded unless every tensor checks.
        """
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise ModuleCheckpointError(
                f"{source}: missing tensor {missing[0]!r} for module {self.name!r}"
                + (f" (and {len(missing) - 1} more: {missing[1:6]})" if len(missing) > 1 else "")
            )
        unexpected = sorted(set(tensors) - set(own))
        if unexpected:
            raise ModuleCheckpointError(
                f"{source}: unexpected tensor {unexpected[0]!r} for module {self.name!r}"
                + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            )
        for k, ref in own.items():
            t = tensors[k]
            if tuple(t.shape) != tuple(ref.shape):
                raise ModuleCheckpointError(
                    f"{source}: tensor {k!r} has shape {tuple(t.shape)}, module {self.name!r} "
                    f"expects {tuple(ref.shape)}"
                )
            if ref.is_floating_point() and not t.is_floating_point():
                raise ModuleCheckpointError(f"{source}: tensor {k!r} has dtype {t.dtype}, expected floating")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ModuleCheckpointError(f"{source}: tensor {k!r} contains non-finite values")
        for k, ref in own.items():
            ref.copy_(tensors[k].to(device=ref.device, dtype=ref.dtype))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ModuleCheckpointError(f"{path}: file not found (not a saved blackbox-rs module?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModuleCheckpointError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModuleCheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_module(directory: str | os.PathLike[str]) -> InputModule:
    """Rebuild a module saved by :meth:`InputModule.save`, using ``json`` and ``safetensors`` only.

    Guarantees: no pickle and no ``torch.load`` is involved; the returned module is on the CPU, in
    eval mode, with parameters that require grad exactly as a freshly built one (fitting can resume),
    and its state equals the saved one exactly; unknown config keys are dropped with a :class:`CompatibilityWarning`. Raises
    :class:`ModuleCheckpointError` for missing/malformed files or tensors (naming them),
    :class:`~blackbox_rs.errors.UnknownModuleError` if the module name is not registered and
    :class:`ConfigError` if the config does not validate.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    meta = _read_json(d / CONFIG_FILENAME)
    where = str(d / CONFIG_FILENAME)
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise ModuleCheckpointError(f"{where}: 'format' is {fmt!r}, expected {FORMAT!r}")
    fv = meta.get("format_version")
    if not isinstance(fv, int) or fv > FORMAT_VERSION:
        raise ModuleCheckpointError(
            f"{where}: format_version {fv!r} is not supported by blackbox-rs {__version__} "
            f"(supports <= {FORMAT_VERSION}); upgrade blackbox-rs"
        )
    name = meta.get("module")
    config_data = meta.get("config")
    if not isinstance(name, str) or not isinstance(config_data, dict):
        raise ModuleCheckpointError(f"{where}: needs a string 'module' and an object 'config'")
    if config_data.get("name", name) != name:
        raise ModuleCheckpointError(
            f"{where}: 'module' is {name!r} but config.name is {config_data['name']!r}"
        )
    cls = MODULES.get(name)
    config = validate_config(
        cls.config_class,
        {**config_data, "name": name},
        drop_unknown=True,
        source=f"{where} (sdk_version {meta.get('sdk_version')!r})",
    )
    module = cls(config)
    wpath = d / WEIGHTS_FILENAME
    if not wpath.is_file():
        raise ModuleCheckpointError(f"{wpath}: file not found")
    try:
        tensors = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModuleCheckpointError(f"{wpath}: not a readable safetensors file: {exc}") from None
    module.load_tensors(tensors, source=str(wpath))
    module.eval()
    return module
