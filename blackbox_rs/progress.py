"""A terminal progress bar for the command line (ETA, queries spent, budget left).

Library code never prints: it reports progress through callbacks; the CLI renders them here, and the
Python API does too, by default, when stderr is a terminal (``progress="auto"``; ``None`` turns it off).
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

__all__ = ["ProgressBar"]


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressBar:
    """Renders ``stage [#####-----] done/total ETA .. queries .. budget left ..`` on one line.

    ``budget`` (total queries allowed) makes it show what is left; on a non-terminal stream it
    prints at most one line per 10% step, so logs stay short.
    """

    def __init__(self, stream: IO[str] | None = None, *, budget: int | None = None, width: int = 28) -> None:
        self.stream = stream or sys.stderr
        self.budget = budget
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stage: str | None = None
        self._t0 = 0.0
        self._last_decile = -1
        self._last_draw = 0.0

    def __call__(self, stage: str, done: int, total: int, info: dict[str, Any] | None = None) -> None:
        info = info or {}
        now = time.monotonic()
        if stage != self._stage:
            if self._stage is not None and self.tty:
                self.stream.write("\n")
            self._stage, self._t0, self._last_decile = stage, now, -1
        frac = done / total if total else 1.0
        decile = int(frac * 10)
        final = done >= total
        if self.tty and not final and now - self._last_draw < 0.1:
            return
        if not self.tty and decile == self._last_decile and not final:
            return
        self._last_decile, self._last_draw = decile, now
        elapsed = now - self._t0
        eta = elapsed / frac * (1 - frac) if frac > 0 else 0.0
        filled = int(frac * self.width)
        parts = [f"{stage:<24} [{'#' * filled}{'-' * (self.width - filled)}] {done}/{total}",
                 f"{'elapsed' if final else 'ETA'} {_fmt_time(elapsed if final else eta)}"]
        if "queries" in info:
            parts.append(f"queries {int(info['queries']):,}")
            if self.budget is not None:
                parts.append(f"budget left {max(0, self.budget - int(info['queries'])):,}")
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
