"""Queries per certificate: sequential (anytime-valid) certification vs Cohen's fixed-n CERTIFY (prints JSON).

For each (sigma, r) it reports mean queries per input (all inputs, certified ones, and certified ones
whose estimation samples all agreed) against n_min(r, sigma, alpha) and against Cohen's CERTIFY with
n = 10,000 and 100,000 (+ n0 = 100), and certified accuracy at r of both methods. Target (issue 7):
all-agree certified inputs cost <= 1.5 n_min + 10 queries, >= 100x fewer than n = 100,000.

Oracle reference. For each input that Cohen's n = 100,000 certifies at r, Wald's bound says that any
level-alpha test that certifies it (with power near 1) needs on average at least
``ln(1/alpha) / KL(p || Phi(r/sigma))`` estimation samples, where p is that input's top-class
probability. ``oracle_mean_queries_matching_cohen`` plugs in Cohen's estimate p_hat = count / n (plus the
1 + n0 selection queries) and averages over all inputs (non-certified inputs cost the oracle nothing):
no valid procedure, sequential or not, can match Cohen's certified accuracy for much less. It is an
estimate (p_hat is noisy, and near the threshold KL is tiny), reported to tell a weak procedure from a
model whose probabilities sit near the threshold. ``..._drop_1pct`` leaves out the most expensive 1 %
of the inputs (what a 1-point accuracy allowance permits).

Default (no --model): trains a tiny CNN (one conv layer) for 2,500 seeded steps (~2 s) on sklearn's 8x8
digits with Gaussian noise augmentation, saves it as TorchScript in a temp dir and certifies all 397
held-out digits (about 2 min).

``--dataset fashion_mnist``: the first ``--images`` Fashion-MNIST test images (Debian package
``dataset-fashion-mnist``); at each sigma the black box is the TorchScript CNN trained with Gaussian
augmentation at that sigma (``benchmarks/_fmnist_models.py``: the white-box ceiling of
``fit_fashion_mnist.py``, built and cached on first use). Cohen's n = 10,000 and 100,000 on 500 images
and two sigmas is 1.1 x 10^8 forwards: 33 minutes on 2 cores.

    python benchmarks/sequential_queries.py                       # default, small
    python benchmarks/sequential_queries.py --images 50 --cohen-n 100000     # quick
    python benchmarks/sequential_queries.py --dataset fashion_mnist --images 500 \\
        --also 0.05:100000 0.1:100000 0.05:50000 0.03:50000     # + other futility/cap settings
    python benchmarks/sequential_queries.py --model smoother.pt --data test.npz --images 200 \\
        --pairs 0.25:0.25,0.25:0.5,0.5:0.5,0.5:1.0

``--data`` is an .npz with ``x`` (N x C x H x W float in [0, 1], or uint8) and ``y`` (labels); the
model must take float32 N x C x H x W in [0, 1] and return logits. ``--cohen-n`` chooses the fixed-n
baselines (``--cohen-n ''`` skips them: the slow part).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from blackbox_rs import stats
from blackbox_rs.certify_sequential import certify_radius_dataset
from blackbox_rs.connectors import TorchScriptConnector
from blackbox_rs.dataset import certify_dataset
from blackbox_rs.engine import QueryEngine
from blackbox_rs.sequential import wald_oracle_samples


def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # N x 1 x 8 x 8 in [0, 1]
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def train_tiny_cnn(path: Path, x: torch.Tensor, y: torch.Tensor, sigmas: list[float], steps: int) -> dict:
    """A fixed number of seeded steps: the same model on every machine and under any load."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sig = torch.tensor(sigmas, dtype=torch.float32)
    t0 = time.time()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,))
        s = sig[torch.randint(0, len(sig), (128,))].view(-1, 1, 1, 1)
        xb = (x[idx] + s * torch.randn_like(x[idx])).clamp(0, 1)
        loss = nn.functional.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.jit.save(torch.jit.script(model), str(path))
    return {"train_seconds": round(time.time() - t0, 1), "steps": steps, "noise_sigmas": sigmas}


def oracle_costs(certs: list, r: float, sigma: float, alpha: float, n0: int) -> np.ndarray:
    """Wald's oracle cost ``1 + n0 + wald_oracle_samples(p_hat, r, sigma, alpha)`` of each input that
    ``certs`` (Cohen certificates) certify correctly at ``r``, with p_hat = count / n of the predicted class."""
    return np.sort(np.asarray([1 + n0 + wald_oracle_samples(c.counts[c.prediction] / c.n, r, sigma, alpha)
                               for c in certs if c.correct and c.radius >= r], float))


def fmnist_setup(sigmas: list[float], images: int, threads: int) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """Fashion-MNIST test images and, per sigma, the cached CNN trained with Gaussian augmentation at it."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _fmnist_models import get_models

    from blackbox_rs._demo.datasets import load_fashion_mnist

    models = get_models(None, threads=threads, log=lambda *a: None)["models"]
    missing = [s for s in sigmas if f"gauss_{s}" not in models]
    if missing:
        raise SystemExit(f"no Fashion-MNIST model trained with noise at sigma {missing}; have {sorted(models)}")
    x, y = load_fashion_mnist("test", limit=images)
    info = {"kind": "Fashion-MNIST SmallCNN trained with Gaussian augmentation at each sigma",
            **{f"gauss_{s}": {k: v for k, v in models[f"gauss_{s}"].items() if k != "path"} for s in sigmas}}
    return x, y, {s: Path(models[f"gauss_{s}"]["path"]) for s in sigmas}, info


def cohen_accuracy(certs: list, r: float) -> float:
    """Certified accuracy at ``r`` of Cohen certificates."""
    return sum(1 for c in certs if c.correct and c.radius >= r) / len(certs)


def sequential_run(engine: QueryEngine, x: torch.Tensor, y: torch.Tensor, s: float, r: float,
                   args: argparse.Namespace, futility: float, cap: int) -> tuple:
    """Sequential certification of every input at (s, r); returns the result and queries per input
    (cache hits included: what a run without the cache would pay)."""
    res = certify_radius_dataset(engine, x, y.tolist(), radius=r, sigma=s, alpha=args.alpha, n0=args.n0,
                                 max_queries=cap, batch_size=args.batch_size, futility=futility or None,
                                 seed=0)  # a fixed seed: the figures in docs/benchmarks.md reproduce exactly
    return res, np.array([c.queries + c.cache_hits for c in res.certificates], float)


def other_setting(spec: str, pairs: list[tuple[float, float]], engines: dict, x: torch.Tensor, y: torch.Tensor,
                  args: argparse.Namespace, cohen: dict) -> dict:
    """Sequential certification with futility F and cap M (``spec = "F:M"``, F = 0: no futility stop),
    compared with the Cohen runs already made: x fewer queries and the change in certified accuracy."""
    fut, cap = spec.split(":")
    row: dict = {"futility": float(fut), "max_queries": int(cap), "pairs": []}
    total = 0.0
    for s, r in pairs:
        res, qs = sequential_run(engines[s], x, y, s, r, args, float(fut), int(cap))
        q = float(qs.mean())
        total += q
        item = {"sigma": s, "r": r, "mean_queries_all_inputs": q,
                "certified_accuracy_sequential": res.certified_accuracy[f"{r:g}"]}
        for (cs, n), certs in cohen.items():
            if cs == s:
                acc = cohen_accuracy(certs, r)
                item[f"fewer_queries_than_cohen_n{n}"] = (n + args.cohen_n0) / q
                item[f"accuracy_change_points_vs_cohen_n{n}"] = 100 * (item["certified_accuracy_sequential"] - acc)
        row["pairs"].append(item)
    row["overall_mean_queries"] = total / len(pairs)
    for n in sorted({n for _, n in cohen}):
        row[f"overall_fewer_queries_than_cohen_n{n}"] = (n + args.cohen_n0) / row["overall_mean_queries"]
    return row


def load_npz(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = np.load(path)
    x = torch.from_numpy(d["x"])
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x, torch.from_numpy(d["y"]).long()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="TorchScript model (float N x C x H x W in [0, 1] -> logits)")
    ap.add_argument("--data", help=".npz with x and y (required with --model)")
    ap.add_argument("--dataset", choices=["digits", "fashion_mnist"], default="digits",
                    help="without --model: the built-in model and data")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--images", type=int, default=397, help="first N test images (digits: 397 held out)")
    ap.add_argument("--skip", type=int, default=0, help="skip the first K test images (a disjoint check)")
    ap.add_argument("--pairs", default="0.25:0.25,0.25:0.5,0.5:0.5,0.5:1.0", help="sigma:r,...")
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--n0", type=int, default=10, help="sequential selection samples")
    ap.add_argument("--max-queries", type=int, default=100_000, help="sequential per-input cap")
    ap.add_argument("--futility", type=float, default=0.01,
                    help="sequential futility level (0: never); 0.01 reproduces the documented futility 0.01 column "
                    "(the library's default is blackbox_rs.defaults.FUTILITY = 0.05)")
    ap.add_argument("--also", nargs="*", default=[], metavar="F:M",
                    help="further sequential settings (futility F, cap M) compared with the same Cohen runs")
    ap.add_argument("--cohen-n", default="10000,100000", help="fixed-n baselines ('' to skip)")
    ap.add_argument("--cohen-n0", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--train-steps", type=int, default=2500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pairs = [(float(a), float(b)) for a, b in (p.split(":") for p in args.pairs.split(","))]
    sigmas = sorted({s for s, _ in pairs})
    out: dict = {"alpha": args.alpha, "n0": args.n0, "max_queries": args.max_queries, "futility": args.futility,
                 "cohen_n0": args.cohen_n0}
    tmp = tempfile.TemporaryDirectory()
    if args.model:
        if not args.data:
            ap.error("--data is required with --model")
        x, y = load_npz(args.data)
        model_paths = dict.fromkeys(sigmas, Path(args.model))
        out["model"] = args.model
    elif args.dataset == "fashion_mnist":
        x, y, model_paths, out["model"] = fmnist_setup(sigmas, args.skip + args.images, args.threads)
    else:
        xtr, ytr, x, y = digits_data()
        model_paths = dict.fromkeys(sigmas, Path(tmp.name) / "digits_cnn.pt")
        out["model"] = {"kind": "tiny CNN on sklearn digits 8x8",
                        **train_tiny_cnn(model_paths[sigmas[0]], xtr, ytr, sigmas, args.train_steps)}
    x, y = x[args.skip: args.skip + args.images], y[args.skip: args.skip + args.images]
    out["skipped_images"] = args.skip
    engines: dict[float, QueryEngine] = {}
    out["clean_accuracy"] = {}
    for s in sigmas:
        conn = TorchScriptConnector(model_paths[s], input_shape=tuple(x.shape[1:]), num_classes=args.num_classes,
                                    max_batch=args.batch_size, label_only=True)
        engines[s] = QueryEngine(conn)
        with torch.inference_mode():
            out["clean_accuracy"][str(s)] = float((engines[s].query(x).labels == y).float().mean())
    out["images"] = len(y)
    cohen_ns = [int(v) for v in args.cohen_n.split(",") if v.strip()]
    cohen: dict[tuple[float, int], list] = {}
    timings: dict[str, float] = {}
    for s in sigmas:
        for n in cohen_ns:
            t0 = time.time()
            res = certify_dataset(engines[s], x, y.tolist(), sigma=s, n0=args.cohen_n0, n=n, alpha=args.alpha,
                                  batch_size=args.batch_size, seed=0)
            cohen[(s, n)] = res.certificates
            timings[f"cohen sigma={s} n={n}"] = round(time.time() - t0, 1)
    rows = []
    totals = {"sequential": 0.0, **{f"cohen_n{n}": 0.0 for n in cohen_ns}}
    for s, r in pairs:
        t0 = time.time()
        res, q = sequential_run(engines[s], x, y, s, r, args, args.futility, args.max_queries)
        timings[f"sequential sigma={s} r={r}"] = round(time.time() - t0, 1)
        certs = res.certificates
        cert_mask = np.array([c.decision == "certified" for c in certs])
        agree = np.array([c.decision == "certified" and c.counts[c.candidate] == c.n for c in certs])
        nmin = stats.n_min(r, s, args.alpha)
        row = {
            "sigma": s, "r": r, "n_min": nmin, "target_queries_all_agree": 1.5 * nmin + 10,
            "mean_queries_all_inputs": float(q.mean()),
            "mean_queries_certified": float(q[cert_mask].mean()) if cert_mask.any() else None,
            "mean_queries_certified_all_agree": float(q[agree].mean()) if agree.any() else None,
            "max_queries_seen": float(q.max()),
            "certified_all_agree_inputs": int(agree.sum()),
            "decisions": {d: int(sum(c.decision == d for c in certs))
                          for d in ("certified", "not_certified", "undecided")},
            "certified_accuracy_sequential": res.certified_accuracy[f"{r:g}"],
        }
        if row["mean_queries_certified_all_agree"] is not None:
            row["all_agree_ratio_to_n_min"] = row["mean_queries_certified_all_agree"] / nmin
            row["meets_target_all_agree"] = row["mean_queries_certified_all_agree"] <= 1.5 * nmin + 10
        for n in cohen_ns:
            cc = cohen[(s, n)]
            per_input = n + args.cohen_n0
            row[f"cohen_n{n}_queries_per_input"] = per_input
            row[f"cohen_n{n}_certified_accuracy"] = cohen_accuracy(cc, r)
            row[f"fewer_queries_than_cohen_n{n}_all_inputs"] = per_input / float(q.mean())
            if row["mean_queries_certified"] is not None:
                row[f"fewer_queries_than_cohen_n{n}_certified"] = per_input / row["mean_queries_certified"]
            totals[f"cohen_n{n}"] += per_input * len(cc)
        totals["sequential"] += float(q.sum())
        if 100_000 in cohen_ns:
            orc = oracle_costs(cohen[(s, 100_000)], r, s, args.alpha, args.n0)
            drop = orc[: len(orc) - int(0.01 * len(certs))]
            oracle = float(orc.sum()) / len(certs)
            row["oracle_mean_queries_matching_cohen"] = oracle
            row["oracle_mean_queries_matching_cohen_drop_1pct"] = float(drop.sum()) / len(certs)
            # None when Cohen certifies nothing at r: the oracle then spends nothing
            row["oracle_fewer_than_cohen_n100000"] = (100_000 + args.cohen_n0) / oracle if oracle > 0 else None
            row["sequential_over_oracle"] = float(q.mean()) / oracle if oracle > 0 else None
        rows.append(row)
    out["results"] = rows
    out["other_settings"] = [other_setting(spec, pairs, engines, x, y, args, cohen) for spec in args.also]
    out["overall"] = {"mean_queries_sequential": totals["sequential"] / (len(y) * len(pairs)),
                      **{f"fewer_queries_than_{k}": v / totals["sequential"]
                         for k, v in totals.items() if k != "sequential"}}
    out["seconds"] = timings
    print(json.dumps(out, indent=1))
    tmp.cleanup()


if __name__ == "__main__":
    main()
