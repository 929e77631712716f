"""Query counts that agree after a resume (task F2): a run interrupted in the middle of an input
(budget spent, Ctrl-C) records what that input was charged; the resumed run's certificate states
``queries_total`` = what the model was charged for that image across both runs, the dataset result
states this run's queries and the total, and the progress bar's budget left is the ledger's."""

from __future__ import annotations

import io
import json
import re
from collections import Counter

import pytest
import torch

from blackbox_rs import QueryBudget, QueryEngine
from blackbox_rs.certify_sequential import certify_radius_dataset
from blackbox_rs.connectors import CallableConnector
from blackbox_rs.dataset import certify_dataset
from blackbox_rs.errors import BudgetExceeded, ResumeMismatchError
from blackbox_rs.progress import DatasetProgress, ProgressBar
from blackbox_rs.reports import load_certificates, write_report

SHAPE = (1, 4, 4)
LEVELS = (0.2, 0.5, 0.8)  # image i is constant LEVELS[i]: a noisy sample's mean tells its image
KW = {"sigma": 0.05, "n0": 10, "n": 100, "alpha": 0.01, "seed": 7, "batch_size": 10}
PER_IMAGE = 110  # n0 + n


class Counting:
    """A model that counts what it was charged per image (by the nearest level of the batch mean);
    it raises ``stop_with`` instead of answering once ``stop_after`` images were answered."""

    def __init__(self) -> None:
        self.per_image: Counter[int] = Counter()
        self.stop_after: int | None = None
        self.stop_with: type[BaseException] = KeyboardInterrupt

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        if self.stop_after is not None and sum(self.per_image.values()) + len(b) > self.stop_after:
            raise self.stop_with("stopped by the test")
        for m in b.flatten(1).mean(1).tolist():
            self.per_image[min(range(len(LEVELS)), key=lambda i: abs(LEVELS[i] - m))] += 1
        return torch.zeros(len(b), dtype=torch.long)  # always class 0: certified


def images() -> torch.Tensor:
    return torch.stack([torch.full(SHAPE, v) for v in LEVELS])


def engine(model: Counting, tmp_path, budget: QueryBudget | None = None) -> QueryEngine:
    conn = CallableConnector(model, input_shape=SHAPE, num_classes=3, fingerprint="counting:v1", max_batch=10)
    return QueryEngine(conn, cache=tmp_path / "cache", budget=budget)


def bar_text(budget: QueryBudget | None, eng: QueryEngine) -> tuple[io.StringIO, DatasetProgress]:
    stream = io.StringIO()
    return stream, DatasetProgress(ProgressBar(stream, budget=budget), 3, engine=eng)


def check_agreement(model: Counting, res, first_run: int, budget: QueryBudget | None, stream: io.StringIO) -> None:
    for c in res.certificates:  # every query paid for image i, both runs, is in its certificate
        assert c.queries_total == model.per_image[c.index], c.index
    assert res.queries_total == sum(model.per_image.values())  # the total: both runs
    assert res.queries == sum(model.per_image.values()) - first_run  # this run only
    last = stream.getvalue().strip().splitlines()[-1]
    assert f"queries {res.queries:,}" in last and f"total {res.queries_total:,}" in last
    if budget is not None:
        left = int(re.search(r"budget left ([\d,]+)", last).group(1).replace(",", ""))
        assert left == budget.max_queries - budget.spent_queries


def test_budget_stop_in_the_middle_of_an_image_then_resume_counts_both_runs(tmp_path):
    model, out, ledger = Counting(), tmp_path / "c.jsonl", tmp_path / "ledger.json"
    first_budget = QueryBudget(max_queries=PER_IMAGE + 50, ledger=ledger)  # stops inside image 1
    with pytest.raises(BudgetExceeded):
        certify_dataset(engine(model, tmp_path, first_budget), images(), [0, 0, 0], output=out, **KW)
    first_run = sum(model.per_image.values())
    assert model.per_image[1] == 50  # paid in the interrupted run, answered from the cache later
    budget = QueryBudget(max_queries=1000, ledger=ledger)  # the limit raised: the same ledger
    eng = engine(model, tmp_path, budget)
    stream, progress = bar_text(budget, eng)
    res = certify_dataset(eng, images(), [0, 0, 0], output=out, progress=progress, **KW)
    assert [c.queries for c in res.certificates] == [PER_IMAGE, PER_IMAGE - 50, PER_IMAGE]
    assert res.certificates[1].cache_hits == 50
    check_agreement(model, res, first_run, budget, stream)
    assert budget.spent_queries == res.queries_total  # the ledger agrees with the certificates
    assert "resumed 1" in stream.getvalue()


def test_ctrl_c_in_the_middle_of_an_image_then_resume_counts_both_runs(tmp_path):
    model, out = Counting(), tmp_path / "c.jsonl"
    model.stop_after = 2 * PER_IMAGE + 30  # Ctrl-C inside image 2
    with pytest.raises(KeyboardInterrupt):
        certify_dataset(engine(model, tmp_path), images(), [0, 0, 0], output=out, **KW)
    first_run = sum(model.per_image.values())
    assert model.per_image[2] == 30
    model.stop_after = None
    eng = engine(model, tmp_path, QueryBudget(max_queries=10_000, ledger=tmp_path / "l2.json"))
    stream, progress = bar_text(eng.budget, eng)
    res = certify_dataset(eng, images(), [0, 0, 0], output=out, progress=progress, **KW)
    check_agreement(model, res, first_run, eng.budget, stream)
    # and `report` reads the journal back with the same totals
    certs = load_certificates(out)
    assert [c.queries_total for c in certs] == [model.per_image[i] for i in range(3)]


def test_two_interruptions_of_one_image_add_up(tmp_path):
    model, out = Counting(), tmp_path / "c.jsonl"
    for stop in (40, 80):
        model.stop_after = stop
        with pytest.raises(KeyboardInterrupt):
            certify_dataset(engine(model, tmp_path), images(), [0, 0, 0], output=out, **KW)
    first_runs = sum(model.per_image.values())
    assert first_runs == 80
    model.stop_after = None
    eng = engine(model, tmp_path)
    stream, progress = bar_text(None, eng)
    res = certify_dataset(eng, images(), [0, 0, 0], output=out, progress=progress, **KW)
    check_agreement(model, res, first_runs, None, stream)


def test_sequential_resume_counts_both_runs(tmp_path):
    model, out = Counting(), tmp_path / "s.jsonl"
    kw = {"radius": 0.05, "sigma": 0.05, "alpha": 0.01, "n0": 10, "max_queries": 400, "seed": 7, "batch_size": 10}
    model.stop_after = 60
    with pytest.raises(KeyboardInterrupt):
        certify_radius_dataset(engine(model, tmp_path), images(), [0, 0, 0], output=out, **kw)
    model.stop_after = None
    res = certify_radius_dataset(engine(model, tmp_path), images(), [0, 0, 0], output=out, **kw)
    assert [c.queries_total for c in res.certificates] == [model.per_image[i] for i in range(3)]
    assert res.queries_total == sum(model.per_image.values())


def test_a_progress_record_for_another_image_is_refused(tmp_path):
    model, out = Counting(), tmp_path / "c.jsonl"
    model.stop_after = 30
    with pytest.raises(KeyboardInterrupt):
        certify_dataset(engine(model, tmp_path), images(), [0, 0, 0], output=out, **KW)
    other = torch.stack([torch.full(SHAPE, v) for v in (0.3, 0.5, 0.8)])
    model.stop_after = None
    with pytest.raises(ResumeMismatchError, match="progress record of input 0"):
        certify_dataset(engine(model, tmp_path), other, [0, 0, 0], output=out, **KW)


def test_old_journal_lines_without_the_total_resume_and_report_as_not_recorded(tmp_path):
    model, out = Counting(), tmp_path / "c.jsonl"
    certify_dataset(engine(model, tmp_path), images(), [0, 0, 0], output=out, **KW)
    lines = out.read_text().splitlines()
    old = [json.loads(x) for x in lines[1:]]
    for rec in old:
        for k in ("queries_total", "prediction_name", "label_name"):
            rec.pop(k)
    out.write_text("\n".join([lines[0], *[json.dumps(r) for r in old]]) + "\n")
    certs = load_certificates(out)
    assert [c.queries_total for c in certs] == [None, None, None]
    res = certify_dataset(engine(model, tmp_path), images(), [0, 0, 0], output=out, **KW)  # still resumes
    assert res.queries == 0 and res.queries_total == 3 * PER_IMAGE  # lower bound: their `queries`
    files = write_report({"old": res}, tmp_path / "report")
    summary = open(files.summary).read()
    assert "at least: 3 record(s) predate" in summary and "not recorded" in summary
