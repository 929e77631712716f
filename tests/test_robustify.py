"""robustify (PEFTSmoothing): PEFT wrapping, exactness at init, artefacts, resume, typed errors, certify."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from blackbox_rs.errors import ConfigError, InvalidInputError, ModelStructureError, ResumeMismatchError
from blackbox_rs.robust import RobustifyConfig, RobustModel, robustify
from blackbox_rs.robust.wrap import wrap_model

timm = pytest.importorskip("timm")
pytest.importorskip("peft")


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=3).eval()


def toy_data(n: int = 48, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    x = torch.rand((n, 3, size, size), generator=g) * 0.3
    for c in range(3):  # class c: channel c bright
        x[y == c, c] += 0.6
    return x.clamp(0, 1), y


FAST = {"steps": 4, "batch_size": 8, "lr": 1e-2, "checkpoint_every": 2}
CASES = [("cnn", "lora"), ("cnn", "adapter"), ("vit", "lora"), ("vit", "adapter"), ("vit", "prompt")]


def build(kind: str) -> nn.Module:
    return tiny_cnn() if kind == "cnn" else tiny_vit()


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_only_peft_parameters_train(kind: str, method: str) -> None:
    base = build(kind)
    w = wrap_model(base, RobustifyConfig(method=method))
    trainable = [n for n, p in w.model.named_parameters() if p.requires_grad]
    assert trainable
    key = {"lora": ".lora_", "adapter": (".down.", ".up."), "prompt": "prompts"}[method]
    keys = key if isinstance(key, tuple) else (key,)
    assert all(any(k in n for k in keys) for n in trainable), trainable
    assert w.head not in w.targets
    # train_head adds exactly the head's parameters
    w2 = wrap_model(base, RobustifyConfig(method=method, train_head=True))
    extra = [n for n, p in w2.model.named_parameters() if p.requires_grad and n not in trainable]
    assert sum(p.numel() for p in w2.head_module.parameters()) == sum(
        dict(w2.model.named_parameters())[n].numel() for n in extra)
    # the base model passed in is untouched (still all trainable: nothing was frozen on it)
    assert all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize(("kind", "method"), [c for c in CASES if c[1] != "prompt"])
def test_exact_base_logits_at_init(kind: str, method: str) -> None:
    base = build(kind)
    x = toy_data(4)[0]
    with torch.no_grad():
        want = base(x)
        got = wrap_model(base, RobustifyConfig(method=method)).model.eval()(x)
    assert torch.equal(got, want)


def test_prompt_weaker_guarantee() -> None:
    """Prompt tokens cannot be exact at init (attention); what holds: prompts off == base exactly,
    base weights untouched, and the prompts do change the logits (they are live)."""
    base = tiny_vit()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = toy_data(4)[0]
    w = wrap_model(base, RobustifyConfig(method="prompt", prompt_tokens=3)).model.eval()
    with torch.no_grad():
        want = base(x)
        on = w(x)
        w.use_prompts = False
        off = w(x)
    assert torch.equal(off, want)
    assert not torch.equal(on, want)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_prompt_in_sequential_with_normalisation() -> None:
    base = nn.Sequential(nn.Identity(), tiny_vit())
    w = wrap_model(base, RobustifyConfig(method="prompt"))
    assert [n for n, p in w.model.named_parameters() if p.requires_grad] == ["1.prompts"]


@pytest.mark.parametrize(("kind", "method"), CASES)
def test_save_load_merge_roundtrip(tmp_path, kind: str, method: str) -> None:
    base = build(kind)
    data = toy_data()
    rm = robustify(base, data, method, [0.25, 0.5], train_head=(method == "lora"), **FAST)
    x = data[0][:5]
    with torch.no_grad():
        logits = rm(x)
        assert not torch.equal(logits, base(x))  # training changed something
    rm.save_pretrained(tmp_path / "art")
    meta = json.loads((tmp_path / "art" / "robustify.json").read_text())
    counts = meta["parameter_counts"]
    assert counts["trainable"] == counts["peft"] + counts["head"] > 0
    assert meta["trained"] and meta["base_digest"] == rm.base_digest
    assert "trainable" in rm.summary()
    loaded = RobustModel.from_pretrained(base, tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)
        merged = loaded.merged()(x)
    torch.testing.assert_close(merged, logits, rtol=0, atol=1e-5)
    path = rm.merge_and_export(tmp_path / "m.pt", input_shape=(3, 16, 16))
    ts = torch.jit.load(str(path))
    with torch.no_grad():
        torch.testing.assert_close(ts(x), logits, rtol=0, atol=1e-5)


def test_lora_artefact_loads_with_plain_peft(tmp_path) -> None:
    import peft

    base = tiny_cnn()
    data = toy_data()
    rm = robustify(base, data, "lora", [0.25], **FAST)
    rm.save_pretrained(tmp_path)
    plain = peft.PeftModel.from_pretrained(tiny_cnn(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(plain(data[0][:3]), rm(data[0][:3]))


def test_onnx_export_matches(tmp_path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    data = toy_data()
    rm = robustify(tiny_cnn(), data, "lora", [0.25], **FAST)
    path = rm.merge_and_export(tmp_path / "m.onnx", input_shape=(3, 16, 16), format="onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = data[0][:3]
    out = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), rm(x), rtol=0, atol=1e-5)


def test_load_onto_other_base_is_refused(tmp_path) -> None:
    data = toy_data()
    robustify(tiny_cnn(), data, "adapter", [0.25], **FAST).save_pretrained(tmp_path)
    with pytest.raises(ResumeMismatchError) as e:
        RobustModel.from_pretrained(tiny_cnn(seed=7), tmp_path)
    assert "base_digest" in e.value.differences


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_resume_continues_the_same_run(tmp_path, method: str) -> None:
    data = toy_data()
    kind = "vit" if method == "prompt" else "cnn"
    settings = {**FAST, "steps": 6, "lora_dropout": 0.1 if method == "lora" else 0.0, "clean_weight": 0.5}
    full = robustify(build(kind), data, method, [0.25, 0.5], **settings)

    def stop_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        robustify(build(kind), data, method, [0.25, 0.5], checkpoint_dir=tmp_path, callback=stop_at_3, **settings)
    resumed = robustify(build(kind), data, method, [0.25, 0.5], checkpoint_dir=tmp_path, **settings)
    assert resumed.report.resumed_from == 2
    a, b = dict(full.model.named_parameters()), dict(resumed.model.named_parameters())
    for n in full.trained:
        assert torch.equal(a[n], b[n]), n
    assert resumed.report.history == full.report.history


def test_resume_refuses_other_settings(tmp_path) -> None:
    data = toy_data()
    robustify(tiny_cnn(), data, "lora", [0.25], checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(ResumeMismatchError) as e:
        robustify(tiny_cnn(), data, "lora", [0.25], checkpoint_dir=tmp_path, **{**FAST, "lr": 5e-3})
    assert set(e.value.differences) == {"config.lr"}
    with pytest.raises(ResumeMismatchError) as e:
        robustify(tiny_cnn(seed=3), data, "lora", [0.25], checkpoint_dir=tmp_path, **FAST)
    assert set(e.value.differences) == {"base_digest"}
    # checkpoint_every is not part of the binding
    robustify(tiny_cnn(), data, "lora", [0.25], checkpoint_dir=tmp_path, **{**FAST, "checkpoint_every": 3})
    # a checkpoint written on another device type (its generator draws other noise) is refused
    meta_path = tmp_path / "fit_state.json"
    meta = json.loads(meta_path.read_text())
    meta["binding"]["device_type"] = "cuda"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ResumeMismatchError) as e:
        robustify(tiny_cnn(), data, "lora", [0.25], checkpoint_dir=tmp_path, **FAST)
    assert set(e.value.differences) == {"device_type"}


@pytest.mark.parametrize("sigmas", [[0.0], [5.0], [-0.25], [float("nan")], [0.25, 0.25]])
def test_sigma_out_of_range_is_a_config_error(sigmas: list[float]) -> None:
    with pytest.raises(ConfigError, match="sigmas"):
        robustify(tiny_cnn(), toy_data(), "lora", sigmas, **FAST)


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="method"):
        robustify(tiny_cnn(), toy_data(), "full", [0.25])
    with pytest.raises(ConfigError, match="sigma_weights"):
        RobustifyConfig.model_validate  # noqa: B018 - the class exists
        robustify(tiny_cnn(), toy_data(), "lora", [0.25, 0.5], sigma_weights=[1.0])
    with pytest.raises(ConfigError, match="all be zero"):
        robustify(tiny_cnn(), toy_data(), "lora", [0.25], sigma_weights=[0.0], clean_weight=0.0)
    with pytest.raises(ConfigError, match="unknown_knob"):
        robustify(tiny_cnn(), toy_data(), "lora", [0.25], unknown_knob=1)


def test_no_matching_target_modules() -> None:
    with pytest.raises(ModelStructureError, match="attn.qkv"):
        robustify(tiny_cnn(), toy_data(), "lora", [0.25], target_modules=["attn.qkv"], **FAST)
    # the head alone is no target
    with pytest.raises(ModelStructureError, match="head"):
        wrap_model(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3)), RobustifyConfig(method="adapter"))
    with pytest.raises(ModelStructureError, match="matches no"):
        wrap_model(tiny_cnn(), RobustifyConfig(target_modules=("6",)))  # the head is excluded


def test_target_override_and_suffixes() -> None:
    w = wrap_model(tiny_vit(), RobustifyConfig(target_modules=("qkv",)))
    assert w.targets == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    w = wrap_model(tiny_vit(), RobustifyConfig(method="adapter"))
    assert w.targets == ["blocks.0.attn.proj", "blocks.0.mlp.fc2", "blocks.1.attn.proj", "blocks.1.mlp.fc2"]


def test_prompt_needs_a_vit() -> None:
    with pytest.raises(ModelStructureError, match="VisionTransformer"):
        robustify(tiny_cnn(), toy_data(), "prompt", [0.25], **FAST)


def test_bad_data_is_invalid_input() -> None:
    x, y = toy_data()
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        robustify(tiny_cnn(), (x * 2, y), "lora", [0.25], **FAST)
    with pytest.raises(InvalidInputError, match="classes"):
        robustify(tiny_cnn(), (x, y + 5), "lora", [0.25], **FAST)


def test_robustified_cnn_certifies_through_module_connector() -> None:
    from blackbox_rs.smoother import BlackBoxSmoother

    x, y = toy_data(96)
    rm = robustify(tiny_cnn(), (x, y), "lora", [0.25], steps=30, batch_size=32, lr=3e-2, train_head=True)
    conn = rm.connector(input_shape=(3, 16, 16), num_classes=3)
    sm = BlackBoxSmoother(conn, module=None, sigma=0.25)
    certs = [sm.certify(x[i], n0=16, n=64, alpha=0.01, seed=0) for i in range(2)]
    assert all(c.radius >= 0 for c in certs)
    assert [c.prediction for c in certs] == [int(y[0]), int(y[1])]


def test_an_explicit_none_setting_is_applied_not_ignored() -> None:
    from blackbox_rs.robust.config import RobustifyConfig, make_config

    cfg = RobustifyConfig(target_modules=("fc",), sigma_weights=(2.0,), head="fc")
    back = make_config(cfg, target_modules=None, sigma_weights=None, head=None)
    assert back.target_modules is None and back.sigma_weights is None and back.head is None
    assert make_config(cfg).target_modules == ("fc",)  # nothing given: the config's values stay
