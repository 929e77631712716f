"""Fitting an input module in front of a 3x224x224 model on a CPU: time and certified consistency.

What it measures (prints one JSON object; docs/large-inputs.md reports the figures):

1. data: scikit-image's bundled sample photos (``pip install 'blackbox-rs[bench]'``), made RGB and
   resized/cropped to 3x224x224. The photos are split by photo: FIT_PHOTOS give the module's fitting
   images (random crops and flips), HELDOUT_PHOTOS give the certification images (two zooms of each,
   centre crops); no photo is in both.
2. black box: a timm ``mobilenetv3_small_100`` (``--arch``; an ImageNet architecture at 224x224,
   ImageNet normalisation inside)
   trained here from scratch, briefly, to tell the photos apart: class = photo identity over ALL the
   photos, trained on random resized crops, flips and brightness jitter. No pretrained weights exist
   offline, so this is a small closed-set recogniser, not an ImageNet model: the held-out photos are
   classes it knows (as an ImageNet model knows "cat"), while the *module* never saw them. It is
   saved as TorchScript and certified through :class:`~blackbox_rs.connectors.TorchScriptConnector`
   and :class:`~blackbox_rs.BlackBoxSmoother`, the SDK's real path.
3. the dry-run estimate (:func:`blackbox_rs.fitting.timing.estimate_fit_time`), then the documented
   default fit for large inputs (module ``lowres``, strategy ``denoise``: zero queries), timed.
4. certified consistency (agreement with the bare model's own clean label, ``reference =
   clean_prediction``) on the held-out images at sigma, radii 0 / 0.25 / 0.5: bare model vs the fitted
   module, same seed, n0, n and alpha.

Run: ``nice -n 5 python benchmarks/large_input_fit.py`` (about 35 minutes on 2 cores; the trained
black box is cached under ``--workdir`` and reused).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SIZE = 224
# photos (scikit-image names); gray ones are repeated to three channels. 'cat' is 'chelsea' (skipped).
ALL_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "hubble_deep_field",
              "immunohistochemistry", "retina", "camera", "brick", "grass", "gravel", "coins", "moon",
              "clock", "cell", "page", "text"]
HELDOUT_PHOTOS = ["chelsea", "rocket", "immunohistochemistry", "camera", "gravel", "coins"]
FIT_PHOTOS = [p for p in ALL_PHOTOS if p not in HELDOUT_PHOTOS]
HELDOUT_SHORT_SIDES = (224, 448)  # two zooms of each held-out photo (centre crops)

DEFAULT_MODULE: dict[str, Any] = {"name": "lowres", "factor": 4, "depth": 8, "width": 32, "output": "gated"}
DEFAULT_FIT: dict[str, Any] = {"strategy": "denoise", "pretrain_steps": 300, "steps": 300, "batch_size": 16,
                               "lr": 1e-3, "lr_schedule": "cosine"}


# ----------------------------------------------------------------------------------------- photos
def load_photo(name: str) -> torch.Tensor:
    """A scikit-image sample photo as a float 3 x H x W tensor in [0, 1] (short side at most 448)."""
    import numpy as np
    from skimage import data

    im = getattr(data, name)()
    if isinstance(im, tuple):  # stereo_motorcycle: (left, right, disparity): the left view
        im = im[0]
    a = np.asarray(im)
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    elif a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    else:
        a = a.astype(np.float32)
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
    t = torch.from_numpy(a)
    if t.ndim == 2:
        t = t[None].repeat(3, 1, 1)
    else:
        t = t[..., :3].permute(2, 0, 1)
    t = t.contiguous().clamp(0, 1)
    if min(t.shape[-2:]) > 2 * SIZE:  # every crop below uses a short side of at most 2 x 224
        t = resize_short(t, 2 * SIZE)
    return t


def resize_short(img: torch.Tensor, short: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    s = short / min(h, w)
    size = (max(short, round(h * s)), max(short, round(w * s)))
    return F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def centre_crop(img: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    h, w = img.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return img[:, top:top + size, left:left + size]


def random_crops(photos: list[torch.Tensor], n: int, g: torch.Generator, jitter: bool = False,
                 labels: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random resized crops: a square of side 224..min(short side, 448) at a random position,
    resized to 224x224 (antialiased), flipped with probability 1/2."""
    xs, ys = [], []
    for _ in range(n):
        i = int(torch.randint(0, len(photos), (1,), generator=g))
        img = photos[i]
        h, w = img.shape[-2:]
        lo = min(SIZE, h, w)
        side = int(torch.randint(lo, max(lo, min(h, w, 2 * SIZE)) + 1, (1,), generator=g))
        top = int(torch.randint(0, h - side + 1, (1,), generator=g))
        left = int(torch.randint(0, w - side + 1, (1,), generator=g))
        c = img[:, top:top + side, left:left + side]
        if side != SIZE:
            c = F.interpolate(c[None], size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)[0]
            c = c.clamp(0, 1)
        if bool(torch.rand(1, generator=g) < 0.5):
            c = c.flip(-1)
        if jitter:
            c = (c * (0.8 + 0.4 * torch.rand(1, generator=g)) + 0.1 * (torch.rand(1, generator=g) - 0.5)).clamp(0, 1)
        xs.append(c)
        ys.append(labels[i] if labels is not None else i)
    return torch.stack(xs), torch.tensor(ys)


def heldout_images(photos: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    xs, names = [], []
    for p in HELDOUT_PHOTOS:
        for s in HELDOUT_SHORT_SIDES:
            xs.append(centre_crop(resize_short(photos[p], s)))
            names.append(f"{p}@{s}")
    return torch.stack(xs), names


# -------------------------------------------------------------------------------------- black box
class _Normalised(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def train_black_box(photos: dict[str, torch.Tensor], path: Path, steps: int, batch: int, seed: int,
                    arch: str = "mobilenetv3_small_100") -> dict[str, Any]:
    """Train a timm ImageNet architecture (from scratch) on photo identity over ALL_PHOTOS; save as
    TorchScript."""
    import timm

    torch.manual_seed(seed)
    net = _Normalised(timm.create_model(arch, pretrained=False, num_classes=len(ALL_PHOTOS)))
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed + 1)
    plist = [photos[p] for p in ALL_PHOTOS]
    t0 = time.perf_counter()
    net.train()
    losses = []
    for k in range(steps):
        x, y = random_crops(plist, batch, g, jitter=True)
        loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if k % 10 == 9:
            print(f"[black box] step {k + 1}/{steps} loss {sum(losses[-10:]) / 10:.3f} "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    net.eval()
    # accuracy on fresh random crops (of all photos) and on the held-out certification images
    gx = torch.Generator().manual_seed(seed + 2)
    xv, yv = random_crops(plist, 128, gx)
    xh, _ = heldout_images(photos)
    yh = torch.tensor([ALL_PHOTOS.index(p) for p in HELDOUT_PHOTOS for _ in HELDOUT_SHORT_SIDES])
    with torch.no_grad():
        acc_crops = float((torch.cat([net(xv[i:i + 32]) for i in range(0, 128, 32)]).argmax(1) == yv).float().mean())
        acc_held = float((net(xh).argmax(1) == yh).float().mean())
    scripted = torch.jit.trace(net.to(memory_format=torch.contiguous_format), torch.rand(2, 3, SIZE, SIZE))
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(path))
    info = {"architecture": f"timm {arch} at 224x224 (from scratch) + ImageNet normalisation inside", "classes": ALL_PHOTOS,
            "train_steps": steps, "train_batch": batch, "train_seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(sum(losses[-25:]) / min(25, len(losses)), 4),
            "clean_accuracy_random_crops": acc_crops, "clean_accuracy_heldout_images": acc_held}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return info


# -------------------------------------------------------------------------------------------- run
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/bbrs_large_input")
    ap.add_argument("--phase", choices=["blackbox", "all"], default="all")
    ap.add_argument("--retrain", action="store_true", help="retrain the black box even if cached")
    ap.add_argument("--arch", default="mobilenetv3_small_100", help="timm architecture of the black box")
    ap.add_argument("--bb-steps", type=int, default=100)
    ap.add_argument("--bb-batch", type=int, default=12)
    ap.add_argument("--fit-images", type=int, default=512, help="random crops of the fitting photos")
    ap.add_argument("--module", default=json.dumps(DEFAULT_MODULE), help="module config (JSON)")
    ap.add_argument("--fit", default=json.dumps(DEFAULT_FIT), help="FitConfig fields (JSON)")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--n0", type=int, default=64)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-steps", type=int, default=3)
    ap.add_argument("--skip-bare", action="store_true", help="do not certify the bare model")
    ap.add_argument("--no-certify", action="store_true", help="stop after the fit (time figures only)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--max-fit-seconds", type=float, default=1800.0, help="refuse a fit estimated above this")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    model_path = work / f"{args.arch}_photos.pt"
    photos = {p: load_photo(p) for p in ALL_PHOTOS}
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                           "torch": torch.__version__, "fit_photos": FIT_PHOTOS, "heldout_photos": HELDOUT_PHOTOS}
    if args.retrain or not model_path.is_file():
        out["black_box"] = train_black_box(photos, model_path, args.bb_steps, args.bb_batch, args.seed, args.arch)
    else:
        out["black_box"] = json.loads(model_path.with_suffix(".json").read_text())
    out["black_box"]["file"] = str(model_path)
    if args.phase == "blackbox":
        print(json.dumps(out, indent=2))
        return 0

    from blackbox_rs import BlackBoxSmoother, FitConfig
    from blackbox_rs.connectors import TorchScriptConnector
    from blackbox_rs.fitting.timing import check_fit_time, estimate_fit_time
    from blackbox_rs.modules import create_module

    g = torch.Generator().manual_seed(args.seed + 10)
    x_fit, _ = random_crops([photos[p] for p in FIT_PHOTOS], args.fit_images, g)
    x_held, held_names = heldout_images(photos)
    out["fit_images"] = len(x_fit)
    out["heldout_images"] = held_names
    y_held = torch.tensor([ALL_PHOTOS.index(n.split("@")[0]) for n in held_names])
    shape = (3, SIZE, SIZE)
    k = len(ALL_PHOTOS)

    module_spec = json.loads(args.module)
    fit_fields = json.loads(args.fit)
    config = FitConfig(**fit_fields)
    out["module"] = module_spec
    out["fit_config"] = fit_fields

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = create_module({"input_shape": shape, **module_spec})
    est = estimate_fit_time(module, config, shape, k, probe_steps=args.probe_steps, n_images=len(x_fit))
    out["estimate"] = est.model_dump()
    check_fit_time(est, args.max_fit_seconds)

    conn = TorchScriptConnector(model_path, input_shape=shape, num_classes=k)
    clean_pred = conn.query(x_held).labels
    out["black_box"]["clean_accuracy_on_certification_images"] = float((clean_pred == y_held).float().mean())
    smoother = BlackBoxSmoother(conn, module=module, sigma=args.sigma)
    steps_seen: list[tuple[int, float]] = []

    def progress(done: int, total: int, info: dict[str, Any]) -> None:
        steps_seen.append((done, time.perf_counter()))
        if done % 100 == 0 or done == total:
            print(f"[fit] step {done}/{total} {info.get('mse', float('nan')):.5f}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    report = smoother.fit(x_fit, config=config, progress=progress)
    fit_s = time.perf_counter() - t0
    total_steps = report.steps_done
    out["fit"] = {"wall_seconds": round(fit_s, 1), "steps": total_steps, "seconds_per_step": fit_s / max(1, total_steps),
                  "queries": report.queries, "stopped": report.stopped}
    if len(steps_seen) > 20:  # after the first tenth of the steps (warm-up, allocator growth)
        (a, ta), (b, tb) = steps_seen[len(steps_seen) // 10], steps_seen[-1]
        out["fit"]["seconds_per_step_after_first_tenth"] = (tb - ta) / max(1, b - a)
    per_phase = est.phases[0].seconds_per_step if est.phases else math.nan
    out["estimate_vs_measured"] = {"estimated_total_s": round(est.total_seconds, 1), "measured_total_s": round(fit_s, 1),
                                   "ratio_estimate_over_measured": round(est.total_seconds / fit_s, 3),
                                   "estimated_s_per_step": per_phase,
                                   "measured_s_per_step": fit_s / max(1, total_steps)}
    module_dir = work / f"fitted_{module_spec.get('name', 'module')}_{module_spec.get('output', '')}".rstrip("_")
    smoother.module.save(module_dir)  # type: ignore[union-attr]
    out["fitted_module"] = {"dir": str(module_dir), "digest": smoother.module.digest()}  # type: ignore[union-attr]

    # held-out reconstruction quality (PSNR of the module output vs the clean image, at sigma)
    with torch.no_grad():
        noise = torch.randn(x_held.shape, generator=torch.Generator().manual_seed(args.seed + 20)) * args.sigma
        den = smoother.module(x_held + noise).clamp(0, 1)  # type: ignore[misc]
        mse_noisy = float(((x_held + noise).clamp(0, 1) - x_held).pow(2).mean())
        mse_mod = float((den - x_held).pow(2).mean())
    out["heldout_psnr_db"] = {"noisy": round(-10 * math.log10(mse_noisy), 2), "module": round(-10 * math.log10(mse_mod), 2)}

    if args.no_certify:
        print(json.dumps(out, indent=2))
        return 0
    radii = [0.0, 0.25, 0.5]
    cert: dict[str, Any] = {"sigma": args.sigma, "n0": args.n0, "n": args.n, "alpha": args.alpha, "seed": args.seed,
                            "radii": radii, "images": len(x_held)}
    runs = [("fitted", smoother)]
    if not args.skip_bare:
        runs.insert(0, ("bare", BlackBoxSmoother(conn, module=None, sigma=args.sigma)))
    for label, sm in runs:
        t1 = time.perf_counter()
        res = sm.certify_dataset(x_held, None, n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed,
                                 radii=radii, progress=None)
        cert[label] = {"reference": res.reference, "certified_accuracy": res.certified_accuracy,
                       "seconds": round(time.perf_counter() - t1, 1), "queries": res.queries,
                       "predictions": [c.prediction for c in res.certificates],
                       "radii": [round(float(c.radius), 4) for c in res.certificates]}
        print(f"[certify] {label}: {res.certified_accuracy}", file=sys.stderr, flush=True)
    out["certification"] = cert
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
