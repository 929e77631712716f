"""QueryEngine, QueryBudget and QueryCache: never pay twice, never overshoot, never unpickle."""

from __future__ import annotations

import json
import pickle
import sqlite3
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from blackbox_rs.budget import QueryBudget
from blackbox_rs.cache import QueryCache, request_key
from blackbox_rs.connectors import CallableConnector, Prediction
from blackbox_rs.core import certify
from blackbox_rs.dataset import certify_dataset
from blackbox_rs.engine import QueryEngine, Tally
from blackbox_rs.errors import (
    BudgetExceeded,
    CacheError,
    ConnectorError,
    InvalidInputError,
    InvalidResponseError,
)

SHAPE = (1, 6, 6)


class Counting:
    """A deterministic base model that records every image it was asked about."""

    def __init__(self, num_classes: int = 3, fail_on: int | None = None, billed: bool | None = None) -> None:
        self.calls = 0
        self.images = 0
        self.num_classes = num_classes
        self.fail_on = fail_on
        self.billed = billed
        self.lock = threading.Lock()

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.calls += 1
            self.images += int(batch.shape[0])
            if self.fail_on is not None and self.calls == self.fail_on:
                raise ConnectorError("injected failure", billed=self.billed)
        m = batch.mean(dim=(1, 2, 3))
        return torch.bucketize(m, torch.tensor([0.45, 0.55]))


def make(fn: Counting, **kw) -> CallableConnector:
    return CallableConnector(fn, input_shape=SHAPE, num_classes=fn.num_classes, fingerprint="counting:v1", **kw)


def test_batches_are_split_and_reassembled_in_order():
    fn = Counting()
    eng = QueryEngine(make(fn, max_batch=7))
    x = torch.rand(30, *SHAPE)
    tally = Tally()
    pred = eng.query(x, tally=tally)
    assert fn.calls == 5 and fn.images == 30
    assert torch.equal(pred.labels, fn(x))
    assert tally.queries == 30 and tally.requests == 5 and eng.stats.queries == 30


def test_concurrent_requests_return_in_order():
    fn = Counting()
    eng = QueryEngine(make(fn, max_batch=4, max_concurrency=4), max_in_flight=4)
    x = torch.rand(50, *SHAPE)
    assert torch.equal(eng.query(x).labels, fn(x))
    eng.close()


def test_cache_hits_are_free_and_counted(tmp_path):
    fn = Counting()
    x = torch.rand(20, *SHAPE)
    eng = QueryEngine(make(fn, max_batch=8), cache=tmp_path / "c", budget=QueryBudget(max_queries=20))
    first = eng.query(x)
    calls = fn.calls
    t = Tally()
    second = eng.query(x, tally=t)
    assert fn.calls == calls
    assert torch.equal(first.labels, second.labels)
    assert t.cache_hits == 20 and t.queries == 0
    assert eng.budget.spent_queries == 20
    eng.close()


def test_scores_survive_the_cache_bit_for_bit(tmp_path):
    def logits(b: torch.Tensor) -> torch.Tensor:
        return torch.softmax(torch.stack([b.mean((1, 2, 3)), b.std((1, 2, 3)), b.amax((1, 2, 3))], 1) * 7.3, 1)

    conn = CallableConnector(logits, input_shape=SHAPE, num_classes=3, returns_scores=True, fingerprint="s")
    x = torch.rand(9, *SHAPE)
    with QueryEngine(conn, cache=tmp_path) as eng:
        a = eng.query(x)
    with QueryEngine(conn, cache=tmp_path) as eng:
        b = eng.query(x)
        assert eng.stats.cache_hits == 9
    assert torch.equal(a.scores, b.scores)


def test_different_fingerprints_never_share_answers(tmp_path):
    x = torch.rand(4, *SHAPE)
    a = CallableConnector(lambda b: torch.zeros(len(b), dtype=torch.long), input_shape=SHAPE, num_classes=2,
                          fingerprint="model:v1")
    b = CallableConnector(lambda b: torch.ones(len(b), dtype=torch.long), input_shape=SHAPE, num_classes=2,
                          fingerprint="model:v2")
    cache = QueryCache(tmp_path)
    assert QueryEngine(a, cache=cache).query(x).labels.tolist() == [0] * 4
    eng_b = QueryEngine(b, cache=cache)
    assert eng_b.query(x).labels.tolist() == [1] * 4
    assert eng_b.stats.cache_hits == 0
    assert request_key("model:v1", x) != request_key("model:v2", x)


def test_budget_is_never_exceeded_and_progress_is_kept(tmp_path):
    fn = Counting()
    budget = QueryBudget(max_queries=25)
    eng = QueryEngine(make(fn, max_batch=10), budget=budget, cache=tmp_path)
    x = torch.rand(40, *SHAPE)
    with pytest.raises(BudgetExceeded, match="25"):
        eng.query(x)
    assert budget.spent_queries == 20 and fn.images == 20  # the third request did not fit
    # what was paid for is in the cache: a bigger budget resumes without repeating it
    eng2 = QueryEngine(make(fn, max_batch=10), budget=QueryBudget(max_queries=100), cache=tmp_path)
    eng2.query(x)
    assert fn.images == 40 and eng2.stats.cache_hits == 20


def test_cost_budget(tmp_path):
    fn = Counting()
    budget = QueryBudget(max_cost=0.015)
    eng = QueryEngine(make(fn, max_batch=5, cost_per_query=0.0015), budget=budget)
    eng.query(torch.rand(10, *SHAPE))
    with pytest.raises(BudgetExceeded, match="cost"):
        eng.query(torch.rand(1, *SHAPE))
    assert budget.spent_cost == pytest.approx(0.015)


def test_refund_only_when_provably_not_billed():
    for billed, expected in [(False, 0), (None, 5), (True, 5)]:
        fn = Counting(fail_on=1, billed=billed)
        budget = QueryBudget(max_queries=100)
        eng = QueryEngine(make(fn, max_batch=5), budget=budget)
        with pytest.raises(ConnectorError):
            eng.query(torch.rand(5, *SHAPE))
        assert budget.spent_queries == expected, billed
        assert eng.stats.failed_requests == 1


def test_ledger_persists_across_runs(tmp_path):
    ledger = tmp_path / "ledger.json"
    b = QueryBudget(max_queries=30, ledger=ledger)
    QueryEngine(make(Counting(), max_batch=10), budget=b).query(torch.rand(20, *SHAPE))
    b2 = QueryBudget(max_queries=30, ledger=ledger)
    assert b2.spent_queries == 20
    with pytest.raises(BudgetExceeded):
        QueryEngine(make(Counting(), max_batch=10), budget=b2).query(torch.rand(20, *SHAPE))
    ledger.write_text("{not json")
    with pytest.raises(CacheError, match="ledger"):
        QueryBudget(max_queries=30, ledger=ledger)


@settings(max_examples=25, deadline=None)
@given(
    limit=st.integers(0, 60),
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=30),
    threads=st.integers(2, 6),
    refund_every=st.integers(2, 7),
)
def test_concurrent_reservations_never_overshoot(limit, sizes, threads, refund_every):
    budget = QueryBudget(max_queries=limit)
    held = []
    lock = threading.Lock()
    peak = [0]

    def worker(chunk: list[int]) -> None:
        for i, s in enumerate(chunk):
            try:
                r = budget.reserve(s, 0.0)
            except BudgetExceeded:
                continue
            with lock:
                held.append(r)
                peak[0] = max(peak[0], budget.spent_queries)
            if i % refund_every == 0:
                budget.refund(r)
                with lock:
                    held.remove(r)

    ts = [threading.Thread(target=worker, args=(sizes[k::threads],)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert peak[0] <= limit
    assert budget.spent_queries == sum(r.queries for r in held) <= limit


def test_concurrent_engine_queries_share_one_budget(tmp_path):
    fn = Counting()
    budget = QueryBudget(max_queries=57)
    eng = QueryEngine(make(fn, max_batch=3, max_concurrency=4), budget=budget, max_in_flight=4)
    errors = []

    def run() -> None:
        try:
            eng.query(torch.rand(12, *SHAPE))
        except BudgetExceeded as e:
            errors.append(e)

    ts = [threading.Thread(target=run) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert fn.images == budget.spent_queries <= 57 and errors
    eng.close()


def test_unwritable_and_corrupted_cache_dirs(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CacheError, match="not writable"):
        QueryCache(f / "sub")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cache.db").write_bytes(b"this is not a sqlite database" * 100)
    with pytest.raises(CacheError, match="corrupted"):
        QueryCache(bad)


def test_cache_refuses_pickled_rows(tmp_path):
    """A tampered cache row in diskcache's pickle mode must raise, never unpickle."""
    cache = QueryCache(tmp_path)
    cache.set("k", {"labels": [0], "scores": None})
    cache.close()

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle executed')",))

    con = sqlite3.connect(tmp_path / "cache.db")
    cur = con.execute("UPDATE Cache SET value = ?, mode = 4 WHERE key = ?", (pickle.dumps(Boom()), b'"k"'))
    assert cur.rowcount == 1
    con.commit()
    con.close()
    with pytest.raises(CacheError, match="mode 4"):
        QueryCache(tmp_path).get("k")


def test_malformed_answers_are_typed_errors_and_not_cached(tmp_path):
    conn = CallableConnector(lambda b: Prediction(labels=torch.zeros(len(b) + 1, dtype=torch.long)),
                             input_shape=SHAPE, num_classes=2, fingerprint="bad")
    eng = QueryEngine(conn, cache=tmp_path)
    with pytest.raises(InvalidResponseError, match="labels for a batch"):
        eng.query(torch.rand(3, *SHAPE))
    assert len(eng.cache) == 0


def test_budget_below_one_certificate_fails_before_spending():
    fn = Counting()
    eng = QueryEngine(make(fn), budget=QueryBudget(max_queries=500))
    with pytest.raises(BudgetExceeded, match="n0 \\+ n = 1100"):
        certify(eng, torch.rand(*SHAPE), sigma=0.25, n0=100, n=1000, seed=0)
    assert fn.calls == 0


def test_certify_dataset_resume_repeats_no_query(tmp_path):
    x = torch.rand(6, *SHAPE)
    y = [0, 1, 2, 0, 1, 2]
    out = tmp_path / "certs.jsonl"
    fn = Counting()
    eng = QueryEngine(make(fn, max_batch=50), cache=tmp_path / "cache", budget=QueryBudget(max_queries=400))
    with pytest.raises(BudgetExceeded):
        certify_dataset(eng, x, y, sigma=0.25, n0=10, n=100, output=out, seed=0)
    # 3 certificates (110 queries each) are final; 60 queries of the 4th are paid for and cached
    assert len(_journal_records(out)) == 3 and fn.images == 390
    eng2 = QueryEngine(make(fn, max_batch=50), cache=tmp_path / "cache")
    res = certify_dataset(eng2, x, y, sigma=0.25, n0=10, n=100, output=out, seed=0)
    assert fn.images == 6 * 110  # exactly one uninterrupted run's worth
    assert eng2.stats.cache_hits == 60
    seed = res.certificates[0].seed  # the resumed run kept the seed of the run it resumed
    fresh = certify_dataset(make(Counting(), max_batch=50), x, y, sigma=0.25, n0=10, n=100, seed=seed)
    strip = {"queries", "cache_hits"}
    assert [c.model_dump(exclude=strip) for c in res.certificates] == [
        c.model_dump(exclude=strip) for c in fresh.certificates
    ]


_HEADER = '"blackbox_rs_journal"'


def _journal_records(path) -> list[dict]:
    """The complete certificate lines of a journal (its header line and progress records left out)."""
    lines = path.read_text().splitlines()
    return [json.loads(s) for s in lines if s.strip().endswith("}") and _HEADER not in s
            and "blackbox_rs_progress" not in s]


def test_resume_with_other_settings_or_model_is_refused(tmp_path):
    x = torch.rand(2, *SHAPE)
    out = tmp_path / "certs.jsonl"
    certify_dataset(make(Counting()), x, [0, 1], sigma=0.25, n0=10, n=100, output=out, seed=0)
    with pytest.raises(CacheError, match="sigma"):
        certify_dataset(make(Counting()), x, [0, 1], sigma=0.5, n0=10, n=100, output=out, seed=0)
    other = CallableConnector(Counting(), input_shape=SHAPE, num_classes=3, fingerprint="counting:v2")
    with pytest.raises(CacheError, match="fingerprint"):
        certify_dataset(other, x, [0, 1], sigma=0.25, n0=10, n=100, output=out, seed=0)
    # a torn final line (crash mid-write) is recomputed, not fatal
    text = out.read_text().splitlines()
    head = [s for s in text if _HEADER in s]  # the journal's header line (if the format has one)
    body = [s for s in text if _HEADER not in s]
    out.write_text("\n".join([*head, body[0], body[1][:40]]))
    res = certify_dataset(make(Counting()), x, [0, 1], sigma=0.25, n0=10, n=100, output=out, seed=0)
    assert [c.index for c in res.certificates] == [0, 1]
    assert [r["index"] for r in _journal_records(out)] == [0, 1]


def test_engine_is_fast_enough_for_cache_lookups(tmp_path):
    """Sanity: a cache hit path for 1,000 images in requests of 100 takes well under a second."""
    fn = Counting()
    eng = QueryEngine(make(fn, max_batch=100), cache=tmp_path)
    x = torch.rand(1000, *SHAPE)
    eng.query(x)
    t = time.perf_counter()
    eng.query(x)
    assert time.perf_counter() - t < 1.0


def test_non_integral_labels_are_rejected_not_truncated():
    with pytest.raises(InvalidInputError, match="labels must be integers"):
        certify_dataset(make(Counting()), torch.rand(2, *SHAPE), [0.7, 1], sigma=0.25, n0=10, n=100, seed=0)


class VersionedModel:
    """A tiny remote-like connector that reports the model version its answers carry and can be
    pinned to one (the two attributes the engine looks for)."""

    def __init__(self, version: str) -> None:
        from blackbox_rs.connectors import ConnectorInfo

        self.version = version
        self.calls = 0
        self.info = ConnectorInfo(input_shape=SHAPE, class_names=("a", "b", "c"), fingerprint="versioned:toy",
                                  max_batch=4)
        self._seen: str | None = None
        self._expected: str | None = None

    @property
    def observed_model_version(self) -> str | None:
        return self._seen

    def expect_model_version(self, version: str) -> None:
        self._expected = version

    def query(self, batch: torch.Tensor) -> Prediction:
        self.calls += 1
        if self._expected is not None and self.version != self._expected:
            raise _version_error()(f"answered by model version {self.version!r}, expected {self._expected!r}")
        self._seen = self.version
        return Prediction(labels=torch.bucketize(batch.mean(dim=(1, 2, 3)), torch.tensor([0.45, 0.55])))


def _version_error() -> type[InvalidResponseError]:
    import blackbox_rs.errors

    return getattr(blackbox_rs.errors, "ModelVersionChangedError", InvalidResponseError)


def test_model_version_is_persisted_and_a_changed_model_is_refused(tmp_path):
    x = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    y = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(2))
    first = VersionedModel("v1")
    engine = QueryEngine(first, cache=tmp_path / "cache")
    expected = engine.query(x).labels
    engine.close()
    # the same model again: its answers are served from the cache, and new ones are fine
    same = VersionedModel("v1")
    engine = QueryEngine(same, cache=tmp_path / "cache")
    assert torch.equal(engine.query(x).labels, expected) and same.calls == 0
    engine.query(y)
    engine.close()
    # the vendor upgraded the model: a resumed run must not mix v1 answers from the cache with v2 ones
    upgraded = VersionedModel("v2")
    engine = QueryEngine(upgraded, cache=tmp_path / "cache")
    z = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(3))
    with pytest.raises(_version_error(), match="v2") as ei:
        engine.query(torch.cat([x, z]))
    assert type(ei.value).__name__ == "ModelVersionChangedError"
    assert len(engine.cache) == 2  # nothing of v2 was cached
    engine.close()


def test_connectors_without_versions_and_engines_without_cache_are_unaffected(tmp_path):
    engine = QueryEngine(make(Counting()), cache=tmp_path / "cache")
    engine.query(torch.rand(2, *SHAPE))
    assert engine.cache.get_meta("model_version|counting:v1") is None and len(engine.cache) == 1
    model = VersionedModel("v1")
    QueryEngine(model).query(torch.rand(2, *SHAPE))  # no cache: nothing stored, nothing pinned
    assert model._expected is None


# ---- cache values: scores as base64 float32 bytes (bit-exact, fast), earlier JSON lists still read ----
def test_cached_scores_round_trip_bit_exactly_and_old_rows_still_read(tmp_path):
    from blackbox_rs.cache import QueryCache
    from blackbox_rs.connectors.base import ConnectorInfo
    from blackbox_rs.engine import _decode, _encode
    from blackbox_rs.errors import CacheError

    m, k = 40, 7
    scores = torch.softmax(torch.randn(m, k, generator=torch.Generator().manual_seed(0)) * 5, dim=1)
    pred = Prediction(labels=scores.argmax(1), scores=scores)
    info = ConnectorInfo(input_shape=(1, 2, 2), class_names=tuple("abcdefg"), returns_scores=True, fingerprint="f")
    cache = QueryCache(tmp_path / "c")
    value = _encode(pred)
    assert isinstance(value["scores_f32"], str) and "scores" not in value  # packed, not a float list
    cache.set("new", value)
    back = _decode(cache.get("new"), m, info)
    assert torch.equal(back.scores, scores) and torch.equal(back.labels, pred.labels)
    cache.set("old", {"labels": pred.labels.tolist(), "scores": scores.double().tolist()})  # earlier releases
    assert torch.equal(_decode(cache.get("old"), m, info).scores, scores)
    label_only = _encode(Prediction(labels=pred.labels, scores=None))
    assert label_only["scores"] is None
    for bad in ({**value, "scores_f32": "not base64!"}, {**value, "scores_f32": value["scores_f32"][:-8]},
                {**value, "scores_f32": 3}):
        with pytest.raises(CacheError, match="malformed cache entry"):
            _decode(bad, m, info)
