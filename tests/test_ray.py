"""Distributed certification on a local Ray cluster started here (2 CPUs, loopback only).

Deselect with ``-m "not ray"``; skipped when Ray is not installed (``pip install -e .[ray]``)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from blackbox_rs.budget import QueryBudget  # noqa: E402
from blackbox_rs.certify_sequential import certify_radius_dataset  # noqa: E402
from blackbox_rs.dataset import certify_dataset  # noqa: E402
from blackbox_rs.distributed import ConnectorSpec, RayExecutor  # noqa: E402
from blackbox_rs.engine import QueryEngine  # noqa: E402
from blackbox_rs.errors import BudgetExceeded, ConfigError  # noqa: E402
from blackbox_rs.smoother import BlackBoxSmoother  # noqa: E402
from tests.helpers.fault_server import FaultServer  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

SECRET_ENV = "BBRS_K2_WORKER_TOKEN"
SECRET = "s3cr3t-only-in-the-workers-7f1c"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    os.environ[SECRET_ENV] = SECRET  # the cluster's processes (and so every worker) inherit it ...
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    del os.environ[SECRET_ENV]  # ... the driver does not have it
    yield
    ray.shutdown()


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) * 4.0)


@pytest.fixture(scope="module")
def ts_spec(tmp_path_factory) -> ConnectorSpec:
    p = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.jit.save(torch.jit.script(Tiny().eval()), str(p))
    return ConnectorSpec(name="torchscript", settings={"path": str(p), "input_shape": [1, 8, 8], "num_classes": 3})


def _data(n: int, shape=(1, 8, 8)) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, *shape, generator=g), [i % 3 for i in range(n)]


def _dump(certs) -> list[dict]:
    return [c.model_dump() for c in certs]


def test_certificates_equal_single_process_cohen_sequential_and_module(ts_spec, tmp_path):
    x, y = _data(6)
    local = certify_dataset(ts_spec.build(), x, y, sigma=0.25, n0=8, n=40, batch_size=16, seed=11)
    ex = RayExecutor(num_workers=2, connector=ts_spec)
    dist = certify_dataset(ts_spec.build(), x, y, sigma=0.25, n0=8, n=40, batch_size=16, seed=11, executor=ex,
                           output=tmp_path / "c.jsonl")
    assert _dump(dist.certificates) == _dump(local.certificates)
    assert [c.index for c in dist.certificates] == list(range(6))
    assert dist.queries == local.queries == 6 * 48
    lines = [json.loads(s) for s in (tmp_path / "c.jsonl").read_text().splitlines()[1:]]
    assert [r["index"] for r in lines if "prediction" in r] == list(range(6))  # journaled in input order

    seq_local = certify_radius_dataset(ts_spec.build(), x[:3], radius=0.1, sigma=0.25, max_queries=300, seed=5)
    seq_dist = certify_radius_dataset(ts_spec.build(), x[:3], radius=0.1, sigma=0.25, max_queries=300, seed=5,
                                      executor=RayExecutor(num_workers=2, connector=ts_spec))
    assert _dump(seq_dist.certificates) == _dump(seq_local.certificates)

    sm = BlackBoxSmoother(ts_spec.build(), module={"name": "dncnn", "depth": 2, "width": 8}, sigma=0.25)
    with torch.no_grad():
        for prm in sm.module.parameters():
            prm.add_(0.01)
    saved = sm.save(tmp_path / "smoother")
    a = sm.certify_dataset(x[:3], y[:3], n0=8, n=40, seed=2, progress=None)
    b = sm.certify_dataset(x[:3], y[:3], n0=8, n=40, seed=2, progress=None,
                           executor=RayExecutor(num_workers=2, connector=ts_spec, module_dir=saved))
    assert _dump(a.certificates) == _dump(b.certificates)
    with pytest.raises(ConfigError, match="transform"):  # a worker without the module refuses to start
        sm.certify_dataset(x[:1], y[:1], n0=8, n=40, seed=2, progress=None,
                           executor=RayExecutor(num_workers=1, connector=ts_spec))


def _kserve_spec(srv: FaultServer, **extra) -> ConnectorSpec:
    return ConnectorSpec(name="kserve_v2", settings={"base_url": srv.url, "model_name": "toy", "max_batch": 8,
                                                      **extra})


def _billed(srv: FaultServer) -> int:
    return sum(r.n_images for r in srv.infer_records())


@pytest.mark.parametrize("batch_size,lease,limit", [(7, 1, 230), (16, 64, 301), (32, 256, 257)])
def test_four_workers_racing_one_budget_never_exceed_it(batch_size, lease, limit, tmp_path):
    x, y = _data(10, (3, 8, 8))
    with FaultServer(service_time_s=0.002) as srv:
        spec = _kserve_spec(srv)
        engine = QueryEngine(spec.build(), budget=QueryBudget(max_queries=limit))
        out = tmp_path / "race.jsonl"
        with pytest.raises(BudgetExceeded):
            certify_dataset(engine, x, y, sigma=0.25, n0=5, n=55, batch_size=batch_size, seed=1, output=out,
                            executor=RayExecutor(num_workers=4, connector=spec, lease_queries=lease))
        billed = _billed(srv)
    assert 0 < billed <= limit
    assert engine.budget.spent_queries <= limit
    assert engine.budget.spent_queries >= billed  # conservative: never under-counted
    rows = [json.loads(s) for s in out.read_text().splitlines()[1:]]
    done = [r["index"] for r in rows if "prediction" in r]
    assert done == list(range(len(done)))  # the finished prefix is journaled, in order (none when the
    # first inputs lost the race for the last leases: conservative, never over the limit)
    assert len(done) * 60 <= limit


_DRIVER = textwrap.dedent("""
    import sys, ray, torch
    from blackbox_rs.dataset import certify_dataset
    from blackbox_rs.distributed import ConnectorSpec, RayExecutor
    address, url, out = sys.argv[1:4]
    ray.init(address=address, log_to_driver=False)
    spec = ConnectorSpec(name="kserve_v2", settings={"base_url": url, "model_name": "toy", "max_batch": 8})
    g = torch.Generator().manual_seed(3)
    x = torch.rand(12, 3, 8, 8, generator=g)
    certify_dataset(spec.build(), x, [i % 3 for i in range(12)], sigma=0.25, n0=8, n=32, batch_size=8, seed=4,
                    output=out, executor=RayExecutor(num_workers=2, connector=spec))
""")


def _finished(path: Path) -> list[int]:
    if not path.exists():
        return []
    rows = []
    for s in path.read_text().splitlines()[1:]:
        try:
            rows.append(json.loads(s))
        except ValueError:
            pass
    return [r["index"] for r in rows if "prediction" in r]


def test_driver_sigkill_then_rerun_repeats_no_query_for_finished_inputs(tmp_path):
    out = tmp_path / "kill.jsonl"
    with FaultServer(service_time_s=0.05) as srv:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-c", _DRIVER, ray.get_runtime_context().gcs_address, srv.url,
                                 str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 90
            while len(_finished(out)) < 3 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
        first = _finished(out)
        assert 3 <= len(first) < 12, first
        last, quiet = len(srv.infer_records()), time.monotonic()
        while time.monotonic() - quiet < 1.5:  # the killed driver's workers are gone
            time.sleep(0.1)
            if len(srv.infer_records()) != last:
                last, quiet = len(srv.infer_records()), time.monotonic()
        before = _billed(srv)
        spec = _kserve_spec(srv)
        x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(3))
        res = certify_dataset(spec.build(), x, [i % 3 for i in range(12)], sigma=0.25, n0=8, n=32, batch_size=8,
                              seed=4, output=out, executor=RayExecutor(num_workers=2, connector=spec))
        rerun = _billed(srv) - before
    assert [c.index for c in res.certificates] == list(range(12))
    assert rerun == res.queries == (12 - len(first)) * 40  # nothing for the inputs finished before the kill


def test_secret_only_in_worker_env_never_shipped_logged_or_journaled(tmp_path):
    assert SECRET_ENV not in os.environ
    x, y = _data(2, (3, 8, 8))
    with FaultServer() as srv:
        spec = _kserve_spec(srv, bearer_token_env=SECRET_ENV)
        ex = RayExecutor(num_workers=2, connector=spec)
        with pytest.raises(ConfigError, match=SECRET_ENV):
            spec.build()  # the driver cannot build it with credentials: the secret is not here
        res = certify_dataset(spec.build(credentials=False), x, y, sigma=0.25, n0=4, n=20, seed=3,
                              output=tmp_path / "s.jsonl", executor=ex)
        assert srv.last_headers.get("Authorization") == f"Bearer {SECRET}"  # the workers did authenticate
    assert len(res.certificates) == 2
    shipped = [repr(spec), spec.model_dump_json(), repr(ex), pickle.dumps(spec), pickle.dumps(ex.spec.model_dump())]
    assert not any((SECRET.encode() if isinstance(s, bytes) else SECRET) in s for s in shipped)
    assert SECRET not in (tmp_path / "s.jsonl").read_text()
    assert SECRET not in json.dumps([c.model_dump(mode="json") for c in res.certificates])
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for f in (session / "logs").rglob("*"):
        if f.is_file() and f.stat().st_size < 50_000_000:
            assert SECRET.encode() not in f.read_bytes(), f


def test_spec_refuses_secret_looking_settings():
    for bad in ({"bearer_token": "x"}, {"api_key": "x"}, {"transport": {"headers": {"Authorization": "Bearer x"}}},
                {"client_secret": "x"}, {"auth": "x"}):
        with pytest.raises(ConfigError, match="credential"):
            ConnectorSpec(name="kserve_v2", settings=bad)
    ok = ConnectorSpec(name="openai_chat", settings={"max_tokens": 5, "api_key_env": "K", "api_key_header": "x"})
    assert ok.settings["max_tokens"] == 5
    with pytest.raises(ConfigError, match="JSON"):
        ConnectorSpec(name="x", settings={"f": object()})


def test_the_command_line_certifies_on_ray_and_matches_the_single_process_run(ts_spec, tmp_path):
    """`blackbox-rs certify RUN.toml --ray auto`: the same journal as without --ray (same seed)."""
    import numpy as np
    from typer.testing import CliRunner

    from blackbox_rs.cli import app

    x, y = _data(4)
    np.savez(tmp_path / "test.npz", x=x.numpy(), y=np.array(y))
    s = ts_spec.settings
    for out in ("local", "ray"):
        (tmp_path / f"{out}.toml").write_text(textwrap.dedent(f"""
            [connector]
            name = "torchscript"
            path = "{s['path']}"
            input_shape = [1, 8, 8]
            num_classes = 3
            [data]
            certify = "{tmp_path / 'test.npz'}"
            [certify]
            sigma = 0.25
            n0 = 8
            n = 40
            seed = 5
            [run]
            out_dir = "{tmp_path / out}"
        """))
    runner = CliRunner()
    r = runner.invoke(app, ["certify", str(tmp_path / "local.toml")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["certify", str(tmp_path / "ray.toml"), "--ray", "auto", "--ray-workers", "2"])
    assert r.exit_code == 0, r.output

    def records(out: str) -> list[dict]:
        lines = (tmp_path / out / "certificates-bare.jsonl").read_text().splitlines()[1:]
        return [{k: v for k, v in json.loads(line).items() if k not in ("queries", "cache_hits", "queries_total")}
                for line in lines]

    assert records("ray") == records("local") and len(records("local")) == 4


def _worker_pids() -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        text = " ".join([p.info.get("name") or "", *(p.info.get("cmdline") or [])])
        if "CertifyWorker" in text:
            pids.append(int(p.info["pid"]))
    return pids


def test_a_worker_sigkilled_mid_run_is_replaced_and_only_its_input_is_redone(tmp_path):
    """SIGKILL one worker while it certifies: its input is redone by a restarted worker, the journal
    equals the single-process run's, and what is paid twice is at most the killed worker's input."""
    import threading

    x, y = _data(8, (3, 8, 8))
    per_input = 8 + 32
    with FaultServer(service_time_s=0.03) as srv:
        spec = _kserve_spec(srv)
        local = certify_dataset(spec.build(), x, y, sigma=0.25, n0=8, n=32, batch_size=8, seed=4)
        single = _billed(srv)
        assert single == len(x) * per_input
        out = tmp_path / "killed.jsonl"
        box: dict = {}

        def run() -> None:
            try:
                box["res"] = certify_dataset(spec.build(), x, y, sigma=0.25, n0=8, n=32, batch_size=8, seed=4,
                                             output=out, executor=RayExecutor(num_workers=2, connector=spec))
            except BaseException as exc:  # noqa: BLE001 - reported below
                box["exc"] = exc

        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + 120
        killed = None
        while time.time() < deadline and killed is None and t.is_alive():
            pids = _worker_pids()
            if len(_finished(out)) >= 1 and pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        t.join(timeout=240)
        billed = _billed(srv) - single
    assert killed is not None, "no worker process was found to kill"
    assert "exc" not in box, box.get("exc")
    got = box["res"].certificates
    strip = ("queries", "cache_hits", "queries_total")
    assert [{k: v for k, v in c.model_dump().items() if k not in strip} for c in got] == \
        [{k: v for k, v in c.model_dump().items() if k not in strip} for c in local.certificates]
    assert _finished(out) == list(range(len(x)))
    # every input paid once, plus at most what the killed worker had in flight (its inputs, redone)
    assert len(x) * per_input <= billed <= len(x) * per_input + 2 * per_input
