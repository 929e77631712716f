"""The robustified model and its artefacts: :class:`RobustModel`.

``save_pretrained(directory)`` writes, each file atomically (:func:`blackbox_rs.paths.atomic_write`),
``robustify.json`` last (it names the complete artefact):

* ``adapter_config.json`` + ``adapter_model.safetensors``: the PEFT weights. For LoRA these are
  peft's own files (``PeftModel.from_pretrained(base, directory)`` loads them too); for the
  bottleneck adapter and the visual prompt they hold our tensors and a ``peft_type`` of
  ``BLACKBOX_RS_BOTTLENECK_ADAPTER`` / ``BLACKBOX_RS_VISUAL_PROMPT``.
* ``head.safetensors``: the classifier head's weights, only when it was trained.
* ``robustify.json``: format tag, SDK version, method, the full config, the base model's digest
  (:func:`blackbox_rs.connectors.module.module_digest`), the resolved target modules and head,
  the parameter counts (total, base, trainable, PEFT, head), the names of every trained tensor and
  the training report.

``RobustModel.from_pretrained(base, directory)`` rebuilds the wrapper on a copy of ``base`` and loads
the tensors: a ``base`` whose digest differs from the saved one is refused with
:class:`~blackbox_rs.errors.ResumeMismatchError` (``differences["base_digest"]``); a missing or
malformed file, or a missing / unexpected / misshapen tensor, raises
:class:`~blackbox_rs.errors.ModuleCheckpointError` naming it. A save/load round trip computes
bit-identical logits on the same device.

``merged()`` is a plain ``nn.Module`` (LoRA merged into the base weights with peft's
``merge_and_unload``; adapters and prompts kept as modules, they cannot be folded into the weights),
and ``merge_and_export(path, input_shape=...)`` writes it as a TorchScript file (or ONNX, with
``onnx`` installed) that any connector can certify as an opaque model. Merging re-associates a float
sum (``W + s * B A``), so merged logits equal the unmerged ones up to float rounding (about 1e-6),
not bit for bit. The certificate is then about that exported model.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from blackbox_rs._version import __version__
from blackbox_rs.errors import (
    InvalidParameterError,
    MissingDependencyError,
    ModuleCheckpointError,
    ResumeMismatchError,
)
from blackbox_rs.paths import atomic_write

from .config import RobustifyConfig
from .wrap import Wrapped, trainable_names, wrap_model

if TYPE_CHECKING:
    from blackbox_rs.connectors.module import ModuleConnector

__all__ = ["FORMAT", "ParameterCounts", "RobustModel"]

FORMAT = "blackbox-rs robustify v1"
_META = "robustify.json"
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_HEAD = "head.safetensors"
_PEFT_TYPES = {"adapter": "BLACKBOX_RS_BOTTLENECK_ADAPTER", "prompt": "BLACKBOX_RS_VISUAL_PROMPT"}


class ParameterCounts(BaseModel):
    """Parameter counts of a wrapped model (numbers of scalars)."""

    model_config = ConfigDict(extra="forbid")

    total: int = Field(description="every parameter of the wrapped model")
    base: int = Field(description="the base model's own parameters (frozen unless it is the head)")
    trainable: int = Field(description="parameters that are trained: peft + head (when train_head)")
    peft: int = Field(description="parameters of the PEFT modules (LoRA A/B, adapters, prompts)")
    head: int = Field(description="parameters of the classifier head that are trained (0 unless train_head)")


class RobustModel:
    """A base model robustified by PEFT modules: call it on ``N x C x H x W`` in [0, 1] for logits.

    Attributes: ``model`` (the wrapped ``nn.Module``), ``method``, ``config``
    (:class:`RobustifyConfig`), ``base_digest``, ``targets`` and ``head`` (module names in the base
    model), ``report`` (the training report, or ``None`` for a loaded artefact: see ``saved_report``).
    """

    def __init__(self, wrapped: Wrapped, config: RobustifyConfig, base_digest: str) -> None:
        self.model = wrapped.model
        self.method = wrapped.method
        self.targets = list(wrapped.targets)
        self.head = wrapped.head
        self._head = wrapped.head_module
        self.config = config
        self.base_digest = base_digest
        self.report: Any = None
        self.saved_report: dict[str, Any] | None = None
        self._trained = trainable_names(self.model)
        self._counts = self._count()

    # -- running --------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(x)

    def to(self, device: str | torch.device) -> RobustModel:
        """Move the wrapped model to ``device`` (in place); returns self."""
        from blackbox_rs.connectors.module import resolve_device

        self.model.to(resolve_device(device))
        return self

    # -- accounting -----------------------------------------------------------------------------
    def _count(self) -> ParameterCounts:
        named = dict(self.model.named_parameters())
        trained = set(self._trained)
        head = [n for n in trained if n not in self._peft_names(named)]
        peft = self._peft_names(named)
        return ParameterCounts(
            total=sum(p.numel() for p in named.values()),
            base=sum(p.numel() for n, p in named.items() if n not in peft),
            trainable=sum(named[n].numel() for n in trained),
            peft=sum(named[n].numel() for n in peft),
            head=sum(named[n].numel() for n in head),
        )

    def _peft_names(self, named: dict[str, nn.Parameter]) -> set[str]:
        if self.method == "lora":
            return {n for n in named if ".lora_" in n}
        if self.method == "prompt":
            return {n for n in named if n == "prompts" or n.endswith(".prompts")}
        from .wrap import ResidualAdapter

        out: set[str] = set()
        for mname, m in self.model.named_modules():
            if isinstance(m, ResidualAdapter):
                pre = f"{mname}." if mname else ""
                out |= {f"{pre}{sub}.{pn}" for sub in ("down", "up") for pn, _ in getattr(m, sub).named_parameters()}
        return out

    def parameter_counts(self) -> ParameterCounts:
        """Counts at the end of training (what was trainable then), see :class:`ParameterCounts`."""
        return self._counts

    @property
    def trained(self) -> list[str]:
        """Names (in ``model``) of every trained tensor."""
        return list(self._trained)

    def summary(self) -> str:
        """A few lines for people: method, sigmas, targets, what was trained and the counts."""
        c = self._counts
        pct = 100.0 * c.trainable / max(c.total, 1)
        return (f"robustified ({self.method}, sigmas {list(self.config.sigmas)}): {c.trainable:,} trainable of "
                f"{c.total:,} parameters ({pct:.2f}%): peft {c.peft:,}, head {c.head:,}; base {c.base:,} frozen\n"
                f"targets: {', '.join(self.targets) or '(prompt tokens)'}; head: {self.head}"
                f"{' (trained)' if self.config.train_head else ' (frozen)'}")

    def __repr__(self) -> str:
        return (f"RobustModel(method={self.method!r}, sigmas={list(self.config.sigmas)}, "
                f"trainable={self._counts.trainable}, base_digest={self.base_digest[:12]!r})")

    # -- artefacts --------------------------------------------------------------------------------
    def _head_module(self) -> nn.Module:
        return self._head

    def _peft_state(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach().cpu().contiguous() for n in sorted(self._peft_names(named))}

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the artefact into ``directory`` (created if needed); see the module docstring."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.method == "lora":
            with tempfile.TemporaryDirectory(prefix=".robustify-", dir=d) as tmp:
                self.model.save_pretrained(tmp)  # type: ignore[operator]
                for name in (_ADAPTER_CONFIG, _ADAPTER_WEIGHTS):
                    atomic_write(d / name, (Path(tmp) / name).read_bytes(), ModuleCheckpointError)
        else:
            state = self._peft_state()
            atomic_write(d / _ADAPTER_WEIGHTS, lambda p: save_file(state, str(p)), ModuleCheckpointError)
            atomic_write(d / _ADAPTER_CONFIG, json.dumps({
                "peft_type": _PEFT_TYPES[self.method], "targets": self.targets,
                "bottleneck": self.config.adapter_bottleneck, "prompt_tokens": self.config.prompt_tokens,
                "tensors": sorted(state)}, indent=1), ModuleCheckpointError)
        if self.config.train_head:
            head = {k: v.detach().cpu().contiguous() for k, v in self._head_module().state_dict().items()}
            atomic_write(d / _HEAD, lambda p: save_file(head, str(p)), ModuleCheckpointError)
        report = self.report.model_dump(mode="json") if self.report is not None else self.saved_report
        meta = {"format": FORMAT, "sdk_version": __version__, "method": self.method,
                "config": self.config.model_dump(mode="json"), "base_digest": self.base_digest,
                "targets": self.targets, "head": self.head,
                "parameter_counts": self._counts.model_dump(), "trained": self._trained, "report": report}
        atomic_write(d / _META, json.dumps(meta, indent=1), ModuleCheckpointError)
        return d

    @classmethod
    def from_pretrained(cls, base: nn.Module, directory: str | Path,
                        device: str | torch.device = "cpu") -> RobustModel:
        """Rebuild the robustified model on a copy of ``base`` from an artefact directory; ``base`` must
        be the model it was trained from (same digest). See the module docstring for the errors."""
        from safetensors.torch import load_file

        from blackbox_rs.connectors.module import module_digest, resolve_device

        d = Path(directory)
        meta = _read_json(d / _META)
        if meta.get("format") != FORMAT:
            raise ModuleCheckpointError(f"{d / _META} is not a robustify artefact (format {meta.get('format')!r})")
        digest = module_digest(base)
        if meta.get("base_digest") != digest:
            raise ResumeMismatchError(
                f"the artefact in {d} was trained on another base model (digest {str(meta.get('base_digest'))[:12]}, "
                f"this model {digest[:12]}); load it onto the model it was trained from",
                {"base_digest": (meta.get("base_digest"), digest)})
        try:
            cfg = RobustifyConfig(**meta["config"])
        except Exception as exc:  # pydantic ValidationError, KeyError, TypeError
            raise ModuleCheckpointError(f"{d / _META}: its config is invalid: {exc}") from None
        cfg = cfg.model_copy(update={"target_modules": tuple(meta["targets"]) or None, "head": meta["head"]})
        wrapped = wrap_model(base, cfg)
        obj = cls(wrapped, cfg, digest)
        named = dict(obj.model.named_parameters())
        expected = obj._peft_names(named)
        try:
            weights = load_file(str(d / _ADAPTER_WEIGHTS))
        except FileNotFoundError:
            raise ModuleCheckpointError(f"{d / _ADAPTER_WEIGHTS} is missing") from None
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise ModuleCheckpointError(f"{d / _ADAPTER_WEIGHTS} is unreadable: {exc}") from None
        if cfg.method == "lora":
            import peft

            want = peft.get_peft_model_state_dict(obj.model)
            _check_keys(d / _ADAPTER_WEIGHTS, set(want), set(weights))
            _check_shapes(d / _ADAPTER_WEIGHTS, want, weights)
            peft.set_peft_model_state_dict(obj.model, weights)
        else:
            _check_keys(d / _ADAPTER_WEIGHTS, expected, set(weights))
            _check_shapes(d / _ADAPTER_WEIGHTS, {n: named[n] for n in expected}, weights)
            with torch.no_grad():
                for n in expected:
                    named[n].copy_(weights[n])
        if cfg.train_head:
            try:
                head_sd = load_file(str(d / _HEAD))
            except FileNotFoundError:
                raise ModuleCheckpointError(f"{d / _HEAD} is missing (the head was trained)") from None
            except Exception as exc:
                raise ModuleCheckpointError(f"{d / _HEAD} is unreadable: {exc}") from None
            module = obj._head_module()
            _check_keys(d / _HEAD, set(module.state_dict()), set(head_sd))
            _check_shapes(d / _HEAD, module.state_dict(), head_sd)
            module.load_state_dict(head_sd)
        obj.model.to(resolve_device(device)).eval()
        obj.saved_report = meta.get("report")
        obj._trained = list(meta.get("trained", obj._trained))
        return obj

    # -- plain module and export ----------------------------------------------------------------
    def merged(self) -> nn.Module:
        """A plain, frozen, eval-mode ``nn.Module`` computing this model's logits (a copy: this object
        is untouched). LoRA is merged into the base weights; adapters and prompts stay modules."""
        m = copy.deepcopy(self.model)
        if self.method == "lora":
            m = m.merge_and_unload()  # type: ignore[operator]
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def connector(self, *, input_shape: Sequence[int], **kwargs: Any) -> ModuleConnector:
        """A :class:`~blackbox_rs.connectors.module.ModuleConnector` over :meth:`merged` (kwargs go to
        it, e.g. ``num_classes``, ``device``, ``label_only``): certify the robustified model directly."""
        from blackbox_rs.connectors.module import ModuleConnector

        return ModuleConnector(self.merged(), input_shape=input_shape, **kwargs)

    def merge_and_export(self, path: str | Path, *, input_shape: Sequence[int], format: str = "torchscript") -> Path:
        """Write :meth:`merged` (on the CPU) to ``path`` as ``"torchscript"`` (traced, any batch size) or
        ``"onnx"`` (dynamic batch dimension; needs ``onnx``); atomically. Returns ``path``.
        Raises :class:`InvalidParameterError` for another format or a bad ``input_shape``,
        :class:`MissingDependencyError` when ``onnx`` is missing."""
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3:
            raise InvalidParameterError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        if format not in ("torchscript", "onnx"):
            raise InvalidParameterError(f"format must be 'torchscript' or 'onnx', got {format!r}")
        m = self.merged().to("cpu")
        example = torch.zeros((2, *shape))
        target = Path(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer / deprecation warnings of torch.jit and torch.onnx
            if format == "torchscript":
                traced = torch.jit.trace(m, example, check_trace=False)
                atomic_write(target, lambda p: torch.jit.save(traced, str(p)), ModuleCheckpointError)
            else:
                try:
                    import onnx  # noqa: F401
                except ImportError:
                    raise MissingDependencyError(
                        "ONNX export needs the 'onnx' package: pip install onnx onnxruntime") from None
                atomic_write(target, lambda p: torch.onnx.export(
                    m, (example,), str(p), dynamo=False, input_names=["input"], output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}), ModuleCheckpointError)
        return target


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModuleCheckpointError(f"{path} is missing: not a robustify artefact directory") from None
    except (OSError, ValueError) as exc:
        raise ModuleCheckpointError(f"{path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise ModuleCheckpointError(f"{path} is not a JSON object")
    return data


def _check_keys(path: Path, want: set[str], have: set[str]) -> None:
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing:
        raise ModuleCheckpointError(f"{path} lacks tensor(s) {missing[:5]}")
    if unexpected:
        raise ModuleCheckpointError(f"{path} has unexpected tensor(s) {unexpected[:5]}")


def _check_shapes(path: Path, want: Any, have: dict[str, torch.Tensor]) -> None:
    for k, t in want.items():
        if tuple(have[k].shape) != tuple(t.shape):
            raise ModuleCheckpointError(
                f"{path}: tensor {k!r} has shape {tuple(have[k].shape)}, the model needs {tuple(t.shape)}")
