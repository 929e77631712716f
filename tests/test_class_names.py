"""Class names in certificates, reports and the dataset progress callback (task F2): descriptive
only, never part of the resume binding, never deciding correctness."""

from __future__ import annotations

import csv
import json

import torch

from blackbox_rs import BlackBoxSmoother
from blackbox_rs.certificate import ABSTAIN, class_name
from blackbox_rs.certify_sequential import certify_radius_dataset
from blackbox_rs.connectors import CallableConnector
from blackbox_rs.dataset import certify_dataset
from blackbox_rs.reports import load_certificates, write_report

SHAPE = (1, 4, 4)
NAMES = ("cat", "dog", "bird")
KW = {"sigma": 0.25, "n0": 10, "n": 100, "alpha": 0.01, "seed": 3}


def bright(b: torch.Tensor) -> torch.Tensor:
    m = b.flatten(1).mean(1)
    return (m > 0.5).long() + (m > 0.8).long()


def half(b: torch.Tensor) -> torch.Tensor:  # a coin per sample: abstains
    return (torch.arange(len(b)) % 2).long()


def conn(fn=bright, names=NAMES) -> CallableConnector:
    kw = {"class_names": names} if names else {"num_classes": 3}
    return CallableConnector(fn, input_shape=SHAPE, fingerprint=f"{fn.__name__}:v1", **kw)


def images(values=(0.1, 0.65, 1.0)) -> torch.Tensor:
    return torch.stack([torch.full(SHAPE, v) for v in values])


def test_class_name_rules():
    assert class_name(NAMES, 1) == "dog" and class_name(NAMES, ABSTAIN) == "abstain"
    assert class_name(NAMES, None) is None and class_name(NAMES, 7) is None
    assert class_name(("0", "1", "2"), 1) is None and class_name(("0", "1", "2"), ABSTAIN) is None  # no names


def test_dataset_certificates_and_the_progress_callback_carry_the_names(tmp_path):
    seen = []
    res = certify_dataset(conn(), images(), [0, 1, 1], output=tmp_path / "c.jsonl",
                          progress=lambda i, c: seen.append((c.prediction_name, c.label_name)), **KW)
    assert [(c.prediction, c.prediction_name, c.label_name) for c in res.certificates] == [
        (0, "cat", "cat"), (1, "dog", "dog"), (2, "bird", "dog")]
    assert seen == [("cat", "cat"), ("dog", "dog"), ("bird", "dog")]
    assert [c.prediction_name for c in load_certificates(tmp_path / "c.jsonl")] == ["cat", "dog", "bird"]
    unnamed = certify_dataset(conn(names=None), images(), [0, 1, 1], **KW)
    assert {(c.prediction_name, c.label_name) for c in unnamed.certificates} == {(None, None)}


def test_abstain_and_unlabeled_runs_get_names():
    res = certify_dataset(conn(half), images((0.1,)), None, **KW)  # reference: the clean prediction
    c = res.certificates[0]
    assert c.prediction == ABSTAIN and c.prediction_name == "abstain" and c.label_name == NAMES[c.label]
    seq = certify_radius_dataset(conn(), images(), None, radius=0.1, sigma=0.25, n0=10, max_queries=400, seed=3)
    assert [(c.prediction_name, c.label_name) for c in seq.certificates] == [
        (NAMES[c.prediction] if c.prediction >= 0 else "abstain", NAMES[c.label]) for c in seq.certificates]
    assert seq.certificates[0].label_name == "cat"


def test_single_input_calls_get_names():
    s = BlackBoxSmoother(conn(), module=None, sigma=0.25)
    assert s.certify(images()[1], n0=10, n=100, alpha=0.01, seed=3, label=1).prediction_name == "dog"
    assert s.certify_radius(images()[0], radius=0.1, n0=10, max_queries=400, seed=3, label=0).label_name == "cat"


def test_names_are_not_bound_and_an_old_journal_without_them_resumes(tmp_path):
    out = tmp_path / "c.jsonl"
    certify_dataset(conn(), images(), [0, 1, 1], output=out, **KW)
    lines = out.read_text().splitlines()
    recs = [json.loads(x) for x in lines[1:]]
    for r in recs[:2]:
        del r["prediction_name"], r["label_name"]  # written before names were recorded
    recs[2]["prediction_name"] = "dog"  # a wrong name decides nothing
    out.write_text("\n".join([lines[0], *map(json.dumps, recs)]) + "\n")
    res = certify_dataset(conn(), images(), [0, 1, 1], output=out, **KW)  # resumes, no mismatch
    assert res.queries == 0
    assert [c.prediction_name for c in res.certificates] == ["cat", "dog", "bird"]  # filled from the connector
    assert [c.correct for c in res.certificates] == [True, True, False]


def test_reports_show_names_next_to_indices(tmp_path):
    res = certify_dataset(conn(), images(), [0, 1, 1], **KW)
    files = write_report({"run": res}, tmp_path / "r")
    with open(files.certificates_csv) as f:
        rows = list(csv.DictReader(f))
    assert [(r["prediction"], r["prediction_name"], r["label"], r["label_name"]) for r in rows] == [
        ("0", "cat", "0", "cat"), ("1", "dog", "1", "dog"), ("2", "bird", "1", "dog")]
    summary = open(files.summary).read()
    assert "| 2 | 1 (dog) | 2 (bird) |" in summary
    data = json.loads(open(files.certificates_json).read())
    assert data["run"][0]["prediction_name"] == "cat"
