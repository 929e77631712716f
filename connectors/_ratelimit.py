"""A thread-safe client-side rate limiter shared by all threads that use one connector.

:class:`RateLimiter` hands out *send slots*. Each call to :meth:`RateLimiter.acquire` reserves the
earliest slot that respects both rules below, then sleeps until it (FIFO: callers are served in the
order they asked):

* **spacing** (generic cell rate algorithm): slots are ``1 / rate`` seconds apart on average, with
  at most ``burst`` slots at once after an idle period;
* **hard window**: at most ``floor(rate * window_s)`` slots in any window of ``window_s + margin_s``
  seconds.

Guarantee: the slots returned by :meth:`acquire` never exceed ``rate * window_s`` in any half-open
interval of length ``window_s`` (one second by default), whatever ``burst`` is and however many
threads call it. ``margin_s`` (default 20 ms) is head-room for the jitter between the moment a
thread gets its slot and the moment its request reaches the server, so the server, not only the
client, sees at most ``rate`` requests per window. The cost is a throughput of about
``rate * window_s / (window_s + margin_s)`` under sustained load (2 % below ``rate``).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from blackbox_rs.errors import InvalidParameterError

__all__ = ["RateLimiter"]


class RateLimiter:
    """Reserve send slots at most ``rate`` per second (see the module docstring for guarantees).

    Args:
        rate: requests per ``window_s`` seconds divided by ``window_s`` (i.e. requests/s), > 0.
        burst: slots that may be handed out back-to-back after an idle period (>= 1).
        window_s: length of the hard sliding window in seconds.
        margin_s: extra spacing added to the hard window to absorb network jitter (>= 0).
        clock, sleep: injectable for tests (``time.monotonic`` and ``time.sleep`` by default).
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: int = 1,
        window_s: float = 1.0,
        margin_s: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
            raise InvalidParameterError(f"rate must be a positive number of requests/s, got {rate!r}")
        if int(burst) < 1:
            raise InvalidParameterError(f"burst must be >= 1, got {burst!r}")
        if not window_s > 0 or margin_s < 0:
            raise InvalidParameterError(f"need window_s > 0 and margin_s >= 0, got {window_s!r}, {margin_s!r}")
        self.rate = float(rate)
        self.burst = int(burst)
        self.window_s = float(window_s)
        self.margin_s = float(margin_s)
        self._interval = 1.0 / self.rate
        self._cap = max(1, math.floor(self.rate * self.window_s + 1e-9))
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tat = -math.inf  # theoretical arrival time of the next conforming slot (GCRA)
        self._recent: deque[float] = deque(maxlen=self._cap)  # the last `cap` reserved slots

    def reserve(self) -> float:
        """Reserve the next slot and return its time on the limiter's clock (does not sleep)."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._tat - (self.burst - 1) * self._interval)
            if self._recent:  # slots are handed out in order, never before an earlier reservation
                slot = max(slot, self._recent[-1])
            if len(self._recent) == self._cap:
                slot = max(slot, self._recent[0] + self.window_s + self.margin_s)
            self._tat = max(self._tat, slot) + self._interval
            self._recent.append(slot)
            return slot

    def acquire(self) -> float:
        """Block until this caller's slot; return the seconds spent waiting."""
        slot = self.reserve()
        wait = slot - self._clock()
        if wait > 0:
            self._sleep(wait)
            return wait
        return 0.0

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate:g}/s, burst={self.burst}, window_s={self.window_s:g})"
