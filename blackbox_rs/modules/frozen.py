"""Bring-your-own denoiser: any denoiser the user already has, as a frozen input module ``frozen``.

Sources (``config.format``, inferred from the file suffix when left out):

- ``torchscript``: a ``.pt``/``.ts`` TorchScript archive, and ``export``: a ``.pt2`` torch.export
  program. Loaded exactly as the TorchScript connector loads a model
  (:meth:`blackbox_rs.connectors.torchscript.TorchScriptConnector._load`): a ``.pt2`` archive is
  inspected and refused (:class:`~blackbox_rs.errors.UnsafeModelFileError`) if it holds any pickled
  payload, native code or unsafe expression, then read without pickle; a TorchScript archive runs its
  graph but no Python from the file.
- ``onnx``: an ``.onnx`` file run by ONNX Runtime on the CPU, read once (the bytes hashed are the bytes
  that run); tensors in external data files are refused, as in :mod:`blackbox_rs.connectors.onnx`.
- ``module``: an ``nn.Module`` in memory (:meth:`FrozenDenoiser.from_module`). Its code is not in any
  file the SDK can rebuild, so a saved one is reloaded with ``FrozenDenoiser.load(dir, module=net)``,
  which checks the given module against the recorded digest; ``load_module`` refuses it with
  :class:`~blackbox_rs.errors.DenoiserModelError` saying so.

The denoiser maps a noisy ``N×C×H×W`` batch (``[0, 1]`` units, values outside it) to a denoised batch of
the same shape; it is checked on a blank image of ``input_shape`` at creation (a wrong output shape or a
failing run raises :class:`~blackbox_rs.errors.DenoiserModelError`). It runs in float32, in eval mode
and under ``no_grad``; the output is returned in the input's dtype and device, not clipped.

Identity: ``config.file_digest`` is ``"sha256:<hex>"`` of the file (or the
:func:`~blackbox_rs.binding.module_state_digest` of the module: class, source, settings, state),
computed at creation and checked again whenever the module is rebuilt from its config (a changed file
raises :class:`~blackbox_rs.errors.DenoiserModelError`). :meth:`FrozenDenoiser.digest` covers it and
the format but not the file's location, so certificates and resume files name exactly which denoiser
ran. No trainable parameters; the file's weights are not copied into a saved module.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from blackbox_rs.binding import hash_state, module_state_digest
from blackbox_rs.errors import ConfigError, ConnectorError, DenoiserModelError, UnsafeModelFileError
from blackbox_rs.modules.base import CONFIG_FILENAME, InputModule, ModuleConfig, _read_json, validate_config
from blackbox_rs.modules.registry import register_module

__all__ = ["FrozenDenoiser", "FrozenDenoiserConfig"]

_SUFFIX_FORMATS = {".pt": "torchscript", ".ts": "torchscript", ".pt2": "export", ".onnx": "onnx"}

Format = Literal["torchscript", "export", "onnx", "module"]


class FrozenDenoiserConfig(ModuleConfig):
    """Configuration of :class:`FrozenDenoiser`; ``format`` and ``file_digest`` are filled in at creation."""

    name: Literal["frozen"] = "frozen"
    path: str | None = Field(default=None, description="denoiser file (.pt/.ts TorchScript, .pt2, .onnx); "
                             "None for an in-memory nn.Module")
    format: Format | None = Field(default=None, description="file format; None: from the suffix")
    file_digest: str | None = Field(default=None, description="'sha256:<hex>' of the file, or the module's "
                                    "state digest; None: computed at creation, otherwise checked")


class _OnnxDenoiser:
    """An ONNX Runtime session as ``batch -> batch`` on the CPU."""

    def __init__(self, path: Path, data: bytes) -> None:
        from blackbox_rs.connectors.onnx import _external_tensors, _import

        ort, onnx = _import("onnxruntime"), _import("onnx")
        try:
            proto = onnx.load_model_from_string(data)
        except Exception as exc:  # protobuf raises DecodeError and others
            raise DenoiserModelError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
        external = _external_tensors(proto)
        if external:
            raise UnsafeModelFileError(
                f"ONNX denoiser {path} keeps tensors in external data files ({', '.join(external[:3])}): they "
                f"are not in its digest; save it with every tensor inside the file",
                path=str(path), reason="external data",
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise DenoiserModelError(f"{path}: cannot load the ONNX denoiser: {type(exc).__name__}: {exc}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise DenoiserModelError(f"{path}: a denoiser takes one input, this graph has {len(inputs)}")
        self.input_name = inputs[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session.run(None, {self.input_name: arr})[0]
        return torch.as_tensor(out, dtype=torch.float32)


@register_module("frozen")
class FrozenDenoiser(InputModule):
    """A user's denoiser file or ``nn.Module``, frozen (see the module docstring)."""

    config_class = FrozenDenoiserConfig
    spatially_flexible = False
    config: FrozenDenoiserConfig

    def __init__(self, config: FrozenDenoiserConfig, *, module: nn.Module | None = None) -> None:
        super().__init__(config)
        fmt = config.format
        if module is not None:
            if fmt not in (None, "module") or config.path is not None:
                raise ConfigError("frozen: give either a file path or an nn.Module, not both")
            fmt = "module"
            digest = module_state_digest(module)
            module.eval()
            net: Any = module
        else:
            if fmt == "module":
                raise DenoiserModelError(
                    "frozen: this denoiser was an in-memory nn.Module, which cannot be rebuilt from files; "
                    "pass it again: FrozenDenoiser.load(directory, module=net) or FrozenDenoiser.from_module(net, ...)"
                )
            if config.path is None:
                raise ConfigError("frozen: needs path= (a .pt/.ts/.pt2/.onnx denoiser file), or use from_module(net)")
            path = Path(config.path).expanduser().resolve()
            if fmt is None:
                fmt = _SUFFIX_FORMATS.get(path.suffix.lower())  # type: ignore[assignment]
                if fmt is None:
                    raise ConfigError(
                        f"frozen: cannot tell the format of {path.name} from its suffix; give format= "
                        f"(torchscript, export or onnx)"
                    )
            if not path.is_file():
                raise DenoiserModelError(f"{path}: denoiser file not found")
            net, digest = self._load_file(path, fmt)
            config = config.model_copy(update={"path": str(path)})
        if config.file_digest is not None and config.file_digest != digest:
            raise DenoiserModelError(
                f"frozen: the denoiser {'module' if fmt == 'module' else config.path} has digest {digest}, not the "
                f"recorded {config.file_digest}: it is not the denoiser this module was created with"
            )
        object.__setattr__(self, "_net", net)  # not a submodule: outside state_dict, never trained
        self._format = fmt
        self.config = config.model_copy(update={"format": fmt, "file_digest": digest})
        self._probe()

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _load_file(path: Path, fmt: str, device: torch.device | None = None) -> tuple[Any, str]:
        if fmt == "onnx":
            data = path.read_bytes()  # one read: the bytes hashed are the bytes that run
            return _OnnxDenoiser(path, data), "sha256:" + hashlib.sha256(data).hexdigest()
        from blackbox_rs.connectors._pt2 import file_sha256
        from blackbox_rs.connectors.torchscript import TorchScriptConnector

        if (fmt == "export") != (path.suffix.lower() == ".pt2"):
            raise DenoiserModelError(f"{path}: format {fmt!r} needs a {'.pt2' if fmt == 'export' else '.pt/.ts'} file")
        before = file_sha256(path)
        try:
            net = TorchScriptConnector._load(path, device)
        except UnsafeModelFileError:
            raise
        except ConnectorError as exc:
            raise DenoiserModelError(str(exc)) from None
        if file_sha256(path) != before:
            raise DenoiserModelError(f"{path}: the file changed while it was being loaded; try again")
        return net, f"sha256:{before}"

    def _probe(self) -> None:
        shape = self.config.input_shape
        try:  # a batch of 2: a denoiser exported with a fixed batch of 1 fails here, not mid-run
            out = self._run(torch.zeros(2, *shape))
        except DenoiserModelError:
            raise
        except Exception as exc:  # a user's graph raises anything
            raise DenoiserModelError(
                f"frozen: the denoiser cannot run on a blank image of input_shape={shape} (a batch of 2: it needs "
                f"a dynamic batch dimension): {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
            ) from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, *shape) or not out.is_floating_point():
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DenoiserModelError(
                f"frozen: a denoiser must return a float batch of the input's shape {(2, *shape)} (a dynamic batch "
                f"dimension), got {got}"
            )

    @classmethod
    def from_module(cls, module: nn.Module, *, input_shape: tuple[int, int, int]) -> FrozenDenoiser:
        """A frozen denoiser around an ``nn.Module`` (put in eval mode; its digest is recorded)."""
        if not isinstance(module, nn.Module):
            raise ConfigError(f"from_module needs an nn.Module, got {type(module).__name__}")
        return cls(FrozenDenoiserConfig(input_shape=input_shape, format="module"), module=module)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, module: nn.Module | None = None) -> FrozenDenoiser:  # type: ignore[override]
        """Load a saved frozen denoiser; an ``nn.Module`` one needs ``module`` (checked against its digest)."""
        if module is None:
            return super().load(directory)  # type: ignore[return-value]
        where = Path(directory) / CONFIG_FILENAME
        meta = _read_json(where)
        if meta.get("module") != "frozen" or not isinstance(meta.get("config"), dict):
            raise DenoiserModelError(f"{where}: does not hold a 'frozen' module")
        config = validate_config(FrozenDenoiserConfig, meta["config"], drop_unknown=True, source=str(where))
        out = cls(config, module=module)  # type: ignore[arg-type]
        out.eval()
        return out

    # ------------------------------------------------------------------ device
    @property
    def device(self) -> torch.device:
        """Where the denoiser runs (ONNX: always the CPU)."""
        if isinstance(self._net, _OnnxDenoiser):
            return torch.device("cpu")
        p = next(iter(self._net.parameters()), None) if hasattr(self._net, "parameters") else None
        if p is None:
            b = next(iter(self._net.buffers()), None) if hasattr(self._net, "buffers") else None
            return b.device if b is not None else torch.device("cpu")
        return p.device

    def _apply(self, fn: Any, recurse: bool = True) -> FrozenDenoiser:  # type: ignore[override]
        out = super()._apply(fn, recurse)
        target = fn(torch.zeros(1))  # device moves reach the denoiser; dtype casts do not (it runs in float32)
        if isinstance(target, torch.Tensor) and target.device != self.device and self._format != "onnx":
            if self._format == "export":
                assert self.config.path is not None
                net, digest = self._load_file(Path(self.config.path), "export", target.device)
                if digest != self.config.file_digest:
                    raise DenoiserModelError(f"{self.config.path}: the file changed since the module was created")
                object.__setattr__(self, "_net", net)
            else:
                self._net.to(target.device)
        return out

    # ------------------------------------------------------------------ forward
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._net(x.detach().to(device=self.device, dtype=torch.float32))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._run(x)
        if tuple(out.shape) != tuple(x.shape):
            raise DenoiserModelError(f"frozen: the denoiser returned shape {tuple(out.shape)} for {tuple(x.shape)}")
        return out.to(device=x.device, dtype=x.dtype)

    # ------------------------------------------------------------------ identity
    @property
    def exact_identity(self) -> bool:  # type: ignore[override]
        """A file's digest determines the denoiser; an in-memory module's best-effort state digest does not."""
        return self._format != "module"

    def identity_config(self) -> dict[str, Any]:
        """The config as identity: everything but ``path`` (a location; the content is ``file_digest``)."""
        data = self.config.model_dump(mode="json")
        data.pop("path", None)
        if self._format == "module":  # an in-memory module can change after creation: hash it as it is now
            data["file_digest"] = module_state_digest(self._net)
        return data

    @torch.no_grad()
    def digest(self) -> str:
        """``"module:frozen:sha256:<hex>"`` over :meth:`identity_config` (format, file digest) and the
        (empty) state dict."""
        h = hashlib.sha256(b"blackbox-rs/module-digest/v1\0")
        h.update(json.dumps(self.identity_config(), sort_keys=True).encode())
        hash_state(h, self.state_dict())
        return f"module:{self.name}:sha256:{h.hexdigest()}"
