"""The pilot of a query-paid fit (issue #23): a tenth of the cap to learn whether the steps help.

Before the strategy's first step a pilot (the same strategy at a smaller scale, from the same
pretrained module) runs ``patience`` scoring rounds; no significant gain ends the fit having spent at
most ``pilot`` of its cap, a gain lets the full fit run exactly as it would without a pilot (reusing
the pilot's clean labels). Toy problems, tiny modules, fixed seeds, CPU only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.toy_fit import brightness, center_pixel, one_thread

from blackbox_rs import BlackBoxSmoother, FitConfig, QueryEngine
from blackbox_rs.connectors import CallableConnector
from blackbox_rs.fitting.pilot import MIN_SCORE_IMAGES, plan_pilot
from blackbox_rs.fitting.strategies import estimate_fit_queries, expected_fit_queries, get_strategy
from blackbox_rs.modules.lora_denoiser import LoRADnCNN

SHAPE = (1, 6, 6)
N = 512
# a fit big enough that its early stop alone costs ~10k queries: the pilot is sized against it
BIG = {"pretrain_steps": 20, "steps": 400, "score_every": 10, "batch_size": 8, "clean_queries": N,
       "score_images": 256, "score_draws": 8, "distill_queries": 2000, "redistill_every": 10,
       "surrogate_epochs": 0.5}


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_thread()


def images(levels: tuple[float, float] = (0.25, 0.75)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    c = torch.tensor(levels).repeat(N // 2)
    return (c.view(-1, 1, 1, 1) + 0.05 * torch.rand(N, *SHAPE, generator=g)).clamp(0, 1)


def smoother(fn: Any, sigmas: list[float] | None = None) -> tuple[BlackBoxSmoother, QueryEngine]:
    engine = QueryEngine(CallableConnector(fn, input_shape=SHAPE, num_classes=2, fingerprint=f"toy:{fn.__name__}"))
    sm = BlackBoxSmoother(engine, module={"name": "dncnn", "depth": 2, "width": 8},
                          **({"sigmas": sigmas} if sigmas else {"sigma": 0.25}))
    return sm, engine


def state(sm: BlackBoxSmoother) -> dict[str, torch.Tensor]:
    assert sm.module is not None
    return {k: v.clone() for k, v in sm.module.state_dict().items()}


def own_rounds(report: Any) -> list[dict[str, float]]:
    return [h for h in report.history if "robust_score" in h and "pilot" not in h]


def pilot_rounds(report: Any) -> list[dict[str, float]]:
    return [h for h in report.history if "robust_score" in h and "pilot" in h]


# ------------------------------------------------------------------------------------- sizing
@pytest.mark.parametrize("strategy", ["surrogate", "zeroth_order"])
def test_a_pilot_costs_at_most_its_share_of_the_cap_and_half_the_early_stop(strategy: str) -> None:
    cls = get_strategy(strategy)
    for n in (64, 500, 2_000, 60_000):
        for budget in (None, 20_000, 40_000, 1_000_000):
            for share in (0.05, 0.1, 0.25):
                cfg = FitConfig(strategy=strategy, pilot=share)
                plan = plan_pilot(cls, cfg, n, budget)
                stop_alone = cls.base_expected_queries(cfg, n)
                if plan is None:
                    continue
                cap = min(cls.base_queries(cfg, n), budget or 10**12)
                assert plan.queries <= share * cap and plan.queries <= 0.5 * stop_alone  # never over its share
                assert plan.queries == cls.base_queries(plan.config, n)  # its cap, whatever it shows
                pc = plan.config
                assert pc.pilot == 0 and pc.steps == cfg.patience * pc.score_every < cfg.steps
                assert MIN_SCORE_IMAGES <= pc.score_images <= pc.clean_queries <= min(n, cfg.clean_queries)
                assert plan_pilot(cls, cfg, n, budget) == plan  # deterministic: a resume re-derives it
                # the dry run's two numbers
                assert expected_fit_queries(cfg, n, budget) == min(plan.queries, budget or plan.queries)
                full = cls.base_queries(cfg, n)
                assert estimate_fit_queries(cfg, n, budget) == min(full + plan.queries - plan.reused,
                                                                   budget or 10**12)
    if strategy == "surrogate":  # the default fit of 60,000 images: a tenth of its cap when no round gains
        cfg = FitConfig(strategy="surrogate")
        for budget in (None, 40_000):
            assert expected_fit_queries(cfg, 60_000, budget) <= 0.1 * min(cls.base_queries(cfg, 60_000), budget or 10**9)


def test_no_pilot_where_it_cannot_save_anything() -> None:
    cls = get_strategy("surrogate")
    assert plan_pilot(cls, FitConfig(pilot=0), 60_000) is None
    assert plan_pilot(cls, FitConfig(patience=0), 60_000) is None
    assert plan_pilot(cls, FitConfig(steps=300), 60_000) is None  # patience * score_every >= steps
    assert plan_pilot(get_strategy("denoise"), FitConfig(strategy="denoise"), 60_000) is None
    # a fit whose scoring set is already at the pilot's floor: the pilot would cost as much as the stop
    toy = FitConfig(strategy="surrogate", steps=400, score_every=5, clean_queries=64, score_images=64,
                    distill_queries=32, redistill_every=20)
    assert plan_pilot(cls, toy, 64) is None
    assert expected_fit_queries(toy, 64) == cls.base_expected_queries(toy, 64)
    # a budget so small that even the smallest pilot is over its share: none (never more than its share)
    assert plan_pilot(cls, FitConfig(), 60_000, budget=1_500) is None


# -------------------------------------------------------------------------------------- fits
def test_a_fit_whose_steps_cannot_help_stops_after_its_pilot_for_a_tenth_of_its_cap() -> None:
    sm, engine = smoother(brightness)
    cfg = FitConfig(strategy="surrogate", **BIG)
    cap = estimate_fit_queries(cfg, N)
    plan = plan_pilot(get_strategy("surrogate"), cfg, N)
    assert plan is not None
    report = sm.fit(images(), config=cfg, progress=None)
    assert report.stopped == "no_gain" and report.pilot is not None and not report.pilot.gained
    assert report.queries == engine.stats.queries == plan.queries == expected_fit_queries(cfg, N)
    assert report.queries <= 0.1 * cap
    assert report.queries_saved == cap - report.queries
    assert report.pilot.queries == report.queries and report.pilot.steps == plan.config.steps
    rounds = pilot_rounds(report)
    assert [h["step"] for h in rounds] == [20, 20 + 10, 20 + 20] and not own_rounds(report)
    assert report.steps_done == 20 + plan.config.steps
    assert report.best_step == 20 and report.best_score == rounds[0]["score"]  # the pretrained module is kept
    pre_sm, _ = smoother(brightness)  # the same pretraining, no strategy steps: bit for bit the kept module
    pre_sm.fit(images(), config=cfg.model_copy(update={"steps": 0}), progress=None)
    a, b = state(sm), state(pre_sm)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # without a pilot the same fit pays the early stop alone: at least twice as much, same decision
    sm0, engine0 = smoother(brightness)
    r0 = sm0.fit(images(), config=cfg.model_copy(update={"pilot": 0.0}), progress=None)
    assert r0.stopped == "no_gain" and r0.pilot is None
    assert r0.queries == get_strategy("surrogate").base_expected_queries(cfg, N) >= 2 * report.queries


def test_a_fit_whose_steps_help_passes_its_pilot_and_is_the_fit_without_one() -> None:
    sm, engine = smoother(center_pixel)
    cfg = FitConfig(strategy="surrogate", **{**BIG, "steps": 60})
    plan = plan_pilot(get_strategy("surrogate"), cfg, N)
    assert plan is not None
    report = sm.fit(images(), config=cfg, progress=None)
    assert report.pilot is not None and report.pilot.gained
    assert any(h["gain_p"] <= cfg.gain_alpha for h in pilot_rounds(report)[1:])
    sm0, engine0 = smoother(center_pixel)
    r0 = sm0.fit(images(), config=cfg.model_copy(update={"pilot": 0.0}), progress=None)
    # the full fit is the fit without a pilot: same rounds, same kept state, bit for bit
    assert own_rounds(report) == own_rounds(r0)
    assert (report.stopped, report.steps_done, report.best_step) == (r0.stopped, r0.steps_done, r0.best_step)
    a, b = state(sm), state(sm0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and it pays the pilot plus itself, minus the pilot's clean labels (never bought twice)
    assert report.queries == engine.stats.queries == plan.queries + r0.queries - plan.reused
    assert report.queries <= estimate_fit_queries(cfg, N)
    assert own_rounds(report)[-1]["score"] > own_rounds(report)[0]["score"]


def test_a_pilot_never_trains_your_surrogate() -> None:
    from blackbox_rs.surrogates import SmallCNN

    mine = SmallCNN(1, 2, (6, 6), width=4, hidden=8, seed=3)
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    sm, _ = smoother(brightness)
    report = sm.fit(images(), config=FitConfig(strategy="surrogate", **BIG), surrogate=mine, progress=None)
    assert report.stopped == "no_gain" and report.pilot is not None
    assert all(torch.equal(before[k], v) for k, v in mine.state_dict().items())


def test_a_zeroth_order_pilot_hands_back_its_lora_module_and_stops() -> None:
    sm, engine = smoother(brightness, sigmas=[0.25, 0.5])
    cfg = FitConfig(strategy="zeroth_order", **{k: v for k, v in BIG.items() if k not in (
        "distill_queries", "redistill_every", "surrogate_epochs")}, zo_batch=4, zo_directions=1)
    plan = plan_pilot(get_strategy("zeroth_order"), cfg, N)
    assert plan is not None and plan.config.score_every < cfg.score_every
    report = sm.fit(images(), config=cfg, progress=None)
    assert report.stopped == "no_gain" and report.pilot is not None and not report.pilot.gained
    assert report.queries == plan.queries <= 0.1 * estimate_fit_queries(cfg, N)
    assert not isinstance(sm.module, LoRADnCNN) and report.best_step == 20  # the pretrained DnCNN is kept
    assert all("robust_score@0.5" in h for h in pilot_rounds(report))


# ------------------------------------------------------------------------------------- resume
def test_a_rerun_of_a_fit_its_pilot_ended_spends_nothing(tmp_path: Path) -> None:
    cfg = FitConfig(strategy="surrogate", **BIG)
    sm, engine = smoother(brightness)
    first = sm.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None)
    assert first.stopped == "no_gain" and (tmp_path / "pilot").is_dir()
    sm2, engine2 = smoother(brightness)
    again = sm2.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None)
    assert again.queries == engine2.stats.queries == 0
    assert again.stopped == "no_gain" and again.best_step == first.best_step
    assert again.pilot is not None and again.pilot.queries == 0
    a, b = state(sm), state(sm2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_pilot_interrupted_by_the_budget_resumes_to_the_uninterrupted_fit(tmp_path: Path) -> None:
    """An engine budget (which does not size the pilot) stops the fit inside its pilot; the rerun with
    a larger one continues that pilot to the uninterrupted fit's end, paying nothing twice."""
    from blackbox_rs import QueryBudget

    cfg = FitConfig(strategy="surrogate", **BIG)
    plan = plan_pilot(get_strategy("surrogate"), cfg, N)
    assert plan is not None
    sm, _ = smoother(brightness)
    whole = sm.fit(images(), config=cfg, progress=None)

    def budgeted(limit: int) -> BlackBoxSmoother:
        engine = QueryEngine(CallableConnector(brightness, input_shape=SHAPE, num_classes=2, fingerprint="toy:brightness"),
                             budget=QueryBudget(max_queries=limit))
        return BlackBoxSmoother(engine, module={"name": "dncnn", "depth": 2, "width": 8}, sigma=0.25)

    cut = budgeted(plan.queries // 2)
    interrupted = cut.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None)
    assert interrupted.stopped == "budget" and 0 < interrupted.queries <= plan.queries // 2
    assert interrupted.pilot is not None and interrupted.pilot.stopped == "budget"
    rest = budgeted(10**6)
    done = rest.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None)
    assert done.stopped == "no_gain" and done.pilot is not None and not done.pilot.gained
    assert interrupted.queries + done.queries == whole.queries
    assert done.best_step == whole.best_step
    a, b = state(sm), state(rest)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------- resume and identity (review findings)
def budgeted(fn: Any, limit: int, sigmas: list[float] | None = None) -> BlackBoxSmoother:
    from blackbox_rs import QueryBudget

    engine = QueryEngine(CallableConnector(fn, input_shape=SHAPE, num_classes=2, fingerprint=f"toy:{fn.__name__}"),
                         budget=QueryBudget(max_queries=limit))
    return BlackBoxSmoother(engine, module={"name": "dncnn", "depth": 2, "width": 8},
                            **({"sigmas": sigmas} if sigmas else {"sigma": 0.25}))


def test_the_pilot_setting_is_not_part_of_a_checkpoints_identity_and_old_checkpoints_run_no_pilot(tmp_path: Path) -> None:
    """A checkpoint written before pilots existed (no ``pilot`` in its meta, a digest without the
    setting) resumes as it would have: no pilot is planned, nothing is paid twice."""
    import json

    cfg = FitConfig(strategy="surrogate", **BIG)
    ref, _ = smoother(brightness)
    r0 = ref.fit(images(), config=cfg.model_copy(update={"pilot": 0.0}), progress=None)  # the fit without pilots
    cut = budgeted(brightness, 3_000)
    first = cut.fit(images(), config=cfg.model_copy(update={"pilot": 0.0}), checkpoint_dir=tmp_path, progress=None)
    assert first.stopped == "budget"
    meta_path = tmp_path / "fit_state.json"
    meta = json.loads(meta_path.read_text())
    assert "pilot" in meta and meta["pilot"] is None
    del meta["pilot"]  # as the code before pilots wrote it
    meta_path.write_text(json.dumps(meta))
    rest = budgeted(brightness, 10**6)
    done = rest.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None)  # pilot=0.1 (default) now
    assert done.pilot is None and not pilot_rounds(done)
    assert first.queries + done.queries == r0.queries and done.stopped == r0.stopped == "no_gain"
    a, b = state(ref), state(rest)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_zeroth_order_fit_its_pilot_ended_reruns_from_its_checkpoint(tmp_path: Path) -> None:
    cfg = FitConfig(strategy="zeroth_order", **{k: v for k, v in BIG.items() if k not in (
        "distill_queries", "redistill_every", "surrogate_epochs")}, zo_batch=4, zo_directions=1)
    sm, _ = smoother(brightness)
    first = sm.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None)
    assert first.stopped == "no_gain" and first.pilot is not None and not isinstance(sm.module, LoRADnCNN)
    again_sm, engine = smoother(brightness)
    again = again_sm.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None)
    assert again.queries == engine.stats.queries == 0 and again.stopped == "no_gain"
    assert again.best_step == first.best_step and not isinstance(again_sm.module, LoRADnCNN)
    a, b = state(sm), state(again_sm)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _force_gain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pilot's verdict is 'gain' (the toy pilots here find none by themselves)."""
    from blackbox_rs.fitting.strategies import base

    init = base._PilotRun.__init__

    def forced(self: Any, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        self.gained = True
        self.summary = self.summary.model_copy(update={"gained": True})

    monkeypatch.setattr(base._PilotRun, "__init__", forced)


def test_a_zeroth_order_full_fit_after_a_gaining_pilot_is_the_fit_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The LoRA form draws its initialisation from the global random state: the pilot runs on a fork
    of it, so the full fit's LoRA is the one a fit without a pilot builds."""
    _force_gain(monkeypatch)
    cfg = FitConfig(strategy="zeroth_order", **{k: v for k, v in BIG.items() if k not in (
        "distill_queries", "redistill_every", "surrogate_epochs")}, zo_batch=4, zo_directions=1)
    assert plan_pilot(get_strategy("zeroth_order"), cfg, N) is not None
    torch.manual_seed(5)
    sm, _ = smoother(center_pixel)
    report = sm.fit(images(), config=cfg, progress=None)
    torch.manual_seed(5)
    sm0, _ = smoother(center_pixel)
    r0 = sm0.fit(images(), config=cfg.model_copy(update={"pilot": 0.0}), progress=None)
    assert report.pilot is not None and report.pilot.gained
    assert own_rounds(report) == own_rounds(r0)
    a, b = state(sm), state(sm0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_labels_a_gaining_pilot_paid_for_survive_an_interruption(tmp_path: Path) -> None:
    """Stopped right after a gaining pilot (before the full fit's own clean labels), the rerun takes the
    pilot's labels from the checkpoint: the two calls pay what the uninterrupted fit pays; the resumed
    report still says what the pilot did."""
    cfg = FitConfig(strategy="surrogate", **{**BIG, "steps": 60})
    plan = plan_pilot(get_strategy("surrogate"), cfg, N)
    assert plan is not None
    whole_sm, _ = smoother(center_pixel)
    whole = whole_sm.fit(images(), config=cfg, progress=None)
    assert whole.pilot is not None and whole.pilot.gained
    cut = budgeted(center_pixel, plan.queries + 100)
    first = cut.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None)
    assert first.stopped == "budget" and first.pilot is not None and first.pilot.gained
    rest = budgeted(center_pixel, 10**6)
    done = rest.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None)
    assert first.queries + done.queries == whole.queries
    assert done.pilot is not None and done.pilot.gained and done.pilot.queries == 0
    assert pilot_rounds(done) == pilot_rounds(whole) and own_rounds(done) == own_rounds(whole)
    a, b = state(whole_sm), state(rest)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_rerun_with_another_budget_continues_the_recorded_pilot(tmp_path: Path) -> None:
    """The pilot's scale is on disk before it spends anything: a fit interrupted inside its pilot and
    rerun with another fit budget continues the same pilot (never re-plans it)."""
    cfg = FitConfig(strategy="surrogate", **BIG)
    cap = estimate_fit_queries(cfg, N)
    plan = plan_pilot(get_strategy("surrogate"), cfg, N, cap)
    other = plan_pilot(get_strategy("surrogate"), cfg, N, cap // 4)
    assert plan is not None and other is not None and other.factor != plan.factor
    cut = budgeted(brightness, plan.queries // 2)
    first = cut.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None, budget=cap)
    assert first.stopped == "budget"
    rest = budgeted(brightness, 10**6)
    done = rest.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None, budget=cap // 4)
    assert done.stopped == "no_gain" and done.pilot is not None and done.pilot.factor == plan.factor
    assert first.queries + done.queries == plan.queries


def test_a_rerun_with_pilot_zero_runs_the_full_fit_its_pilot_stopped(tmp_path: Path) -> None:
    cfg = FitConfig(strategy="surrogate", **{**BIG, "steps": 60})
    sm, _ = smoother(brightness)
    first = sm.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None)
    assert first.stopped == "no_gain" and first.pilot is not None and not first.pilot.gained
    full_sm, engine = smoother(brightness)
    full = full_sm.fit(images(), config=cfg.model_copy(update={"pilot": 0.0}), checkpoint_dir=tmp_path, progress=None)
    ref_sm, _ = smoother(brightness)
    ref = ref_sm.fit(images(), config=cfg.model_copy(update={"pilot": 0.0}), progress=None)
    assert own_rounds(full) == own_rounds(ref) and full.stopped == ref.stopped
    assert full.queries == ref.queries - first.pilot.clean_queries  # the pilot's labels are not bought again
    a, b = state(full_sm), state(ref_sm)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_pilot_without_enough_labelled_images_to_hold_its_scoring_set_out() -> None:
    cls = get_strategy("surrogate")
    for n in (40, 64, 100):  # the pilot's training pool would be smaller than its scoring set
        assert plan_pilot(cls, FitConfig(), n) is None
    plan = plan_pilot(cls, FitConfig(), 2 * MIN_SCORE_IMAGES)
    assert plan is not None and plan.config.clean_queries - plan.config.score_images >= plan.config.score_images


def test_a_pilots_surrogate_never_sees_its_scoring_images() -> None:
    from blackbox_rs.fitting.context import FitContext
    from blackbox_rs.fitting.data import FitData
    from blackbox_rs.fitting.strategies.surrogate import SurrogateStrategy

    sm, engine = smoother(brightness)
    cfg = FitConfig(strategy="surrogate", **{**BIG, "pretrain_steps": 0, "clean_queries": 200, "score_images": 64})
    ctx = FitContext(engine, sm.module, FitData(x=images(), y=None), [0.25], cfg)
    ctx.holdout = True
    strat = SurrogateStrategy(ctx)
    strat.main_step(0)  # the clean labels and the first distillation round go into the surrogate's buffer
    held = ctx.scoring_indices()
    pool = ctx.labelled_pool()
    assert len(pool) == 200 - 64 and not set(pool.tolist()) & set(held.tolist())
    scoring = images()[held].flatten(1)
    buffered = strat.buf_x.flatten(1)
    assert len(buffered) == len(pool) + cfg.distill_queries
    assert not bool((torch.cdist(buffered[: len(pool)], scoring) == 0).any())  # no scoring image among them


def test_a_crash_right_after_a_gaining_pilot_keeps_its_spend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gaining pilot's outcome and spend are on disk before the full fit's first step: a process
    that dies there resumes with the pilot counted (queries_saved as if uninterrupted)."""
    from blackbox_rs.fitting.strategies import base
    from blackbox_rs.fitting.strategies.surrogate import SurrogateStrategy

    _force_gain(monkeypatch)
    cfg = FitConfig(strategy="surrogate", **BIG)
    whole_sm, _ = smoother(brightness)
    whole = whole_sm.fit(images(), config=cfg, progress=None)
    assert whole.stopped == "no_gain" and whole.pilot is not None and whole.pilot.gained
    gone = {"dead": False}
    real_ckpt, real_step = base._checkpoint, SurrogateStrategy.step

    def ckpt(ctx: Any, strat: Any, directory: Any, *a: Any, **kw: Any) -> None:
        if gone["dead"] and Path(directory) == tmp_path:
            return  # the process is gone: its last checkpoint is never written
        real_ckpt(ctx, strat, directory, *a, **kw)

    def step(self: Any, k: int) -> dict[str, float]:
        if not self.ctx.holdout and k == self.pretrain_steps:  # the full fit's first step
            gone["dead"] = True
            raise RuntimeError("killed")
        return real_step(self, k)

    monkeypatch.setattr(base, "_checkpoint", ckpt)
    monkeypatch.setattr(SurrogateStrategy, "step", step)
    sm, _ = smoother(brightness)
    with pytest.raises(RuntimeError, match="killed"):
        sm.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None)
    monkeypatch.setattr(base, "_checkpoint", real_ckpt)
    monkeypatch.setattr(SurrogateStrategy, "step", real_step)
    rest, _ = smoother(brightness)
    done = rest.fit(images(), config=cfg, checkpoint_dir=tmp_path, progress=None)
    assert done.pilot is not None and done.pilot.gained and done.pilot.outcome == "gain"
    assert done.queries == whole.queries - whole.pilot.queries  # only the full fit is paid again
    assert done.queries_saved == whole.queries_saved
