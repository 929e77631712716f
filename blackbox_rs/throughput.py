"""Measured images/s of a local model (and the input module in front of it), for dry runs and ETAs.

:func:`measure_throughput` times a few real forward batches on this machine: noise-like random
images in ``[0, 1]`` of the connector's input shape, put through the ``transform`` when one is given
(the certified classifier is module + model), clipped to ``[0, 1]`` as certification clips them, and
sent to the **connector itself** in chunks of its ``max_batch``, exactly as the engine would chunk
one certification batch. One warm-up batch runs first, untimed (lazy initialisation, kernel
selection, caches); then timed batches run until ``seconds`` have passed or ``max_batches`` were
timed (at least one). The rate is the images of the timed batches over their seconds.

Guarantees: **nothing is charged, counted or cached.** The measurement never goes through a
:class:`~blackbox_rs.engine.QueryEngine` (given one, it only reads ``engine.connector``): no budget
is reserved, no ledger is written, the engine's ``stats`` do not change and no answer reaches the
query cache. It only runs on a *local* model, and never on a paid one: for a connector that is not
a local model, or whose ``info.cost_per_query`` is above zero, it sends nothing and returns ``None``
(a dry run never sends to a paid or remote API). The random images come from a generator of their
own, so torch's global random state is untouched.

What counts as a local model: an instance of
:class:`~blackbox_rs.connectors.module.TorchModelConnector` (``ModuleConnector``, ``TorchScriptConnector``,
which also loads exported programs) or of :class:`~blackbox_rs.connectors.onnx.ONNXConnector`, checked with
``isinstance`` (classes imported lazily; importing the ONNX connector does not import onnxruntime).
An explicit list rather than a duck-typed attribute, so a remote connector can never be timed by
accident because it happens to carry the attribute. A :class:`CallableConnector` is not counted as
local (the function it wraps may call anything).

What is *not* included: the engine's own bookkeeping (cache look-ups, budget reservations, journal
writes) and the Gaussian noise draws of certification. The figure is for the current torch thread
count, the model's device and the load on the machine at the time of the probe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, Field

from blackbox_rs.errors import InvalidParameterError
from blackbox_rs.progress import format_rate

__all__ = ["Throughput", "format_rate", "is_local_model", "measure_throughput"]


class Throughput(BaseModel):
    """What :func:`measure_throughput` measured."""

    images_per_s: float = Field(gt=0, description="images of the timed batches / their seconds")
    batch_size: int = Field(ge=1, description="images per timed batch (the transform's batch)")
    measured_batches: int = Field(ge=1, description="timed batches (the warm-up batch excluded)")
    seconds: float = Field(ge=0, description="seconds of the timed batches")
    includes_transform: bool = Field(default=False, description="the input module's time is in the figure")
    threads: int = Field(default=1, description="torch intra-op threads during the probe")

    def eta_seconds(self, images: int) -> float:
        """Seconds ``images`` model answers take at the measured rate."""
        return max(0, int(images)) / self.images_per_s


def _connector(engine_or_connector: Any) -> Any:
    from blackbox_rs.engine import QueryEngine

    return engine_or_connector.connector if isinstance(engine_or_connector, QueryEngine) else engine_or_connector


def is_local_model(connector: Any) -> bool:
    """Whether ``connector`` (or a :class:`QueryEngine`'s connector) runs a model file or module in
    this process: a ``TorchModelConnector`` subclass or an ``ONNXConnector`` (see the module docstring)."""
    from blackbox_rs.connectors.module import TorchModelConnector
    from blackbox_rs.connectors.onnx import ONNXConnector

    return isinstance(_connector(connector), (TorchModelConnector, ONNXConnector))


def measure_throughput(
    engine_or_connector: Any,
    *,
    batch_size: int | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seconds: float = 0.5,
    max_batches: int = 20,
    seed: int = 0,
) -> Throughput | None:
    """Images per second of the local model behind ``engine_or_connector`` (with ``transform`` in
    front of it, when given) on this machine; ``None``, with nothing sent, for a remote or paid
    connector. Nothing is charged, counted or cached (see the module docstring).

    ``batch_size``: images per batch, as certification batches them (default: the connector's
    ``max_batch``; larger batches are sent in chunks of ``max_batch``). ``seconds``: how long to keep
    timing batches (at least one is timed); ``max_batches``: at most this many timed batches.
    Raises :class:`InvalidParameterError` for a non-positive ``batch_size``, ``seconds`` or
    ``max_batches``, and whatever the model or the transform raises on the probe batch.
    """
    conn = _connector(engine_or_connector)
    info = conn.info
    if float(info.cost_per_query) > 0 or not is_local_model(conn):
        return None
    bs = int(info.max_batch) if batch_size is None else int(batch_size)
    if bs < 1:
        raise InvalidParameterError(f"batch_size must be >= 1, got {batch_size!r}")
    if not (isinstance(seconds, (int, float)) and seconds > 0):
        raise InvalidParameterError(f"seconds must be a positive number, got {seconds!r}")
    if int(max_batches) < 1:
        raise InvalidParameterError(f"max_batches must be >= 1, got {max_batches!r}")
    chunk = int(info.max_batch)
    g = torch.Generator().manual_seed(int(seed))
    x = torch.rand((bs, *info.input_shape), generator=g)  # noise-like images in [0, 1]

    def one_batch() -> None:
        batch = x
        if transform is not None:
            with torch.no_grad():
                batch = transform(x.clone())
        batch = batch.detach().clamp(0.0, 1.0)
        for s in range(0, bs, chunk):
            conn.query(batch[s:s + chunk])  # labels come back on the CPU: the device work is done

    one_batch()  # warm-up, untimed
    done, spent = 0, 0.0
    while done < int(max_batches) and (done == 0 or spent < float(seconds)):
        t0 = time.perf_counter()
        one_batch()
        spent += time.perf_counter() - t0
        done += 1
    rate = done * bs / max(spent, 1e-9)
    return Throughput(images_per_s=rate, batch_size=bs, measured_batches=done, seconds=spent,
                      includes_transform=transform is not None, threads=torch.get_num_threads())
