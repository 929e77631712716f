"""Bring-your-own denoisers (``frozen``) and the frozen-denoiser + fitted adapter (``denoiser_adapter``)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from blackbox_rs.connectors import CallableConnector
from blackbox_rs.errors import ConfigError, DenoiserModelError, UnsafeModelFileError
from blackbox_rs.modules import DenoiserAdapter, FrozenDenoiser, create_module, load_module
from blackbox_rs.smoother import BlackBoxSmoother

SHAPE = (1, 8, 8)


class Blur(nn.Module):
    """A toy denoiser: a fixed 3x3 box blur (one conv with weights)."""

    def __init__(self, w: float = 1 / 9) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.conv.weight, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _script(path: Path, w: float = 1 / 9) -> Path:
    torch.jit.save(torch.jit.script(Blur(w).eval()), str(path))
    return path


def _onnx(path: Path, scale: float = 0.5, shift: float = 0.25) -> Path:
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])
    a = numpy_helper.from_array(np.full((1,), scale, dtype=np.float32), "a")  # raw data: can go external
    b = numpy_helper.from_array(np.full((1,), shift, dtype=np.float32), "b")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                              "affine", [x], [y], initializer=[a, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def _frozen(path: Path, **kw) -> FrozenDenoiser:
    return create_module("frozen", input_shape=SHAPE, path=str(path), **kw)  # type: ignore[return-value]


def test_torchscript_denoiser_runs_frozen_and_records_its_digest(tmp_path: Path) -> None:
    from blackbox_rs.connectors._pt2 import file_sha256

    path = _script(tmp_path / "blur.pt")
    m = _frozen(path)
    x = torch.randn(3, *SHAPE)
    torch.testing.assert_close(m(x), Blur()(x))
    assert m.config.format == "torchscript" and m.config.file_digest == f"sha256:{file_sha256(path)}"
    assert m.num_trainable() == 0 and m.state_dict() == {}
    assert m(x.double()).dtype == torch.float64
    # location-independent identity; another file, another digest
    moved = _frozen(Path(shutil.copy(path, tmp_path / "moved.pt")))
    assert moved.digest() == m.digest()
    assert _frozen(_script(tmp_path / "other.pt", w=0.2)).digest() != m.digest()


def test_changed_file_is_refused_against_the_recorded_digest(tmp_path: Path) -> None:
    path = _script(tmp_path / "blur.pt")
    recorded = _frozen(path).config
    _script(path, w=0.3)  # the file is replaced after the digest was recorded
    with pytest.raises(DenoiserModelError, match="not the denoiser this module was created with"):
        FrozenDenoiser(recorded)


def test_save_load_round_trip_through_the_smoother(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _script(tmp_path / "blur.pt")
    conn = CallableConnector(lambda b: (b.mean(dim=(1, 2, 3)) > 0.5).long(), input_shape=SHAPE, num_classes=2,
                             fingerprint="toy:v1")
    sm = BlackBoxSmoother(conn, module=_frozen(path), sigma=0.25)
    x = torch.rand(4, *SHAPE)
    y = sm.transform(x)
    sm.save(tmp_path / "sm")
    meta = json.loads((tmp_path / "sm" / "module" / "module_config.json").read_text())
    assert meta["config"]["file_digest"] == sm.module.config.file_digest

    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("pickle / torch.load used while loading")

    with monkeypatch.context() as mp:
        for mod, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
            mp.setattr(mod, name, forbidden)
        back = BlackBoxSmoother.load(tmp_path / "sm", conn)
    assert back.transform.identity == sm.transform.identity and torch.equal(back.transform(x), y)
    _script(path, w=0.3)
    with pytest.raises(DenoiserModelError):
        BlackBoxSmoother.load(tmp_path / "sm", conn)


def test_exported_program_denoiser(tmp_path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(Blur().eval(), (torch.zeros(2, *SHAPE),), dynamic_shapes=({0: batch},))
    path = tmp_path / "blur.pt2"
    torch.export.save(program, str(path))
    m = _frozen(path)
    x = torch.randn(3, *SHAPE)
    assert m.config.format == "export"
    torch.testing.assert_close(m(x), Blur()(x))


def test_onnx_denoiser(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    m = _frozen(_onnx(tmp_path / "affine.onnx"))
    x = torch.randn(2, *SHAPE)
    assert m.config.format == "onnx" and m.config.file_digest.startswith("sha256:")
    torch.testing.assert_close(m(x), 0.5 * x + 0.25)
    m.save(tmp_path / "saved")
    assert torch.equal(load_module(tmp_path / "saved")(x), m(x))


def test_onnx_external_data_is_refused(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = _onnx(tmp_path / "affine.onnx")
    model = onnx.load_model(str(path))
    ext = tmp_path / "ext.onnx"
    onnx.save_model(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    with pytest.raises(UnsafeModelFileError, match="external data"):
        _frozen(ext)


def test_nn_module_denoiser_and_its_reload(tmp_path: Path) -> None:
    net = Blur()
    m = FrozenDenoiser.from_module(net, input_shape=SHAPE)
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(m(x), net(x))
    assert m.config.format == "module" and m.config.file_digest.startswith("nn:Blur:sha256:")
    d0 = m.digest()
    m.save(tmp_path / "mod")
    with pytest.raises(DenoiserModelError, match="cannot be rebuilt from files"):
        load_module(tmp_path / "mod")
    back = FrozenDenoiser.load(tmp_path / "mod", module=Blur())
    assert back.digest() == d0 and torch.equal(back(x), m(x))
    with pytest.raises(DenoiserModelError, match="not the denoiser this module was created with"):
        FrozenDenoiser.load(tmp_path / "mod", module=Blur(0.3))
    with torch.no_grad():
        net.conv.weight.mul_(2)  # the wrapped module changed: so does the identity
    assert m.digest() != d0


def test_bad_denoisers_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(DenoiserModelError, match="not found"):
        _frozen(tmp_path / "missing.pt")
    (tmp_path / "x.weird").write_bytes(b"")
    with pytest.raises(ConfigError, match="suffix"):
        _frozen(tmp_path / "x.weird")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(DenoiserModelError, match="cannot load"):
        _frozen(tmp_path / "junk.pt")

    class Shrink(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :, :4, :4]

    with pytest.raises(DenoiserModelError, match="input's shape"):
        FrozenDenoiser.from_module(Shrink(), input_shape=SHAPE)
    with pytest.raises(DenoiserModelError, match="cannot run on a blank image"):
        FrozenDenoiser.from_module(Blur(), input_shape=(3, 8, 8))
    with pytest.raises(ConfigError, match="needs path="):
        create_module("frozen", input_shape=SHAPE)


# ---------------------------------------------------------------------------------- adapter
def _adapter(path: Path, **kw) -> DenoiserAdapter:
    den = {"name": "frozen", "input_shape": SHAPE, "path": str(path)}
    return create_module("denoiser_adapter", input_shape=SHAPE, denoiser=den, width=4, **kw)  # type: ignore[return-value]


@pytest.mark.parametrize("use_input", [True, False])
def test_adapter_is_exactly_the_frozen_denoiser_at_init(tmp_path: Path, use_input: bool) -> None:
    path = _script(tmp_path / "blur.pt")
    ad = _adapter(path, use_input=use_input)
    x = torch.randn(3, *SHAPE) * 1.5 + 0.5
    assert torch.equal(ad(x), _frozen(path)(x))
    assert ad.num_trainable() > 0
    assert [n for n, _ in ad.named_trainable_parameters()] == [f"net.{n}" for n, _ in ad.net.named_parameters()]


def test_adapter_trains_saves_and_binds_to_the_denoiser(tmp_path: Path) -> None:
    path = _script(tmp_path / "blur.pt")
    ad = _adapter(path)
    g = torch.Generator().manual_seed(0)
    ad.set_flat_parameters(ad.flat_parameters() + 0.05 * torch.randn(ad.num_trainable(), generator=g))
    x = torch.rand(2, *SHAPE)
    ad(x).square().sum().backward()
    assert all(p.grad is not None for p in ad.trainable_parameters())
    y = ad(x)
    torch.testing.assert_close(ad(x[:1]), y[:1], rtol=1e-5, atol=1e-6)  # per sample
    ad.save(tmp_path / "ad")
    back = load_module(tmp_path / "ad")
    assert isinstance(back, DenoiserAdapter) and back.digest() == ad.digest() and torch.equal(back(x), y)
    other = _adapter(_script(tmp_path / "other.pt", w=0.2))
    other.set_flat_parameters(ad.flat_parameters())
    assert other.digest() != ad.digest()  # same adapter weights, another denoiser
    with pytest.raises(ConfigError, match="differs from input_shape"):
        create_module("denoiser_adapter", input_shape=(1, 16, 16),
                      denoiser={"name": "frozen", "input_shape": SHAPE, "path": str(path)})


def test_adapter_after_an_nn_module_denoiser() -> None:
    den = FrozenDenoiser.from_module(Blur(), input_shape=SHAPE)
    ad = DenoiserAdapter.from_denoiser(den, width=4)
    x = torch.rand(2, *SHAPE)
    assert torch.equal(ad(x), den(x))


def test_adapter_is_fitted_by_an_existing_strategy(tmp_path: Path) -> None:
    path = _script(tmp_path / "blur.pt")
    conn = CallableConnector(lambda b: (b.mean(dim=(1, 2, 3)) > 0.5).long(), input_shape=SHAPE, num_classes=2,
                             fingerprint="toy:v1")
    ad = _adapter(path)
    sm = BlackBoxSmoother(conn, module=ad, sigma=0.25)
    before = ad.flat_parameters()
    sm.fit(torch.rand(16, *SHAPE), strategy="denoise", pretrain_steps=3, steps=0, batch_size=4,
           clean_queries=16, score_images=4, score_draws=2, progress=None)
    assert not torch.equal(sm.module.flat_parameters(), before)


def test_a_nested_denoiser_without_input_shape_takes_the_adapters(tmp_path: Path) -> None:
    # what BlackBoxSmoother(module={"name": "denoiser_adapter", "denoiser": {...}}) sends: the model's
    # input_shape on the outer config only
    path = _script(tmp_path / "blur.pt")
    ad = create_module("denoiser_adapter", input_shape=SHAPE, denoiser={"name": "frozen", "path": str(path)}, width=4)
    assert tuple(ad.denoiser.config.input_shape) == SHAPE and ad.config == _adapter(path).config
    assert _adapter(path).exact_identity is True  # a file's digest is exact
    den = FrozenDenoiser.from_module(Blur(), input_shape=SHAPE)
    assert den.exact_identity is False and DenoiserAdapter.from_denoiser(den, width=4).exact_identity is False
