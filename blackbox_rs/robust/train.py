"""``robustify``: train PEFT modules of a model you own on Gaussian-noise-augmented data.

PEFTSmoothing (Fu & Wang 2024, arXiv 2404.05350) with the clean/multi-sigma mixture of Qiu et al.
(2023, arXiv 2312.09020): every step draws ``batch_size`` training images (with replacement), gives
each one a level from the mixture (clean, or one of ``sigmas``; see :mod:`.config`), adds
``sigma * N(0, I)`` and **clips to [0, 1]**, which is what the certifier feeds the model
(``f(clip(x + delta))``), and minimises the cross-entropy of the wrapped model on the labels with
AdamW over the PEFT parameters only (and the head's, with ``train_head``).

Guarantees:

* The base model passed in is never changed (the wrapper works on a deep copy). During training the
  base runs in eval mode: BatchNorm statistics and the base's own dropout are frozen, so what was
  trained is exactly the PEFT tensors (plus the head) that the artefact saves.
* Step ``k``'s draws (batch indices, mixture levels, noise, LoRA dropout) are a function of
  ``(seed, k)`` and the device type only, so a run resumed from a checkpoint continues the same run:
  its final weights equal those of an uninterrupted run (on the same device type).
* With ``checkpoint_dir`` the PEFT tensors, the optimiser state and the step are saved every
  ``checkpoint_every`` steps and after the last one (JSON + safetensors, atomic:
  :mod:`blackbox_rs.fitting.checkpoint`). The checkpoint is bound to the base model's digest, the
  whole config (``checkpoint_every`` aside) and the training data's digest; a rerun that differs in
  any of them raises :class:`~blackbox_rs.errors.ResumeMismatchError` whose ``differences`` names
  each differing field. An interruption between checkpoints loses the steps since the last one.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from blackbox_rs.errors import InvalidInputError, ResumeMismatchError

from .artefact import ParameterCounts, RobustModel
from .config import RobustifyConfig, make_config
from .wrap import trainable_names, wrap_model

__all__ = ["RobustifyReport", "robustify"]

_KIND = "blackbox-rs robustify checkpoint v1"


class RobustifyReport(BaseModel):
    """What a robustify run did: steps (and where it resumed), the loss history (mean loss per
    reporting interval), wall time of this call, and the parameter counts."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description="lora, adapter or prompt")
    sigmas: list[float] = Field(description="noise levels trained for")
    steps_done: int = Field(description="optimiser steps completed (over every call of the run)")
    steps_total: int = Field(description="config.steps")
    resumed_from: int | None = Field(default=None, description="the checkpoint step this call resumed from")
    history: list[dict[str, float]] = Field(default_factory=list, description="[{step, loss}] per interval")
    seconds: float = Field(default=0.0, description="wall time of this call")
    parameters: ParameterCounts = Field(description="parameter counts of the wrapped model")


def _check_data(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(data, Sequence) and len(data) == 2):
        raise InvalidInputError("data must be a pair (images N x C x H x W in [0, 1], labels N)")
    x, y = data
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidInputError(f"data images must be a float tensor N x C x H x W, got {shape}")
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.is_floating_point() or y.dtype == torch.bool:
        raise InvalidInputError(f"data labels must be N={x.shape[0]} integers, got {tuple(y.shape)} {y.dtype}")
    if x.shape[0] == 0:
        raise InvalidInputError("data is empty")
    x = x.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise InvalidInputError("data images must be finite and in [0, 1] (certification clips to [0, 1])")
    y = y.detach().to("cpu", torch.int64)
    if y.min() < 0:
        raise InvalidInputError(f"data labels must be >= 0, got {int(y.min())}")
    return x.contiguous(), y.contiguous()


def _data_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    h = hashlib.sha256(b"blackbox-rs robustify data v1\0")
    h.update(str(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    h.update(y.numpy().tobytes())
    return h.hexdigest()[:32]


def _step_seed(seed: int, step: int) -> int:
    d = hashlib.blake2b(f"robustify|{seed}|{step}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") & ((1 << 63) - 1)


def _lr(cfg: RobustifyConfig, step: int) -> float:
    if cfg.lr_schedule == "constant" or cfg.steps <= 1:
        return cfg.lr
    t = step / (cfg.steps - 1)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


def _binding(cfg: RobustifyConfig, base_digest: str, data_digest: str, device_type: str) -> dict[str, Any]:
    # the device type too: the run's random draws come from that device's generator
    return {"base_digest": base_digest, "data_digest": data_digest, "device_type": device_type,
            "config": cfg.model_dump(mode="json", exclude={"checkpoint_every"})}


def _compare(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[object, object]]:
    diff: dict[str, tuple[object, object]] = {}
    for key in ("base_digest", "data_digest", "device_type"):
        if saved.get(key) != now[key]:
            diff[key] = (saved.get(key), now[key])
    old, new = saved.get("config") or {}, now["config"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diff[f"config.{key}"] = (old.get(key), new.get(key))
    return diff


def _set_train_modes(model: nn.Module) -> None:
    """Base in eval mode; only the LoRA dropout (a PEFT module) in train mode."""
    model.eval()
    for name, m in model.named_modules():
        if "lora_dropout" in name:
            m.train()


def robustify(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    method: str | None = None,
    sigmas: Sequence[float] | None = None,
    *,
    config: RobustifyConfig | Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | os.PathLike[str] | None = None,
    callback: Callable[[int, float], None] | None = None,
    **settings: Any,
) -> RobustModel:
    """Robustify ``model`` (an ``nn.Module`` taking ``N x C x H x W`` in [0, 1] and returning logits;
    put normalisation inside it) by training PEFT modules on noisy ``data = (images, labels)``.

    ``method``, ``sigmas`` and ``settings`` override fields of ``config`` (a
    :class:`RobustifyConfig`, a mapping, or ``None``: defaults). ``device`` is where the model, the
    noise and training run (``"cpu"``, ``"cuda"``, ``"cuda:N"``). ``callback(step, loss)`` is called
    after each step (an exception from it stops the run; the last checkpoint stays).

    Returns a :class:`RobustModel` (on ``device``, eval mode) whose ``report`` is a
    :class:`RobustifyReport`. Raises :class:`~blackbox_rs.errors.ConfigError` for a bad setting
    (naming it, e.g. a sigma outside (0, 4]), :class:`~blackbox_rs.errors.ModelStructureError` for a
    model without what the method needs, :class:`~blackbox_rs.errors.InvalidInputError` for bad data,
    :class:`~blackbox_rs.errors.ResumeMismatchError` for a checkpoint of another run, and
    :class:`~blackbox_rs.errors.InvalidParameterError` for an unusable device.
    """
    from blackbox_rs.connectors.module import module_digest, resolve_device
    from blackbox_rs.fitting.checkpoint import (
        load_checkpoint,
        optimizer_from_tensors,
        optimizer_to_tensors,
        save_checkpoint,
    )

    t0 = time.perf_counter()
    given = {"method": method} if method is not None else {}  # None: not given, the config's value
    if sigmas is not None:
        given["sigmas"] = tuple(float(s) for s in sigmas)
    cfg = make_config(config, **given, **settings)
    dev = resolve_device(device)
    x, y = _check_data(data)
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    base_digest = module_digest(model)
    wrapped = wrap_model(model, cfg)
    net = wrapped.model.to(dev)
    with torch.no_grad():
        net.eval()
        width = int(net(x[:1].to(dev)).shape[-1])
    if int(y.max()) >= width:
        raise InvalidInputError(f"data label {int(y.max())} is outside the model's {width} classes")
    names = trainable_names(net)
    params = dict(net.named_parameters())
    opt = torch.optim.AdamW([params[n] for n in names], lr=cfg.lr, weight_decay=cfg.weight_decay)
    binding = _binding(cfg, base_digest, _data_digest(x, y), dev.type)
    start, history, resumed = 0, [], None
    if checkpoint_dir is not None:
        found = load_checkpoint(checkpoint_dir)
        if found is not None:
            tensors, meta = found
            saved = {**meta.get("binding", {}), "kind": meta.get("kind")}
            diff = _compare(saved, binding)
            if meta.get("kind") != _KIND:
                diff = {"kind": (meta.get("kind"), _KIND), **diff}
            if diff:
                raise ResumeMismatchError(
                    f"the checkpoint in {checkpoint_dir} belongs to another run (differs in "
                    f"{', '.join(diff)}); use another checkpoint_dir or the original settings", diff)
            with torch.no_grad():
                for n in names:
                    params[n].copy_(tensors[f"p.{n}"].to(params[n].device))
            optimizer_from_tensors(opt, "opt", tensors, meta["opt"])  # torch places each state tensor
            start, history = int(meta["step"]), list(meta["history"])
            resumed = start

    def checkpoint(step: int) -> None:
        assert checkpoint_dir is not None
        t, om = optimizer_to_tensors(opt, "opt")
        t.update({f"p.{n}": params[n].detach() for n in names})
        save_checkpoint(checkpoint_dir, t, {"kind": _KIND, "binding": binding, "step": step, "opt": om,
                                            "history": history})

    levels = torch.tensor([0.0, *cfg.sigmas], dtype=torch.float32)
    probs = torch.tensor(cfg.weights(), dtype=torch.float64)
    probs = (probs / probs.sum()).to(torch.float32)
    every = max(1, cfg.steps // 100)
    loss_fn = nn.CrossEntropyLoss()
    acc, acc_n = 0.0, 0
    fork = [dev] if dev.type == "cuda" else []
    for k in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, k)
        s = _step_seed(cfg.seed, k)
        g = torch.Generator().manual_seed(s)
        idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=g)
        lv = torch.multinomial(probs, cfg.batch_size, replacement=True, generator=g)
        gd = torch.Generator(device=dev).manual_seed(s ^ 0x5EED)
        xb = x[idx].to(dev)
        noise = torch.randn(xb.shape, generator=gd, device=dev, dtype=xb.dtype)
        sig = levels[lv].to(dev).view(-1, 1, 1, 1)
        xn = (xb + sig * noise).clamp(0.0, 1.0)
        _set_train_modes(net)
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(s)
            loss = loss_fn(net(xn), y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        value = float(loss.detach())
        acc, acc_n = acc + value, acc_n + 1
        if (k + 1) % every == 0 or k + 1 == cfg.steps:
            history.append({"step": k + 1, "loss": acc / acc_n})
            acc, acc_n = 0.0, 0
        if checkpoint_dir is not None and ((k + 1) % cfg.checkpoint_every == 0 or k + 1 == cfg.steps):
            checkpoint(k + 1)
        if callback is not None:
            callback(k + 1, value)
    net.eval()
    result = RobustModel(wrapped, cfg, base_digest)
    result.report = RobustifyReport(
        method=cfg.method, sigmas=list(cfg.sigmas), steps_done=cfg.steps, steps_total=cfg.steps,
        resumed_from=resumed, history=history, seconds=round(time.perf_counter() - t0, 3),
        parameters=result.parameter_counts())
    return result
