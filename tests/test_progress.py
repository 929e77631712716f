"""The progress bar after a resume (task F2): budget left from the budget's ledger, ETA over the
inputs left at the pace of the inputs this run worked on."""

from __future__ import annotations

import io

from blackbox_rs import QueryBudget
from blackbox_rs.progress import DatasetProgress, ProgressBar


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Cert:
    def __init__(self, queries: int, total: int | None = None) -> None:
        self.queries, self.queries_total = queries, queries if total is None else total


def test_budget_left_is_read_from_the_ledger_not_this_run(tmp_path):
    ledger = tmp_path / "ledger.json"
    QueryBudget(max_queries=1000, ledger=ledger).reserve(600, 0.0)  # an earlier run spent 600
    budget = QueryBudget(max_queries=1000, ledger=ledger)
    stream = io.StringIO()
    ProgressBar(stream, budget=budget)("certify", 1, 1, {"queries": 100})
    assert "budget left 400" in stream.getvalue()  # not 1000 - 100
    parent = QueryBudget(max_queries=50)
    child = QueryBudget(max_queries=1000, parent=parent)
    stream = io.StringIO()
    ProgressBar(stream, budget=child)("fit", 1, 1, {"queries": 0})
    assert "budget left 50" in stream.getvalue()  # the tightest budget it charges


def test_eta_counts_only_the_inputs_left_at_this_runs_pace(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("blackbox_rs.progress.time.monotonic", clock)
    stream = io.StringIO()
    progress = DatasetProgress(ProgressBar(stream), 10)
    for i in range(5):  # five inputs read back from the journal at once
        progress.resumed(i, Cert(110))
    clock.t += 60  # one input computed in 60 s
    progress(5, Cert(30, total=110))
    last = stream.getvalue().strip().splitlines()[-1]
    assert "6/10" in last and "ETA 4m00s" in last  # 4 inputs left at 60 s each
    assert "resumed 5" in last and "queries 30" in last and "total 660" in last


def test_the_bar_itself_leaves_resumed_inputs_out_of_the_pace(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("blackbox_rs.progress.time.monotonic", clock)
    stream = io.StringIO()
    bar = ProgressBar(stream)
    for done in range(1, 6):  # read back from the journal: no time
        bar("certify", done, 10, {"resumed": done})
    clock.t += 60
    bar("certify", 6, 10, {"resumed": 5})
    assert "ETA 4m00s" in stream.getvalue().strip().splitlines()[-1]  # not 40 s (5 free inputs in the pace)


class Stats:
    def __init__(self) -> None:
        self.queries = self.cache_hits = 0


class Engine:  # what DatasetProgress reads of an engine
    def __init__(self) -> None:
        self.stats = Stats()
        self.info = None


def test_the_bar_shows_samples_per_second_of_this_run(monkeypatch):
    """Issue 19: samples/s (queries + cache hits of this run, per second) for every connector."""
    clock = Clock()
    monkeypatch.setattr("blackbox_rs.progress.time.monotonic", clock)
    engine = Engine()
    engine.stats.queries, engine.stats.cache_hits = 5000, 700  # earlier work of this engine: not this run's
    stream = io.StringIO()
    progress = DatasetProgress(ProgressBar(stream), 4, engine=engine)
    progress.resumed(0, Cert(110))  # read back from the journal: no samples
    clock.t += 10
    engine.stats.queries += 600
    engine.stats.cache_hits += 400
    progress(1, Cert(600))
    last = stream.getvalue().strip().splitlines()[-1]
    assert "  100 samples/s" in last and "queries 600" in last  # (600 + 400) / 10 s
    assert "ETA 0m20s" in last  # the pace still leaves the resumed input out
    clock.t += 40
    engine.stats.queries += 150
    progress(2, Cert(150))
    assert "  23 samples/s" in stream.getvalue().strip().splitlines()[-1]  # 1150 / 50 s


def test_samples_per_second_without_an_engine_sum_this_runs_certificates(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("blackbox_rs.progress.time.monotonic", clock)
    stream = io.StringIO()
    progress = DatasetProgress(ProgressBar(stream), 3)
    progress.resumed(0, Cert(500))
    clock.t += 4
    cert = Cert(30)
    cert.cache_hits = 10  # type: ignore[attr-defined]
    progress(1, cert)
    assert "  10 samples/s" in stream.getvalue().strip().splitlines()[-1]  # (30 + 10) / 4 s
    stream = io.StringIO()
    ProgressBar(stream)("certify", 1, 2, {"queries": 5})
    assert "samples/s" not in stream.getvalue()  # a caller that does not report samples: no figure
