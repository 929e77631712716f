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
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from blackbox_rs.errors import ConnectorError, InvalidParameterError

from ._pt2 import file_sha256, inspect_exported_program, load_exported_program
from .base import BaseConnector, ConnectorInfo, Prediction

__all__ = ["TorchScriptConnector", "file_sha256", "inspect_exported_program", "load_exported_program"]

_EXPORT_SUFFIXES = {".pt2"}


# torch >= 2.9 warns on every torch.jit.load; the SDK's own load silences exactly this notice
_JIT_LOAD_DEPRECATED = r"`torch\.jit\.load` is deprecated"
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



class TorchScriptConnector(BaseConnector):
    """A TorchScript or torch.export model file behind the connector protocol.

    Args:
        path: ``.pt``/``.ts`` TorchScript archive (``torch.jit.save``) or ``.pt2`` exported program
            (``torch.export.save``).
        input_shape: ``(C, H, W)`` the model expects.
        class_names: class names; or ``num_classes`` to name them ``"0" .. "K-1"``. If neither is
            given, the width of the model's output on one blank image is used; if one is given, it must
            equal that width.
        label_only: hide scores (simulates a label-only API; strategies that need scores refuse it).
        max_batch: most images per forward pass.
        threads: torch intra-op threads for inference (``None`` leaves torch's setting alone).

    At construction the model runs once on a zero batch of ``input_shape`` (1 image, and 2 to check
    that the batch dimension is dynamic, unless ``max_batch=1``): a model that cannot run it raises
    :class:`~blackbox_rs.errors.InvalidParameterError` with one line naming the declared shape and
    the model's own complaint (the last line of a TorchScript traceback), before any query is made.
    The probe is local (nothing is sent anywhere) and does not change the fingerprint. torch's
    ``torch.jit.load`` deprecation ``FutureWarning`` is silenced around the SDK's own load only.

    The model is differentiable (``info.differentiable``): :meth:`forward_logits` runs it with autograd
    for gradient pass-through fitting. Neither loader unpickles arbitrary Python objects: a ``.pt2``
    archive is inspected and refused (:class:`~blackbox_rs.errors.UnsafeModelFileError`) if it holds
    a pickled payload, native code or an unsafe expression, then loaded without pickle; a TorchScript
    archive runs TorchScript code (its graph) but no Python from the file. See the module docstring
    for exactly what each can execute.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        input_shape: Sequence[int],
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        label_only: bool = False,
        max_batch: int = 256,
        cost_per_query: float = 0.0,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConnectorError(f"model file not found: {self.path}")
        if threads is not None:
            torch.set_num_threads(int(threads))
        digest = file_sha256(self.path)  # the file that is loaded is the file the fingerprint names
        self._model = self._load(self.path)
        if file_sha256(self.path) != digest:
            raise ConnectorError(f"model file {self.path} changed while it was being loaded; load it again")
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 3:
            raise InvalidParameterError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        if class_names is not None and num_classes is not None and num_classes != len(class_names):
            raise InvalidParameterError(
                f"num_classes={num_classes} disagrees with {len(class_names)} class_names"
            )
        width = self._probe(shape, int(max_batch))  # type: ignore[arg-type]
        if class_names is None:
            if num_classes is None:
                num_classes = width
            class_names = [str(i) for i in range(int(num_classes))]
        if len(class_names) != width:
            given = f"num_classes={num_classes}" if num_classes is not None else f"{len(class_names)} class_names"
            raise InvalidParameterError(
                f"model {self.path.name} returns {width} logits per image, not the declared {given}"
            )
        self.label_only = bool(label_only)
        self._info = ConnectorInfo(
            input_shape=shape,  # type: ignore[arg-type]
            class_names=tuple(class_names),
            returns_scores=not self.label_only,
            max_batch=max_batch,
            cost_per_query=cost_per_query,
            # label_only changes every Prediction (no scores): cached answers of one never serve the other
            fingerprint=f"torchscript:sha256:{digest}" + ("|label_only" if self.label_only else ""),
            differentiable=True,
        )

    @staticmethod
    def _load(path: Path) -> torch.nn.Module:
        try:
            if path.suffix in _EXPORT_SUFFIXES:
                module = load_exported_program(path).module()
            else:
                with warnings.catch_warnings():  # exactly torch's own deprecation notice, nothing else
                    warnings.filterwarnings("ignore", message=_JIT_LOAD_DEPRECATED, category=FutureWarning)
                    module = torch.jit.load(str(path), map_location="cpu")
                module.eval()
        except ConnectorError:
            raise
        except Exception as exc:  # torch raises many unrelated types for a bad archive
            raise ConnectorError(f"cannot load model file {path}: {type(exc).__name__}: {exc}") from exc
        for p in module.parameters():
            p.requires_grad_(False)
        return module

    def _probe(self, shape: tuple[int, int, int], max_batch: int) -> int:
        """Run a zero batch of the declared shape (1 image, then 2 unless ``max_batch`` is 1) and
        return the model's output width. A model that cannot run it raises one line
        (:class:`InvalidParameterError`) naming the declared shape and the model's own complaint;
        a model that does not return ``N x K`` logits raises :class:`ConnectorError`."""
        width = 0
        for n in (1, 2) if max_batch >= 2 else (1,):
            batch = torch.zeros((n, *shape), dtype=torch.float32)
            try:
                with torch.inference_mode():
                    out = self._model(batch)
            except Exception as exc:  # torch raises many unrelated types from inside a model
                complaint = _complaint(exc)
                if n == 1:
                    hint = ""
                    if re.search(r"size\(\)\[0\]|shape\[0\]", complaint):
                        hint = (" (export the program with a dynamic batch dimension: "
                                "dynamic_shapes={0: Dim('batch')})")
                    msg = (f"model {self.path.name} cannot run on the declared input_shape={shape} "
                           f"(a zero batch of shape {tuple(batch.shape)}): {complaint}{hint}")
                else:
                    msg = (f"model {self.path.name} runs on one image of input_shape={shape} but fails on "
                           f"a batch of 2, so its batch dimension is not dynamic: {complaint} (trace or "
                           f"export it with a dynamic batch dimension, e.g. dynamic_shapes={{0: Dim('batch')}}, "
                           f"or pass max_batch=1)")
                raise InvalidParameterError(msg) from None
            try:
                logits = self._check_logits(out, n)
            except ConnectorError as exc:
                if n == 1:
                    raise
                raise InvalidParameterError(
                    f"model {self.path.name} answers a batch of 2 images wrongly, so its batch dimension is not "
                    f"dynamic ({exc}); trace or export it with a dynamic batch dimension, or pass max_batch=1"
                ) from None
            width = width or int(logits.shape[1])
        return width

    def _forward(self, batch: torch.Tensor) -> object:
        """Run the model; any failure inside it (a shape guard of an exported program, a dtype or
        size mismatch) becomes a :class:`ConnectorError` naming the file and the batch shape."""
        try:
            return self._model(batch)
        except Exception as exc:  # torch raises many unrelated types from inside a model
            hint = ""
            text = str(exc)
            if self.path.suffix in _EXPORT_SUFFIXES and ("Guard failed" in text or ".shape[0]" in text):
                hint = " (export the program with a dynamic batch dimension: dynamic_shapes={0: Dim('batch')})"
            raise ConnectorError(
                f"model {self.path.name} failed on a batch of shape {tuple(batch.shape)}: "
                f"{type(exc).__name__}: {exc}{hint}"
            ) from exc

    def _check_logits(self, out: object, n: int) -> torch.Tensor:
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != n:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConnectorError(f"model must return logits of shape (N, K) for N={n}, got {shape}")
        return out

    def forward_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Differentiable forward pass (autograd enabled); logits ``N x K``."""
        return self._check_logits(self._forward(batch), int(batch.shape[0])).float()

    def _query(self, batch: torch.Tensor) -> Prediction:
        with torch.inference_mode():
            logits = self._check_logits(self._forward(batch), int(batch.shape[0])).float()
        labels = logits.argmax(dim=1)
        scores = None if self.label_only else torch.softmax(logits, dim=1)
        return Prediction(labels=labels, scores=scores)
