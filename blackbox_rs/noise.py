"""Reproducible, counter-based Gaussian noise.

Sample ``i`` of input key ``k`` in stream ``s`` under seed ``seed`` is a pure function of
``(seed, k, s, i, shape)``: it is the same whatever the batch size, the order of requests or the point
at which a run resumed. This is what lets a resumed run send byte-identical payloads and hit the
query cache.

How: samples are grouped in fixed chunks (the chunk size depends only on the image shape). Chunk
``c`` is drawn from a fresh ``torch.Generator`` seeded with a 63-bit BLAKE2b hash of
``(seed, key, stream, c)``. Memory is one batch plus one chunk, never n copies.

Noise is float32 and drawn on the device the model runs on (``device=``; default the CPU), so no
per-sample host tensor crosses the bus when the model is on an accelerator. CPU and CUDA generators
give different values for the same seed, so the device *type* is part of the noise identity
(:func:`blackbox_rs.binding.noise_identity`): it is recorded in every certificate and journal, a
resume on another device type (or, for CUDA, another GPU model: :func:`device_tag`) is refused, and
cache keys differ. On one device type the values are
still a pure function of ``(seed, key, stream, i, shape)``: the same for any batch size or resume
point. CPU noise is bit-identical to earlier releases (same generator, same chunk seeds).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from blackbox_rs.errors import InvalidParameterError

__all__ = ["NoiseStream", "chunk_size_for", "device_tag", "input_key"]

_CHUNK_ELEMENTS = 1 << 20  # ~4 MiB of float32 per chunk
_MAX_CHUNK = 256


def device_tag(device: str | torch.device | None) -> str:
    """What of a device determines the noise its generator draws: ``"cpu"``; for CUDA the device type
    with its multiprocessor count and threads per multiprocessor (``"cuda.sm132x2048"``), because
    CUDA's random kernels cap their grid by those and the element-to-random-number mapping of a large
    chunk follows the grid (two GPU models, or MIG slices, can draw different values for one seed);
    other device types by their type."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type != "cuda":
        return dev.type
    props = torch.cuda.get_device_properties(dev)
    threads = getattr(props, "max_threads_per_multi_processor", None) or props.name
    return f"cuda.sm{props.multi_processor_count}x{threads}"


def chunk_size_for(shape: Sequence[int]) -> int:
    """Samples per chunk for images of ``shape`` (a function of the shape only)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    return max(1, min(_MAX_CHUNK, _CHUNK_ELEMENTS // max(numel, 1)))


def input_key(x: torch.Tensor) -> str:
    """Content key of an input image: SHA-256 of its shape and float32 bytes (32 hex chars).

    Used as the default noise key, so the noise for an input does not depend on its position in a
    dataset, and identical inputs get identical noise.
    """
    t = x.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def _chunk_seed(seed: int, key: str, stream: str, chunk: int, device_tag: str = "cpu") -> int:
    where = "" if device_tag == "cpu" else f"|{device_tag}"  # CPU: the seeds of every earlier release
    msg = f"blackbox-rs/noise/v1|{int(seed)}|{key}|{stream}|{int(chunk)}{where}".encode()
    return int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") & ((1 << 63) - 1)


class NoiseStream:
    """Standard-normal noise samples for one (seed, key, stream), addressable by sample index.

    ``samples(start, count)`` returns ``count x *shape`` float32 noise with standard deviation
    ``sigma`` on ``device``; the values for a given index never depend on how the range was split
    into calls. ``device`` (default CPU) selects the generator: values differ across device types.
    """

    def __init__(self, *, seed: int, key: str, stream: str, shape: Sequence[int], sigma: float = 1.0,
                 device: str | torch.device | None = None) -> None:
        try:
            bad_seed = isinstance(seed, bool) or int(seed) != seed or seed < 0
        except (TypeError, ValueError, OverflowError):  # "abc", nan, inf, None
            bad_seed = True
        if bad_seed:
            raise InvalidParameterError(f"seed must be a non-negative integer, got {seed!r}")
        try:
            sigma_ok = math.isfinite(float(sigma)) and float(sigma) >= 0.0
        except (TypeError, ValueError):
            sigma_ok = False
        if not sigma_ok:
            raise InvalidParameterError(f"sigma must be a finite number >= 0, got {sigma!r}")
        self.seed = int(seed)
        self.key = str(key)
        self.stream = str(stream)
        self.shape = tuple(int(d) for d in shape)
        self.sigma = float(sigma)
        self.chunk = chunk_size_for(self.shape)
        self._cached_index = -1
        self._cached: torch.Tensor | None = None  # one reusable chunk buffer, for partial chunks
        try:
            self.device = torch.device("cpu" if device is None else device)
            self._gen = torch.Generator(device=self.device)
            self.device_tag = device_tag(self.device)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise InvalidParameterError(f"cannot draw noise on device {device!r}: {exc}") from None

    def _fill(self, c: int, dest: torch.Tensor) -> None:
        """Draw chunk ``c`` into ``dest`` (a contiguous ``chunk x *shape`` float32 tensor).

        ``normal_`` on a contiguous tensor is exactly what ``torch.randn`` does, so drawing in place
        gives the same values as drawing into a fresh tensor, without allocating or copying one."""
        self._gen.manual_seed(_chunk_seed(self.seed, self.key, self.stream, c, self.device_tag))
        dest.normal_(0.0, 1.0, generator=self._gen)

    def _chunk(self, c: int) -> torch.Tensor:
        if c != self._cached_index:
            if self._cached is None:
                self._cached = torch.empty((self.chunk, *self.shape), dtype=torch.float32, device=self.device)
            self._cached_index = -1  # stays invalid if drawing fails
            self._fill(c, self._cached)
            self._cached_index = c
        assert self._cached is not None
        return self._cached

    def samples(self, start: int, count: int) -> torch.Tensor:
        """Noise for sample indices ``start .. start + count - 1`` (scaled by ``sigma``).

        Allocates the ``count`` samples returned; whole chunks are drawn straight into them, partial
        chunks go through one reused chunk buffer. The returned tensor is the caller's to modify."""
        if start < 0 or count < 0:
            raise InvalidParameterError("start and count must be non-negative")
        out = torch.empty((count, *self.shape), dtype=torch.float32, device=self.device)
        pos, end = start, start + count
        while pos < end:
            c, off = divmod(pos, self.chunk)
            take = min(self.chunk - off, end - pos)
            dest = out[pos - start : pos - start + take]
            if take == self.chunk and c != self._cached_index:
                self._fill(c, dest)  # a whole chunk: no buffer, no copy
            else:
                dest.copy_(self._chunk(c)[off : off + take])
            pos += take
        if self.sigma != 1.0:
            out.mul_(self.sigma)
        return out
