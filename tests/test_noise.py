"""Counter-based noise: sample i of (seed, key, stream) never depends on how it was requested."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from helpers.devices import DEVICES
from scipy import stats as sps

from blackbox_rs import noise as noise_mod
from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.noise import NoiseStream, chunk_size_for, input_key

SHAPE = (3, 8, 8)  # chunk of 256 samples


def _stream(seed=0, key="k", stream="estimation", shape=SHAPE, sigma=1.0, device=None):
    return NoiseStream(seed=seed, key=key, stream=stream, shape=shape, sigma=sigma, device=device)


def _in_batches(ns: NoiseStream, start: int, total: int, bs: int) -> torch.Tensor:
    parts, pos = [], start
    while pos < start + total:
        m = min(bs, start + total - pos)
        parts.append(ns.samples(pos, m))
        pos += m
    return torch.cat(parts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [SHAPE, (1, 28, 28), (3, 300, 300)])
def test_same_samples_whatever_the_batch_size(shape, device):
    total = 600 if shape != (3, 300, 300) else 30  # (3, 300, 300): 3 samples per chunk
    ref = _stream(shape=shape, device=device).samples(0, total)
    assert ref.shape == (total, *shape) and ref.dtype == torch.float32 and ref.device.type == device
    for bs in [1, 7, 1000]:
        got = _in_batches(_stream(shape=shape, device=device), 0, total, bs)
        assert torch.equal(got, ref), bs


@pytest.mark.parametrize("device", DEVICES)
def test_random_split_points_and_resume_offsets(device):
    def _stream(**kw):  # noqa: F811 - this test's streams on the device under test
        return NoiseStream(seed=0, key="k", stream="estimation", shape=SHAPE, device=device, **kw)

    total = 1500
    ref = _stream().samples(0, total)
    rng = np.random.default_rng(0)
    for _ in range(10):
        cuts = np.sort(rng.choice(np.arange(1, total), size=int(rng.integers(1, 30)), replace=False))
        edges = [0, *cuts.tolist(), total]
        ns = _stream()
        got = torch.cat([ns.samples(a, b - a) for a, b in zip(edges[:-1], edges[1:], strict=True)])
        assert torch.equal(got, ref)
    # resume: a fresh stream (a new process) starting anywhere sees the same tail
    for off in [1, 255, 256, 257, 700, 1499]:
        assert torch.equal(_stream().samples(off, total - off), ref[off:])
    # out-of-order and repeated requests
    ns = _stream()
    assert torch.equal(ns.samples(900, 10), ref[900:910])
    assert torch.equal(ns.samples(3, 10), ref[3:13])
    assert torch.equal(ns.samples(900, 10), ref[900:910])


def test_returned_tensors_are_independent_of_the_internal_cache():
    # callers add x in place: that must not corrupt the next request
    ns = _stream()
    a = ns.samples(0, 10)
    a.add_(100.0)
    assert torch.equal(ns.samples(0, 10), _stream().samples(0, 10))


def test_sigma_scales_the_same_samples():
    base = _stream().samples(0, 300)
    assert torch.equal(_stream(sigma=0.25).samples(0, 300), base * 0.25)  # power of two: exact
    assert torch.allclose(_stream(sigma=0.12).samples(0, 300), base * 0.12, rtol=1e-6, atol=0)
    assert torch.count_nonzero(_stream(sigma=0.0).samples(0, 5)) == 0


def test_seeds_keys_streams_differ():
    ref = _stream().samples(0, 300)
    others = [
        _stream(seed=1), _stream(key="k2"), _stream(stream="selection"), _stream(seed=2**40, key="k"),
    ]
    for ns in others:
        other = ns.samples(0, 300)
        assert not torch.equal(other, ref)
        # not merely different: uncorrelated
        r = np.corrcoef(ref.flatten().numpy(), other.flatten().numpy())[0, 1]
        assert abs(r) < 0.02
    # nearby chunks of one stream are uncorrelated too
    r = np.corrcoef(ref[:256].flatten().numpy(), _stream().samples(256, 256).flatten().numpy())[0, 1]
    assert abs(r) < 0.02


def test_distribution_is_gaussian_with_std_sigma():
    sigma = 0.5
    x = _stream(sigma=sigma, shape=(1, 16, 16)).samples(0, 2000).flatten().double().numpy()  # 512k values
    assert abs(x.mean()) < 5 * sigma / np.sqrt(x.size)
    assert x.std() == pytest.approx(sigma, rel=0.005)
    assert sps.kstest(x[:100_000], "norm", args=(0.0, sigma)).pvalue > 1e-3
    # per-pixel: every coordinate has the right marginal (no constant offsets per position)
    per_pixel = _stream(sigma=1.0, shape=(1, 2, 2)).samples(0, 20_000).reshape(20_000, 4).double().numpy()
    for j in range(4):
        assert sps.kstest(per_pixel[:, j], "norm").pvalue > 1e-3


def test_independent_of_torch_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = _stream(shape=(3, 32, 32)).samples(0, 300)
        torch.set_num_threads(max(2, before))
        b = _stream(shape=(3, 32, 32)).samples(0, 300)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(a, b)


def test_independent_of_global_rng_state():
    torch.manual_seed(1)
    a = _stream().samples(0, 50)
    torch.manual_seed(2)
    torch.randn(1000)
    b = _stream().samples(0, 50)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# memory: one output of `count` samples plus one chunk, never n copies
def test_chunk_size_depends_on_shape_only_and_is_bounded():
    assert chunk_size_for((3, 32, 32)) == 256
    assert chunk_size_for((3, 224, 224)) == 6
    assert chunk_size_for((3, 1024, 1024)) == 1  # bigger than a chunk: one sample per chunk
    for shape in [(1, 1, 1), (1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 224, 224), (3, 512, 512)]:
        c = chunk_size_for(shape)
        numel = int(np.prod(shape))
        assert 1 <= c <= 256
        assert c * numel <= max(noise_mod._CHUNK_ELEMENTS, numel)


@pytest.mark.parametrize("bs", [64, 256, 1000])
def test_samples_allocates_count_plus_one_chunk(monkeypatch, bs):
    shape = (3, 32, 32)
    allocs: list[tuple[int, ...]] = []
    draws: list[tuple[int, tuple[int, ...]]] = []
    real_empty, real_fill = torch.empty, NoiseStream._fill

    def recording_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        allocs.append(tuple(out.shape))
        return out

    def recording_fill(self, c, dest):
        draws.append((c, tuple(dest.shape)))
        assert dest.is_contiguous()
        return real_fill(self, c, dest)

    monkeypatch.setattr(noise_mod.torch, "empty", recording_empty)
    monkeypatch.setattr(NoiseStream, "_fill", recording_fill)
    ns = _stream(shape=shape)
    chunk = ns.chunk
    total = 10_000
    for start in range(0, total, bs):
        out = ns.samples(start, min(bs, total - start))
        assert out.shape == (min(bs, total - start), *shape)
    # every draw is exactly one chunk, and read in order each chunk is drawn once
    assert {d for _, d in draws} == {(chunk, *shape)}
    assert [c for c, _ in draws] == list(range(-(-total // chunk)))
    # allocations: the outputs (count samples each) plus at most one reused chunk buffer, never n samples
    expected = Counter((min(bs, total - start), *shape) for start in range(0, total, bs))
    extra = Counter(allocs) - expected
    assert Counter(allocs) - extra == expected
    assert sum(extra.values()) <= 1 and set(extra) <= {(chunk, *shape)}
    # one sample far into a stream draws one chunk, not the samples before it
    draws.clear()
    one = _stream(shape=shape).samples(99_999, 1)
    assert one.shape == (1, *shape) and draws == [(99_999 // chunk, (chunk, *shape))]


def test_zero_count_and_invalid_arguments():
    ns = _stream()
    assert ns.samples(10, 0).shape == (0, *SHAPE)
    with pytest.raises(InvalidParameterError):
        ns.samples(-1, 3)
    with pytest.raises(InvalidParameterError):
        ns.samples(0, -3)
    for bad_seed in [-1, 1.5, True, "abc", float("nan"), None]:
        with pytest.raises(InvalidParameterError, match="seed"):
            _stream(seed=bad_seed)
    for bad_sigma in [-0.1, float("nan"), float("inf")]:
        with pytest.raises(InvalidParameterError, match="sigma"):
            _stream(sigma=bad_sigma)


def test_input_key_is_a_content_hash():
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    k = input_key(x)
    assert len(k) == 32 and int(k, 16) >= 0
    assert input_key(x.clone()) == k
    assert input_key(x.double()) == k  # same float32 content
    y = x.clone()
    y[0, 0, 0] += 1e-3
    assert input_key(y) != k
    assert input_key(x.reshape(3, 4, 16)) != k  # shape is part of the key
