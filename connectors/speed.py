"""Opt-in speed knobs of the local PyTorch connectors, and what each does to the guarantee.

:class:`~blackbox_rs.connectors.ModuleConnector` and
:class:`~blackbox_rs.connectors.TorchScriptConnector` take, all off by default:

* ``precision="bf16"`` / ``"fp16"`` (default ``"fp32"``): the base model's forward runs under
  :func:`torch.autocast` with that dtype on the model's device; logits come back as float32. This
  **changes the classifier**: a reduced-precision model can answer differently from the fp32 one
  (near ties, saturated logits), and the certificate is a statement about the classifier that was
  queried, i.e. the reduced-precision one. So the precision is part of the fingerprint
  (``"|precision=bf16"``): cached answers and journals of one precision never serve another, and an
  fp32 connector keeps exactly the fingerprint it had before the knob existed. A device type or
  dtype that :func:`torch.autocast` does not support is refused at construction, and the probe at
  construction runs under the same precision, so a model that cannot run in it fails there.
* ``channels_last=True``: the model (where it supports it) and every input batch use the
  :data:`torch.channels_last` memory format. Same function, same fingerprint; kernels for another
  layout may differ in the last bits of a logit, like a device change, so an argmax near-tie can
  break the other way (use a separate cache directory if bit-identity matters).
* ``compile=True``: :func:`torch.compile` (``dynamic=True``, so the last, smaller batch does not
  recompile) of an ``nn.Module`` or a ``.pt2`` program's module; a TorchScript archive is refused
  (torch.compile does not take ScriptModules). Same fingerprint, same last-bits caveat (fused
  kernels round differently). The compilation happens on the construction probe.
* ``max_batch="auto"`` (also what ``max_batch`` not given means on CUDA): on CUDA, the batch size that fits in 70% of the free device memory, from the
  peak memory of two probe forwards (:func:`cuda_auto_max_batch`, arithmetic in
  :func:`auto_max_batch`); elsewhere the default, 256. Measured on the query path (no autograd):
  gradient pass-through fitting keeps activations and needs more, so give it an explicit
  ``max_batch``. The chosen value is ``info.max_batch``; it changes how many images go in one
  forward, never an answer, so it is not part of the fingerprint.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from blackbox_rs.errors import InvalidParameterError

__all__ = ["AUTO", "DEFAULT_MAX_BATCH", "PRECISIONS", "SpeedSettings", "auto_max_batch", "check_max_batch",
           "compiled", "cuda_auto_max_batch", "speed_settings"]

#: the precisions a local model can run in, and their autocast dtype (``None``: no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"
#: ``max_batch`` of a local model when none is given, and of ``"auto"`` off CUDA
DEFAULT_MAX_BATCH = 256
#: the two probe batch sizes of the CUDA memory measurement, the share of free memory used, the clip
_PROBE_SIZES = (2, 8)
_FREE_FRACTION = 0.7
_BATCH_RANGE = (1, 4096)
#: the torch.compile backend (a module constant so tests can use a cheap one)
_COMPILE_BACKEND = "inductor"


@dataclass(frozen=True)
class SpeedSettings:
    """The validated knobs of one connector (see the module docstring for what each guarantees)."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @property
    def dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    def fingerprint_suffix(self) -> str:
        """``""`` for fp32 (today's fingerprint), else ``"|precision=<name>"``: the reduced-precision
        model is another classifier."""
        return "" if self.precision == "fp32" else f"|precision={self.precision}"

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """The context the model's forward runs in: autocast to :attr:`dtype`, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """The batch as the model gets it: channels-last when asked (a 4-D batch only)."""
        if self.channels_last and batch.ndim == 4:
            return batch.contiguous(memory_format=torch.channels_last)
        return batch


def speed_settings(precision: object, channels_last: object, compile: object,
                   device: torch.device) -> SpeedSettings:
    """Validate the knobs for a model on ``device``; :class:`InvalidParameterError` names the bad value,
    including a precision that :func:`torch.autocast` does not support on that device type."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InvalidParameterError(
            f"precision={precision!r} is not one of {', '.join(repr(p) for p in PRECISIONS)}"
        )
    for name, value in (("channels_last", channels_last), ("compile", compile)):
        if not isinstance(value, bool):
            raise InvalidParameterError(f"{name}={value!r} must be True or False")
    settings = SpeedSettings(precision, bool(channels_last), bool(compile))
    if settings.dtype is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # torch warns and silently disables an unsupported dtype
                ctx = settings.autocast(device)
            if not getattr(ctx, "_enabled", True):
                raise RuntimeError("autocast disabled itself")
        except (RuntimeError, AssertionError, UserWarning, ValueError) as exc:
            raise InvalidParameterError(
                f"precision={precision!r} is not supported by torch.autocast on device {str(device)!r}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
    return settings


def compiled(model: torch.nn.Module) -> Callable[..., Any]:
    """``torch.compile`` of ``model`` with a dynamic batch dimension (the last, smaller batch of a run
    reuses the graph; a batch of one has its own, compiled by the construction probe)."""
    return torch.compile(model, dynamic=True, backend=_COMPILE_BACKEND)


def check_max_batch(max_batch: object, device: torch.device | None = None) -> int | str:
    """``max_batch`` as a positive int or ``"auto"``; ``None`` (not given) is ``"auto"`` on CUDA and
    :data:`DEFAULT_MAX_BATCH` elsewhere; anything else is :class:`InvalidParameterError`."""
    if max_batch is None:
        return AUTO if device is not None and device.type == "cuda" else DEFAULT_MAX_BATCH
    if isinstance(max_batch, str):
        if max_batch != AUTO:
            raise InvalidParameterError(f"max_batch={max_batch!r} must be a positive integer or 'auto'")
        return AUTO
    if isinstance(max_batch, bool) or not isinstance(max_batch, numbers.Integral) or max_batch < 1:
        raise InvalidParameterError(f"max_batch={max_batch!r} must be a positive integer or 'auto'")
    return int(max_batch)


def auto_max_batch(peak_small: int, peak_large: int, small: int, large: int, free_bytes: int, *,
                   fraction: float = _FREE_FRACTION, bounds: tuple[int, int] = _BATCH_RANGE) -> int:
    """The batch size that fits in ``fraction`` of ``free_bytes``: per-image bytes are the growth of the
    peak memory from a batch of ``small`` to one of ``large`` images, ``(peak_large - peak_small) /
    (large - small)``; the result is ``floor(fraction * free_bytes / per_image)`` clipped to
    ``bounds``. A growth of zero or less (the allocator reused memory) gives the upper bound."""
    if large <= small:
        raise InvalidParameterError(f"the probe batches must grow: small={small}, large={large}")
    lo, hi = bounds
    per_image = (peak_large - peak_small) / (large - small)
    if per_image <= 0:
        return hi
    return max(lo, min(hi, math.floor(fraction * max(free_bytes, 0) / per_image)))


def cuda_auto_max_batch(run: Callable[[int], object], device: torch.device) -> int:
    """Measure ``run(n)`` (a forward of ``n`` images on ``device``, as queries run it) at the two probe
    sizes and return :func:`auto_max_batch` of the peaks and the free memory of ``device``."""
    peaks = []
    for n in _PROBE_SIZES:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(n)
        torch.cuda.synchronize(device)
        peaks.append(int(torch.cuda.max_memory_allocated(device)))
    torch.cuda.empty_cache()  # blocks cached by torch's allocator count as free for the next forwards
    free, _total = torch.cuda.mem_get_info(device)
    return auto_max_batch(peaks[0], peaks[1], _PROBE_SIZES[0], _PROBE_SIZES[1], int(free))
