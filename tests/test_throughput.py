"""Measured images/s of local models (issue 19): nothing charged, counted or cached; None for paid or
remote connectors; the certify and fit dry runs print the measured rate and the ETA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from blackbox_rs import QueryBudget
from blackbox_rs.connectors import CallableConnector, ModuleConnector
from blackbox_rs.engine import QueryEngine
from blackbox_rs.errors import InvalidParameterError

runner = CliRunner()


class Recording(nn.Module):
    """A tiny classifier that records the batch size of every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(x.shape[0]))
        return self.lin(x.flatten(1))


def test_a_local_module_is_timed_without_touching_the_engine(tmp_path):
    from blackbox_rs.throughput import is_local_model, measure_throughput

    model = Recording()
    conn = ModuleConnector(model, input_shape=(1, 2, 2), max_batch=3)
    budget = QueryBudget(max_queries=100, ledger=tmp_path / "ledger.json")
    engine = QueryEngine(conn, cache=tmp_path / "cache", budget=budget)
    calls: list[float] = []

    def transform(b: torch.Tensor) -> torch.Tensor:
        calls.append(float(b.min()))
        return b * 2.0  # out of [0, 1]: clipped before the model, as certification does

    rng = torch.get_rng_state()
    model.seen.clear()
    tp = measure_throughput(engine, batch_size=8, transform=transform, seconds=0.02, max_batches=4)
    assert tp is not None and tp.images_per_s > 0 and tp.seconds > 0
    assert tp.batch_size == 8 and 1 <= tp.measured_batches <= 4 and tp.includes_transform
    assert len(calls) == tp.measured_batches + 1  # one warm-up batch, then the timed ones
    assert min(calls) >= 0.0  # noise-like images in [0, 1]
    assert model.seen == [3, 3, 2] * (tp.measured_batches + 1)  # chunked by max_batch, as the engine would
    # nothing charged, counted or cached, and torch's global random state untouched
    assert engine.stats.queries == engine.stats.cache_hits == engine.stats.requests == 0
    assert budget.spent_queries == 0 and not (tmp_path / "ledger.json").exists()
    assert len(engine.cache) == 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert is_local_model(engine) and is_local_model(conn)
    engine.query(torch.rand(2, 1, 2, 2))  # control: a real query through the engine is counted and cached
    assert engine.stats.queries == 2 and len(engine.cache) > 0 and budget.spent_queries == 2


def test_paid_and_remote_connectors_are_never_sent_anything():
    from blackbox_rs.throughput import is_local_model, measure_throughput

    model = Recording()
    paid = ModuleConnector(model, input_shape=(1, 2, 2), cost_per_query=0.001)
    model.seen.clear()
    assert measure_throughput(paid, batch_size=4) is None
    assert model.seen == []  # not one image sent
    sent: list[int] = []

    def remote(b: torch.Tensor) -> torch.Tensor:  # may call anything: not a local model
        sent.append(int(b.shape[0]))
        return torch.zeros(b.shape[0], dtype=torch.int64)

    callable_conn = CallableConnector(remote, input_shape=(1, 2, 2), num_classes=2)
    assert not is_local_model(callable_conn)
    assert measure_throughput(callable_conn, batch_size=4) is None and sent == []


def test_bad_settings_are_refused():
    from blackbox_rs.throughput import measure_throughput

    conn = ModuleConnector(Recording(), input_shape=(1, 2, 2))
    for kwargs in ({"batch_size": 0}, {"seconds": 0}, {"seconds": -1.0}, {"max_batches": 0}):
        with pytest.raises(InvalidParameterError):
            measure_throughput(conn, **kwargs)


def test_the_cli_helper_says_nothing_for_a_remote_model():
    from blackbox_rs.cli import _measured_speed

    conn = CallableConnector(lambda b: torch.zeros(b.shape[0], dtype=torch.int64), input_shape=(1, 2, 2),
                             num_classes=2)
    assert _measured_speed(conn, 4, 1000) == ""
    local = _measured_speed(ModuleConnector(Recording(), input_shape=(1, 2, 2)), 4, 1000)
    assert "images/s" in local and "ETA" in local


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    from blackbox_rs._demo.zoo import SmallCNN, export_torchscript

    d = tmp_path_factory.mktemp("tp")
    export_torchscript(SmallCNN(1, 10, (8, 8), width=4, seed=0), d / "m.pt", (1, 8, 8))
    g = np.random.default_rng(0)
    np.savez(d / "data.npz", x=g.random((5, 1, 8, 8), dtype=np.float32), y=g.integers(0, 10, 5))
    (d / "run.toml").write_text(f"""
[connector]
name = "torchscript"
path = "{d / 'm.pt'}"
input_shape = [1, 8, 8]
num_classes = 10

[data]
fit = "{d / 'data.npz'}"
certify = "{d / 'data.npz'}"

[fit]
strategy = "denoise"
pretrain_steps = 5
steps = 0

[certify]
sigma = 0.25
n0 = 10
n = 100

[run]
out_dir = "{d / 'out'}"
""")
    return d


def test_certify_dry_run_reports_measured_images_per_s_and_eta(run_file, tmp_path):
    from blackbox_rs.cli import app

    d = run_file
    out = tmp_path / "out"
    r = runner.invoke(app, ["certify", str(d / "run.toml"), "--out-dir", str(out), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "550 queries" in r.output and "images/s" in r.output and "ETA " in r.output, r.output
    assert "for the whole run" in r.output and "nothing was sent" in r.output
    assert not out.exists()


def test_certify_dry_run_with_a_module_times_module_and_model(run_file, tmp_path):
    from blackbox_rs.cli import app
    from blackbox_rs.connectors import TorchScriptConnector
    from blackbox_rs.smoother import BlackBoxSmoother

    d = run_file
    conn = TorchScriptConnector(d / "m.pt", input_shape=(1, 8, 8), num_classes=10)
    BlackBoxSmoother(conn, module="dncnn", sigma=0.25).save(tmp_path / "smoother")
    out = tmp_path / "out"
    r = runner.invoke(app, ["certify", str(d / "run.toml"), "--out-dir", str(out), "--module-dir",
                            str(tmp_path / "smoother"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "images/s" in r.output and "through the module" in r.output and "ETA " in r.output, r.output
    assert not out.exists()


def test_fit_dry_run_reports_the_models_measured_rate(run_file, tmp_path):
    from blackbox_rs.cli import app

    out = tmp_path / "out"
    r = runner.invoke(app, ["fit", str(run_file / "run.toml"), "--out-dir", str(out), "--dry-run"])
    assert r.exit_code == 0 and "at most 0 queries" in r.output, r.output
    assert "images/s" not in r.output  # a denoise fit sends no query: no model time to report
    toml = tmp_path / "zo.toml"
    toml.write_text((run_file / "run.toml").read_text().replace('"denoise"', '"zeroth_order"')
                    .replace("steps = 0", "steps = 3"))
    r = runner.invoke(app, ["fit", str(toml), "--out-dir", str(out), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "853 queries" in r.output and "images/s" in r.output and "take about" in r.output, r.output
    assert "nothing was sent" in r.output and not out.exists()
