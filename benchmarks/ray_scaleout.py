"""Scale-out of distributed certification (Ray) against a loopback model server.

A KServe-v2 server on 127.0.0.1 with a fixed service time (default 20 ms) and K-way concurrency
(``--capacity``); ``certify_dataset`` with 1, 2 and 4 Ray workers; inputs/s (timed from the moment the
workers are ready: starting a worker imports torch, which the run's total also reports), speedup against 1 worker
and against the server's capacity, and the budget check (billed <= limit). Then the ledger actor's
lease round trips per second. Prints one JSON object. On a small machine the numbers are
latency-bound (the server's service time, the Ray round trips), not CPU-bound.

    python benchmarks/ray_scaleout.py --inputs 8 --n 40 --capacity 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--service-ms", type=float, default=20.0)
    ap.add_argument("--capacity", type=int, default=4)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()

    import ray
    import torch

    from blackbox_rs.budget import QueryBudget
    from blackbox_rs.dataset import certify_dataset
    from blackbox_rs.distributed import ConnectorSpec, RayExecutor
    from blackbox_rs.distributed.ledger import Ledger
    from blackbox_rs.engine import QueryEngine
    from tests.helpers.fault_server import FaultServer

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    n0 = 4
    per_input_requests = -(-(1 + n0 + args.n) // args.batch)  # upper bound, batches per input
    x = torch.rand(args.inputs, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = [i % 4 for i in range(args.inputs)]
    out: dict = {"service_ms": args.service_ms, "capacity": args.capacity, "inputs": args.inputs,
                 "queries_per_input": n0 + args.n, "runs": []}
    base = None
    with FaultServer(service_time_s=args.service_ms / 1000, capacity=args.capacity) as srv:
        spec = ConnectorSpec(name="kserve_v2", settings={"base_url": srv.url, "model_name": "toy", "max_batch": args.batch,
                                                          "transport": {"max_in_flight": 1}})
        limit = args.inputs * (n0 + args.n) * 10
        for w in [int(s) for s in args.workers.split(",")]:
            engine = QueryEngine(spec.build(), budget=QueryBudget(max_queries=limit))
            ex = RayExecutor(num_workers=w, connector=spec, max_in_flight=1)
            before = sum(r.n_images for r in srv.infer_records())
            t = time.perf_counter()
            certify_dataset(engine, x, y, sigma=0.25, n0=n0, n=args.n, batch_size=args.batch, seed=1, executor=ex)
            dt = time.perf_counter() - t
            billed = sum(r.n_images for r in srv.infer_records()) - before
            steady = ex.last_stats["certify_s"]  # after the workers started (each imports torch: seconds)
            rate = args.inputs / steady
            base = base or rate
            ideal = min(w, args.capacity)
            out["runs"].append({"workers": w, "seconds_with_startup": round(dt, 3), "startup_s": ex.last_stats["startup_s"],
                                "certify_s": steady, "inputs_per_s": round(rate, 3),
                                "speedup": round(rate / base, 3), "ideal_speedup": ideal,
                                "efficiency_vs_linear_to_capacity": round(rate / base / ideal, 3),
                                "billed": billed, "budget_limit": limit, "within_budget": billed <= limit,
                                "ledger": ex.last_stats})
    out["capacity_inputs_per_s"] = round(args.capacity / (per_input_requests * args.service_ms / 1000), 3)
    led = ray.remote(Ledger).options(num_cpus=0).remote(None, None)
    m = 2000
    t = time.perf_counter()
    ray.get([led.lease.remote("bench", 1, 0.0, 1, 0.0) for _ in range(m)])
    out["ledger_reservations_per_s_pipelined"] = round(m / (time.perf_counter() - t), 1)
    t = time.perf_counter()
    for _ in range(300):
        ray.get(led.lease.remote("bench", 1, 0.0, 1, 0.0))
    out["ledger_reservations_per_s_round_trip"] = round(300 / (time.perf_counter() - t), 1)
    ray.shutdown()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
