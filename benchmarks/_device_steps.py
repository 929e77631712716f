"""Steps (c) and (d) of ``benchmarks/device_check.sh`` (prints one JSON object per call).

* ``precision``: fp32 vs bf16 throughput of one ResNet-50 (torchvision, 1000 classes, random init:
  throughput does not depend on the weights) through ``ModuleConnector(precision=...)`` on CUDA, on
  the same pre-made noisy 3 x 224 x 224 batches (``connector.query``: the forward, argmax, softmax
  and the copy of labels and scores to the host), interleaved repetitions, best times; plus the
  fraction of labels the two agree on. With random weights the logits of a ResNet-50 are close
  together, so near-ties make that fraction a pessimistic figure for a trained model; the median
  fp32 top-1 / top-2 logit margin is printed beside it for context.
* ``fit``: a fit of the U-Net denoiser (``module="unet"``, strategy ``denoise``: MSE only, zero
  queries) on a random data set, ``FitConfig(device=...)`` on CUDA and on the CPU: seconds each and
  the ratio.

A step whose SDK feature is missing (``precision=`` on ModuleConnector, ``device`` on FitConfig)
prints ``{"skipped": "..."}`` and exits 0.

    python benchmarks/_device_steps.py precision --batch-size 500 --batches 8 --reps 3
    python benchmarks/_device_steps.py fit --steps 200 --batch-size 64 --shape 1 28 28
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import statistics
import time

import torch
from torch import nn


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def precision(args: argparse.Namespace) -> dict[str, object]:
    import torchvision

    from blackbox_rs.connectors import ModuleConnector

    if "precision" not in inspect.signature(ModuleConnector.__init__).parameters:
        return {"skipped": "ModuleConnector has no precision= keyword in this checkout"}
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    torch.manual_seed(0)
    base = torchvision.models.resnet50(num_classes=1000).eval()
    shape = (3, 224, 224)
    conns = {}
    for p in ("fp32", "bf16"):
        conns[p] = ModuleConnector(copy.deepcopy(base), input_shape=shape, num_classes=1000, device="cuda",
                                   max_batch=args.batch_size, precision=p)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(shape, device="cuda", generator=g)
    batches = [(x + 0.25 * torch.randn((args.batch_size, *shape), device="cuda", generator=g)).clamp_(0, 1)
               for _ in range(args.batches)]
    for c in conns.values():  # warm-up: cuDNN / autocast kernels
        c.query(batches[0])
    times: dict[str, list[float]] = {p: [] for p in conns}
    order = list(conns)
    for r in range(args.reps):
        for p in order if r % 2 == 0 else order[::-1]:
            _sync()
            t = time.perf_counter()
            for b in batches:
                conns[p].query(b)
            _sync()
            times[p].append(time.perf_counter() - t)
    images = args.batch_size * args.batches
    with torch.inference_mode():
        lab32 = torch.cat([conns["fp32"].query(b).labels for b in batches])
        lab16 = torch.cat([conns["bf16"].query(b).labels for b in batches])
        top2 = torch.cat([conns["fp32"]._model(b).float().topk(2, dim=1).values for b in batches[:2]])
    ips = {p: round(images / min(v), 1) for p, v in times.items()}
    return {
        "model": "resnet50 (torchvision, random init), 3x224x224, 1000 classes, ModuleConnector on cuda",
        "batch_size": args.batch_size, "images_per_rep": images, "reps": args.reps,
        "images_per_s_fp32": ips["fp32"], "images_per_s_bf16": ips["bf16"],
        "ratio_bf16_over_fp32": round(ips["bf16"] / ips["fp32"], 3),
        "seconds": {p: [round(t, 3) for t in v] for p, v in times.items()},
        "label_agreement_bf16_vs_fp32": round(float((lab32 == lab16).float().mean()), 4),
        "median_fp32_top1_minus_top2_logit": round(float(statistics.median((top2[:, 0] - top2[:, 1]).tolist())), 5),
        "note": "random weights: near-tied logits make the agreement pessimistic for a trained model",
        "fingerprints_differ": conns["fp32"].info.fingerprint != conns["bf16"].info.fingerprint,
    }


def fit(args: argparse.Namespace) -> dict[str, object]:
    from blackbox_rs.connectors import ModuleConnector
    from blackbox_rs.fitting.config import FitConfig
    from blackbox_rs.smoother import BlackBoxSmoother

    fields = getattr(type(FitConfig(strategy="denoise")), "model_fields", {})
    if "device" not in fields:
        return {"skipped": "FitConfig has no device field in this checkout"}
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    shape = tuple(args.shape)
    torch.manual_seed(0)
    data = torch.rand((args.images, *shape))
    out: dict[str, object] = {
        "module": "unet (default widths)", "strategy": "denoise", "steps": args.steps, "batch_size": args.batch_size,
        "shape": list(shape), "images": args.images, "data": "uniform random images", "cpu_threads": args.threads,
    }
    for dev in devices:
        classifier = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shape).prod()), 10)).eval()
        conn = ModuleConnector(classifier, input_shape=shape, num_classes=10)  # denoise never queries it
        sm = BlackBoxSmoother(conn, module={"name": "unet"}, sigma=0.25)
        cfg = FitConfig(strategy="denoise", steps=args.steps, pretrain_steps=0, batch_size=args.batch_size,
                        seed=0, device=dev)
        _sync()
        t = time.perf_counter()
        rep = sm.fit(data, config=cfg, progress=None)
        _sync()
        out[f"seconds_{dev}"] = round(time.perf_counter() - t, 2)
        out[f"queries_{dev}"] = rep.queries
    if "seconds_cuda" in out:
        out["speedup_cuda_over_cpu"] = round(out["seconds_cpu"] / out["seconds_cuda"], 2)  # type: ignore[operator]
    else:
        out["note"] = "no CUDA device: CPU only"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("precision")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    f = sub.add_parser("fit")
    f.add_argument("--steps", type=int, default=200)
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--images", type=int, default=1024)
    f.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28], metavar=("C", "H", "W"))
    f.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    out = precision(args) if args.step == "precision" else fit(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
