"""Local model files as opaque base models: TorchScript (``.pt``/``.ts``) and torch.export (``.pt2``).

The model must take a float32 batch ``N x C x H x W`` in ``[0, 1]`` (put any normalisation inside the
exported model) and return logits ``N x K``. The connector returns argmax labels and, unless
``label_only=True``, softmax scores. Its fingerprint is the SHA-256 of the file (plus ``|label_only``
when scores are hidden), so a changed file never reuses cached answers of the old one.

What loading a file can execute
-------------------------------
A model file is code: its graph runs as the model, on every query. What the loaders below guarantee
is narrower and exact: **loading never unpickles arbitrary Python objects and never runs Python that
the file supplies**.

* ``.pt2`` (torch.export): ``torch.export.load`` is *not* used: it unpickles weights or constants
  marked as pickled with ``torch.load(weights_only=False)`` / ``pickle.loads``, and it unpickles the
  archive's sample inputs with a ``weights_only=False`` fallback, so a crafted archive runs a shell
  command while the model still answers normally. Instead :func:`load_exported_program` first
  inspects the zip and refuses, with :class:`~blackbox_rs.errors.UnsafeModelFileError` naming the
  file and the reason, an archive that holds any weight or constant flagged ``use_pickle``, a
  custom/opaque object constant (pickled), a legacy pickled weight file, a ``.pkl`` entry or another
  entry that starts with a pickle header, AOTInductor or other compiled native code, a symbolic shape
  expression outside a small arithmetic grammar (torch parses them with ``sympy.sympify``, i.e.
  ``eval``), or a graph node whose target is not a registered operator (``torch.ops.*``) or a pure
  ``operator``/``math``/``torch.sym_*`` function. It then reads the raw tensor bytes itself (no
  pickle) and deserialises the JSON program; the sample inputs (always a pickle) are never read.
* ``.pt``/``.ts`` (TorchScript): ``torch.jit.load`` compiles the archive's TorchScript source and
  runs it in the TorchScript interpreter, which can call any registered torch operator (including
  ones that read files, such as ``aten::from_file``) but cannot import Python modules or call
  Python functions. Its ``data.pkl``/``constants.pkl`` are read by TorchScript's own C++ unpickler,
  which rebuilds only tensors and TorchScript types and resolves no arbitrary Python globals (no
  ``__reduce__`` callables). A TorchScript file is therefore trusted as a *program over tensors*:
  only load files whose graph you are willing to run.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from blackbox_rs.errors import ConnectorError, InvalidParameterError

from ._pt2 import file_sha256, inspect_exported_program, load_exported_program
from .module import _TS_INTERPRETER, TorchModelConnector, _complaint, resolve_device  # noqa: F401 - re-exported
from .speed import check_max_batch, speed_settings

__all__ = ["TorchScriptConnector", "file_sha256", "inspect_exported_program", "load_exported_program"]

_EXPORT_SUFFIXES = {".pt2"}


# torch >= 2.9 warns on every torch.jit.load; the SDK's own load silences exactly this notice
_JIT_LOAD_DEPRECATED = r"`torch\.jit\.load` is deprecated"


class TorchScriptConnector(TorchModelConnector):
    """A TorchScript or torch.export model file behind the connector protocol.

    Args:
        path: ``.pt``/``.ts`` TorchScript archive (``torch.jit.save``) or ``.pt2`` exported program
            (``torch.export.save``).
        input_shape: ``(C, H, W)`` the model expects.
        class_names: class names; or ``num_classes`` to name them ``"0" .. "K-1"``. If neither is
            given, the width of the model's output on one blank image is used; if one is given, it must
            equal that width.
        label_only: hide scores (simulates a label-only API; strategies that need scores refuse it).
        max_batch: most images per forward pass, or ``"auto"``: on CUDA the batch that fits in 70% of
            the free device memory (measured on two probe forwards), elsewhere 256; not given
            (``None``): ``"auto"`` on CUDA, 256 elsewhere. The chosen value is ``info.max_batch``.
        threads: torch intra-op threads for inference (``None`` leaves torch's setting alone).
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a :class:`torch.device`):
            a TorchScript archive is loaded with ``map_location=device``, an exported program's module
            is moved there. Batches are moved to it; labels and scores come back on the CPU, and
            :meth:`forward_logits` returns logits on the batch's own device.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the forward runs under
            ``torch.autocast`` with that dtype, logits come back float32. The certificate is then
            about that reduced-precision classifier, so the fingerprint gets ``|precision=<name>``
            (fp32 keeps the fingerprint it always had). Unsupported on the device: refused here.
        channels_last: the model's weights (where the loaded module supports the move; else only the
            inputs) and every batch in ``torch.channels_last`` format. Not in the fingerprint (same
            function; kernels may differ in the last bits, as across devices).
        compile: ``torch.compile(..., dynamic=True)`` of a ``.pt2`` program's module (compiled on
            the construction probe); a TorchScript archive is refused with
            :class:`~blackbox_rs.errors.InvalidParameterError` (torch.compile does not take
            ScriptModules). Not in the fingerprint (same last-bits caveat).

    At construction the model runs once on a zero batch of ``input_shape`` (1 image, and 2 to check
    that the batch dimension is dynamic, unless ``max_batch=1``): a model that cannot run it raises
    :class:`~blackbox_rs.errors.InvalidParameterError` with one line naming the declared shape and
    the model's own complaint (the last line of a TorchScript traceback), before any query is made.
    The probe is local (nothing is sent anywhere) and does not change the fingerprint. Neither does
    the device (same file, same model), but fp32 kernels on different devices may differ in the last
    bits of a logit, so scores can differ slightly and an argmax tie or near-tie can break the other
    way: answers cached on one device type are served, as they were computed there, on another (use a
    cache directory per device type if that matters). torch's
    ``torch.jit.load`` deprecation ``FutureWarning`` is silenced around the SDK's own load only.

    The model is differentiable (``info.differentiable``): :meth:`forward_logits` runs it with autograd
    for gradient pass-through fitting. Neither loader unpickles arbitrary Python objects: a ``.pt2``
    archive is inspected and refused (:class:`~blackbox_rs.errors.UnsafeModelFileError`) if it holds
    a pickled payload, native code or an unsafe expression, then loaded without pickle; a TorchScript
    archive runs TorchScript code (its graph) but no Python from the file. See the module docstring
    for exactly what each can execute. The speed knobs and what each does to the guarantee:
    :mod:`blackbox_rs.connectors.speed`; :attr:`settings` (and the repr) show them.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        input_shape: Sequence[int],
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        label_only: bool = False,
        max_batch: int | str | None = None,
        cost_per_query: float = 0.0,
        threads: int | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        self.path = Path(path)
        self._name = f"model {self.path.name}"
        self._batch_remedy = ("trace or export it with a dynamic batch dimension, e.g. "
                              "dynamic_shapes={0: Dim('batch')}, or pass max_batch=1")
        if not self.path.is_file():
            raise ConnectorError(f"model file not found: {self.path}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.device = resolve_device(device)
        max_batch = check_max_batch(max_batch, self.device)
        speed_settings(precision, channels_last, compile, self.device)  # a bad knob is refused before the load
        if compile is True and self.path.suffix.lower() not in _EXPORT_SUFFIXES:
            raise InvalidParameterError(
                f"compile=True for {self._name}, a TorchScript archive: torch.compile does not take "
                f"ScriptModules (export the model as a .pt2 program with torch.export to compile it, or "
                f"pass compile=False)"
            )
        digest = file_sha256(self.path)  # the file that is loaded is the file the fingerprint names
        self._model = self._load(self.path, self.device)
        if file_sha256(self.path) != digest:
            raise ConnectorError(f"model file {self.path} changed while it was being loaded; load it again")
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 3:
            raise InvalidParameterError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        self._use_speed(precision, channels_last, compile)
        names = self._declare(shape=shape, class_names=class_names, num_classes=num_classes,  # type: ignore[arg-type]
                              max_batch=max_batch)
        self.label_only = bool(label_only)
        self._info = self._local_info(shape, names, self._max_batch(shape, max_batch),  # type: ignore[arg-type]
                                      cost_per_query, f"torchscript:sha256:{digest}")

    @staticmethod
    def _load(path: Path, device: torch.device | None = None) -> torch.nn.Module:
        device = device or torch.device("cpu")
        try:
            if path.suffix.lower() in _EXPORT_SUFFIXES:  # .PT2 too: never torch.jit.load an export archive
                program = load_exported_program(path)
                if device.type != "cpu":  # weights, constants and device arguments baked into the graph
                    from torch.export.passes import move_to_device_pass

                    program = move_to_device_pass(program, device)
                module = program.module()
            else:
                with warnings.catch_warnings():  # exactly torch's own deprecation notice, nothing else
                    warnings.filterwarnings("ignore", message=_JIT_LOAD_DEPRECATED, category=FutureWarning)
                    module = torch.jit.load(str(path), map_location=device)
                module.eval()
        except ConnectorError:
            raise
        except Exception as exc:  # torch raises many unrelated types for a bad archive
            raise ConnectorError(f"cannot load model file {path}: {type(exc).__name__}: {exc}") from exc
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    def _failure_hint(self, text: str) -> str:
        if self.path.suffix.lower() in _EXPORT_SUFFIXES and ("Guard failed" in text or ".shape[0]" in text):
            return " (export the program with a dynamic batch dimension: dynamic_shapes={0: Dim('batch')})"
        return ""
