"""Reading torch.export (``.pt2``) archives without unpickling anything: the safe loader behind
:class:`~blackbox_rs.connectors.torchscript.TorchScriptConnector` (see that module's docstring, "What
loading a file can execute", for exactly what is refused and why).

:func:`inspect_exported_program` reads only the zip and its JSON and raises
:class:`~blackbox_rs.errors.UnsafeModelFileError` naming the file and the reason for anything that
loading could execute; :func:`load_exported_program` then rebuilds the tensors from raw bytes and
deserialises the program with no ``torch.load`` path taken.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from blackbox_rs.errors import ConnectorError, UnsafeModelFileError
from blackbox_rs.paths import file_sha256

__all__ = ["file_sha256", "inspect_exported_program", "load_exported_program"]


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
