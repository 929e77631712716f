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

import hashlib
import json
import os
import re
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from blackbox_rs.errors import ConnectorError, InvalidParameterError, UnsafeModelFileError

from .base import BaseConnector, ConnectorInfo, Prediction

__all__ = ["TorchScriptConnector", "file_sha256", "inspect_exported_program", "load_exported_program"]

_EXPORT_SUFFIXES = {".pt2"}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- torch.export archives without pickle ----------------------------------------------------------
# The on-disk layout written by torch.export.save (torch/export/pt2_archive/_package.py): a zip whose
# entries sit under one root folder; the program is models/<name>.json, weights and constants are raw
# bytes described by JSON payload configs.
_MODEL = "model"
_PROGRAM = f"models/{_MODEL}.json"
_WEIGHTS_CONFIG = f"data/weights/{_MODEL}_weights_config.json"
_CONSTANTS_CONFIG = f"data/constants/{_MODEL}_constants_config.json"
_SAMPLE_INPUTS = "data/sample_inputs/"  # always a pickle: never read
_METADATA = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
             "version"}
_NATIVE_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")
_CODE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".so", ".dll", ".dylib", ".py", ".pyc", ".cpp", ".cubin")
_PICKLE_HEADER = re.compile(rb"\x80[\x02-\x05]")

# symbolic shape expressions: torch parses them with sympy.sympify (eval), so only this grammar passes
_EXPR_TOKEN = re.compile(r"\s+|'[A-Za-z_][A-Za-z0-9_]*'|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|[A-Za-z_][A-Za-z0-9_]*"
                         r"|\*\*|//|==|!=|<=|>=|[-+*/%(),=<>&|~]")
_EXPR_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_EXPR_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Max", "Min", "Abs", "Mod", "floor", "ceiling", "sqrt",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "oo", "zoo", "nan", "True",
    "False", "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero",
    "nonzero", "even", "odd", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv",
    "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
})
# graph node targets that are not registered operators but pure functions of their arguments
_PURE_TARGET = re.compile(
    r"torch\.ops\.[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+"
    r"|_operator\.(getitem|add|sub|mul|truediv|floordiv|mod|pow|neg|pos|abs|eq|ne|lt|le|gt|ge|and_|or_|xor|"
    r"not_|invert|lshift|rshift|matmul)"
    r"|math\.[a-z][a-z0-9_]*"
    r"|torch\.(sym_[a-z_]+|_sym_sqrt)"
)


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


def _refuse(path: Path, reason: str) -> UnsafeModelFileError:
    return UnsafeModelFileError(
        f"refusing to load {path}: {reason}; loading it could run code from the file, so nothing in it was "
        f"loaded (re-export the model with plain tensor weights: torch.export.save of an nn.Module)",
        path=str(path), reason=reason,
    )


_EXPR_MAX_CHARS = 4096
_EXPR_MAX_EXPONENT = 64


def _check_expr(path: Path, expr: object) -> None:
    """Refuse a symbolic expression outside the grammar, longer than ``_EXPR_MAX_CHARS``, or with a
    power whose exponent is not a small literal (``9**9**9**9`` would hang sympy: no code, but no end)."""
    text = str(expr)
    if len(text) > _EXPR_MAX_CHARS:
        raise _refuse(path, f"symbolic shape expression of {len(text):,} characters")
    pos = 0
    prev = ""
    exponent = False  # the last token was the exponent of a power
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if m is None:
            raise _refuse(path, f"symbolic shape expression {text[:80]!r} has the character {text[pos]!r}")
        tok = m.group(0)
        if (tok[0].isalpha() or tok[0] == "_") and tok not in _EXPR_NAMES and not _EXPR_SYMBOL.fullmatch(tok):
            raise _refuse(path, f"symbolic shape expression {text[:80]!r} names {tok!r}")
        if not tok.isspace():
            if prev == "**" and not (tok[0].isdigit() and float(tok) <= _EXPR_MAX_EXPONENT):
                raise _refuse(path, f"symbolic shape expression {text[:80]!r} raises to {tok!r}")
            if tok == "**" and exponent:  # a power tower: a**b**c
                raise _refuse(path, f"symbolic shape expression {text[:80]!r} stacks powers")
            exponent = prev == "**"
            prev = tok
        pos = m.end()


def _check_program(path: Path, node: Any) -> None:
    """Every symbolic expression and every graph node target, anywhere in the JSON program."""
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            for key, value in cur.items():
                if key == "expr_str":
                    _check_expr(path, value)
                elif key == "nodes" and isinstance(value, list):
                    for n in value:
                        target = n.get("target") if isinstance(n, dict) else None
                        if not isinstance(target, str) or not _PURE_TARGET.fullmatch(target):
                            raise _refuse(path, f"graph node target {str(target)[:80]!r} is not a registered operator")
                stack.append(value)
        elif isinstance(cur, list):
            stack.extend(cur)


def inspect_exported_program(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a ``.pt2`` archive without loading anything from it (pure zip + JSON reads).

    Returns the parsed JSON documents ``{"root", "program", "weights", "constants", "entries"}``.
    Raises :class:`UnsafeModelFileError` (naming the file and the reason) for any pickled payload,
    native code, unsafe symbolic expression or non-operator graph call (see the module docstring),
    and :class:`ConnectorError` for an archive that is not a torch.export archive.
    """
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            roots = {n.split("/", 1)[0] for n in names}
            if len(roots) != 1 or any("/" not in n for n in names):
                raise ConnectorError(f"cannot load model file {p}: not a torch.export archive (no single root folder)")
            root = roots.pop() + "/"
            entries = {n[len(root):]: n for n in names if not n.endswith("/")}

            def read(name: str) -> bytes:
                return zf.read(entries[name])

            def read_json(name: str) -> Any:
                try:
                    return json.loads(read(name).decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as exc:
                    raise ConnectorError(f"cannot load model file {p}: {name} is not JSON ({exc})") from None

            if "archive_format" not in entries:
                if any(n.endswith(".pt") for n in entries):
                    raise _refuse(p, "it is a legacy torch.export archive, whose weights are pickles")
                raise ConnectorError(f"cannot load model file {p}: not a torch.export archive (no archive_format)")
            if read("archive_format").decode("utf-8", "replace").strip() != "pt2":
                raise ConnectorError(f"cannot load model file {p}: archive_format is not 'pt2'")
            for name in entries:
                if name.startswith(_NATIVE_DIRS):
                    raise _refuse(p, f"entry {name!r} is compiled native code (AOTInductor/ExecuTorch)")
            for name in (_PROGRAM, _WEIGHTS_CONFIG, _CONSTANTS_CONFIG):
                if name not in entries:
                    raise ConnectorError(f"cannot load model file {p}: the archive has no {name}")
            weights, constants = read_json(_WEIGHTS_CONFIG), read_json(_CONSTANTS_CONFIG)
            raw: set[str] = set()
            for folder, config in (("data/weights/", weights), ("data/constants/", constants)):
                items = config.get("config") if isinstance(config, dict) else None
                if not isinstance(items, dict):
                    raise ConnectorError(f"cannot load model file {p}: {folder} payload config has no 'config'")
                for fqn, meta in items.items():
                    if not isinstance(meta, dict):
                        raise ConnectorError(f"cannot load model file {p}: payload {fqn!r} is malformed")
                    file = str(meta.get("path_name", ""))
                    if meta.get("use_pickle"):
                        raise _refuse(p, f"{'weight' if folder.startswith('data/w') else 'constant'} {fqn!r} "
                                         f"({folder}{file}) is flagged as pickled (use_pickle)")
                    prefix = "weight_" if folder == "data/weights/" else "tensor_"
                    if not file.startswith(prefix):
                        raise _refuse(p, f"constant {fqn!r} is stored as {file!r}, a pickled object (only raw "
                                         f"tensors are loaded)")
                    if folder + file not in entries:
                        raise ConnectorError(f"cannot load model file {p}: payload {folder}{file} is missing")
                    if not isinstance(meta.get("tensor_meta"), dict):
                        raise ConnectorError(f"cannot load model file {p}: payload {fqn!r} has no tensor_meta")
                    raw.add(folder + file)
            for name in entries:
                if name in raw or name in _METADATA or name.startswith(_SAMPLE_INPUTS):
                    continue
                if name.lower().endswith(_CODE_SUFFIXES):
                    raise _refuse(p, f"entry {name!r} is a pickle or code file")
                with zf.open(entries[name]) as fh:
                    head = fh.read(2)
                if _PICKLE_HEADER.match(head):
                    raise _refuse(p, f"entry {name!r} is a pickle")
            program = read_json(_PROGRAM)
    except zipfile.BadZipFile as exc:
        raise ConnectorError(f"cannot load model file {p}: not a zip archive ({exc})") from None
    except OSError as exc:
        raise ConnectorError(f"cannot load model file {p}: {exc}") from None
    _check_program(p, program)
    return {"root": root, "program": program, "weights": weights, "constants": constants, "entries": entries}


def load_exported_program(path: str | os.PathLike[str]) -> Any:
    """An ``ExportedProgram`` from a ``.pt2`` file, through a route that cannot unpickle.

    :func:`inspect_exported_program` runs first; tensors are then rebuilt from their raw bytes with
    ``torch.frombuffer`` and the JSON program is deserialised with torch's deserializer, given
    ready-made tensor dicts and no sample inputs (so none of torch's ``torch.load`` paths is taken).
    """
    from torch._export.serde import schema
    from torch._export.serde.serialize import (
        ExportedProgramDeserializer,
        _dict_to_dataclass,
        deserialize_scalar_type,
        deserialize_size,
        deserialize_storage_offset,
        deserialize_stride,
    )

    p = Path(path)
    doc = inspect_exported_program(p)
    entries = doc["entries"]
    with zipfile.ZipFile(p) as zf:

        def tensors(folder: str, config: dict[str, Any], params: bool) -> dict[str, torch.Tensor]:
            parsed = _dict_to_dataclass(schema.PayloadConfig, config)
            storages: dict[str, bytes] = {}
            out: dict[str, torch.Tensor] = {}
            for fqn, meta in parsed.config.items():
                if meta.use_pickle or meta.tensor_meta is None:  # inspect_exported_program refused these
                    raise _refuse(p, f"payload {fqn!r} is pickled")
                tm = meta.tensor_meta
                dtype = deserialize_scalar_type(tm.dtype)
                size = deserialize_size(tm.sizes)
                if meta.path_name not in storages:  # read once; tensors sharing a storage share it
                    storages[meta.path_name] = bytearray(zf.read(entries[folder + meta.path_name]))
                data = storages[meta.path_name]
                if len(data) == 0:
                    t = torch.zeros(size, dtype=dtype)
                else:
                    flat = torch.frombuffer(data, dtype=dtype)
                    t = torch.as_strided(flat, size, deserialize_stride(tm.strides),
                                         deserialize_storage_offset(tm.storage_offset))
                out[fqn] = torch.nn.Parameter(t, requires_grad=tm.requires_grad) if (params and meta.is_param) else t
            return out

        state_dict = tensors("data/weights/", doc["weights"], True)
        constants = tensors("data/constants/", doc["constants"], False)
    program = _dict_to_dataclass(schema.ExportedProgram, doc["program"])
    return ExportedProgramDeserializer(None).deserialize(program, state_dict, constants, None)


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
