"""Diffusion denoised smoothing on Fashion-MNIST: ONE off-the-shelf-style DDPM for every sigma (prints JSON).

Trains (once; cached) a small pixel-space DDPM with diffusers on the Fashion-MNIST training set (uniform
timesteps, epsilon objective, linear betas: a generic DDPM, not one tailored to the certified sigmas),
saves it in the diffusers layout, and certifies the first ``--images`` test images in front of the same
opaque clean SmallCNN as ``fit_fashion_mnist.py`` (label-only, through the QueryEngine), per sigma:

* ``none``               the bare black box, smoothed;
* ``unet``               the SDK's per-sigma U-Net denoiser (``denoise``: MSE only, zero queries; cached);
* ``diffusion``          the ONE DDPM as a one-shot denoiser at t*(sigma) (``module="diffusion"``, zero queries);
* ``diffusion_adapter``  that DDPM frozen + a zero-initialised adapter fitted through the black box
                         (``denoiser_adapter``, strategy ``--adapter-strategy``, at most ``--adapter-budget``
                         queries, early stop on): does query-paid fitting add to the off-the-shelf denoiser?
* ``ceiling``            the same CNN trained with Gaussian noise at that sigma (white-box retraining).

Certified accuracy at r = 0 .. 1.0 with Cohen's CERTIFY (n0, n, alpha). Cost: every noise sample goes
through the DDPM's UNet (267,313 parameters at the default channels 16/32/32; 32/64/64 is 1.06M and about
3.5x slower), so the diffusion rows cost n0 + n UNet forwards per image: about 330 forwards/s on one CPU
core, so 11 minutes per sigma at 200 images and n = 1,000 (``--device cuda`` runs it on a GPU). Everything is seeded; the DDPM and
the U-Nets are cached under ``--cache-dir`` (default ``~/.cache/blackbox-rs/bench``) keyed by their settings.

    sudo apt-get install dataset-fashion-mnist; pip install -e '.[diffusion]'
    python benchmarks/diffusion_fashion_mnist.py [--images 200] [--n 1000] [--sigmas 0.25 0.5 1.0]
        [--ddpm-steps 6000] [--unet-steps 3000] [--methods none unet diffusion diffusion_adapter ceiling]
    # on a GPU: --device cuda (the noise, the denoisers and the black box run there)
    # smoke run: --images 4 --n 100 --n0 10 --ddpm-steps 20 --unet-steps 10 --adapter-budget 2000 --fit-images 2000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (  # noqa: E402
    RADII,
    add_certify_args,
    add_run_args,
    certify_run,
    emit,
    fmnist_setup,
    for_sigma,
    print_table,
)

from blackbox_rs import QueryEngine  # noqa: E402
from blackbox_rs.connectors import TorchScriptConnector  # noqa: E402
from blackbox_rs.fitting.config import FitConfig  # noqa: E402
from blackbox_rs.smoother import BlackBoxSmoother  # noqa: E402

SHAPE = (1, 28, 28)
METHODS = ["none", "unet", "diffusion", "diffusion_adapter", "ceiling"]
UNET = {"name": "unet", "widths": [16, 32, 32]}


def _log(msg: str) -> None:
    print(f"[diffusion-bench] {msg}", file=sys.stderr, flush=True)


def _tag(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def ddpm_dir(args: argparse.Namespace, xtr: torch.Tensor, cache: Path) -> tuple[Path, dict]:
    """The cached DDPM (pipeline layout: unet/ + scheduler/), trained here if missing."""
    from diffusers import DDPMScheduler, UNet2DModel

    settings = {"v": 1, "channels": args.ddpm_channels, "layers": 1, "timesteps": 1000, "schedule": "linear",
                "steps": args.ddpm_steps, "batch": args.ddpm_batch, "lr": args.ddpm_lr, "seed": 0,
                "images": len(xtr), "objective": "epsilon", "range": [-1, 1]}
    out = cache / f"ddpm-fmnist-{_tag(settings)}"
    info_path = out / "bench_info.json"
    if info_path.is_file():
        _log(f"DDPM cached: {out}")
        return out, json.loads(info_path.read_text())
    torch.manual_seed(0)
    ch = tuple(args.ddpm_channels)
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=ch, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * len(ch), up_block_types=("UpBlock2D",) * len(ch),
                       norm_num_groups=8)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    dev = torch.device(args.device)
    unet.to(dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.ddpm_lr)
    lr_at = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.ddpm_steps)
    g = torch.Generator().manual_seed(0)
    abar = sched.alphas_cumprod
    t0, losses = time.perf_counter(), []
    unet.train()
    for step in range(args.ddpm_steps):
        idx = torch.randint(0, len(xtr), (args.ddpm_batch,), generator=g)
        x0 = xtr[idx] * 2 - 1
        t = torch.randint(0, 1000, (args.ddpm_batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x0, eps, a, t = x0.to(dev), eps.to(dev), a.to(dev), t.to(dev)  # drawn on the CPU: the same on every device
        loss = torch.nn.functional.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_at.step()
        losses.append(float(loss))
        if (step + 1) % max(1, args.ddpm_steps // 10) == 0:
            _log(f"DDPM step {step + 1}/{args.ddpm_steps}: loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                 f"({time.perf_counter() - t0:.0f} s)")
    unet.eval().to("cpu")
    unet.save_pretrained(out / "unet", safe_serialization=True)
    sched.save_pretrained(out / "scheduler")
    info = {"settings": settings, "parameters": sum(p.numel() for p in unet.parameters()),
            "train_seconds": round(time.perf_counter() - t0, 1), "final_loss": sum(losses[-100:]) / len(losses[-100:]),
            "threads": torch.get_num_threads()}
    info_path.write_text(json.dumps(info, indent=1))
    return out, info


def unet_smoother(engine: QueryEngine, sigma: float, args: argparse.Namespace, xtr: torch.Tensor,
                  ytr: torch.Tensor, cache: Path) -> tuple[BlackBoxSmoother, dict]:
    """The per-sigma U-Net (denoise: MSE only, zero queries: the same weights in front of any model), cached."""
    settings = {"v": 1, "module": UNET, "sigma": sigma, "steps": args.unet_steps, "lr": 2e-3, "batch": 64,
                "seed": 0, "images": len(xtr), "schedule": "cosine"}
    out = cache / f"unet-fmnist-{_tag(settings)}"
    if (out / "bench_info.json").is_file():
        return BlackBoxSmoother.load(out, engine), json.loads((out / "bench_info.json").read_text())
    sm = BlackBoxSmoother(engine, module=UNET, sigma=sigma)
    t = time.perf_counter()
    rep = sm.fit((xtr, ytr), config=FitConfig(strategy="denoise", steps=args.unet_steps, pretrain_steps=0, lr=2e-3,
                                              batch_size=64, seed=0, lr_schedule="cosine"), progress=None)
    info = {"settings": settings, "fit_queries": rep.queries, "trainable": rep.trainable_parameters,
            "train_seconds": round(time.perf_counter() - t, 1)}
    sm.save(out)
    (out / "bench_info.json").write_text(json.dumps(info, indent=1))
    return sm, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_certify_args(ap, images=200, n=1_000, sigmas=[0.25, 0.5, 1.0])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--fit-images", type=int, default=60_000)
    ap.add_argument("--ddpm-steps", type=int, default=6000)
    ap.add_argument("--ddpm-batch", type=int, default=64)
    ap.add_argument("--ddpm-lr", type=float, default=1e-3)
    ap.add_argument("--ddpm-channels", type=int, nargs="+", default=[16, 32, 32])
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--adapter-strategy", default="surrogate", choices=["surrogate", "zeroth_order"])
    ap.add_argument("--adapter-budget", type=int, default=20_000)
    ap.add_argument("--adapter-steps", type=int, default=1000)
    add_run_args(ap, device=True)
    args = ap.parse_args()
    t_all = time.perf_counter()
    cache, models, paths, xtr, ytr, xte, yte = fmnist_setup(args)
    black_box = TorchScriptConnector(paths["clean"], input_shape=SHAPE, num_classes=10, label_only=True,
                                     max_batch=args.batch_size, device=args.device)
    ddpm, ddpm_info = ddpm_dir(args, xtr, cache) if {"diffusion", "diffusion_adapter"} & set(args.methods) else (None, {})
    results: dict[str, dict] = {}
    fits: dict[str, dict] = {}
    for sigma in args.sigmas:
        row: dict[str, dict] = {}
        for method in args.methods:
            engine = QueryEngine(black_box)
            if method == "none":
                sm = BlackBoxSmoother(engine, module=None, sigma=sigma)
            elif method == "ceiling":
                if f"gauss_{sigma}" not in paths:
                    continue
                white = TorchScriptConnector(paths[f"gauss_{sigma}"], input_shape=SHAPE, num_classes=10,
                                             label_only=True, max_batch=args.batch_size, device=args.device)
                sm = BlackBoxSmoother(white, module=None, sigma=sigma)
            elif method == "unet":
                sm, fits[f"unet@{sigma}"] = unet_smoother(engine, sigma, args, xtr, ytr, cache)
            elif method == "diffusion":
                sm = BlackBoxSmoother(engine, sigma=sigma, module={"name": "diffusion", "model_dir": str(ddpm),
                                                                   "sigma": sigma})
                fits[f"diffusion@{sigma}"] = {"fit_queries": 0, "t_star": sm.module.config.timestep,  # type: ignore[union-attr]
                                              "parameters": ddpm_info.get("parameters")}
            else:  # diffusion_adapter: frozen DDPM + adapter fitted through the black box
                spec = {"name": "denoiser_adapter",
                        "denoiser": {"name": "diffusion", "model_dir": str(ddpm), "sigma": sigma}}
                sm = BlackBoxSmoother(engine, sigma=sigma, module=spec)
                t = time.perf_counter()
                rep = sm.fit((xtr, ytr), config=FitConfig(strategy=args.adapter_strategy, steps=args.adapter_steps,
                                                          pretrain_steps=0, seed=0, batch_size=64),
                             budget=args.adapter_budget, progress=None)
                fits[f"diffusion_adapter@{sigma}"] = {
                    "fit_queries": rep.queries, "stopped": rep.stopped, "queries_saved": rep.queries_saved,
                    "best_step": rep.best_step, "trainable": rep.trainable_parameters,
                    "fit_seconds": round(time.perf_counter() - t, 1)}
            row[method] = certify_run(sm, xte, yte, sigma, args)
            _log(json.dumps({"sigma": sigma, "method": method, **row[method]}))
        results[str(sigma)] = row
    out = {"benchmark": "diffusion_fashion_mnist", "images": len(xte), "n0": args.n0, "n": args.n,
           "alpha": args.alpha, "radii": RADII, "settings": vars(args), "ddpm": ddpm_info, "results": results,
           "fits": fits, "total_seconds": round(time.perf_counter() - t_all, 1)}
    emit(out, args.out)
    print_table(results, {"fit queries": lambda m, sg: for_sigma(fits, m, sg).get("fit_queries", 0)})


if __name__ == "__main__":
    main()
