"""A QueryBudget ledger shared by several processes and threads: the limit holds for their sum, the
file is the truth, a spent ledger says to raise the limit, a corrupted one is a typed error."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest

from blackbox_rs.budget import QueryBudget, Reservation
from blackbox_rs.errors import BudgetExceeded, BudgetSpentError, CacheError

LIMIT = 200


def _spender(ledger: str, go: str, ready: str, out: str) -> None:
    """Child process: open the ledger, wait for the start signal, reserve 1-3 queries until refused."""
    budget = QueryBudget(max_queries=LIMIT, max_cost=None, ledger=ledger)  # reads the ledger now
    Path(ready).touch()
    deadline = time.monotonic() + 20
    while not Path(go).exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    got, i, kind = 0, 0, ""
    while True:
        size = 1 + i % 3
        i += 1
        try:
            budget.reserve(size, 0.0)
        except BudgetExceeded as exc:
            kind = type(exc).__name__
            break
        got += size
        if i % 7 == 0:  # a refunded request (cache hit) never counts
            try:
                budget.refund(budget.reserve(1, 0.0))
            except BudgetExceeded:
                pass
    Path(out).write_text(json.dumps({"got": got, "error": kind}))


def test_two_processes_never_spend_more_than_the_limit_together(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    go = tmp_path / "go"
    ctx = mp.get_context("spawn")
    procs = []
    for k in range(2):
        p = ctx.Process(target=_spender, args=(str(ledger), str(go), str(tmp_path / f"ready{k}"),
                                               str(tmp_path / f"out{k}.json")))
        p.start()
        procs.append(p)
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"ready{k}").exists() for k in range(2)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both opened the ledger before either spent anything
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = [json.loads((tmp_path / f"out{k}.json").read_text()) for k in range(2)]
    total = sum(r["got"] for r in results)
    final = json.loads(ledger.read_text())
    assert total <= LIMIT
    assert final["spent_queries"] == total
    assert total >= LIMIT - 2  # stopped only because the next request (<= 3) did not fit
    assert {r["error"] for r in results} == {"BudgetSpentError"}
    assert QueryBudget(max_queries=LIMIT, ledger=ledger).spent_queries == total


def test_two_budgets_on_one_ledger_in_threads_and_spent_reads_the_file(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    a = QueryBudget(max_queries=100, max_cost=1.0, ledger=ledger)
    b = QueryBudget(max_queries=100, max_cost=1.0, ledger=ledger)
    won = [0, 0]

    def spend(k: int, budget: QueryBudget) -> None:
        while True:
            try:
                budget.reserve(1, 0.003)
            except BudgetExceeded:
                return
            won[k] += 1

    threads = [threading.Thread(target=spend, args=(k % 2, (a, b)[k % 2])) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(won) == a.spent_queries == b.spent_queries <= 100
    assert a.spent_cost == pytest.approx(b.spent_cost) and a.spent_cost <= 1.0 + 1e-9
    assert a.remaining_queries == b.remaining_queries == 100 - sum(won)


def test_parent_and_child_ledgers_hold_nothing_on_failure(tmp_path: Path) -> None:
    parent = QueryBudget(max_queries=10, ledger=tmp_path / "run.json")
    child = QueryBudget(max_queries=100, ledger=tmp_path / "fit.json", parent=parent)
    child.reserve(8, 0.0)
    with pytest.raises(BudgetSpentError):
        child.reserve(5, 0.0)  # the child has room, the parent does not
    assert child.spent_queries == 8 and parent.spent_queries == 8
    # another process (here: another object) spends on the parent's ledger: the child sees it
    QueryBudget(max_queries=10, ledger=tmp_path / "run.json").reserve(2, 0.0)
    with pytest.raises(BudgetExceeded):
        child.reserve(1, 0.0)
    assert child.spent_queries == 8 and parent.spent_queries == 10
    QueryBudget(max_queries=10, ledger=tmp_path / "run.json").refund(Reservation(2, 0.0))
    assert parent.spent_queries == 8 and parent.remaining_queries == 2


def test_a_spent_ledger_says_to_raise_the_limit_and_memory_budgets_do_not(tmp_path: Path) -> None:
    ledger = tmp_path / "out" / "budget_ledger.json"
    b = QueryBudget(max_queries=20, ledger=ledger)
    b.reserve(16, 0.0)
    with pytest.raises(BudgetSpentError) as info:
        b.reserve(16, 0.0)
    msg = str(info.value)
    assert str(ledger) in msg and "16 of 20" in msg and "larger budget" in msg
    assert "same command" in msg and "cannot progress" in msg
    cost = QueryBudget(max_cost=0.01, ledger=tmp_path / "c.json")
    with pytest.raises(BudgetSpentError, match="--max-cost"):
        cost.reserve(10, 0.02)
    mem = QueryBudget(max_queries=20)
    mem.reserve(16, 0.0)
    with pytest.raises(BudgetExceeded) as info2:
        mem.reserve(16, 0.0)
    assert type(info2.value) is BudgetExceeded


def test_a_corrupted_ledger_is_a_cache_error_at_open_and_mid_run(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.json"
    ledger.write_text("{not json")
    with pytest.raises(CacheError, match="corrupted"):
        QueryBudget(max_queries=10, ledger=ledger)
    ledger.write_text(json.dumps({"spent_queries": 3, "spent_cost": 0.0}))
    b = QueryBudget(max_queries=10, ledger=ledger)
    assert b.spent_queries == 3
    ledger.write_text(json.dumps({"spent_queries": "three"}))  # damaged while the run goes on
    with pytest.raises(CacheError, match="corrupted"):
        b.reserve(1, 0.0)
    assert json.loads(ledger.read_text()) == {"spent_queries": "three"}  # never silently reset


def test_a_parent_on_the_same_ledger_is_refused_not_a_deadlock(tmp_path: Path) -> None:
    from blackbox_rs.errors import InvalidParameterError

    parent = QueryBudget(max_queries=10, ledger=tmp_path / "l.json")
    child = QueryBudget(max_queries=10, ledger=tmp_path / "l.json", parent=parent)
    with pytest.raises(InvalidParameterError, match="its own ledger"):
        child.reserve(1, 0.0)
    assert parent.spent_queries == 0 and child.spent_queries == 0
    parent.reserve(2, 0.0)  # nothing was left locked
    assert child.spent_queries == 2
