"""BlackBoxSmoother: fitting strategies, budgets, resume, save/load, bad input (tiny, CPU)."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blackbox_rs import BudgetExceeded, QueryBudget, QueryEngine
from blackbox_rs._demo.datasets import load_digits
from blackbox_rs._demo.zoo import SmallCNN, export_torchscript, train_classifier
from blackbox_rs.connectors import CallableConnector, TorchScriptConnector
from blackbox_rs.errors import CacheError, ConfigError, InvalidInputError, InvalidParameterError
from blackbox_rs.fitting.config import FitConfig
from blackbox_rs.smoother import BlackBoxSmoother

SIGMA = 0.5
SMALL = {"depth": 3, "width": 16}


def _up(x: torch.Tensor) -> torch.Tensor:
    """Digits upsampled to 16x16: enough redundancy for a denoiser to show a clear gain."""
    return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)


@pytest.fixture(scope="module")
def digits():
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    return _up(xtr), ytr, _up(xte[:120]), yte[:120]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, digits):
    xtr, ytr, _, _ = digits
    model = train_classifier(SmallCNN(1, 10, (16, 16), width=16, seed=0), xtr, ytr, epochs=25, seed=0, threads=1)
    path = tmp_path_factory.mktemp("model") / "digits.pt"
    export_torchscript(model, path, (1, 16, 16))
    return path


def label_only(path) -> TorchScriptConnector:
    return TorchScriptConnector(path, input_shape=(1, 16, 16), num_classes=10, label_only=True)


def mean_p_correct(smoother: BlackBoxSmoother, x, y, n=200) -> float:
    """Mean probability (over noise) that the composed classifier is right: a low-variance score."""
    ps = []
    for xi, yi in zip(x, y, strict=True):
        pred = smoother.predict(xi, n=n, alpha=0.01, seed=0)
        ps.append(pred.counts[int(yi)] / n)
    return sum(ps) / len(ps)


def small_fit(**kw):
    base = {"lr": 3e-3, "pretrain_steps": 150, "steps": 60, "batch_size": 32, "checkpoint_every": 20, "clean_queries": 600,
            "score_images": 64, "score_draws": 4}
    own = {"surrogate": {"distill_queries": 1200, "redistill_every": 30},  # each strategy's own settings
           "zeroth_order": {"zo_batch": 16, "zo_directions": 2}}
    return FitConfig(**{**base, **own.get(kw.get("strategy", "surrogate"), {}), **kw})


def test_fitted_modules_beat_no_module(model_file, digits):
    xtr, ytr, xte, yte = digits
    conn = label_only(model_file)
    none = mean_p_correct(BlackBoxSmoother(conn, module=None, sigma=SIGMA), xte, yte)
    scores = {}
    for strategy in ("denoise", "surrogate"):
        sm = BlackBoxSmoother(conn, module={"name": "dncnn", **SMALL}, sigma=SIGMA)
        report = sm.fit((xtr, ytr), config=small_fit(strategy=strategy), budget=20_000)
        assert report.steps_done == report.steps_total
        scores[strategy] = mean_p_correct(sm, xte, yte)
        if strategy == "surrogate":  # each distillation round records how well the surrogate mimics the black box
            fidelity = [h["surrogate_fidelity"] for h in report.history if "surrogate_fidelity" in h]
            assert len(fidelity) >= 2 and all(0.0 <= f <= 1.0 for f in fidelity)
            assert fidelity[-1] > 0.5, fidelity  # distilled: far above chance (0.1) where the module sends inputs
    # a no-op fit would leave the identity module: exactly the "none" score
    # measured: none 0.775, denoise 0.848, surrogate 0.845 (same noise for all: a paired comparison)
    assert scores["denoise"] > none + 0.04, (none, scores)
    assert scores["surrogate"] > none + 0.04, (none, scores)


def test_passthrough_uses_true_gradients_and_is_counted(model_file, digits):
    xtr, ytr, xte, yte = digits
    conn = TorchScriptConnector(model_file, input_shape=(1, 16, 16), num_classes=10)
    engine = QueryEngine(conn)
    sm = BlackBoxSmoother(engine, module={"name": "dncnn", **SMALL}, sigma=SIGMA)
    report = sm.fit((xtr, ytr), config=small_fit(strategy="passthrough", steps=40, pretrain_steps=100))
    # clean labels of the subset + batch_size differentiable forwards per step + two scoring rounds
    # (before the first step and after the last), all through the engine
    assert report.queries == 600 + 40 * 32 + 2 * 64 * 4
    assert engine.stats.queries == report.queries
    assert mean_p_correct(sm, xte, yte) > mean_p_correct(BlackBoxSmoother(conn, module=None, sigma=SIGMA), xte, yte)


def test_zeroth_order_tunes_a_low_dimensional_lora(model_file, digits):
    xtr, ytr, _, _ = digits
    conn = label_only(model_file)
    engine = QueryEngine(conn)
    sm = BlackBoxSmoother(engine, module={"name": "dncnn", **SMALL}, sigma=SIGMA)
    cfg = small_fit(strategy="zeroth_order", steps=6, pretrain_steps=50)
    report = sm.fit((xtr, ytr), config=cfg, budget=100_000)
    assert sm.module.name == "lora_dncnn"
    assert report.trainable_parameters < 0.25 * sum(p.numel() for p in sm.module.parameters())
    assert report.queries == 600 + 6 * 2 * cfg.zo_directions * cfg.zo_batch + 2 * cfg.score_images * cfg.score_draws
    assert engine.stats.queries == report.queries


def test_selection_keeps_the_pretrained_module_when_later_steps_hurt(model_file, digits):
    """Scoring rounds rate the MSE-pretrained state on the black box; steps that wreck the module
    (a huge learning rate) must not replace it."""
    xtr, ytr, _, _ = digits
    conn = label_only(model_file)
    common = {"pretrain_steps": 80, "pretrain_lr": 3e-3}
    ref = BlackBoxSmoother(conn, module={"name": "dncnn", **SMALL}, sigma=SIGMA)
    ref.fit((xtr, ytr), config=small_fit(strategy="denoise", steps=0, **common))
    sm = BlackBoxSmoother(conn, module={"name": "dncnn", **SMALL}, sigma=SIGMA)
    report = sm.fit((xtr, ytr), config=small_fit(strategy="passthrough", steps=20, lr=1.0,
                                                 weights={"classification": 1.0}, score_every=10, **common))
    scored = [h for h in report.history if "robust_score" in h]
    assert [h["step"] for h in scored] == [80, 90, 100]  # before the first step, every 10 steps, after the last
    assert scored[0]["robust_score"] > scored[-1]["robust_score"] + 0.2, scored  # the steps did wreck it
    assert report.best_step == 80 and report.best_score == scored[0]["robust_score"]
    for a, b in zip(sm.module.state_dict().values(), ref.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_scoring_rounds_reuse_images_and_noise(model_file, digits, tmp_path):
    """Common random numbers: an unchanged module re-scored sends the same payloads (cache hits)."""
    from blackbox_rs.fitting.config import FitConfig as Cfg
    from blackbox_rs.fitting.context import FitContext
    from blackbox_rs.fitting.data import FitData
    from blackbox_rs.fitting.selection import score_round
    from blackbox_rs.modules.registry import create_module

    xtr, ytr, _, _ = digits
    engine = QueryEngine(label_only(model_file), cache=tmp_path / "cache")
    module = create_module({"name": "dncnn", "input_shape": (1, 16, 16), **SMALL})
    ctx = FitContext(engine, module, FitData(xtr, ytr), [0.25, 0.5], Cfg(clean_queries=300, score_images=40,
                                                                        score_draws=5))
    a = score_round(ctx)
    paid = ctx.tally.queries
    b = score_round(ctx)
    assert paid == 300 + 200 and ctx.tally.queries == paid and ctx.tally.cache_hits >= 200
    assert a.score == b.score and a.per_image.shape == (40,)
    assert sorted(a.by_sigma) == [0.25, 0.5]  # 20 images at each sigma
    assert sum(a.by_sigma.values()) / 2 == pytest.approx(a.score)
    assert a.by_sigma[0.25] >= a.by_sigma[0.5]  # less noise, more agreement (identity module)
    assert torch.equal(a.labels, b.labels)


def test_multi_sigma_selection_is_the_worst_per_sigma_gain(model_file, digits, tmp_path):
    """A multi-sigma fit keeps the state whose worst sigma gained most over the pretrained module
    (gain 0), so no sigma is bought with another; a resumed fit compares against the same round."""
    xtr, ytr, _, _ = digits
    conn = label_only(model_file)
    cfg = small_fit(strategy="surrogate", pretrain_steps=20, steps=60, redistill_every=30, score_every=20,
                    patience=0)  # every round is run (no early stop for no gain: tests/test_fit_early_stop.py)
    kw = {"module": {"name": "dncnn", **SMALL}, "sigmas": [0.25, 0.5]}
    ref = BlackBoxSmoother(conn, **kw, cache=tmp_path / "c1")
    full = ref.fit((xtr, ytr), config=cfg, budget=20_000)
    scored = [h for h in full.history if "robust_score" in h]
    assert [h["step"] for h in scored] == [20, 40, 60, 80]
    base = scored[0]
    for h in scored:
        gains = [h[f"robust_score@{s}"] - base[f"robust_score@{s}"] for s in (0.25, 0.5)]
        assert h["score"] == pytest.approx(min(gains), abs=1e-12)
        assert h["robust_score"] == pytest.approx((h["robust_score@0.25"] + h["robust_score@0.5"]) / 2)
    best = max(scored, key=lambda h: h["score"])  # the first of equal scores
    assert full.best_step == best["step"] and full.best_score == best["score"] >= 0.0
    # interrupted at the budget, then resumed: the same rounds, the same choice
    sm = BlackBoxSmoother(conn, **kw, cache=tmp_path / "c2")
    cut = sm.fit((xtr, ytr), config=cfg, budget=3_000, checkpoint_dir=tmp_path / "ck")
    assert cut.stopped == "budget" and sum("robust_score" in h for h in cut.history) >= 2
    sm2 = BlackBoxSmoother(conn, **kw, cache=tmp_path / "c2")
    resumed = sm2.fit((xtr, ytr), config=cfg, budget=20_000, checkpoint_dir=tmp_path / "ck")
    again = [h for h in resumed.history if "robust_score" in h]
    assert [h["step"] for h in again] == [20, 40, 60, 80]
    for a, b in zip(again, scored, strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-9)
    assert resumed.best_step == full.best_step


def test_fit_stops_at_the_budget_and_resumes(model_file, digits, tmp_path):
    xtr, ytr, _, _ = digits
    cfg = small_fit(strategy="surrogate", pretrain_steps=20, steps=60)
    cache = tmp_path / "cache"
    ck = tmp_path / "ck"
    calls = {"n": 0}
    inner = label_only(model_file)

    def counted(batch):
        calls["n"] += len(batch)
        return inner.query(batch)

    conn = CallableConnector(counted, input_shape=(1, 16, 16), num_classes=10, fingerprint="digits-test",
                             max_batch=256)
    sm = BlackBoxSmoother(conn, module={"name": "dncnn", **SMALL}, sigma=SIGMA, cache=cache)
    report = sm.fit((xtr, ytr), config=cfg, budget=2_500, checkpoint_dir=ck)
    assert report.stopped == "budget" and report.queries <= 2_500
    assert report.steps_done < report.steps_total
    paid = calls["n"]
    assert paid == report.queries <= 2_500
    # resume with more budget: continues from the checkpoint, repeats no paid query
    sm2 = BlackBoxSmoother(conn, module={"name": "dncnn", **SMALL}, sigma=SIGMA, cache=cache)
    report2 = sm2.fit((xtr, ytr), config=cfg, budget=20_000, checkpoint_dir=ck)
    assert report2.resumed_from == report.steps_done
    assert report2.stopped == "completed"
    # an uninterrupted run pays exactly what both runs paid together
    calls["n"] = 0
    ref = BlackBoxSmoother(conn, module={"name": "dncnn", **SMALL}, sigma=SIGMA, cache=tmp_path / "cache2")
    ref.fit((xtr, ytr), config=cfg, budget=20_000)
    assert paid + report2.queries == calls["n"]
    for a, b in zip(sm2.module.state_dict().values(), ref.module.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_checkpoint_with_other_settings_is_refused(model_file, digits, tmp_path):
    xtr, ytr, _, _ = digits
    sm = BlackBoxSmoother(label_only(model_file), module={"name": "dncnn", **SMALL}, sigma=SIGMA)
    sm.fit((xtr, ytr), config=small_fit(strategy="denoise", pretrain_steps=5, steps=0), checkpoint_dir=tmp_path)
    with pytest.raises(CacheError, match="other settings"):
        sm.fit((xtr, ytr), config=small_fit(strategy="denoise", pretrain_steps=5, steps=0, lr=0.1),
               checkpoint_dir=tmp_path)


def test_save_load_round_trip_without_pickle(model_file, digits, tmp_path, monkeypatch):
    xtr, ytr, xte, _ = digits
    conn = label_only(model_file)
    sm = BlackBoxSmoother(conn, module={"name": "dncnn", **SMALL}, sigmas=[0.25, 0.5])
    sm.fit((xtr, ytr), config=small_fit(strategy="denoise", pretrain_steps=30, steps=0))
    sm.save(tmp_path / "s")
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle used"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
    loaded = BlackBoxSmoother.load(tmp_path / "s", conn)
    assert loaded.sigmas == [0.25, 0.5]
    for sigma in (0.25, 0.5):
        a = sm.certify(xte[0], n0=20, n=200, sigma=sigma, seed=0)
        b = loaded.certify(xte[0], n0=20, n=200, sigma=sigma, seed=0)
        assert a.counts == b.counts and a.radius == b.radius
    other = CallableConnector(lambda b: torch.zeros(len(b), dtype=torch.long), input_shape=(1, 16, 16),
                              num_classes=10, fingerprint="another-model")
    with pytest.warns(UserWarning, match="fitted in front of"):
        BlackBoxSmoother.load(tmp_path / "s", other)
    wrong = CallableConnector(lambda b: torch.zeros(len(b), dtype=torch.long), input_shape=(3, 8, 8),
                              num_classes=10)
    with pytest.raises(ConfigError, match="inputs"):
        BlackBoxSmoother.load(tmp_path / "s", wrong)


def test_unfitted_module_certifies_exactly_like_no_module(model_file, digits):
    _, _, xte, _ = digits
    conn = label_only(model_file)
    a = BlackBoxSmoother(conn, module=None, sigma=SIGMA).certify(xte[3], n0=20, n=300, seed=0)
    b = BlackBoxSmoother(conn, module="dncnn", sigma=SIGMA).certify(xte[3], n0=20, n=300, seed=0)
    assert a.counts == b.counts and a.selection_counts == b.selection_counts


def test_bad_fit_inputs_are_typed_errors(model_file, digits):
    xtr, ytr, _, _ = digits
    conn = label_only(model_file)
    sm = BlackBoxSmoother(conn, module={"name": "dncnn", **SMALL}, sigma=SIGMA)
    cfg = small_fit(strategy="denoise", pretrain_steps=1, steps=0)
    with pytest.raises(InvalidInputError, match="1 x 16 x 16"):
        sm.fit(torch.rand(10, 1, 9, 9), config=cfg)
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        sm.fit(xtr * 3, config=cfg)
    with pytest.raises(InvalidInputError, match="NaN"):
        sm.fit(torch.full((4, 1, 16, 16), float("nan")), config=cfg)
    with pytest.raises(InvalidInputError, match="labels must lie"):
        sm.fit((xtr, ytr + 5), config=cfg)
    with pytest.raises(ConfigError, match="stepz"):
        sm.fit(xtr, strategy="denoise", stepz=3)
    with pytest.raises(ConfigError, match="strategy"):
        sm.fit(xtr, strategy="magic")
    with pytest.raises(InvalidParameterError, match="outputs per image"):
        sm.fit((xtr, ytr), config=small_fit(strategy="surrogate"), surrogate=nn.Sequential(nn.Flatten(), nn.Linear(256, 7)))
    with pytest.raises(InvalidParameterError, match="returns no scores|label-only"):
        sm.fit((xtr, ytr), config=small_fit(strategy="zeroth_order", zo_loss="scores"))
    with pytest.raises(InvalidParameterError, match="would tune 7,217 parameters of module 'unet'"):  # a unet has no LoRA form
        BlackBoxSmoother(conn, module={"name": "unet", "widths": [8, 16]}, sigma=SIGMA).fit(
            xtr, config=small_fit(strategy="zeroth_order", zo_max_parameters=2_000))
    with pytest.raises(InvalidParameterError, match="differentiable"):
        kserve_like = CallableConnector(lambda b: torch.zeros(len(b), dtype=torch.long), input_shape=(1, 16, 16),
                                        num_classes=10)
        BlackBoxSmoother(kserve_like, module="dncnn", sigma=SIGMA).fit(xtr, config=small_fit(strategy="passthrough"))
    with pytest.raises(InvalidParameterError, match="exactly one of sigma"):
        BlackBoxSmoother(conn, module="dncnn")


def test_budget_of_fit_is_also_charged_to_the_run_budget(model_file, digits):
    xtr, ytr, _, _ = digits
    run_budget = QueryBudget(max_queries=1_000)
    engine = QueryEngine(label_only(model_file), budget=run_budget)
    sm = BlackBoxSmoother(engine, module={"name": "dncnn", **SMALL}, sigma=SIGMA)
    report = sm.fit((xtr, ytr), config=small_fit(strategy="surrogate", pretrain_steps=2, steps=10), budget=50_000)
    assert report.stopped == "budget"
    assert run_budget.spent_queries == report.queries <= 1_000
    with pytest.raises(BudgetExceeded):
        sm.certify(xtr[0], n0=100, n=1000, seed=0)


def test_learning_rate_schedule_per_phase():
    from types import SimpleNamespace

    from blackbox_rs.fitting.strategies.denoise import DenoiseStrategy
    from blackbox_rs.fitting.strategies.surrogate import SurrogateStrategy

    module = SimpleNamespace(trainable_parameters=lambda: [nn.Parameter(torch.zeros(1))])

    def lrs(cls=SurrogateStrategy, **kw):
        strat = object.__new__(cls)  # the schedule needs only the config
        strat.ctx = SimpleNamespace(module=module, config=FitConfig(**kw))
        return [strat.learning_rate(k) for k in range(kw["pretrain_steps"] + kw["steps"])]

    cos = lrs(pretrain_steps=11, steps=5, lr=1e-3, pretrain_lr=4e-3, lr_schedule="cosine")
    assert cos[0] == pytest.approx(4e-3) and cos[10] == pytest.approx(0.05 * 4e-3)  # pretraining decays
    assert cos[11] == pytest.approx(1e-3) and cos[15] == pytest.approx(0.05 * 1e-3)  # then the main phase
    assert all(a >= b for a, b in zip(cos[:10], cos[1:11], strict=True))
    assert cos[5] == pytest.approx(4e-3 * (0.05 + 0.95 * 0.5))  # half way: the mean of the two ends
    const = lrs(pretrain_steps=3, steps=2, lr=1e-3)
    assert const == [1e-3] * 5  # the default: constant; pretrain_lr unset: lr
    whole = lrs(DenoiseStrategy, pretrain_steps=6, steps=5, lr=1e-3, pretrain_lr=4e-3, lr_schedule="cosine")  # one phase
    assert whole[0] == pytest.approx(4e-3) and whole[10] == pytest.approx(0.05 * 4e-3)
    assert all(a > b for a, b in zip(whole[:10], whole[1:], strict=True))
    with pytest.raises(ValueError, match="lr_schedule"):
        FitConfig(lr_schedule="linear")
