"""A SIGKILLed certification run, rerun to completion, pays for no query twice."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("_kill_worker.py")
ACCOUNTING = {"queries", "cache_hits", "queries_total"}  # legitimately differ: resumed queries are cache hits
# (a SIGKILL leaves no progress record, so queries_total cannot see what the killed run paid)


def run(work: Path, kill_at: int = 0) -> int:
    return subprocess.run([sys.executable, str(WORKER), str(work), str(kill_at)], timeout=300).returncode


def calls(work: Path) -> list[int]:
    p = work / "calls.log"
    return [int(s) for s in p.read_text().split()] if p.exists() else []


def certs(work: Path) -> list[dict]:
    out = []
    for line in (work / "certs.jsonl").read_text().splitlines():
        d = json.loads(line)
        if "blackbox_rs_journal" in d:  # the journal's header line, not a certificate
            continue
        out.append({k: v for k, v in d.items() if k not in ACCOUNTING})
    return out


def test_sigkill_mid_run_then_resume_repeats_no_call(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    assert run(ref) == 0
    ref_calls = calls(ref)
    assert len(ref_calls) == 200  # 50 inputs x (1 selection + 3 estimation requests of <= 40)

    work = tmp_path / "killed"
    work.mkdir()
    rc = run(work, kill_at=83)  # dies as call 83 starts: inside the 21st input
    assert rc == -signal.SIGKILL
    assert len(calls(work)) == 82
    assert len(certs(work)) == 20
    assert run(work) == 0
    assert sum(calls(work)) == sum(ref_calls) and len(calls(work)) == len(ref_calls)
    assert certs(work) == certs(ref)


def test_external_sigkill_at_a_random_moment(tmp_path):
    """Killed from outside at an arbitrary time: at most the one request in flight is repeated."""
    ref = tmp_path / "ref"
    ref.mkdir()
    assert run(ref) == 0
    work = tmp_path / "killed"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, str(WORKER), str(work)])
    deadline = time.time() + 120
    target = random.Random(os.getpid()).randint(10, 120)
    while len(calls(work)) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run(work) == 0
    assert len(calls(ref)) <= len(calls(work)) <= len(calls(ref)) + 1
    assert certs(work) == certs(ref)
