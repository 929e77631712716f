"""The table of fit strategies by name: a leaf that imports no strategy. The built-in strategies are
lazy entries (imported on first use, when they also register themselves), so the typed fit config can
check a name without importing the fitting machinery, and third-party strategies add themselves with
:func:`blackbox_rs.fitting.strategies.register_strategy`."""

from __future__ import annotations

from typing import Any

from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.registry import Registry

__all__ = ["STRATEGIES"]

_BUILTIN = "blackbox_rs.fitting.strategies"

#: Every fit strategy by name (``name in STRATEGIES``, ``sorted(STRATEGIES)``, ``STRATEGIES.pop(name)``).
STRATEGIES: Registry[Any] = Registry("strategy", unknown=InvalidParameterError, lazy={
    "denoise": (f"{_BUILTIN}.denoise", "DenoiseStrategy"),
    "surrogate": (f"{_BUILTIN}.surrogate", "SurrogateStrategy"),
    "zeroth_order": (f"{_BUILTIN}.zeroth_order", "ZerothOrderStrategy"),
    "passthrough": (f"{_BUILTIN}.passthrough", "PassthroughStrategy"),
})
