"""Subprocess for tests/test_kill_resume.py: certify 50 inputs through a counting connector.

argv: workdir [kill_at_call]. Every completed connector call appends one line to workdir/calls.log
(fsynced). With kill_at_call=K the process SIGKILLs itself when call K starts, i.e. mid-run, with
calls 1..K-1 answered.
"""

import os
import signal
import sys
from pathlib import Path

import torch

from blackbox_rs.connectors import CallableConnector
from blackbox_rs.dataset import certify_dataset
from blackbox_rs.engine import QueryEngine

work = Path(sys.argv[1])
kill_at = int(sys.argv[2]) if len(sys.argv) > 2 else 0
log = open(work / "calls.log", "a")  # noqa: SIM115
calls = 0


def model(batch: torch.Tensor) -> torch.Tensor:
    global calls
    calls += 1
    if calls == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    m = batch.mean(dim=(1, 2, 3))
    out = torch.bucketize(m, torch.tensor([0.45, 0.55]))
    log.write(f"{len(batch)}\n")
    log.flush()
    os.fsync(log.fileno())
    return out


g = torch.Generator().manual_seed(7)
x = torch.rand(50, 1, 6, 6, generator=g)
y = torch.randint(0, 3, (50,), generator=g)
conn = CallableConnector(model, input_shape=(1, 6, 6), num_classes=3, max_batch=40, fingerprint="kill-test:v1")
engine = QueryEngine(conn, cache=work / "cache")
certify_dataset(engine, x, y.tolist(), sigma=0.25, n0=10, n=100, seed=3, output=work / "certs.jsonl")
