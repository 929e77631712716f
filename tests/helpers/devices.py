"""Device parametrisation for tests: CPU always, CUDA where there is one (marked ``cuda``, skipped
without a device; ``benchmarks/device_check.sh`` runs ``pytest -m cuda`` on a GPU machine)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
#: ``@pytest.mark.parametrize("device", DEVICES)``: "cpu", and "cuda" when available
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_MARKS)]

F = TypeVar("F", bound=Callable[..., object])


def cuda_only(fn: F) -> F:
    """Mark a test ``cuda`` and skip it without a CUDA device."""
    for mark in CUDA_MARKS:
        fn = mark(fn)
    return fn
