"""Fit strategies, chosen by name: ``denoise``, ``surrogate``, ``zeroth_order``, ``passthrough``."""

from blackbox_rs.fitting.strategies import denoise, passthrough, surrogate, zeroth_order  # noqa: F401 (register)
from blackbox_rs.fitting.strategies.base import (
    STRATEGIES,
    Strategy,
    estimate_fit_queries,
    expected_fit_queries,
    get_strategy,
    register_strategy,
    run_fit,
)

__all__ = ["STRATEGIES", "Strategy", "estimate_fit_queries", "expected_fit_queries", "get_strategy", "register_strategy",
           "run_fit"]
