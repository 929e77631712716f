"""Base classifiers for the demo, the benchmarks and the tests: train, score, export (private).

* :func:`train_classifier` -- Adam + cross-entropy, optionally with Gaussian noise augmentation (the
  "white-box ceiling" of randomized smoothing). Deterministic given ``seed``.
* :func:`accuracy` -- top-1 accuracy, optionally under Gaussian noise.
* :func:`export_torchscript` (``.pt``, ``torch.jit.trace``) and :func:`export_program` (``.pt2``,
  ``torch.export.save`` with a dynamic batch dimension): files that
  :class:`blackbox_rs.connectors.TorchScriptConnector` loads, written atomically
  (:func:`blackbox_rs.paths.atomic_path`).

The architecture itself, :class:`~blackbox_rs.surrogates.SmallCNN`, and
:func:`~blackbox_rs.surrogates.predict_logits` live in the core module :mod:`blackbox_rs.surrogates`
(the ``surrogate`` fit strategy uses them) and are re-exported here for the callers of this module.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from blackbox_rs.errors import InvalidInputError, InvalidParameterError
from blackbox_rs.paths import atomic_path
from blackbox_rs.surrogates import SmallCNN, check_batch, predict_logits, torch_threads

__all__ = [
    "EpochStats",
    "SmallCNN",
    "accuracy",
    "export_program",
    "export_torchscript",
    "predict_logits",
    "train_classifier",
]


@dataclass(frozen=True)
class EpochStats:
    """What :func:`train_classifier` reports to ``progress`` after each epoch."""

    epoch: int  # 1-based
    epochs: int
    loss: float  # mean training cross-entropy over the epoch
    train_accuracy: float  # on the (noisy, if noise_sigma > 0) training batches, in training mode
    seconds: float  # wall time of this epoch


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 2e-3,
    noise_sigma: float = 0.0,
    clip_noisy: bool = True,
    weight_decay: float = 0.0,
    seed: int = 0,
    threads: int | None = None,
    progress: Callable[[EpochStats], None] | None = None,
) -> nn.Module:
    """Train ``model`` in place (and return it, in eval mode) with Adam and cross-entropy.

    The learning rate follows a cosine schedule from ``lr`` down to 0 over all steps.

    Gaussian augmentation: with ``noise_sigma > 0`` every training image is replaced by
    ``x + N(0, noise_sigma^2)`` drawn fresh each step, in ``[0, 1]`` pixel space (before the model's own
    normalisation), as in Cohen et al. (2019). By default the noisy image is then **clipped** to
    ``[0, 1]``, because the SDK smooths ``x -> f(clip(x + delta, 0, 1))`` (``blackbox_rs.core``:
    connectors take valid images), so the model trains on exactly the distribution it is certified
    under. ``clip_noisy=False`` keeps the unclipped noise of Cohen et al. (for a pipeline that does not
    clip); certified through the SDK, such a model loses accuracy at large sigma (Fashion-MNIST,
    sigma = 0.5: about 6 points of certified accuracy at r = 0.5).

    Determinism: the batch order and the noise come from a ``torch.Generator`` seeded with ``seed``;
    the model's initial weights are the caller's (see ``SmallCNN(seed=...)``). Same initial weights,
    data, arguments, torch build and thread count give bit-identical weights.

    Args:
        threads: torch intra-op threads during training (restored afterwards); ``None`` leaves torch's
            setting alone.
        progress: called with an :class:`EpochStats` after each epoch.
    """
    check_batch(x, y)
    if epochs < 0 or batch_size < 1 or not lr > 0 or noise_sigma < 0 or not math.isfinite(noise_sigma):
        raise InvalidParameterError(
            f"need epochs >= 0, batch_size >= 1, lr > 0, finite noise_sigma >= 0; got epochs={epochs}, "
            f"batch_size={batch_size}, lr={lr}, noise_sigma={noise_sigma}"
        )
    x = x.detach().to(torch.float32).contiguous()
    y = y.detach().to(torch.int64)
    n = int(x.shape[0])
    if n == 0:
        raise InvalidInputError("cannot train on an empty data set")
    gen = torch.Generator().manual_seed(int(seed))
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = max(1, epochs * steps_per_epoch)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    loss_fn = nn.CrossEntropyLoss()
    with torch_threads(threads):
        model.train()
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=gen)
            loss_sum, correct = 0.0, 0
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                xb, yb = x[idx], y[idx]
                if noise_sigma > 0:
                    xb = xb + noise_sigma * torch.randn(xb.shape, generator=gen, dtype=xb.dtype)
                    if clip_noisy:
                        xb = xb.clamp_(0.0, 1.0)
                logits = model(xb)
                loss = loss_fn(logits, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += float(loss.detach()) * int(yb.shape[0])
                correct += int((logits.detach().argmax(1) == yb).sum())
            if progress is not None:
                progress(
                    EpochStats(
                        epoch=epoch,
                        epochs=epochs,
                        loss=loss_sum / n,
                        train_accuracy=correct / n,
                        seconds=time.perf_counter() - t0,
                    )
                )
    model.eval()
    return model


def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 1000,
    noise_sigma: float = 0.0,
    seed: int = 0,
    threads: int | None = None,
) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``; with ``noise_sigma > 0`` on ``x + N(0, sigma^2)``
    (one unclipped noise draw per image from ``seed``: the base classifier's accuracy under noise)."""
    check_batch(x, y)
    if noise_sigma > 0:
        gen = torch.Generator().manual_seed(int(seed))
        x = x + noise_sigma * torch.randn(x.shape, generator=gen, dtype=torch.float32)
    if x.shape[0] == 0:
        return float("nan")
    pred = predict_logits(model, x, batch_size=batch_size, threads=threads).argmax(1)
    return float((pred == y).double().mean())


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def _example_input(model: nn.Module, input_shape: Sequence[int], batch: int) -> torch.Tensor:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise InvalidParameterError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    try:
        param = next(model.parameters())
        device = param.device
    except StopIteration:
        device = torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.rand((batch, *shape), generator=gen).to(device)


def _frozen_eval_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).cpu().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def export_torchscript(model: nn.Module, path: str | os.PathLike[str], input_shape: Sequence[int]) -> Path:
    """Save ``model`` (traced in eval mode on CPU, float32) as a TorchScript file (``torch.jit.save``).

    ``input_shape`` is ``(C, H, W)`` (a leading batch size is ignored); the traced graph accepts any
    batch size. The file takes ``[0, 1]`` inputs and returns logits, as the model does. torch >= 2.15
    deprecates ``torch.jit`` with a FutureWarning; it is silenced here (loading still works, and
    :func:`export_program` is the forward-looking format). ``model`` itself is not modified. The file
    is written atomically and durably (:func:`blackbox_rs.paths.atomic_path`): ``path`` holds either
    its old content or the whole new file. Returns the path.

    Raises:
        InvalidParameterError: ``input_shape`` is not ``(C, H, W)``.
        CacheError: the file cannot be written (the message names it).
    """
    m = _frozen_eval_copy(model)
    example = _example_input(m, input_shape, 2)
    target = Path(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        with torch.no_grad():
            traced = torch.jit.trace(m, example, check_trace=True)
        with atomic_path(target) as tmp:
            torch.jit.save(traced, str(tmp))
    return target


def export_program(model: nn.Module, path: str | os.PathLike[str], input_shape: Sequence[int]) -> Path:
    """Save ``model`` (eval mode, CPU, float32) as a ``torch.export`` program (``.pt2``,
    ``torch.export.save``) whose batch dimension is dynamic (any batch size >= 1).

    ``input_shape`` is ``(C, H, W)``. The program takes ``[0, 1]`` inputs and returns logits.
    ``model`` itself is not modified; the file is written atomically and durably
    (:func:`blackbox_rs.paths.atomic_path`). Returns the path.

    Raises:
        InvalidParameterError: ``input_shape`` is not ``(C, H, W)``.
        CacheError: the file cannot be written (the message names it).
    """
    m = _frozen_eval_copy(model)
    example = _example_input(m, input_shape, 2)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.export.export(m, (example,), dynamic_shapes=({0: batch},))
    target = Path(path)
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        # a file object, not the temporary path: torch.export.save warns about names not ending in .pt2
        torch.export.save(program, fh)
    return target
