"""Certify a dataset across processes or machines (Ray), with one budget that holds across all of them.

``certify_dataset(..., executor=RayExecutor(connector=ConnectorSpec(...), num_workers=4))``: workers
build their own connector from a serialisable :class:`ConnectorSpec` (credentials are read from the
worker's environment, never shipped), load the module from a saved smoother directory, and certify
the inputs the journal has not finished with the same per-input function and seeds as the
single-process path. One :class:`~blackbox_rs.distributed.ledger.LedgerActor` holds the budget;
results are journaled on the driver, in input order. Ray is optional (``pip install blackbox-rs[ray]``):
importing this package never imports Ray. See ``docs/distributed.md``.
"""

from __future__ import annotations

from blackbox_rs.distributed.executor import Executor, LocalExecutor, RayExecutor
from blackbox_rs.distributed.spec import ConnectorSpec

__all__ = ["ConnectorSpec", "Executor", "LocalExecutor", "RayExecutor"]
