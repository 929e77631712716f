"""Certificates and resume files are bound to exactly what they describe (issue #16, items 1, 3, 8, 10,
11, 13, 15). Each test here failed on the main of 2026-12-01 (see the closing note of that issue)."""

from __future__ import annotations

import json

import pytest
import torch

from blackbox_rs import BlackBoxSmoother, QueryBudget, QueryEngine
from blackbox_rs.certify_sequential import certify_radius_dataset
from blackbox_rs.connectors import CallableConnector
from blackbox_rs.connectors.base import BaseConnector, ConnectorInfo, Prediction
from blackbox_rs.core import certify
from blackbox_rs.dataset import certify_dataset
from blackbox_rs.errors import BudgetExceeded, InvalidParameterError, ResumeMismatchError
from blackbox_rs.reports import load_certificates

SHAPE = (1, 4, 4)


def brightness(b: torch.Tensor) -> torch.Tensor:
    """Class 0 below mean 0.5, class 1 above (3 classes declared)."""
    return (b.flatten(1).mean(1) > 0.5).long()


def conn(fn=brightness, fingerprint: str = "bright:v1", **kw) -> CallableConnector:
    return CallableConnector(fn, input_shape=SHAPE, num_classes=3, fingerprint=fingerprint, **kw)


def images(values=(0.1, 0.9, 0.2)) -> torch.Tensor:
    return torch.stack([torch.full(SHAPE, v) for v in values])


class Shift(torch.nn.Module):
    """A deterministic transform with weights (an nn.Module: its identity is its state digest)."""

    def __init__(self, delta: float) -> None:
        super().__init__()
        self.delta = torch.nn.Parameter(torch.tensor(float(delta)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta


KW = {"sigma": 0.25, "n0": 10, "n": 100, "alpha": 0.01, "seed": 3}


def same(a, b) -> bool:
    """Equal certificates, up to where their queries were paid (this run or the cache)."""
    drop = {"queries", "cache_hits", "queries_total"}
    return [c.model_dump(exclude=drop) for c in a] == [c.model_dump(exclude=drop) for c in b]


# ---------------------------------------------------------------------------------------------- item 1
def test_resume_with_another_module_is_refused_and_the_cli_style_split_works(tmp_path):
    out = tmp_path / "c.jsonl"
    eng = QueryEngine(conn(), cache=tmp_path / "cache")
    certify_dataset(eng, images(), [0, 1, 0], output=out, **KW)
    with pytest.raises(ResumeMismatchError, match="transform") as e:
        certify_dataset(eng, images(), [0, 1, 0], output=out, transform=Shift(0.3), **KW)
    assert "transform" in e.value.differences
    # two modules that differ only in a weight are two classifiers
    certify_dataset(eng, images(), [0, 1, 0], output=tmp_path / "m.jsonl", transform=Shift(0.3), **KW)
    with pytest.raises(ResumeMismatchError, match="transform"):
        certify_dataset(eng, images(), [0, 1, 0], output=tmp_path / "m.jsonl", transform=Shift(0.31), **KW)


def test_resume_through_the_smoother_is_bound_to_the_module_digest(tmp_path):
    out = tmp_path / "c.jsonl"
    torch.manual_seed(0)
    a = BlackBoxSmoother(conn(), module={"name": "dncnn", "depth": 2, "width": 4}, sigma=0.25)
    res = a.certify_dataset(images(), [0, 1, 0], n0=10, n=100, alpha=0.01, seed=1, output=out)
    assert all(c.transform == a.module.digest() for c in res.certificates)
    b = BlackBoxSmoother(conn(), module=None, sigma=0.25)
    with pytest.raises(ResumeMismatchError, match="transform"):
        b.certify_dataset(images(), [0, 1, 0], n0=10, n=100, alpha=0.01, seed=1, output=out)
    # the same module resumes: nothing is recomputed
    again = a.certify_dataset(images(), [0, 1, 0], n0=10, n=100, alpha=0.01, seed=1, output=out)
    assert again.queries == 0 and again.certificates == res.certificates


def test_resume_with_other_inputs_or_labels_is_refused(tmp_path):
    out = tmp_path / "c.jsonl"
    eng = QueryEngine(conn())
    certify_dataset(eng, images(), [0, 1, 0], output=out, **KW)
    with pytest.raises(ResumeMismatchError, match="key") as e:
        certify_dataset(eng, images((0.1, 0.8, 0.2)), [0, 1, 0], output=out, **KW)
    assert set(e.value.differences) == {"key"} and "input 1" in str(e.value)
    with pytest.raises(ResumeMismatchError, match="label"):
        certify_dataset(eng, images(), [0, 2, 0], output=out, **KW)
    with pytest.raises(ResumeMismatchError, match="reference"):
        certify_dataset(eng, images(), None, output=out, **KW)


def test_resume_with_another_setting_or_noise_mode_is_refused(tmp_path):
    eng = QueryEngine(conn())
    x8 = (images() * 255).round() / 255
    out = tmp_path / "s.jsonl"
    certify_radius_dataset(eng, x8, [0, 1, 0], radius=0.1, sigma=0.25, alpha=0.01, n0=5, max_queries=300,
                           seed=1, output=out)
    with pytest.raises(ResumeMismatchError, match="noise"):
        certify_radius_dataset(eng, x8, [0, 1, 0], radius=0.1, sigma=0.25, alpha=0.01, n0=5, max_queries=300,
                               seed=1, output=out, lattice=True)
    with pytest.raises(ResumeMismatchError, match="max_queries"):
        certify_radius_dataset(eng, x8, [0, 1, 0], radius=0.1, sigma=0.25, alpha=0.01, n0=5, max_queries=400,
                               seed=1, output=out)
    with pytest.raises(ResumeMismatchError, match="kind"):  # a Cohen run never resumes a sequential file
        certify_dataset(eng, x8, [0, 1, 0], output=out, **KW)


def test_a_transform_without_identity_cannot_be_journaled(tmp_path):
    with pytest.raises(InvalidParameterError, match="identity"):
        certify_dataset(conn(), images(), [0, 1, 0], output=tmp_path / "c.jsonl", transform=lambda b: b, **KW)

    def ident(b: torch.Tensor) -> torch.Tensor:
        return b

    ident.identity = "user:identity:v1"  # type: ignore[attr-defined]
    res = certify_dataset(conn(), images(), [0, 1, 0], output=tmp_path / "c.jsonl", transform=ident, **KW)
    assert {c.transform for c in res.certificates} == {"user:identity:v1"}


def test_old_journals_without_binding_are_refused_but_still_reported(tmp_path):
    out = tmp_path / "c.jsonl"
    res = certify_dataset(conn(), images(), [0, 1, 0], output=out, **KW)
    lines = out.read_text().splitlines()
    old = tmp_path / "old.jsonl"
    old.write_text("\n".join(lines[1:]) + "\n")  # the v1 layout: certificates only
    with pytest.raises(ResumeMismatchError, match="older blackbox-rs"):
        certify_dataset(conn(), images(), [0, 1, 0], output=old, **KW)
    assert load_certificates(old) == res.certificates


# ---------------------------------------------------------------------------------------------- item 8
def test_a_torn_line_is_cut_before_appending_so_every_later_resume_reads(tmp_path):
    out = tmp_path / "c.jsonl"
    eng = QueryEngine(conn(), cache=tmp_path / "cache")
    full = certify_dataset(eng, images(), [0, 1, 0], output=out, **KW)
    text = out.read_text().splitlines()
    out.write_text("\n".join(text[:2]) + "\n" + text[2][: len(text[2]) // 2])  # crash mid-write of record 1
    second = certify_dataset(eng, images(), [0, 1, 0], output=out, **KW)
    assert same(second.certificates, full.certificates) and second.queries == 0  # from the cache
    third = certify_dataset(eng, images(), [0, 1, 0], output=out, **KW)  # failed on main
    assert same(third.certificates, full.certificates) and third.queries == 0
    assert len(load_certificates(out)) == 3
    assert all(json.loads(x) for x in out.read_text().splitlines())


# ---------------------------------------------------------------------------------------------- item 10
def test_the_default_seed_is_fresh_recorded_and_read_back_on_resume(tmp_path):
    a = certify(conn(), images()[0], sigma=0.25, n0=10, n=100, alpha=0.01)
    b = certify(conn(), images()[0], sigma=0.25, n0=10, n=100, alpha=0.01)
    assert a.seed != b.seed and a.seed >= 0  # not 0, not predictable
    out = tmp_path / "c.jsonl"
    eng = QueryEngine(conn(), cache=tmp_path / "cache")
    first = certify_dataset(eng, images(), [0, 1, 0], sigma=0.25, n0=10, n=100, alpha=0.01, output=out)
    header = json.loads(out.read_text().splitlines()[0])
    assert {c.seed for c in first.certificates} == {header["seed"]}
    # a crash after the header and record 0: the rerun with the default seed reads the seed back and is
    # answered from the cache (pays nothing twice)
    out.write_text("\n".join(out.read_text().splitlines()[:2]) + "\n")
    again = certify_dataset(eng, images(), [0, 1, 0], sigma=0.25, n0=10, n=100, alpha=0.01, output=out)
    assert same(again.certificates, first.certificates) and again.queries == 0
    with pytest.raises(ResumeMismatchError, match="seed"):
        certify_dataset(eng, images(), [0, 1, 0], sigma=0.25, n0=10, n=100, alpha=0.01, output=out, seed=5)
    fixed = certify(conn(), images()[0], sigma=0.25, n0=10, n=100, alpha=0.01, seed=7)
    assert fixed == certify(conn(), images()[0], sigma=0.25, n0=10, n=100, alpha=0.01, seed=7)


# ---------------------------------------------------------------------------------------------- item 11
def test_consistency_is_against_the_bare_models_clean_label_everywhere():
    """A transform that flips the clean label: both dataset paths compare with the bare model's f(x)."""
    darken = Shift(-0.5)
    x = images((0.9,))  # f(x) = 1, f(T(x)) = 0
    cohen = certify_dataset(conn(), x, sigma=0.05, n0=10, n=100, alpha=0.01, seed=1, transform=darken)
    seq = certify_radius_dataset(conn(), x, radius=0.05, sigma=0.05, alpha=0.01, n0=5, max_queries=400, seed=1,
                                 transform=darken)
    for res in (cohen, seq):
        (c,) = res.certificates
        assert res.reference == c.reference == "clean_prediction"
        assert c.label == 1 and c.prediction == 0 and not c.correct
        assert set(res.certified_accuracy.values()) == {0.0}
    assert seq.certificates[0].clean_prediction == 0  # the transformed clean label is still recorded


# ---------------------------------------------------------------------------------------------- item 13
class WithOther(BaseConnector):
    """Classes cat, dog, other; answers `other` for bright images (a vendor's "none of your classes")."""

    def __init__(self) -> None:
        self._info = ConnectorInfo(input_shape=SHAPE, class_names=("cat", "dog", "other"), fingerprint="vendor:x",
                                   other_index=2)

    def _query(self, batch: torch.Tensor) -> Prediction:
        m = batch.flatten(1).mean(1)
        return Prediction(labels=torch.where(m > 0.5, 2, 0).long())


def test_other_is_never_correct_or_consistent_and_has_its_own_column(tmp_path):
    x = images((0.9, 0.1))  # bare clean labels: other, cat
    res = certify_dataset(WithOther(), x, sigma=0.05, n0=10, n=100, alpha=0.01, seed=1)
    c_other, c_cat = res.certificates
    assert c_other.prediction == 2 and c_other.label == 2 and c_other.is_other and c_other.correct is False
    assert c_cat.correct is True
    assert res.certified_accuracy["0"] == 0.5  # main counted `other` as consistent: 1.0
    assert res.certified_other["0"] == 0.5 and c_other.radius > 0
    seq = certify_radius_dataset(WithOther(), x, radius=0.05, sigma=0.05, alpha=0.01, n0=5, max_queries=400,
                                 seed=1)
    assert seq.certified_accuracy["0.05"] == 0.5 and seq.certified_other == {"0.05": 0.5}
    from blackbox_rs.reports import write_report

    files = write_report({"run": res}, tmp_path / "rep")
    summary = open(files.summary).read()
    assert "other" in summary and "never counted as correct" in summary and "bare model" in summary


# ---------------------------------------------------------------------------------------------- item 15
def test_a_budget_too_small_for_one_certificate_sends_nothing_and_counts_the_clean_query():
    sent = []

    def fn(b: torch.Tensor) -> torch.Tensor:
        sent.append(len(b))
        return brightness(b)

    eng = QueryEngine(conn(fn), budget=QueryBudget(max_queries=110))
    with pytest.raises(BudgetExceeded, match=r"1 clean query \+ n0 \+ n = 111"):
        certify_dataset(eng, images(), None, sigma=0.25, n0=10, n=100, alpha=0.01)
    assert sent == []  # main billed the clean query first
    with pytest.raises(BudgetExceeded, match="n0 \\+ n = 110") as e:
        certify_dataset(QueryEngine(conn(fn), budget=QueryBudget(max_queries=109)), images(), [0, 1, 0],
                        sigma=0.25, n0=10, n=100, alpha=0.01)
    assert "nothing was sent" in str(e.value) and sent == []
    # labelled (x, y) items need no clean query (review finding: they were refused at n0 + n)
    ok = certify_dataset(QueryEngine(conn(fn), budget=QueryBudget(max_queries=110)),
                         list(zip(images(), [0, 1, 0], strict=True))[:1], sigma=0.25, n0=10, n=100, alpha=0.01)
    assert ok.reference == "labels" and sum(sent) == 110
    sent.clear()
    # a parent's limit counts too
    child = QueryBudget(max_queries=10_000, parent=QueryBudget(max_queries=50))
    with pytest.raises(BudgetExceeded):
        certify_dataset(QueryEngine(conn(fn), budget=child), images(), [0, 1, 0], sigma=0.25, n0=10, n=100,
                        alpha=0.01)
    assert sent == []


# ---------------------------------------------------------------------------------------------- item 3
def test_a_fit_budget_object_sits_under_the_engines_hard_cap():
    torch.manual_seed(0)
    x = torch.rand(16, *SHAPE)
    run_cap = QueryBudget(max_queries=100)
    sm = BlackBoxSmoother(QueryEngine(conn(), budget=run_cap), module={"name": "dncnn", "depth": 2, "width": 4},
                          sigma=0.25)
    fit_budget = QueryBudget(max_queries=10_000)
    rep = sm.fit(x, strategy="zeroth_order", budget=fit_budget, steps=50, pretrain_steps=2, batch_size=4,
                 score_images=8, score_draws=2, score_every=10)
    assert rep.stopped == "budget"
    assert run_cap.spent_queries <= 100 and fit_budget.spent_queries <= 100  # main billed 592
    assert fit_budget.spent_queries == run_cap.spent_queries


class Offset(torch.nn.Module):
    """A stateless transform whose function is a plain attribute (like torchvision's GaussianBlur)."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.k).clamp(0, 1)


def test_modules_that_differ_only_in_a_plain_setting_are_different_transforms(tmp_path):
    """Review finding: only the class name and state dict were hashed, so Offset(0.6) resumed Offset(0.0)'s
    journal with 0 queries and returned its certificates."""
    from blackbox_rs.binding import transform_identity

    assert transform_identity(Offset(0.0)) != transform_identity(Offset(0.6))
    assert transform_identity(Offset(0.6)) == transform_identity(Offset(0.6))  # stable across instances
    out = tmp_path / "c.jsonl"
    certify_dataset(conn(), images(), [0, 1, 0], output=out, transform=Offset(0.0), **KW)
    with pytest.raises(ResumeMismatchError, match="transform"):
        certify_dataset(conn(), images(), [0, 1, 0], output=out, transform=Offset(0.6), **KW)


def test_a_fit_budget_is_never_rewired_and_cycles_cannot_hang(tmp_path):
    """Review finding: placing the fit budget under the engine's by setting `.parent` built a cycle
    (fit(budget=R) with the engine's E = QueryBudget(parent=R): E.reserve deadlocked) and made one
    engine's spending charge another's budget."""
    import threading

    from blackbox_rs.budget import JointBudget

    x = torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(0))
    small = {"steps": 20, "pretrain_steps": 2, "batch_size": 4, "score_images": 8, "score_draws": 2,
             "score_every": 10}
    run = QueryBudget(max_queries=300)
    engine_budget = QueryBudget(max_queries=10_000, parent=run)
    sm = BlackBoxSmoother(QueryEngine(conn(), budget=engine_budget),
                          module={"name": "dncnn", "depth": 2, "width": 4}, sigma=0.25)
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(sm.fit(x, strategy="zeroth_order", budget=run, **small)),
                         daemon=True)
    t.start()
    t.join(60)
    assert done, "fit(budget=<a budget above the engine's>) hung"
    assert run.parent is None and engine_budget.parent is run and run.spent_queries <= 300
    shared = QueryBudget(max_queries=10_000)
    a_cap, b_cap = QueryBudget(max_queries=10_000), QueryBudget(max_queries=10_000)
    for cap in (a_cap, b_cap):
        s = BlackBoxSmoother(QueryEngine(conn(), budget=cap), module={"name": "dncnn", "depth": 2, "width": 4},
                             sigma=0.25)
        s.fit(x, strategy="zeroth_order", budget=shared, **small)
    assert a_cap.parent is None and b_cap.parent is None and shared.parent is None
    assert a_cap.spent_queries + b_cap.spent_queries == shared.spent_queries > 0
    joint = JointBudget(QueryBudget(max_queries=5), QueryBudget(max_queries=100))
    with pytest.raises(BudgetExceeded):
        joint.reserve(6, 0.0)
    assert [m.spent_queries for m in joint.members] == [0, 0]  # nothing held on failure


@pytest.mark.parametrize("edit,error", [
    ({"seed": None}, "seed"), ({"seed": 42.7}, "seed"), ({"seed": -5}, "seed"),
    ({"blackbox_rs_journal": 99}, "format"), ({"params_extra": {"future_setting": 1}}, "future_setting"),
])
def test_a_damaged_or_foreign_header_is_a_typed_error(tmp_path, edit, error):
    """Review finding: a null seed gave a raw TypeError, 42.7 was truncated, -5 and a future format were
    accepted, and header settings unknown to this run were ignored."""
    from blackbox_rs.errors import CacheError

    out = tmp_path / "c.jsonl"
    certify_dataset(conn(), images(), [0, 1, 0], output=out, **KW)
    lines = out.read_text().splitlines()
    header = json.loads(lines[0])
    extra = edit.pop("params_extra", None) if "params_extra" in edit else None
    header.update(edit)
    if extra:
        header["params"].update(extra)
    out.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    with pytest.raises(CacheError, match=error):
        certify_dataset(conn(), images(), [0, 1, 0], output=out, **{**KW, "seed": None})
