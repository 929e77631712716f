"""A PyTorch model you hold in memory (an ``nn.Module``, e.g. a timm model) as the opaque base model.

This is the natural entry for a model you own: no file to export. :class:`ModuleConnector` freezes
the module (eval mode, no gradients for its weights), moves it to the chosen ``device``, runs every
query there and returns labels and scores on the CPU, like every other connector. It is
differentiable (gradient pass-through fitting works through it).

Its fingerprint (the key of cached answers) is a SHA-256 digest of what determines the module's
answers *as far as tensors can tell*: the class of the module and of every submodule (qualified
names, in order), every ``state_dict`` tensor and every non-persistent buffer (name, dtype, shape,
bytes), the ``identity`` string if given, and ``label_only``. A model whose behaviour also depends on
non-tensor state (a constructor argument kept as a Python attribute, such as a pooling mode, a
temperature, a flag read in ``forward``) must pass ``identity=`` naming that state (e.g.
``"resnet50|global_pool=avg"``): two modules with the same classes and tensors but different
Python-level settings otherwise share one fingerprint, and so one cache.

The digest is taken at construction. Changing the module's weights afterwards (an optimizer step, a
``load_state_dict``, replacing a parameter) would make the fingerprint lie, so every query first
checks that each weight is still the same tensor at the same in-place version
(:attr:`torch.Tensor._version`) and the same storage (an assignment to ``.data`` moves it), and that
no submodule was put back in training mode, and refuses with :class:`~blackbox_rs.errors.ConnectorError`
otherwise: build a new connector for the changed model. An in-place edit through ``.data``
(``w.data.mul_(2)``) bypasses torch's version counting and cannot be seen: don't.

The device is not part of the fingerprint (same weights, same model). fp32 kernels on different
devices (CPU, CUDA, another GPU generation) may differ in the last bits of a logit, so a score can
differ slightly and an argmax tie (or near-tie) can break the other way: an answer cached on one
device and served for another is the answer that device computed, not necessarily bit-identical to
what this device would compute. Use a separate cache directory per device type if that matters.

Opt-in speed knobs (``precision``, ``channels_last``, ``compile``, ``max_batch="auto"``; all off by
default) are described, with what each does to the guarantee, in :mod:`blackbox_rs.connectors.speed`:
a reduced precision is another classifier and changes the fingerprint (``|precision=bf16``); the
memory format, compilation and batch size do not (same function, last-bits caveat as for a device).

This module also holds what the local-model connectors share (:class:`TorchModelConnector`: the
probe at construction, device handling, logits to labels and scores) and :func:`resolve_device`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from blackbox_rs.errors import ConnectorError, InvalidParameterError

from .base import BaseConnector, ConnectorInfo, Prediction
from .speed import (
    AUTO,
    DEFAULT_MAX_BATCH,
    SpeedSettings,
    check_max_batch,
    compiled,
    cuda_auto_max_batch,
    speed_settings,
)

__all__ = ["ModuleConnector", "TorchModelConnector", "module_digest", "resolve_device"]

_TS_INTERPRETER = "The following operation failed in the TorchScript interpreter"


def _complaint(exc: BaseException) -> str:
    """The one line of a model failure that says what is wrong: for a TorchScript interpreter error
    (a traceback of serialized and original code) its last line, else the first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if lines[0].startswith(_TS_INTERPRETER) else lines[0]
    if not re.match(r"[A-Za-z_][A-Za-z0-9_.]*(Error|Exception|Warning):", line):
        line = f"{type(exc).__name__}: {line}"
    return line if len(line) <= 300 else line[:297] + "..."


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` that this process can use.

    Raises :class:`InvalidParameterError` naming the device for a string that is not a torch device,
    for ``"cuda"``/``"cuda:N"`` when torch sees no CUDA device (or fewer than ``N + 1``), and for
    ``"mps"`` when MPS is not available.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidParameterError(
            f"device={device!r} is not a torch device (use 'cpu', 'cuda' or 'cuda:N')"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidParameterError(
                f"device={str(dev)!r} but torch sees no CUDA device (torch.cuda.is_available() is False)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidParameterError(
                f"device={str(dev)!r} but torch sees {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InvalidParameterError(f"device={str(dev)!r} but MPS is not available")
    return dev


class TorchModelConnector(BaseConnector):
    """What the local PyTorch connectors share: a frozen model on one device.

    Subclasses set ``self._model`` (eval mode, weights frozen, on ``self.device``), ``self._name``
    (``"model file.pt"``, ``"module ResNet"``: how messages name it), ``self.label_only`` and
    ``self._info``, and call :meth:`_probe` before declaring ``_info``. Queries move the batch to the
    model's device, run it without autograd and return int64 labels (argmax) and, unless
    ``label_only``, softmax scores, both on the CPU. :meth:`forward_logits` runs with autograd and
    returns the logits on the batch's own device.

    Speed knobs (:mod:`~blackbox_rs.connectors.speed`): subclasses call :meth:`_use_speed` after the
    model is on its device and before :meth:`_probe`; every forward (probe, query, ``forward_logits``)
    then runs through :meth:`_run`: the batch in the chosen memory format, the (compiled) model under
    autocast to the chosen precision. :attr:`settings` shows what runs.
    """

    _model: nn.Module
    _name: str
    device: torch.device
    label_only: bool
    _speed: SpeedSettings = SpeedSettings()
    #: the compiled model when ``compile=True`` (``_model`` stays the module itself)
    _compiled: Callable[..., Any] | None = None
    #: how to fix a model whose batch dimension is not dynamic (said by the probe)
    _batch_remedy = "make it accept any batch size, or pass max_batch=1"
    #: the model runs in this process: the query cache keys generated payloads by their generating
    #: identity (:func:`blackbox_rs.cache.origin_key`), never by hashing their bytes on the host
    cache_by_origin = True

    def _failure_hint(self, text: str) -> str:
        """A hint appended to a query-time failure whose message is ``text`` (default: none)."""
        return ""

    def _check_unchanged(self) -> None:
        """Hook run before every forward pass (default: nothing to check)."""

    def _use_speed(self, precision: object, channels_last: object, compile: object) -> None:
        """Validate the speed knobs (:class:`InvalidParameterError` naming a bad value) and apply them to
        ``self._model``, already on ``self.device``: channels-last weights where the model supports the
        move (else only the inputs are converted), and the compiled model for :meth:`_run`."""
        self._speed = speed_settings(precision, channels_last, compile, self.device)
        if self._speed.channels_last:
            try:
                self._model.to(memory_format=torch.channels_last)
            except Exception:  # noqa: BLE001 - a model that cannot move still gets channels-last inputs
                pass
        if self._speed.compile:
            self._compiled = compiled(self._model)

    def _run(self, batch: torch.Tensor) -> object:
        """One forward of ``batch`` (already on the device) as every query runs it: the speed knobs
        applied (memory format, compiled model, autocast to the precision)."""
        model = self._compiled if self._compiled is not None else self._model
        x = self._speed.prepare(batch)
        with self._speed.autocast(self.device):
            return model(x)

    @property
    def settings(self) -> dict[str, object]:
        """What runs: device, precision, channels_last, compile and the batch size (for a run log)."""
        info = getattr(self, "_info", None)
        return {"device": str(self.device), "precision": self._speed.precision,
                "channels_last": self._speed.channels_last, "compile": self._speed.compile,
                "max_batch": info.max_batch if info is not None else None}

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        fp = self._info.fingerprint if hasattr(self, "_info") else None
        return f"{type(self).__name__}(fingerprint={fp!r}, {shown})"

    def _probe(self, shape: tuple[int, int, int], max_batch: int) -> int:
        """Run a zero batch of the declared shape (1 image, then 2 unless ``max_batch`` is 1) on the
        model's device and return the model's output width. A model that cannot run it raises one line
        (:class:`InvalidParameterError`) naming the declared shape and the model's own complaint;
        a model that does not return ``N x K`` logits raises :class:`ConnectorError`."""
        width = 0
        for n in (1, 2) if max_batch >= 2 else (1,):
            batch = torch.zeros((n, *shape), dtype=torch.float32, device=self.device)
            try:
                with torch.inference_mode():
                    out = self._run(batch)
            except Exception as exc:  # torch raises many unrelated types from inside a model
                complaint = _complaint(exc)
                if n == 1:
                    hint = ""
                    if re.search(r"size\(\)\[0\]|shape\[0\]", complaint):
                        hint = (" (export the program with a dynamic batch dimension: "
                                "dynamic_shapes={0: Dim('batch')})")
                    msg = (f"{self._name} cannot run on the declared input_shape={shape} "
                           f"(a zero batch of shape {tuple(batch.shape)}): {complaint}{hint}")
                else:
                    msg = (f"{self._name} runs on one image of input_shape={shape} but fails on "
                           f"a batch of 2, so its batch dimension is not dynamic: {complaint} "
                           f"({self._batch_remedy})")
                raise InvalidParameterError(msg) from None
            try:
                logits = self._check_logits(out, n)
            except ConnectorError as exc:
                if n == 1:
                    raise
                raise InvalidParameterError(
                    f"{self._name} answers a batch of 2 images wrongly, so its batch dimension is not "
                    f"dynamic ({exc}); {self._batch_remedy}"
                ) from None
            width = width or int(logits.shape[1])
        return width

    def _forward(self, batch: torch.Tensor) -> object:
        """Run the model on ``batch`` moved to its device; any failure inside it (a shape guard of an
        exported program, a dtype or size mismatch) becomes a :class:`ConnectorError` naming the model
        and the batch shape."""
        self._check_unchanged()
        try:
            return self._run(batch.to(self.device))
        except Exception as exc:  # torch raises many unrelated types from inside a model
            raise ConnectorError(
                f"{self._name} failed on a batch of shape {tuple(batch.shape)}: "
                f"{type(exc).__name__}: {exc}{self._failure_hint(str(exc))}"
            ) from exc

    def _check_logits(self, out: object, n: int) -> torch.Tensor:
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != n:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConnectorError(f"model must return logits of shape (N, K) for N={n}, got {shape}")
        return out

    def forward_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Differentiable forward pass (autograd enabled); float32 logits ``N x K`` on ``batch``'s
        device (the move to and from the model's device is part of the graph). Runs in the
        connector's precision (autocast), like queries; the logits are cast back to float32."""
        logits = self._check_logits(self._forward(batch), int(batch.shape[0])).float()
        return logits.to(batch.device)

    def _query(self, batch: torch.Tensor) -> Prediction:
        with torch.inference_mode():
            logits = self._check_logits(self._forward(batch), int(batch.shape[0])).float()
            labels = logits.argmax(dim=1).cpu()
            scores = None if self.label_only else torch.softmax(logits, dim=1).cpu()
        return Prediction(labels=labels, scores=scores)

    def _declare(self, *, shape: tuple[int, int, int], class_names: Sequence[str] | None,
                 num_classes: int | None, max_batch: int | str) -> tuple[str, ...]:
        """Probe the model and return the class names, checked against its output width: ``None``
        for both names them ``"0" .. "K-1"`` from the probe. Raises :class:`InvalidParameterError`
        naming the disagreement. ``max_batch="auto"`` probes a batch of 2 like any size above 1."""
        if class_names is not None and num_classes is not None and num_classes != len(class_names):
            raise InvalidParameterError(
                f"num_classes={num_classes} disagrees with {len(class_names)} class_names"
            )
        width = self._probe(shape, 2 if max_batch == AUTO else int(max_batch))
        if class_names is None:
            if num_classes is None:
                num_classes = width
            class_names = [str(i) for i in range(int(num_classes))]
        if len(class_names) != width:
            given = f"num_classes={num_classes}" if num_classes is not None else f"{len(class_names)} class_names"
            raise InvalidParameterError(
                f"{self._name} returns {width} logits per image, not the declared {given}"
            )
        return tuple(class_names)

    def _max_batch(self, shape: tuple[int, int, int], max_batch: int | str) -> int:
        """``max_batch`` as the number of images per forward: ``"auto"`` on CUDA measures the memory of
        two probe forwards (:func:`~blackbox_rs.connectors.speed.cuda_auto_max_batch`, the knobs
        applied); ``"auto"`` elsewhere is the default, 256. Call after :meth:`_probe`."""
        if max_batch != AUTO:
            return int(max_batch)
        if self.device.type != "cuda":
            return DEFAULT_MAX_BATCH

        def run(n: int) -> object:
            with torch.inference_mode():
                return self._run(torch.zeros((n, *shape), dtype=torch.float32, device=self.device))

        try:
            return cuda_auto_max_batch(run, self.device)
        except Exception as exc:  # torch raises many unrelated types from inside a model
            raise InvalidParameterError(
                f"{self._name}: max_batch='auto' could not measure the memory of a probe forward on "
                f"{str(self.device)!r}: {_complaint(exc)} (pass max_batch=<number>)"
            ) from None

    def _local_info(self, shape: tuple[int, int, int], names: tuple[str, ...], max_batch: int,
                    cost_per_query: float, fingerprint: str) -> ConnectorInfo:
        """The :class:`ConnectorInfo` of a local model: differentiable, scores unless ``label_only``
        (which changes every Prediction, so it is part of the fingerprint: cached answers of one never
        serve the other). A reduced precision is another classifier: ``|precision=<name>`` is appended
        (nothing for fp32, so an fp32 connector keeps its fingerprint)."""
        fingerprint += self._speed.fingerprint_suffix()
        return ConnectorInfo(
            input_shape=shape, class_names=names, returns_scores=not self.label_only, max_batch=max_batch,
            cost_per_query=cost_per_query, fingerprint=fingerprint + ("|label_only" if self.label_only else ""),
            differentiable=True,
        )


def _state_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every ``state_dict`` tensor (the objects themselves, ``keep_vars``) then every buffer that
    ``state_dict`` leaves out (non-persistent), in module order."""
    state = list(model.state_dict(keep_vars=True).items())
    seen = {name for name, _ in state}
    state += [(name, b) for name, b in model.named_buffers() if name not in seen]
    return [(name, t) for name, t in state if isinstance(t, torch.Tensor)]


def _class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def module_digest(model: nn.Module, *, identity: str | None = None) -> str:
    """SHA-256 (hex) of the module's class, the class of every submodule (by name, in order), every
    ``state_dict`` tensor and non-persistent buffer (name, dtype, shape, bytes) and ``identity``.
    Non-tensor state is not seen: name it in ``identity``. A tensor whose bytes cannot be read
    (quantized, nested) raises :class:`InvalidParameterError` naming it."""
    h = hashlib.sha256(b"blackbox-rs module digest v1\0")

    def put(*parts: object) -> None:
        for part in parts:
            data = part if isinstance(part, bytes) else str(part).encode()
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)

    put("identity", "" if identity is None else "1", identity or "")
    for name, sub in model.named_modules():
        put("module", name, _class_path(sub))
    for name, t in _state_tensors(model):
        try:
            flat = t.detach()
            if flat.is_sparse:
                flat = flat.to_dense()
            flat = flat.to("cpu").contiguous().reshape(-1)
            data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        except (RuntimeError, TypeError, ValueError) as exc:
            raise InvalidParameterError(
                f"cannot fingerprint tensor {name!r} ({t.dtype}, {type(exc).__name__}): pass identity= naming "
                f"the model's version"
            ) from None
        put("tensor", name, str(t.dtype), tuple(t.shape), data)
    return h.hexdigest()


class ModuleConnector(TorchModelConnector):
    """An in-memory ``torch.nn.Module`` behind the connector protocol.

    Args:
        model: takes a float32 batch ``N x C x H x W`` in ``[0, 1]`` (put any normalisation inside
            it, e.g. ``nn.Sequential(Normalize(mean, std), timm_model)``) and returns logits ``N x K``
            (or a tuple/list whose first element they are).
        input_shape: ``(C, H, W)`` the model expects.
        class_names: class names; or ``num_classes`` to name them ``"0" .. "K-1"``. If neither is
            given, the width of the model's output on one blank image is used; if one is given, it
            must equal that width.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a :class:`torch.device`).
            Batches are moved there; labels and scores come back on the CPU.
        label_only: hide scores (simulates a label-only API; strategies that need scores refuse it).
        max_batch: most images per forward pass, or ``"auto"``: on CUDA the batch that fits in 70% of
            the free device memory (measured on two probe forwards), elsewhere 256; not given
            (``None``): ``"auto"`` on CUDA, 256 elsewhere. The chosen value is ``info.max_batch``.
        identity: names any non-tensor state the model's answers depend on (see the module
            docstring); it becomes part of the fingerprint, so it must never hold a secret.
        cost_per_query: price of one image query, for the budget.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the forward runs under
            ``torch.autocast`` with that dtype, logits come back float32. The certificate is then
            about that reduced-precision classifier, so the fingerprint gets ``|precision=<name>``
            (fp32 keeps the fingerprint it always had). Unsupported on the device: refused here.
        channels_last: the module's weights and every batch in ``torch.channels_last`` format. Not in
            the fingerprint (same function; kernels may differ in the last bits, as across devices).
        compile: run ``torch.compile(model, dynamic=True)`` (compiled on the construction probe). Not
            in the fingerprint (same function, same last-bits caveat).

    The module is changed **in place**: put in eval mode, its parameters' ``requires_grad`` turned
    off and moved to ``device`` (and to channels-last format with ``channels_last=True``;
    ``nn.Module.to`` moves the object you passed). Pass a
    ``copy.deepcopy`` if you keep training it. At construction the model runs on a zero batch of
    ``input_shape`` (1 image, and 2 to check that the batch dimension is dynamic, unless
    ``max_batch=1``): a model that cannot run it raises
    :class:`~blackbox_rs.errors.InvalidParameterError` with one line naming the declared shape and
    the model's complaint. Fingerprint: ``"module:sha256:<module_digest>"`` plus ``|label_only``
    when scores are hidden; the device is not part of it (see the module docstring for what that
    means across devices). A weight changed after construction is refused at the next query.
    The speed knobs and what each does to the guarantee: :mod:`blackbox_rs.connectors.speed`;
    :attr:`settings` (and the repr) show them.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_shape: Sequence[int],
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        device: str | torch.device = "cpu",
        label_only: bool = False,
        max_batch: int | str | None = None,
        identity: str | None = None,
        cost_per_query: float = 0.0,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise InvalidParameterError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if identity is not None and not isinstance(identity, str):
            raise InvalidParameterError(f"identity must be a string, got {type(identity).__name__}")
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 3:
            raise InvalidParameterError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        self.device = resolve_device(device)
        max_batch = check_max_batch(max_batch, self.device)
        speed_settings(precision, channels_last, compile, self.device)  # refuse a bad knob before any change
        self._name = f"module {type(model).__qualname__}"
        self.label_only = bool(label_only)
        digest = module_digest(model, identity=identity)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            model.to(self.device)
        except Exception as exc:  # torch raises many unrelated types for a failed move
            raise ConnectorError(
                f"cannot move {self._name} to device {str(self.device)!r}: {type(exc).__name__}: {exc}"
            ) from exc
        self._model = model
        self._use_speed(precision, channels_last, compile)  # before the snapshot: channels-last moves weights
        self._weights = [(name, t, t._version, t.data_ptr()) for name, t in _state_tensors(model)]
        names = self._declare(shape=shape, class_names=class_names, num_classes=num_classes,  # type: ignore[arg-type]
                              max_batch=max_batch)
        self._info = self._local_info(shape, names, self._max_batch(shape, max_batch),  # type: ignore[arg-type]
                                      cost_per_query, f"module:sha256:{digest}")

    def _check_unchanged(self) -> None:
        """Refuse to answer for a module whose weights changed after the fingerprint was taken."""
        if any(m.training for m in self._model.modules()):
            raise ConnectorError(f"{self._name} was put in training mode after the connector was built (dropout "
                                 f"or batch statistics would change its answers); call .eval() on it again")
        current = dict(_state_tensors(self._model))
        for name, t, version, ptr in self._weights:
            now = current.get(name)
            # the tensor object, its in-place version and its storage (an assignment to .data moves it);
            # an in-place edit through .data bypasses version counting and cannot be seen here
            if now is not t or now._version != version or now.data_ptr() != ptr:
                raise ConnectorError(
                    f"{self._name}: weight {name!r} changed after the connector was built, so its fingerprint "
                    f"{self._info.fingerprint if hasattr(self, '_info') else ''!r} no longer names this model; "
                    f"build a new ModuleConnector for the changed model"
                )
        if len(current) != len(self._weights):
            raise ConnectorError(
                f"{self._name}: its tensors changed after the connector was built (added or removed); "
                f"build a new ModuleConnector for the changed model"
            )
