"""What a certificate is bound to: the identity of the transform, of the noise, and of the seed.

Every persisted certificate records everything that determined it (model fingerprint, transform
digest, input key, label and its reference, noise mode, certification settings, seed). A resumed run
compares each of them with what it is about to do (:func:`differences`) and refuses a mismatch with a
:class:`~blackbox_rs.errors.ResumeMismatchError` that names every differing field; it never mixes.

* :func:`transform_identity`: ``"none"`` (the bare model), an :class:`~blackbox_rs.modules.base.InputModule`'s
  :meth:`digest`, a digest of any other ``nn.Module``'s class and state, or the ``identity``
  attribute of a callable that declares one. A plain callable has no identity: it can be certified,
  but not bound to a resume file (``require=True`` raises).
* :func:`fresh_seed`: a 63-bit seed from the OS's entropy source. The default noise seed of every
  certification call, so nobody can compute the noise draws for an input in advance (the guarantee
  assumes noise independent of the input); a journal records it and a resumed run reads it back.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import torch

from blackbox_rs.errors import InvalidParameterError

__all__ = ["NOISE_GAUSSIAN", "NOISE_LATTICE", "differences", "fresh_seed", "noise_identity",
           "hash_state", "identified", "transform_identity"]

NOISE_GAUSSIAN = "gaussian-v1"
"""Counter-based Gaussian noise of :mod:`blackbox_rs.noise` (float32, drawn on the CPU)."""
NOISE_LATTICE = "lattice-v1"
"""Exact discrete Gaussian noise on the 1/255 lattice (:mod:`blackbox_rs.noise_lattice`)."""


def noise_identity(lattice: bool = False, device_type: str = "cpu") -> str:
    """Noise mode and the device type its generator runs on (generators differ across device types)."""
    return f"{NOISE_LATTICE if lattice else NOISE_GAUSSIAN}:{device_type}"


def fresh_seed() -> int:
    """A non-negative 63-bit seed from the OS's cryptographic entropy source."""
    return secrets.randbits(63)


def transform_identity(transform: Callable[..., Any] | None, *, require: bool = False) -> str:
    """The identity string of a transform (see the module docstring).

    Raises :class:`InvalidParameterError` for a callable without identity when ``require`` is set
    (a resume file could not tell it from another callable)."""
    if transform is None:
        return "none"
    ident = getattr(transform, "identity", None)
    if isinstance(ident, str) and ident:
        return ident
    digest = getattr(transform, "digest", None)
    if callable(digest):
        value = digest()
        if isinstance(value, str) and value:
            return value
    if isinstance(transform, torch.nn.Module):
        return module_state_digest(transform)
    if require:
        raise InvalidParameterError(
            f"the transform {getattr(transform, '__qualname__', type(transform).__name__)!r} has no identity, so "
            "its certificates cannot be bound to a resume file: pass an InputModule or nn.Module, or give the "
            "callable an `identity` string attribute that changes whenever its function does"
        )
    return f"unidentified:{getattr(transform, '__qualname__', type(transform).__name__)}"


class _Identified:
    """A transform with its identity computed once (a dataset run hashes it once, not per input)."""

    def __init__(self, fn: Callable[..., Any], identity: str) -> None:
        self.fn, self.identity = fn, identity

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def identified(transform: Callable[..., Any] | None, *, require: bool = False) -> Callable[..., Any] | None:
    """``transform`` carrying its :func:`transform_identity` as an ``identity`` attribute (computed
    once here); ``None`` stays ``None``. ``require`` as for :func:`transform_identity`."""
    if transform is None:
        return None
    ident = transform_identity(transform, require=require)
    if getattr(transform, "identity", None) == ident:
        return transform
    return _Identified(transform, ident)


@torch.no_grad()
def module_state_digest(module: torch.nn.Module) -> str:
    """``"nn:<class>:sha256:<hex>"`` over what determines an ``nn.Module``'s function as far as it can
    be read: for the module and every submodule, its class (name and source code when available),
    its plain settings (numbers, strings, tuples: e.g. a blur's sigma, a shift's offset) and unregistered
    tensor attributes; and every state-dict tensor. Code outside the classes (globals a forward reads)
    cannot be seen: give such a transform an ``identity`` string."""
    h = hashlib.sha256(b"blackbox-rs/nn-digest/v2\0")
    for name, sub in module.named_modules():
        cls = type(sub)
        h.update(f"\0module {name}|{cls.__module__}.{cls.__qualname__}\0".encode())
        h.update(_class_source(cls).encode())
        for key, value in sorted(vars(sub).items()):
            if key.startswith("_") or key == "training":
                continue
            if isinstance(value, torch.Tensor):
                hash_state(h, {f"attr:{key}": value})
            else:
                h.update(f"\0{key}={_plain(value)}".encode())
    hash_state(h, module.state_dict())
    return f"nn:{type(module).__qualname__}:sha256:{h.hexdigest()}"


def _class_source(cls: type) -> str:
    import inspect

    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def _plain(value: Any) -> str:
    """A stable text of a setting: the value of plain data, the type name of anything else (whose
    repr may hold a memory address)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_plain(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_plain(k)}:{_plain(v)}" for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))) + "}"
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


@torch.no_grad()
def hash_state(h: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Feed every tensor of a state dict (name, dtype, shape, raw bytes; in name order) into ``h``."""
    for name, t in sorted(state.items()):
        v = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"\0{name}|{v.dtype}|{tuple(t.shape)}\0".encode())
        if v.numel():
            h.update(v.view(torch.uint8).numpy().tobytes())


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, now)}`` for every field of ``now`` whose saved value differs (missing: None)."""
    return {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
