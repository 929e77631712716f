"""HTTP connector throughput and rate-limit adherence against a local KServe-v2 server.

The server (tests/helpers/fault_server.py, run in its own process so it does not share the GIL
with the client) has a fixed service time and serves at most K requests at once, answering 503 to
anything beyond (``overflow="reject"``), so its capacity is ``K / service_time`` requests/s.

Two runs, each driven by a thread pool calling ``KServeV2Connector.query`` (one image per request):

1. ``max_in_flight = K``, no rate limit: achieved throughput vs capacity (target >= 0.90), and the
   server's rejections (target 0: the client never exceeds K in flight).
2. ``max_in_flight = K``, ``rate_limit = R`` (< capacity): the most requests the *server* saw in any
   1-s sliding window (target <= R), and the achieved rate.

Prints one JSON object. Usage: ``python benchmarks/http_throughput.py [--k 4] [--service-ms 20]
[--seconds 4] [--rate 100]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.fault_server import FaultServer, max_in_window  # noqa: E402

from blackbox_rs.connectors.http import TransportSettings  # noqa: E402
from blackbox_rs.connectors.kserve_v2 import KServeV2Connector  # noqa: E402

SHAPE = (1, 4, 4)


def _serve(conn: Connection, service_s: float, k: int) -> None:
    srv = FaultServer(input_shape=SHAPE, num_classes=3, service_time_s=service_s, capacity=k, overflow="reject")
    srv.start()
    conn.send(srv.url)
    while True:
        cmd = conn.recv()
        if cmd == "reset":
            with srv._lock:
                srv.log.clear()
                srv.handling_times.clear()
                srv.rejected = 0
                srv.max_in_flight_seen = 0
            conn.send(True)
        elif cmd == "stats":
            recs = srv.infer_records()
            ht = sorted(srv.handling_times)
            conn.send({"times": [r.t for r in recs], "rejected": srv.rejected,
                       "handling_ms_mean": 1e3 * sum(ht) / max(1, len(ht)),
                       "max_in_flight_seen": srv.max_in_flight_seen})
        else:
            srv.stop()
            conn.send(True)
            return


def _drive(conn_: KServeV2Connector, seconds: float, threads: int) -> tuple[int, float]:
    x = torch.rand(1, *SHAPE)
    deadline = time.monotonic() + seconds
    done = [0] * threads

    def worker(i: int) -> None:
        while time.monotonic() < deadline:
            conn_.query(x)
            done[i] += 1

    t0 = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    return sum(done), time.monotonic() - t0


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4, help="server capacity: concurrent requests")
    ap.add_argument("--service-ms", type=float, default=20.0, help="server service time per request")
    ap.add_argument("--seconds", type=float, default=4.0, help="duration of each run")
    ap.add_argument("--threads", type=int, default=None, help="client threads (default: 2 K)")
    ap.add_argument("--rate", type=float, default=None, help="rate limit for run 2 (default: capacity / 2)")
    args = ap.parse_args(argv)
    k, service_s = args.k, args.service_ms / 1000.0
    capacity = k / service_s
    rate = args.rate if args.rate is not None else capacity / 2
    threads = args.threads or 2 * k

    parent, child = mp.Pipe()
    proc = mp.get_context("fork").Process(target=_serve, args=(child, service_s, k), daemon=True)
    proc.start()
    url = parent.recv()
    result: dict[str, object] = {"k": k, "service_ms": args.service_ms, "capacity_rps": capacity,
                                 "client_threads": threads}
    try:
        # run 1: saturate the server at max_in_flight = K
        with KServeV2Connector(url, "toy", transport=TransportSettings(max_in_flight=k, timeout_s=10)) as c:
            _drive(c, 0.5, threads)  # warm-up: open the pooled connections
            parent.send("reset")
            parent.recv()
            n, secs = _drive(c, args.seconds, threads)
            parent.send("stats")
            st = parent.recv()
            achieved = n / secs
            result.update(
                achieved_rps=round(achieved, 1),
                throughput_ratio=round(achieved / capacity, 3),
                server_handling_ms_mean=round(st["handling_ms_mean"], 2),
                ratio_vs_measured_server_capacity=round(achieved * st["handling_ms_mean"] / 1e3 / k, 3),
                server_max_in_flight=st["max_in_flight_seen"],
                server_rejections=st["rejected"],
                client_retries=c.transport_stats()["retries"],
            )
        # run 2: rate-limited
        parent.send("reset")
        parent.recv()
        with KServeV2Connector(url, "toy",
                               transport=TransportSettings(max_in_flight=k, rate_limit=rate, timeout_s=10)) as c:
            parent.send("reset")  # discovery requests are not part of the measurement
            parent.recv()
            n, secs = _drive(c, args.seconds, threads)
            parent.send("stats")
            st = parent.recv()
            result.update(
                rate_limit_rps=rate,
                rate_limited_achieved_rps=round(n / secs, 1),
                server_max_requests_in_any_1s_window=max_in_window(st["times"], 1.0),
            )
    finally:
        parent.send("stop")
        parent.recv()
        proc.join(5)
    result["pass"] = {
        "throughput_ge_0.90_capacity": result["throughput_ratio"] >= 0.90,  # type: ignore[operator]
        "no_rejections": result["server_rejections"] == 0,
        "rate_limit_respected": result["server_max_requests_in_any_1s_window"] <= rate,  # type: ignore[operator]
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
