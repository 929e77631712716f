"""Each fit strategy owns its typed config; ``FitConfig`` is the discriminated union of the registered
ones; the surrogate is set one way (the ``surrogate`` setting) and is bound by digest, never by repr."""

from __future__ import annotations

import copy
import inspect
import json
from typing import Any, ClassVar, Literal

import pytest
import torch
from pydantic import ValidationError

from blackbox_rs import BlackBoxSmoother, FitConfig, QueryEngine
from blackbox_rs.connectors import CallableConnector
from blackbox_rs.errors import CacheError, ConfigError, InvalidParameterError
from blackbox_rs.fitting.strategies import STRATEGIES, Strategy, register_strategy

SHAPE = (1, 6, 6)
BUILT_IN = ("denoise", "passthrough", "surrogate", "zeroth_order")
TINY = {"pretrain_steps": 2, "steps": 3, "batch_size": 4, "clean_queries": 10, "score_images": 6, "score_draws": 2,
        "score_every": 3, "checkpoint_every": 1}


def _smoother() -> tuple[BlackBoxSmoother, QueryEngine, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))
    engine = QueryEngine(CallableConnector(model, input_shape=SHAPE, num_classes=3, fingerprint="tiny:v1"))
    sm = BlackBoxSmoother(engine, module={"name": "dncnn", "depth": 2, "width": 4}, sigma=0.25)
    return sm, engine, torch.rand(24, *SHAPE, generator=torch.Generator().manual_seed(1))


def _surrogate_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))


# ---------------------------------------------------------------------------- the union
def test_fitconfig_returns_the_named_strategys_own_config():
    from blackbox_rs.fitting.config import StrategyConfig

    zo = FitConfig(strategy="zeroth_order", steps=5, zo_lr=0.01)
    assert type(zo).__name__ == "ZerothOrderConfig" and (zo.steps, zo.zo_lr) == (5, 0.01)
    default = FitConfig()
    assert type(default).__name__ == "SurrogateConfig" and default.strategy == "surrogate"
    for name in BUILT_IN:
        cfg = FitConfig(strategy=name)
        assert isinstance(cfg, FitConfig) and isinstance(cfg, StrategyConfig) and cfg.strategy == name
        assert type(cfg) is FitConfig.config_class(name)
        assert FitConfig(**cfg.model_dump()) == cfg == FitConfig.validate(cfg.model_dump(mode="json"))
    assert not isinstance({"strategy": "surrogate"}, FitConfig)
    assert not hasattr(default, "zo_lr") and not hasattr(zo, "distill_queries")  # each holds its own settings only


def test_defaults_are_those_of_the_former_flat_config():
    """Benchmarks reproduce figures: every default is unchanged."""
    shared = {"steps": 600, "pretrain_steps": 600, "batch_size": 64, "noise_draws": 1, "lr": 1e-3, "pretrain_lr": None,
              "lr_schedule": "constant", "clean_fraction": 0.1, "weights": {"mse": 1.0, "stability": 1.0}, "seed": 0,
              "checkpoint_every": 50, "clean_queries": 10_000, "score_images": 256, "score_draws": 8,
              "score_every": 150,
              "patience": 2, "gain_alpha": 0.1,  # added by issue #23: query-paid fits stop when rounds show no gain
              "pilot": 0.1,  # added by issue #23: a pilot spends at most a tenth of the cap to learn whether steps help
              "device": None}  # added by issue #19: where the module, surrogate and training batches live
    own = {"surrogate": {"surrogate": "small_cnn", "distill_queries": 10_000, "redistill_every": 150,
                         "surrogate_epochs": 2.0, "surrogate_lr": 2e-3, "surrogate_buffer": 60_000},
           "zeroth_order": {"zo_max_parameters": 20_000, "zo_rank": 2, "zo_directions": 4, "zo_mu": 0.05,
                            "zo_batch": 32, "zo_lr": 0.002, "zo_momentum": 0.9, "zo_loss": "auto"}}
    for name in BUILT_IN:
        assert FitConfig(strategy=name).model_dump() == {"strategy": name, **shared, **own.get(name, {})}


def test_the_early_stop_settings_are_shared_and_validated():
    for name in BUILT_IN:
        cfg = FitConfig(strategy=name, patience=0, gain_alpha=0.05)
        assert (cfg.patience, cfg.gain_alpha) == (0, 0.05)
    for bad in ({"patience": -1}, {"gain_alpha": 0.0}, {"gain_alpha": 0.6}, {"patience": 1.5}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            FitConfig(**bad)
    fields = FitConfig.config_class("surrogate").model_fields
    assert "0: never stop early" in (fields["patience"].description or "")
    assert "paired test" in (fields["gain_alpha"].description or "")


def test_a_setting_of_another_strategy_is_an_error_naming_both():
    with pytest.raises(ValidationError, match="zo_lr is not a setting of strategy 'surrogate'; it belongs to "
                                              "'zeroth_order'"):
        FitConfig(zo_lr=0.01)
    with pytest.raises(ValidationError, match="distill_queries is not a setting of strategy 'denoise'; it belongs "
                                              "to 'surrogate'"):
        FitConfig(strategy="denoise", distill_queries=5)
    with pytest.raises(ValidationError, match="zo_lrr is not a setting of strategy 'zeroth_order' \\(unknown"):
        FitConfig(strategy="zeroth_order", zo_lrr=0.01)
    with pytest.raises(ValidationError, match="unknown strategy 'nope'"):
        FitConfig(strategy="nope")
    with pytest.raises(ValidationError, match="zo_momentum"):
        FitConfig(strategy="zeroth_order", zo_momentum=1.0)
    sm, engine, x = _smoother()
    with pytest.raises(ConfigError, match="zo_lr is not a setting of strategy 'surrogate'; it belongs to 'zeroth_order'"):
        sm.fit(x, zo_lr=0.01)
    with pytest.raises(ConfigError, match="distill_queries is not a setting of strategy 'passthrough'"):
        sm.fit(x, strategy="passthrough", distill_queries=5)
    assert engine.stats.queries == 0


def test_every_setting_is_described_and_the_schema_covers_every_registered_strategy():
    for name in BUILT_IN:
        for field, info in FitConfig.config_class(name).model_fields.items():
            assert info.description and len(info.description) > 10, (name, field)
            assert "Fashion" not in info.description and "docs/" not in info.description, (name, field)  # no lab notes
    schema = FitConfig.json_schema()
    json.dumps(schema)
    assert sorted(schema["discriminator"]["mapping"]) == sorted(BUILT_IN)
    assert schema["$defs"]["SurrogateConfig"]["properties"]["surrogate"]["type"] == "string"


# ---------------------------------------------------------------------------- registration
def test_registration_checks_the_config_literal_and_rebuilds_the_union():
    from blackbox_rs.fitting.config import StrategyConfig

    class Wrong(StrategyConfig):
        strategy: Literal["someone_else"] = "someone_else"

    class Mislabelled(Strategy):
        name: ClassVar[str] = "k_mislabelled"
        config_class = Wrong

        def main_step(self, k: int) -> dict[str, float]:  # pragma: no cover - never run
            return {}

    with pytest.raises(InvalidParameterError, match="'k_mislabelled'.*declares strategy 'someone_else'"):
        register_strategy(Mislabelled)
    assert "k_mislabelled" not in STRATEGIES

    class Plain(Strategy):  # no config of its own: a generated one with the right Literal
        name: ClassVar[str] = "k_plain"

        def main_step(self, k: int) -> dict[str, float]:  # pragma: no cover - never run
            return {}

    before = FitConfig.json_schema()
    register_strategy(Plain)
    try:
        assert issubclass(Plain.config_class, StrategyConfig) and Plain.config_class is not StrategyConfig
        cfg = FitConfig(strategy="k_plain", steps=3)
        assert type(cfg) is Plain.config_class and cfg.steps == 3 and isinstance(cfg, FitConfig)
        assert "k_plain" in FitConfig.json_schema()["discriminator"]["mapping"]
        with pytest.raises(ValidationError, match="zo_lr is not a setting of strategy 'k_plain'"):
            FitConfig(strategy="k_plain", zo_lr=0.1)
    finally:
        STRATEGIES.pop("k_plain")
    assert FitConfig.json_schema() == before


# ---------------------------------------------------------------------------- changing strategy
def test_strategy_keyword_carries_the_shared_settings_and_refuses_foreign_explicit_ones():
    from blackbox_rs.fitting.config import merge_fit_config

    sur = FitConfig(strategy="surrogate", steps=3, lr=0.01, distill_queries=7)
    with pytest.raises(ValidationError, match="distill_queries is not a setting of strategy 'zeroth_order'"):
        merge_fit_config(sur, "zeroth_order", {})
    zo = merge_fit_config(FitConfig(steps=3, lr=0.01), "zeroth_order", {"zo_batch": 5})
    assert type(zo).__name__ == "ZerothOrderConfig" and (zo.steps, zo.lr, zo.zo_batch, zo.zo_lr) == (3, 0.01, 5, 0.002)
    assert merge_fit_config(sur, None, {"steps": 4}).model_dump() == {**sur.model_dump(), "steps": 4}
    assert merge_fit_config({"strategy": "denoise", "steps": 2}, None, {}).strategy == "denoise"
    sm, engine, x = _smoother()
    report = sm.fit(x, config=FitConfig(strategy="surrogate", **TINY), strategy="denoise")  # shared settings carried
    assert report.strategy == "denoise" and report.steps_total == 5 and engine.stats.queries == 0


# ---------------------------------------------------------------------------- the surrogate, one way
def test_the_surrogate_is_a_setting_and_a_module_is_bound_by_digest():
    from blackbox_rs.fitting.strategies.surrogate import SurrogateStrategy, surrogate_identity

    assert list(inspect.signature(SurrogateStrategy.__init__).parameters) == ["self", "ctx"]
    a, b, c = _surrogate_net(0), _surrogate_net(0), _surrogate_net(1)
    cfg = FitConfig(surrogate=a)
    assert cfg.surrogate is a and cfg.model_dump()["surrogate"] is a  # the module itself, in Python
    dumped = cfg.model_dump(mode="json")["surrogate"]
    json.dumps(cfg.model_dump(mode="json"))
    assert dumped == surrogate_identity(b) != surrogate_identity(c)  # weights, not object identity or repr
    assert dumped.startswith("module:torch.nn.modules.container.Sequential:sha256:") and "Linear" not in dumped
    with pytest.raises(ValidationError, match="unknown surrogate 'tiny_cnn'"):
        FitConfig(surrogate="tiny_cnn")
    sm, _, x = _smoother()
    with pytest.raises(ConfigError, match="surrogate is not a setting of strategy 'zeroth_order'"):
        sm.fit(x, strategy="zeroth_order", surrogate=_surrogate_net())  # was silently ignored


def test_a_module_surrogate_fit_checkpoints_and_resumes_only_with_the_same_weights(tmp_path):
    first = _surrogate_net(0)
    same = copy.deepcopy(first)  # the fit trains the given module in place
    settings: dict[str, Any] = {**TINY, "distill_queries": 5, "redistill_every": 2, "surrogate_epochs": 0.5}
    sm, _, x = _smoother()
    done = sm.fit(x, surrogate=first, checkpoint_dir=tmp_path / "ck", **settings)
    assert done.stopped == "completed" and done.resumed_from is None
    trained = [p.detach().clone() for p in first.parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(trained, same.parameters(), strict=True))  # it was the surrogate
    sm2, _, _ = _smoother()
    again = sm2.fit(x, config=FitConfig(surrogate=same, **settings), checkpoint_dir=tmp_path / "ck")
    assert again.resumed_from == done.steps_done and again.queries == 0
    sm3, _, _ = _smoother()
    with pytest.raises(CacheError, match="other settings"):
        sm3.fit(x, surrogate=_surrogate_net(1), checkpoint_dir=tmp_path / "ck", **settings)
