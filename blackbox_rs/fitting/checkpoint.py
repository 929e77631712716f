"""Fit checkpoints: JSON metadata + safetensors tensors, written atomically (one helper,
:mod:`blackbox_rs.paths`); never pickle.

A checkpoint holds the module weights, the optimizer state, the step, the RNG state, the strategy's
own state (surrogate weights, distillation buffer, momentum), the best module so far and the early
stop's state (the patience counter, the reference round's per-image scores, the step whose scoring
round was run, how the fit stopped and the queries it was charged), so a resumed fit continues exactly
where the interrupted one stopped and decides to stop for no gain where it would have.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from blackbox_rs._version import __version__
from blackbox_rs.errors import CacheError
from blackbox_rs.paths import atomic_path, atomic_write

__all__ = ["load_checkpoint", "optimizer_from_tensors", "optimizer_to_tensors", "save_checkpoint"]

_META = "fit_state.json"
_TENSORS = "fit_state.safetensors"


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer state into tensors and JSON-able metadata."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().clone().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any]) -> None:
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        pid, k = name[len(prefix) + 1:].split(".", 1)
        state.setdefault(int(pid), {})[k] = t
    for pid, sc in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(directory: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``fit_state.json`` and ``fit_state.safetensors`` durably and atomically
    (:func:`blackbox_rs.paths.atomic_path`): the JSON is written to its temporary file first, then the
    tensors are written and moved into place, and the JSON, which names the complete state, is moved
    into place last. A failure while writing either file leaves the previous checkpoint as it was
    (only a failing last move can leave the new tensors beside the old JSON) and raises
    :class:`CacheError` naming the file."""
    from safetensors.torch import save_file

    d = Path(directory)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(d / _META, CacheError) as tmp_meta:
        tmp_meta.write_text(json.dumps({"sdk_version": __version__, **meta}, indent=1))
        atomic_write(d / _TENSORS, lambda p: save_file(cpu, str(p)), CacheError)  # tensors first


def load_checkpoint(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The checkpoint in ``directory``, or ``None`` if there is none. Corruption raises CacheError."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / _META).exists():
        return None
    try:
        meta = json.loads((d / _META).read_text())
        tensors = load_file(str(d / _TENSORS))
    except (OSError, ValueError) as exc:
        raise CacheError(f"fit checkpoint in {d} is unreadable: {exc}") from exc
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise CacheError(f"fit checkpoint in {d} is corrupted: {exc}") from exc
    return tensors, meta
