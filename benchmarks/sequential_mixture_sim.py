"""Would a mixture e-process beat the look schedule? A Bernoulli simulation (prints JSON).

Compares, at one (sigma, r, alpha), the mean estimation samples and the certification rate of

* ``schedule``: blackbox-rs's procedure (alpha spent over target + geometric Clopper-Pearson looks,
  :func:`blackbox_rs.sequential.simulate_bernoulli`);
* ``mixture``: the same target look (half of alpha) plus, for the other half, the mixture likelihood
  ratio ``E_n = int_{p0}^1 (p1/p0)^K ((1-p1)/(1-p0))^(n-K) dp1 / (1 - p0)`` (uniform prior on
  (p0, 1]), a supermartingale under every p <= p0, checked every ``--step`` fraction of samples and
  certified when ``E_n >= 2 / alpha`` (Ville);
* ``oracle``: Wald's ``ln(1/alpha) / KL(p || p0)`` (knows p; a lower bound for any level-alpha test).

    python benchmarks/sequential_mixture_sim.py [--sigma 0.25 --r 0.5 --runs 4000]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
from scipy import special
from scipy.stats import norm

from blackbox_rs.sequential import LookSchedule, simulate_bernoulli


def log_mixture_e(k: np.ndarray, n: int, p0: float) -> np.ndarray:
    f = n - k
    tail = np.maximum(special.betaincc(k + 1, f + 1, p0), 1e-300)
    return special.betaln(k + 1, f + 1) + np.log(tail) - math.log1p(-p0) - (k * math.log(p0) + f * math.log1p(-p0))


def simulate_mixture(sch: LookSchedule, p: float, runs: int, step: float, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    p0, alpha, cap = sch.thresholds[0], sch.alpha, sch.max_samples
    t_n, t_c = sch.sizes[0], int(sch.cert_counts[0, 0])
    pts = [50]
    while pts[-1] < cap:
        pts.append(min(cap, max(pts[-1] + 1, math.ceil(pts[-1] * (1 + step)))))
    k = np.zeros(runs, np.int64)
    prev, done = 0, np.zeros(runs, bool)
    n_used = np.full(runs, cap)
    for n in sorted(set(pts) | {t_n}):
        k += rng.binomial(n - prev, p, size=runs)
        prev = n
        hit = (log_mixture_e(k, n, p0) >= math.log(2 / alpha)) | ((n == t_n) & (k >= t_c))
        new = hit & ~done
        n_used[new] = n
        done |= new
        if done.all():
            break
    return float(done.mean()), float(n_used.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--r", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--cap", type=int, default=99_989, help="estimation samples (100,000 - 1 - n0)")
    ap.add_argument("--runs", type=int, default=4000)
    ap.add_argument("--step", type=float, default=0.02, help="mixture checked every this fraction")
    ap.add_argument("--ps", default="0.979,0.981,0.983,0.985,0.99,0.995,1.0")
    args = ap.parse_args()
    sch = LookSchedule.for_radii(args.r, args.sigma, args.alpha, args.cap)
    p0 = float(norm.cdf(args.r / args.sigma))
    rows = []
    for p in (float(v) for v in args.ps.split(",")):
        s = simulate_bernoulli(sch, p, args.runs, seed=1)
        cert = s["certified_index"] >= 0
        m_rate, m_n = simulate_mixture(sch, p, args.runs, args.step, seed=1)
        q = min(p, 1 - 1e-12)
        kl = q * math.log(q / p0) + (1 - q) * math.log((1 - q) / (1 - p0))
        rows.append({"p": p, "oracle_n": math.log(1 / args.alpha) / kl,
                     "schedule_certified": float(cert.mean()), "schedule_mean_n": float(s["n"].mean()),
                     "mixture_certified": m_rate, "mixture_mean_n": m_n,
                     "mixture_over_schedule": m_n / float(s["n"].mean())})
    print(json.dumps({"sigma": args.sigma, "r": args.r, "alpha": args.alpha, "p0": p0, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
