"""A terminal progress bar for the command line (ETA, queries spent, budget left).

Library code never prints: it reports progress through callbacks; the CLI renders them here, and the
Python API does too, by default, when stderr is a terminal (``progress="auto"``; ``None`` turns it off).

After a resume the bar agrees with the budget and the dataset result: "budget left" is read from the
budget object itself (its persisted ledger, so it includes what earlier runs and other processes
spent), "queries" are those charged by this run, "total" those recorded for every run on the
journal, and the ETA counts only the inputs still to do, at the pace of the inputs this run worked on
(inputs read back from the journal cost no time and are not part of the pace). "samples/s" is the
model evaluations of this run (queries charged plus answers served by the query cache) per second
since the stage began: what the classifier is actually doing, whatever the connector.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["DatasetProgress", "ProgressBar", "budget_left", "format_rate"]


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_rate(per_s: float) -> str:
    """A rate as ``"1,234"`` (100 and more) or ``"12.3"`` (three significant digits below 100)."""
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.3g}"


def budget_left(budget: Any) -> int | None:
    """Queries a budget (a :class:`~blackbox_rs.budget.QueryBudget`, with its parents and members)
    still allows: the smallest ``max_queries - spent_queries`` over the budgets it charges, read from
    their ledgers (None when none has a query limit)."""
    from blackbox_rs.budget import chain

    left = [b.remaining_queries for b in chain(budget) if b.max_queries is not None]
    return min(left) if left else None


class ProgressBar:
    """Renders ``stage [#####-----] done/total ETA .. N samples/s queries .. total .. budget left ..`` on one line.

    ``budget``: a :class:`~blackbox_rs.budget.QueryBudget` (budget left is then read from it, i.e.
    from its persisted ledger, at each draw: what every run spent counts), or an int limit (budget
    left = limit - ``info["queries"]``: only right when this run is the budget's only spender).
    ``info["budget_left"]`` overrides both. ``info["resumed"]``: how many of ``done`` were finished by
    earlier runs; the ETA then uses only the pace of the others, and counts only what is left.
    ``info["samples"]``: samples this run evaluated (queries plus cache hits); shown as ``samples/s``
    over the seconds since the stage began.
    On a non-terminal stream it prints at most one line per 10% step, so logs stay short.
    """

    def __init__(self, stream: IO[str] | None = None, *, budget: Any = None, width: int = 28) -> None:
        self.stream = stream or sys.stderr
        self.budget = budget
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stage: str | None = None
        self._t0 = 0.0
        self._last_decile = -1
        self._last_draw = 0.0
        self._begun: tuple[str, float] | None = None
        self._resumed = 0
        self._t_work = 0.0

    def begin(self, stage: str) -> None:
        """Start ``stage``'s clock now (without drawing), so the first item's time counts in the ETA."""
        self._begun = (stage, time.monotonic())

    def _left(self, info: dict[str, Any]) -> int | None:
        if info.get("budget_left") is not None:
            return max(0, int(info["budget_left"]))
        if self.budget is None:
            return None
        if isinstance(self.budget, int):
            return max(0, self.budget - int(info.get("queries", 0))) if "queries" in info else None
        return budget_left(self.budget)

    def __call__(self, stage: str, done: int, total: int, info: dict[str, Any] | None = None) -> None:
        info = info or {}
        now = time.monotonic()
        if stage != self._stage:
            if self._stage is not None and self.tty:
                self.stream.write("\n")
            start = self._begun[1] if self._begun is not None and self._begun[0] == stage else now
            self._stage, self._t0, self._last_decile = stage, start, -1
            self._resumed, self._t_work = 0, start
        resumed = int(info.get("resumed", 0))
        if resumed > self._resumed:  # items read back: no work, the pace is measured from here
            self._resumed, self._t_work = resumed, now
        frac = done / total if total else 1.0
        decile = int(frac * 10)
        final = done >= total
        if self.tty and not final and now - self._last_draw < 0.1:
            return
        if not self.tty and decile == self._last_decile and not final:
            return
        self._last_decile, self._last_draw = decile, now
        elapsed = now - self._t0
        worked = done - self._resumed
        eta_text = ("elapsed " + _fmt_time(elapsed) if final else
                    "ETA " + (_fmt_time((now - self._t_work) / worked * (total - done)) if worked > 0 else "--"))
        filled = int(frac * self.width)
        parts = [f"{stage:<24} [{'#' * filled}{'-' * (self.width - filled)}] {done}/{total}", eta_text]
        if self._resumed:
            parts.append(f"resumed {self._resumed}")
        if info.get("pilot"):  # a fit's pilot (blackbox_rs.fitting.pilot): its steps, not the full fit's
            parts.append("pilot")
        if info.get("samples") is not None and elapsed > 0:
            parts.append(f"{format_rate(int(info['samples']) / elapsed)} samples/s")
        if "queries" in info:
            parts.append(f"queries {int(info['queries']):,}")
        if info.get("queries_total") is not None:
            parts.append(f"total {int(info['queries_total']):,}")
        left = self._left(info)
        if left is not None:
            parts.append(f"budget left {left:,}")
        if info.get("cost"):
            parts.append(f"cost {float(info['cost']):.4g}")
        line = "  ".join(parts)
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        if final:
            self._stage = None
        self.stream.flush()


class DatasetProgress:
    """A dataset ``progress(index, cert)`` callback that draws a :class:`ProgressBar` (as ``stage``;
    its clock starts when this object is made) or calls ``draw(done, total, info)``.

    The dataset loop calls :meth:`resumed` for certificates read back from the journal and the
    object itself for those this run computed, so ``info`` carries ``resumed`` (inputs finished by
    earlier runs), ``queries`` (charged by this run: the engine's counter since this object was made,
    when given an ``engine``, else the sum of this run's certificates' ``queries``) and
    ``queries_total`` (the certificates' ``queries_total`` so far: every run on the journal) and
    ``samples`` (what this run evaluated: the engine's queries plus cache hits since this object was
    made, when given an ``engine``, else the sum of this run's certificates' ``queries`` and
    ``cache_hits``), drawn as samples/s.
    ``then(index, cert)``, if given, is called after each draw.
    """

    def __init__(self, draw: ProgressBar | Callable[[int, int, dict[str, Any]], None], total: int, *,
                 stage: str = "certify", engine: Any = None, then: Callable[[int, Any], None] | None = None) -> None:
        if isinstance(draw, ProgressBar):
            bar = draw
            bar.begin(stage)
            self.draw: Callable[[int, int, dict[str, Any]], None] = lambda d, t, i: bar(stage, d, t, i)
        else:
            self.draw = draw
        self.total, self.engine, self.then = int(total), engine, then
        self.done = self.resumed_count = self.queries = self.queries_total = self.samples = 0
        self._start = engine.stats.queries if engine is not None else 0
        self._start_hits = engine.stats.cache_hits if engine is not None else 0

    def resumed(self, index: int, cert: Any) -> None:
        """A certificate read back from the journal (no work in this run)."""
        self.resumed_count += 1
        self._show(index, cert, new=False)

    def __call__(self, index: int, cert: Any) -> None:
        self._show(index, cert, new=True)

    def _show(self, index: int, cert: Any, *, new: bool) -> None:
        self.done += 1
        q = int(getattr(cert, "queries", 0))
        if new:
            self.queries += q
            self.samples += q + int(getattr(cert, "cache_hits", 0) or 0)
        total = getattr(cert, "queries_total", None)
        self.queries_total += q if total is None else int(total)
        charged = self.engine.stats.queries - self._start if self.engine is not None else self.queries
        samples = (charged + self.engine.stats.cache_hits - self._start_hits if self.engine is not None
                   else self.samples)
        info: dict[str, Any] = {"queries": charged, "queries_total": self.queries_total,
                                "resumed": self.resumed_count, "samples": samples}
        cpq = getattr(getattr(self.engine, "info", None), "cost_per_query", 0.0)
        if cpq:
            info["cost"] = charged * cpq
        self.draw(self.done, max(self.total, self.done), info)
        if self.then is not None:
            self.then(index, cert)
