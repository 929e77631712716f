"""Noise on the model's device, the device type in the noise identity, and origin-keyed caching of
local models (issue 19): a local model's certification never hashes payload bytes on the host, and
its cached answers are never served for another input, seed, sigma, stream, module or noise device."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from helpers.devices import cuda_only
from torch import nn

from blackbox_rs import cache as cache_mod
from blackbox_rs import dataset as dataset_mod
from blackbox_rs import engine as engine_mod
from blackbox_rs.binding import noise_identity
from blackbox_rs.certify_sequential import certify_radius
from blackbox_rs.connectors import ModuleConnector
from blackbox_rs.core import certify, noise_device
from blackbox_rs.dataset import certify_dataset
from blackbox_rs.engine import QueryEngine
from blackbox_rs.errors import InvalidParameterError, ResumeMismatchError
from blackbox_rs.modules import create_module
from blackbox_rs.noise import NoiseStream
from blackbox_rs.smoother import BlackBoxSmoother

SHAPE = (1, 8, 8)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3))


class _OriginModel(ModuleConnector):
    cache_by_origin = True


class _PayloadModel(ModuleConnector):
    cache_by_origin = False


def _x(seed: int = 1) -> torch.Tensor:  # an 8-bit image (lattice noise needs one)
    return torch.round(torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed)) * 255) / 255


@pytest.fixture
def no_payload_hashing(monkeypatch):
    """Fail any attempt to hash a noisy payload for the cache (the engine's request_key); the one
    clean image a sequential certificate sends first is hashed (one image per input, not per sample)
    and recorded."""
    calls = []
    real = cache_mod.request_key

    def boom(fingerprint, batch):
        if int(batch.shape[0]) != 1:
            raise AssertionError(f"payload of shape {tuple(batch.shape)} hashed on the host")
        calls.append(tuple(batch.shape))
        return real(fingerprint, batch)

    monkeypatch.setattr(engine_mod, "request_key", boom)
    return calls


# ---- the noise ---------------------------------------------------------------------------------
def test_cpu_noise_is_bit_identical_to_earlier_releases():
    # chunk 0 of (seed 3, key "k", stream "estimation") as every release before device noise drew it
    msg = b"blackbox-rs/noise/v1|3|k|estimation|0"
    seed = int.from_bytes(hashlib.blake2b(msg, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    chunk = NoiseStream(seed=3, key="k", stream="estimation", shape=SHAPE).chunk
    want = torch.randn((chunk, *SHAPE), generator=torch.Generator().manual_seed(seed))
    for device in (None, "cpu", torch.device("cpu")):
        got = NoiseStream(seed=3, key="k", stream="estimation", shape=SHAPE, device=device).samples(0, chunk)
        assert torch.equal(got, want)


def test_a_device_torch_cannot_draw_on_is_a_typed_error():
    with pytest.raises(InvalidParameterError, match="cannot draw noise on device 'not-a-device'"):
        NoiseStream(seed=0, key="k", stream="s", shape=SHAPE, device="not-a-device")


def test_noise_is_drawn_where_a_local_model_runs():
    class OnAccelerator:  # a connector that says it runs on CUDA (no query is made)
        info = ModuleConnector(_net(), input_shape=SHAPE).info
        device = torch.device("cuda", 0)

        def query(self, batch):  # pragma: no cover - never called
            raise AssertionError

    assert noise_device(QueryEngine(OnAccelerator())) == torch.device("cuda", 0)
    assert noise_device(QueryEngine(ModuleConnector(_net(), input_shape=SHAPE))).type == "cpu"

    class Remote:
        info = OnAccelerator.info
        device = "cuda"  # not a torch.device: not a local torch model

        def query(self, batch):  # pragma: no cover
            raise AssertionError

    assert noise_device(QueryEngine(Remote())).type == "cpu"


def test_certificates_and_journals_record_the_noise_device_type(tmp_path: Path, monkeypatch):
    conn = ModuleConnector(_net(), input_shape=SHAPE)
    cert = certify(conn, _x(), sigma=0.5, n0=10, n=100, alpha=0.01, seed=0)
    assert cert.noise == noise_identity(False, "cpu") == "gaussian-v1:cpu"
    out = tmp_path / "run.jsonl"
    xs = torch.stack([_x(1), _x(2)])
    certify_dataset(conn, xs, [0, 1], sigma=0.5, n0=10, n=100, alpha=0.01, seed=0, output=out, progress=None)
    assert '"gaussian-v1:cpu"' in out.read_text()
    # the same journal resumed by a run whose noise would be drawn on CUDA: refused, nothing sent
    monkeypatch.setattr(dataset_mod, "noise_mode", lambda engine, lattice=False: "gaussian-v1:cuda.sm132x2048")
    engine = QueryEngine(conn)
    with pytest.raises(ResumeMismatchError, match="noise"):
        certify_dataset(engine, xs, [0, 1], sigma=0.5, n0=10, n=100, alpha=0.01, seed=0, output=out, progress=None)
    assert engine.stats.queries == 0


@cuda_only
def test_cuda_noise_lives_on_the_device_and_differs_from_cpu_noise():
    cpu = NoiseStream(seed=0, key="k", stream="s", shape=SHAPE).samples(0, 300)
    gpu = NoiseStream(seed=0, key="k", stream="s", shape=SHAPE, device="cuda").samples(0, 300)
    assert gpu.device.type == "cuda" and not torch.equal(gpu.cpu(), cpu)
    conn = ModuleConnector(_net(), input_shape=SHAPE, device="cuda")
    assert noise_device(QueryEngine(conn)).type == "cuda"
    cert = certify(conn, _x(), sigma=0.5, n0=10, n=100, alpha=0.01, seed=0)
    assert cert.noise == "gaussian-v1:cuda"
    # a module fitted on the CPU runs on the model's device, through a copy (the module stays put)
    module = create_module({"name": "dncnn", "input_shape": SHAPE, "depth": 2, "width": 4})
    sm = BlackBoxSmoother(conn, module=module, sigma=0.5)
    c = sm.certify(_x(), n0=10, n=100, alpha=0.01, seed=0)
    assert c.noise == "gaussian-v1:cuda" and next(module.parameters()).device.type == "cpu"


# ---- origin-keyed caching ----------------------------------------------------------------------
def _certify(engine, x, **kw):
    args = {"sigma": 0.5, "n0": 16, "n": 200, "alpha": 0.01, "seed": 5, "batch_size": 64, **kw}
    return certify(engine, x, **args)


def test_a_local_model_is_cached_by_origin_and_never_hashes_payloads(tmp_path: Path, no_payload_hashing):
    engine = QueryEngine(_OriginModel(_net(), input_shape=SHAPE), cache=tmp_path / "c")
    assert engine.caches_by_origin
    first = _certify(engine, _x())
    assert first.queries == 216 and first.cache_hits == 0
    again = _certify(engine, _x())
    assert again.cache_hits == 216 and again.queries == 0
    assert (again.prediction, again.counts, again.selection_counts) == (first.prediction, first.counts,
                                                                       first.selection_counts)
    assert no_payload_hashing == []
    # sequential certification (Gaussian and exact lattice noise) is origin-keyed too
    for lattice in (False, True):
        a = certify_radius(engine, _x(), radius=0.1, sigma=0.5, n0=16, max_queries=400, alpha=0.01, seed=5,
                           batch_size=64, lattice=lattice)
        b = certify_radius(engine, _x(), radius=0.1, sigma=0.5, n0=16, max_queries=400, alpha=0.01, seed=5,
                           batch_size=64, lattice=lattice)
        assert a.queries > 0 and b.queries == 0 and b.cache_hits == a.queries + a.cache_hits
    assert len(no_payload_hashing) == 4  # the clean image of each sequential certificate, nothing else


@pytest.mark.parametrize("change", ["input", "seed", "sigma", "module", "key"])
def test_origin_keys_never_serve_another_payload(tmp_path: Path, change: str):
    engine = QueryEngine(_OriginModel(_net(), input_shape=SHAPE), cache=tmp_path / "c")
    module = create_module({"name": "dncnn", "input_shape": SHAPE, "depth": 2, "width": 4})
    sm = BlackBoxSmoother(engine, module=module, sigma=0.5)
    base = {"n0": 16, "n": 200, "alpha": 0.01, "seed": 5, "batch_size": 64}
    first = sm.certify(_x(), **base)
    assert first.cache_hits == 0
    x, kw = _x(), dict(base)
    if change == "input":
        x = _x(2)
    elif change == "seed":
        kw["seed"] = 6
    elif change == "sigma":
        kw["sigma"] = 0.25
    elif change == "module":
        with torch.no_grad():
            next(module.parameters()).add_(0.01)
    if change == "key":  # same input, another noise key
        second = certify(engine, x, sigma=0.5, key="another-noise-key", transform=sm.transform, **kw)
    else:
        with pytest.warns(UserWarning) if change == "sigma" else _nothing():
            second = sm.certify(x, **kw)
    assert second.cache_hits == 0 and second.queries == 216


def test_a_transform_without_identity_and_a_remote_style_connector_key_by_payload(tmp_path: Path, monkeypatch):
    seen = []
    real = cache_mod.request_key

    def counting(fingerprint, batch):
        seen.append(int(batch.shape[0]))
        return real(fingerprint, batch)

    monkeypatch.setattr(engine_mod, "request_key", counting)
    origin = QueryEngine(_OriginModel(_net(), input_shape=SHAPE), cache=tmp_path / "a")
    _certify(origin, _x(), transform=lambda b: b * 0.5)  # a plain callable: nothing tells two apart
    assert sum(seen) == 216
    seen.clear()
    payload = QueryEngine(_PayloadModel(_net(), input_shape=SHAPE), cache=tmp_path / "b")
    assert not payload.caches_by_origin
    _certify(payload, _x())
    again = _certify(payload, _x())
    assert sum(seen) == 2 * 216 and again.cache_hits == 216


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- review findings: what an origin key must never hide --------------------------------------
def test_a_transform_kept_across_a_module_change_names_and_caches_the_module_as_it_is(tmp_path: Path):
    engine = QueryEngine(_OriginModel(_net(), input_shape=SHAPE), cache=tmp_path / "c")
    module = create_module({"name": "dncnn", "input_shape": SHAPE, "depth": 2, "width": 4})
    sm = BlackBoxSmoother(engine, module=module, sigma=0.5)
    t = sm.transform  # kept, as a user may
    before = t.identity
    first = _certify(engine, _x(), transform=t)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(-3.0)  # in place: a fit or a user edit
    assert t.identity != before and t.identity == module.digest()
    again = _certify(engine, _x(), transform=t)
    assert again.transform == module.digest() and again.cache_hits == 0 and again.queries == first.queries
    module.load_state_dict({k: v.clone() for k, v in module.state_dict().items()})  # same values: same digest
    assert t.identity == module.digest()


def test_plain_module_transforms_are_never_cached_by_their_best_effort_digest(tmp_path: Path):
    import numpy as np

    class Shift(nn.Module):  # a numpy scalar setting: the nn digest sees only its type
        def __init__(self, by):
            super().__init__()
            self.by = np.float32(by)

        def forward(self, b):
            return b + float(self.by)

    lo, hi = Shift(0.0), Shift(0.6)
    from blackbox_rs.binding import transform_identity
    from blackbox_rs.core import exact_identity

    assert transform_identity(lo) == transform_identity(hi) and not exact_identity(lo)
    engine = QueryEngine(_OriginModel(_net(), input_shape=SHAPE), cache=tmp_path / "c")
    a = _certify(engine, _x(), transform=lo)
    b = _certify(engine, _x(), transform=hi)
    assert a.cache_hits == 0 and b.cache_hits == 0  # payload keys: different payloads, no cross hits
    assert _certify(engine, _x(), transform=hi).cache_hits == 216  # and still cached, by payload


def test_a_modules_batch_is_part_of_the_origin(tmp_path: Path):
    # a module's output can differ in the last bits with the batch it ran in: another batch_size misses
    engine = QueryEngine(_OriginModel(_net(), input_shape=SHAPE, max_batch=1), cache=tmp_path / "c")
    module = create_module({"name": "dncnn", "input_shape": SHAPE, "depth": 2, "width": 4})
    sm = BlackBoxSmoother(engine, module=module, sigma=0.5)
    kw = {"n0": 8, "n": 100, "alpha": 0.01, "seed": 1}
    assert sm.certify(_x(), batch_size=1, **kw).cache_hits == 0
    assert sm.certify(_x(), batch_size=16, **kw).cache_hits == 0
    assert sm.certify(_x(), batch_size=16, **kw).cache_hits == 108
    bare = BlackBoxSmoother(engine, module=None, sigma=0.5)  # no module: elementwise, any batch size hits
    bare.certify(_x(), batch_size=1, **kw)
    assert bare.certify(_x(), batch_size=16, **kw).cache_hits == 108


def test_a_module_that_cannot_be_copied_runs_where_it_is():
    import threading

    from blackbox_rs.smoother import _ModuleTransform

    module = create_module({"name": "dncnn", "input_shape": SHAPE, "depth": 2, "width": 4})
    t = _ModuleTransform(module)
    meta = torch.device("meta")  # stands in for an accelerator
    copy_ = t.on(meta)
    assert copy_ is not module and next(copy_.parameters()).device == meta
    assert next(module.parameters()).device.type == "cpu" and t.on(meta) is copy_  # made once
    module._session = threading.Lock()  # like an ONNX Runtime session: cannot be deep-copied
    with torch.no_grad():
        next(module.parameters()).add_(1.0)  # a new state: the old copy is dropped, a new one cannot be made
    assert t.on(meta) is None and str(meta) not in t._copies
    assert t.on(torch.device("cpu")) is module
    assert torch.equal(t(_x().unsqueeze(0)), module(_x().unsqueeze(0)))
