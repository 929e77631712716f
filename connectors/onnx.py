"""ONNX model files as opaque base models, run by ONNX Runtime (CPU or CUDA execution provider).

ONNX is the common format for models handed between teams. The model must take one float32 input
``N x C x H x W`` in ``[0, 1]`` (put any normalisation inside the graph) and return logits ``N x K``
as its first output. The connector returns argmax labels and, unless ``label_only=True``, softmax
scores, on the CPU. Its fingerprint is ``"onnx:sha256:<file hash>"`` plus ``|label_only`` when scores
are hidden, so a changed file never reuses cached answers of the old one.

Needs ``onnxruntime`` (or ``onnxruntime-gpu`` for CUDA) and ``onnx``: ``pip install 'blackbox-rs[onnx]'``
or ``pip install onnxruntime onnx``. They are imported only when a connector is built; a missing one
raises :class:`~blackbox_rs.errors.MissingDependencyError` naming the install command.

What loading a file can execute
-------------------------------
An ONNX file is a protobuf message: **loading it never unpickles anything and runs no Python**. The
file is read once; that one copy of the bytes is hashed for the fingerprint, parsed by ``onnx`` (to
refuse external data, below) and handed to ONNX Runtime, so the model that runs is the model the
fingerprint names. ONNX Runtime runs the graph with its built-in operators only: the connector
registers no custom-operator library, so a file cannot bring native code. A model whose tensors live
in *external data* files is refused (:class:`~blackbox_rs.errors.UnsafeModelFileError`): those files
are named by the model, would be read from wherever it points, and are not in the fingerprint; save
the model with every tensor inside the ``.onnx`` file (``onnx.save_model(m, path,
save_as_external_data=False)``; files up to 2 GB).

Checked at load
---------------
Exactly one graph input, of type float32 and shape ``[N, C, H, W]`` whose fixed dimensions equal
``input_shape`` (a named/dynamic C, H or W accepts the declared size); a mismatch raises
:class:`~blackbox_rs.errors.InvalidParameterError` naming both shapes. The batch dimension may be
dynamic (any name, or unset) or fixed:

* fixed to 1: ``info.max_batch`` is 1, the engine sends one image per run;
* fixed to ``b > 1``: ``info.max_batch`` is ``min(max_batch, b)`` and a smaller chunk is **padded**
  with blank images to ``b`` rows, whose answers are dropped. This is exact for a model that treats
  the images of a batch independently (any classifier exported in eval mode); it costs the padded
  rows' compute.

The first output must be ``[N, K]`` (float); K is checked against ``num_classes`` / ``class_names``
on a probe run of a blank batch, which also catches a model that cannot run on the declared shape.

Devices
-------
``device="cpu"`` (default) uses ``CPUExecutionProvider``; ``device="cuda"`` / ``"cuda:N"`` uses
``CUDAExecutionProvider`` (device N), which needs the ``onnxruntime-gpu`` build; ``providers=`` gives
ONNX Runtime's provider list directly instead. If the first requested provider is not the one the
session runs with (ONNX Runtime otherwise falls back to the CPU silently), the connector refuses
with :class:`~blackbox_rs.errors.ConnectorError`. The provider is not part of the fingerprint (same
file, same model), but kernels of different providers may differ in the last bits of a logit, so
scores can differ slightly and an argmax tie or near-tie can break the other way: answers cached with
one provider are served, as computed there, for another (use a cache directory per device type if
that matters).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blackbox_rs.errors import (
    ConnectorError,
    InvalidParameterError,
    MissingDependencyError,
    UnsafeModelFileError,
)

from .base import BaseConnector, ConnectorInfo, Prediction

__all__ = ["ONNXConnector"]

_INSTALL = "pip install onnxruntime onnx (or pip install 'blackbox-rs[onnx]'; onnxruntime-gpu for CUDA)"


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MissingDependencyError(f"the ONNX connector needs the {name!r} package: {_INSTALL}") from None


def _external_tensors(model: Any) -> list[str]:
    """Names of every tensor in ``model`` (initializers, sparse initializers, attribute tensors, in
    every graph, subgraph and function) whose data lives in an external file."""
    onnx = _import("onnx")
    external = onnx.TensorProto.EXTERNAL
    found: list[str] = []

    def tensor(t: Any) -> None:
        if t.data_location == external or len(t.external_data):
            found.append(t.name or "(unnamed)")

    def sparse(s: Any) -> None:
        tensor(s.values)
        tensor(s.indices)

    def nodes(node_list: Any) -> None:
        for node in node_list:
            for a in node.attribute:
                if a.HasField("t"):
                    tensor(a.t)
                for t in a.tensors:
                    tensor(t)
                if a.HasField("sparse_tensor"):
                    sparse(a.sparse_tensor)
                for s in a.sparse_tensors:
                    sparse(s)
                if a.HasField("g"):
                    graph(a.g)
                for g in a.graphs:
                    graph(g)

    def graph(g: Any) -> None:
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            sparse(s)
        nodes(g.node)

    graph(model.graph)
    for f in model.functions:
        nodes(f.node)
    return found


def _providers(device: str | torch.device | None, providers: Sequence[Any] | None) -> list[Any]:
    """ONNX Runtime's provider list for ``device`` or ``providers`` (one of them, not both)."""
    if providers is not None:
        if device is not None:
            raise InvalidParameterError("give device= or providers=, not both")
        out = [p if isinstance(p, str) else (str(p[0]), dict(p[1])) for p in providers]
        if not out:
            raise InvalidParameterError("providers must name at least one ONNX Runtime execution provider")
        return out
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError, ValueError):
        raise InvalidParameterError(f"device={device!r} is not a device (use 'cpu', 'cuda' or 'cuda:N')") from None
    if dev.type == "cpu":
        return ["CPUExecutionProvider"]
    if dev.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
    raise InvalidParameterError(f"device={str(dev)!r}: the ONNX connector runs on 'cpu' or 'cuda[:N]' "
                                f"(or give ONNX Runtime providers= directly)")


def _dim(d: object) -> int | None:
    """A static dimension as an int, a named/unset (dynamic) one as ``None``."""
    return d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None


def _show(dims: Sequence[object]) -> str:
    return "[" + ", ".join(str(d) if _dim(d) is not None else (str(d) if d else "?") for d in dims) + "]"


class ONNXConnector(BaseConnector):
    """An ONNX model file behind the connector protocol, run by ONNX Runtime.

    Args:
        path: the ``.onnx`` file (every tensor inside it: no external data).
        input_shape: ``(C, H, W)`` the model expects.
        class_names: class names; or ``num_classes`` to name them ``"0" .. "K-1"``. If neither is
            given, the width of the model's output is used; if one is given, it must equal it.
        device: ``"cpu"`` (default) or ``"cuda"`` / ``"cuda:N"`` (needs ``onnxruntime-gpu``).
        providers: ONNX Runtime execution providers, instead of ``device`` (e.g.
            ``["CPUExecutionProvider"]``, or ``[("CUDAExecutionProvider", {"device_id": 1})]``).
        label_only: hide scores (simulates a label-only API; strategies that need scores refuse it).
        max_batch: most images per run (capped by a fixed batch dimension, see the module docstring).
        cost_per_query: price of one image query, for the budget.
        threads: ONNX Runtime intra-op threads (``None``: its default).

    Raises :class:`ConnectorError` for a missing file or one that is not a loadable ONNX model (not
    protobuf, truncated, an unknown operator), :class:`UnsafeModelFileError` for external data,
    :class:`InvalidParameterError` for an input or output that does not fit the declared shape or
    classes, :class:`MissingDependencyError` when onnxruntime or onnx is not installed. The model is not
    differentiable (``info.differentiable`` is False): fit with 'surrogate' or 'zeroth_order'.
    """

    #: the model runs in this process: cached by the payload's generating identity (see cache.py)
    cache_by_origin = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        input_shape: Sequence[int],
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        device: str | torch.device | None = None,
        providers: Sequence[Any] | None = None,
        label_only: bool = False,
        max_batch: int = 64,
        cost_per_query: float = 0.0,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 3:
            raise InvalidParameterError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        if class_names is not None and num_classes is not None and num_classes != len(class_names):
            raise InvalidParameterError(f"num_classes={num_classes} disagrees with {len(class_names)} class_names")
        if int(max_batch) < 1:
            raise InvalidParameterError(f"max_batch must be at least 1, got {max_batch}")
        wanted = _providers(device, providers)
        ort = _import("onnxruntime")
        onnx = _import("onnx")
        if not self.path.is_file():
            raise ConnectorError(f"model file not found: {self.path}")
        data = self.path.read_bytes()  # one read: the bytes hashed are the bytes that run
        digest = hashlib.sha256(data).hexdigest()
        try:
            proto = onnx.load_model_from_string(data)  # parses only: external data is never read here
        except Exception as exc:  # protobuf raises DecodeError and others for a file that is not ONNX
            raise ConnectorError(f"cannot load ONNX model file {self.path}: not an ONNX model "
                                 f"({type(exc).__name__}: {exc})") from None
        if not proto.HasField("graph"):
            raise ConnectorError(f"cannot load ONNX model file {self.path}: it holds no graph (not an ONNX model)")
        external = _external_tensors(proto)
        del proto
        if external:
            raise UnsafeModelFileError(
                f"ONNX model file {self.path} keeps tensors in external data files ({', '.join(external[:3])}"
                f"{', ...' if len(external) > 3 else ''}): they are read from wherever the model points and are "
                f"not in the fingerprint; save the model with every tensor inside the file"
            )
        first = wanted[0] if isinstance(wanted[0], str) else wanted[0][0]
        if first not in ort.get_available_providers():
            raise ConnectorError(
                f"ONNX Runtime has no {first} here (available: {', '.join(ort.get_available_providers())})"
                + ("; install onnxruntime-gpu for CUDA" if first == "CUDAExecutionProvider" else "")
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: the library never writes warnings to stderr
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self._session = ort.InferenceSession(data, sess_options=options, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ConnectorError(
                f"cannot load ONNX model file {self.path}: {type(exc).__name__}: {exc}"
            ) from None
        used = self._session.get_providers()
        if not used or used[0] != first:
            raise ConnectorError(f"ONNX Runtime runs {self.path.name} with {used}, not the requested {first}")
        self.providers = list(used)
        self._batch = self._check_input(shape)
        limit = int(max_batch) if self._batch is None else min(int(max_batch), self._batch)
        width = self._probe(shape, limit)
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
            max_batch=limit,
            cost_per_query=cost_per_query,
            # label_only changes every Prediction (no scores): cached answers of one never serve the other
            fingerprint=f"onnx:sha256:{digest}" + ("|label_only" if self.label_only else ""),
            differentiable=False,
        )

    def _check_input(self, shape: tuple[int, int, int]) -> int | None:
        """Check the graph's one input against ``shape``; return its fixed batch size, or ``None``
        when the batch dimension is dynamic."""
        inputs = self._session.get_inputs()
        name = self.path.name
        if len(inputs) != 1:
            raise InvalidParameterError(
                f"model {name} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                f"a classifier here takes exactly one image batch"
            )
        x = inputs[0]
        self._input_name = x.name
        if x.type != "tensor(float)":
            raise InvalidParameterError(f"model {name} input {x.name!r} is {x.type}, not tensor(float) (float32)")
        dims = list(x.shape) if x.shape is not None else []
        want = f"[N, {shape[0]}, {shape[1]}, {shape[2]}]"
        if len(dims) != 4 or any(_dim(d) is not None and d != s for d, s in zip(dims[1:], shape, strict=False)):
            raise InvalidParameterError(
                f"model {name} takes input {x.name!r} of shape {_show(dims)}, not the declared "
                f"input_shape={shape} ({want})"
            )
        return _dim(dims[0])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise ConnectorError(f"ONNXConnector for {self.path.name} is closed")
        try:
            out = self._session.run(None, {self._input_name: batch})
        except Exception as exc:  # onnxruntime raises its own types for a failing run
            raise ConnectorError(
                f"model {self.path.name} failed on a batch of shape {tuple(batch.shape)}: "
                f"{type(exc).__name__}: {str(exc).strip()}"
            ) from None
        logits = out[0] if out else None
        if not isinstance(logits, np.ndarray) or logits.ndim != 2 or logits.shape[0] != batch.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, np.ndarray) else type(logits).__name__
            raise ConnectorError(
                f"model {self.path.name} must return logits of shape (N, K) for N={batch.shape[0]} as its "
                f"first output, got {got}"
            )
        if not np.issubdtype(logits.dtype, np.floating):
            raise ConnectorError(f"model {self.path.name} returns {logits.dtype} outputs, not float logits")
        return logits

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits for ``batch`` (padded with blank images to a fixed batch size, then cut)."""
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        n = x.shape[0]
        if self._batch is not None and n < self._batch:
            x = np.concatenate([x, np.zeros((self._batch - n, *x.shape[1:]), dtype=np.float32)])
        return torch.from_numpy(np.ascontiguousarray(self._run(x)[:n], dtype=np.float32))

    def _probe(self, shape: tuple[int, int, int], max_batch: int) -> int:
        """Run a blank batch (1 image, and 2 when the batch dimension allows it); return K. A model
        that cannot run it raises :class:`InvalidParameterError` naming the declared shape."""
        width = 0
        for n in (1, 2) if max_batch >= 2 else (1,):
            try:
                logits = self._logits(torch.zeros((n, *shape)))
            except ConnectorError as exc:
                raise InvalidParameterError(
                    f"model {self.path.name} cannot run on the declared input_shape={shape} "
                    f"(a blank batch of {n}): {exc}"
                ) from None
            width = width or int(logits.shape[1])
        return width

    def _query(self, batch: torch.Tensor) -> Prediction:
        logits = self._logits(batch)
        labels = logits.argmax(dim=1)
        scores = None if self.label_only else torch.softmax(logits, dim=1)
        return Prediction(labels=labels, scores=scores)

    def close(self) -> None:
        """Drop the ONNX Runtime session."""
        self._session = None  # type: ignore[assignment]
