"""PEFTSmoothing on Fashion-MNIST: robustify a model you own with LoRA / adapters / prompts (prints JSON).

The base model is a small timm VisionTransformer (1x28x28 input, patch 7) trained here on clean
Fashion-MNIST images (``--base-steps``). Rows, each certified at every ``--sigmas`` with Cohen's
CERTIFY (n0, n, alpha) on the first ``--images`` test images, certified accuracy at fixed radii:

* ``a_base``        the clean base model, smoothed (nothing trained on noise);
* ``b_full``        full fine-tuning with noise at that sigma (every weight trains: the ceiling);
* ``c_lora``        robustify(method="lora") at that sigma;
* ``d_adapter``     robustify(method="adapter") at that sigma;
* ``e_prompt``      robustify(method="prompt") at that sigma;
* ``f_lora_mix``    ONE LoRA model for all sigmas (clean + every sigma in the mixture, Qiu et al.), trained
                    for ``--mix-steps`` (default: ``--steps`` x the number of sigmas, the compute of the
                    per-sigma LoRAs together);
* ``g_unet``        the clean base behind the SDK's U-Net input denoiser (``denoise`` strategy: MSE only,
                    zero queries; ``--unet-steps``), i.e. what a user who cannot touch the model gets.

PEFT rows record trainable parameter counts. Certification goes through the merged model in a
ModuleConnector (the robustified model is the base classifier the certificate is about).

    sudo apt-get install dataset-fashion-mnist
    python benchmarks/peft_fashion_mnist.py [--images 200] [--n 1000] [--sigmas 0.25 0.5 1.0]
        [--base-steps 3000] [--steps 2000] [--rows a_base b_full c_lora e_prompt f_lora_mix g_unet d_adapter]
    # smoke run: --images 8 --n 100 --n0 20 --base-steps 30 --steps 10 --unet-steps 10 --fit-images 2000

The documented run (docs/robustify.md) used the defaults: 200 images, n = 1,000, n0 = 100, alpha = 0.001.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import RADII, add_certify_args, emit, for_sigma, print_table  # noqa: E402

from blackbox_rs._demo.datasets import load_fashion_mnist  # noqa: E402
from blackbox_rs.connectors.module import ModuleConnector  # noqa: E402
from blackbox_rs.fitting.config import FitConfig  # noqa: E402
from blackbox_rs.robust import robustify  # noqa: E402
from blackbox_rs.smoother import BlackBoxSmoother  # noqa: E402

SHAPE = (1, 28, 28)
ROWS = ["a_base", "b_full", "c_lora", "d_adapter", "e_prompt", "f_lora_mix", "g_unet"]
DEFAULT_ROWS = ["a_base", "b_full", "c_lora", "e_prompt", "f_lora_mix", "g_unet"]


def make_vit(seed: int) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                             depth=4, embed_dim=64, num_heads=4, num_classes=10)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, sigma: float,
          batch: int, seed: int) -> nn.Module:
    """Plain training of every weight (base model: sigma 0; full fine-tuning: noise, clipped)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb = x[idx]
        if sigma > 0:
            xb = (xb + sigma * torch.randn(xb.shape, generator=g)).clamp(0, 1)
        loss = nn.functional.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, args: argparse.Namespace) -> dict:
    conn = ModuleConnector(model, input_shape=SHAPE, num_classes=10, max_batch=args.batch_size, device=args.device)
    sm = BlackBoxSmoother(conn, module=None, sigma=sigma)
    t = time.perf_counter()
    res = sm.certify_dataset(x, y.tolist(), n0=args.n0, n=args.n, alpha=args.alpha, seed=0,
                             batch_size=args.batch_size, radii=RADII, progress=None)
    return {"certified_accuracy": res.certified_accuracy, "certify_seconds": round(time.perf_counter() - t, 1)}


def unet_row(base: nn.Module, xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor,
             sigma: float, args: argparse.Namespace, trained: dict[str, dict]) -> dict:
    """The clean base behind a U-Net denoiser fitted with MSE only (``denoise``: zero queries to the model)."""
    conn = ModuleConnector(copy.deepcopy(base), input_shape=SHAPE, num_classes=10, max_batch=args.batch_size,
                           device=args.device)
    sm = BlackBoxSmoother(conn, module={"name": "unet", "widths": [16, 32, 32]}, sigma=sigma)
    t = time.perf_counter()
    rep = sm.fit((xtr, ytr), config=FitConfig(strategy="denoise", steps=args.unet_steps, pretrain_steps=0, lr=2e-3,
                                              batch_size=64, seed=0, lr_schedule="cosine"), progress=None)
    trained[f"g_unet@{sigma}"] = {"trainable": rep.trainable_parameters, "fit_queries": rep.queries,
                                  "train_seconds": round(time.perf_counter() - t, 1), "steps": args.unet_steps}
    t = time.perf_counter()
    res = sm.certify_dataset(xte, yte.tolist(), n0=args.n0, n=args.n, alpha=args.alpha, seed=0,
                             batch_size=args.batch_size, radii=RADII, progress=None)
    return {"certified_accuracy": res.certified_accuracy, "certify_seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_certify_args(ap, images=200, n=1_000, sigmas=[0.25, 0.5, 1.0])
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=ROWS)
    ap.add_argument("--fit-images", type=int, default=60_000)
    ap.add_argument("--base-steps", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=2000, help="steps of every per-sigma noise-trained row")
    ap.add_argument("--mix-steps", type=int, default=None,
                    help="f_lora_mix steps (default: --steps x the number of sigmas)")
    ap.add_argument("--unet-steps", type=int, default=3000, help="g_unet: MSE steps of the U-Net denoiser")
    ap.add_argument("--train-batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="PEFT learning rate")
    ap.add_argument("--full-lr", type=float, default=3e-4, help="base training / full fine-tuning learning rate")
    ap.add_argument("--lora-rank", type=int, default=2, help="LoRA rank (2: about 4%% of the ViT's parameters)")
    ap.add_argument("--lora-alpha", type=float, default=4.0)
    ap.add_argument("--train-head", action=argparse.BooleanOptionalAction, default=True,
                    help="PEFT rows also train the classifier head (650 parameters)")
    ap.add_argument("--clean-weight", type=float, default=0.25, help="f_lora_mix: weight of clean images")
    ap.add_argument("--batch-size", type=int, default=1000, help="certification batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    xtr, ytr = load_fashion_mnist("train", limit=args.fit_images)
    xte, yte = load_fashion_mnist("test", limit=args.images)
    base = train(make_vit(0), xtr, ytr, args.base_steps, args.full_lr, 0.0, args.train_batch, seed=0)
    with torch.no_grad():
        clean_acc = float((base(xte).argmax(1) == yte).float().mean())
    common = {"batch_size": args.train_batch, "lr": args.lr, "lora_rank": args.lora_rank,
              "lora_alpha": args.lora_alpha, "train_head": args.train_head, "lr_schedule": "cosine",
              "device": args.device}
    mix_steps = args.mix_steps if args.mix_steps is not None else args.steps * len(args.sigmas)
    results: dict[str, dict[str, dict]] = {}
    trained: dict[str, dict] = {}

    def peft_row(name: str, method: str, sigmas: list[float], steps: int, **extra: object) -> nn.Module:
        t = time.perf_counter()
        rm = robustify(base, (xtr, ytr), method, sigmas, steps=steps, **common, **extra)  # type: ignore[arg-type]
        print(rm.summary(), file=sys.stderr)
        trained[f"{name}@{','.join(map(str, sigmas))}"] = {
            **rm.parameter_counts().model_dump(), "train_seconds": round(time.perf_counter() - t, 1), "steps": steps,
            "final_loss": rm.report.history[-1]["loss"] if rm.report.history else None}
        return rm.merged().to(args.device)

    mix = peft_row("f_lora_mix", "lora", list(args.sigmas), mix_steps, clean_weight=args.clean_weight) \
        if "f_lora_mix" in args.rows else None
    for sigma in args.sigmas:
        row: dict[str, dict] = {}
        for name in args.rows:
            if name == "a_base":
                model = copy.deepcopy(base)
            elif name == "b_full":
                t = time.perf_counter()
                model = train(copy.deepcopy(base), xtr, ytr, args.steps, args.full_lr, sigma, args.train_batch, 1)
                trained[f"b_full@{sigma}"] = {"trainable": sum(p.numel() for p in model.parameters()),
                                              "train_seconds": round(time.perf_counter() - t, 1)}
            elif name == "f_lora_mix":
                assert mix is not None
                model = mix
            elif name == "g_unet":
                row[name] = unet_row(base, xtr, ytr, xte, yte, sigma, args, trained)
                print(json.dumps({"sigma": sigma, "row": name, **row[name]}), file=sys.stderr, flush=True)
                continue
            else:
                model = peft_row(name, name.split("_", 1)[1], [sigma], args.steps)
            row[name] = certify(copy.deepcopy(model), xte, yte, sigma, args)
            print(json.dumps({"sigma": sigma, "row": name, **row[name]}), file=sys.stderr, flush=True)
        results[str(sigma)] = row
    out = {"benchmark": "peft_fashion_mnist", "images": len(xte), "n0": args.n0, "n": args.n, "alpha": args.alpha,
           "radii": RADII, "base_clean_accuracy": clean_acc, "settings": vars(args), "results": results,
           "trained": trained, "total_seconds": round(time.perf_counter() - t_all, 1)}
    emit(out, args.out)
    print_table(results, {"trainable": lambda m, sg: for_sigma(trained, m, sg).get("trainable", "-"),
                          "train s": lambda m, sg: for_sigma(trained, m, sg).get("train_seconds", "-")}, label="row")


if __name__ == "__main__":
    main()
