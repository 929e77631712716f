"""Small CNNs for tiny images: the opaque base models of demos, benchmarks and tests.

* :class:`SmallCNN` -- two 3x3 stride-2 conv layers (``width`` and ``2*width`` channels, ReLU) and a
  linear head. Takes ``[0, 1]`` images and returns logits; the fixed ``(x - 0.5) / 0.5`` input scaling
  lives inside the model, so exported files follow the connector contract as they are. At width 16 on
  28x28 inputs: 20,490 parameters, ~0.27 MMAC per image.
* :func:`train_classifier` -- Adam + cross-entropy, optionally with Gaussian noise augmentation (the
  "white-box ceiling" of randomized smoothing). Deterministic given ``seed``.
* :func:`export_torchscript` (``.pt``, ``torch.jit.trace``) and :func:`export_program` (``.pt2``,
  ``torch.export.save`` with a dynamic batch dimension): files that
  :class:`blackbox_rs.connectors.TorchScriptConnector` loads.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from blackbox_rs.errors import InvalidInputError, InvalidParameterError

__all__ = [
    "EpochStats",
    "SmallCNN",
    "accuracy",
    "export_program",
    "export_torchscript",
    "predict_logits",
    "train_classifier",
]


class SmallCNN(nn.Module):
    """A small CNN for ``C x H x W`` images in ``[0, 1]`` (e.g. 1x8x8 digits, 1x28x28 Fashion-MNIST).

    ``conv3x3/2(C -> width) - ReLU - conv3x3/2(width -> 2*width) - ReLU - [linear(-> hidden) - ReLU] -
    linear(-> num_classes)``; ``hidden=0`` (default) makes the head a single linear layer. Each conv
    has stride 2 and padding 1, so a side of ``s`` pixels becomes ``ceil(ceil(s/2)/2)`` (28 -> 7, 8 -> 2).

    Downsampling by stride rather than by full-resolution conv + max-pool is deliberate: the model is
    queried millions of times per certification run, and on CPU the full-resolution activations make
    the conv + max-pool variant memory-bound and 5-25x slower at the same channel widths (measured).

    Args:
        in_channels: image channels C.
        num_classes: number of logits K.
        input_hw: ``(H, W)`` (or one int for square images).
        width: channels of the first conv layer (the second has twice as many).
        hidden: width of an optional hidden fully connected layer (0: none).
        seed: if given, the weights are initialised from this seed without touching torch's global RNG;
            otherwise from the global RNG, like any ``nn.Module``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_hw: int | Sequence[int] = (28, 28),
        width: int = 16,
        *,
        hidden: int = 0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        hw = (int(input_hw), int(input_hw)) if isinstance(input_hw, int) else tuple(int(s) for s in input_hw)
        if len(hw) != 2 or min(hw) < 1:
            raise InvalidParameterError(f"input_hw must be (H, W) with H, W >= 1, got {input_hw!r}")
        if in_channels < 1 or num_classes < 2 or width < 1 or hidden < 0:
            raise InvalidParameterError(
                f"need in_channels >= 1, num_classes >= 2, width >= 1, hidden >= 0; got "
                f"{in_channels}, {num_classes}, {width}, {hidden}"
            )
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.input_hw: tuple[int, int] = (hw[0], hw[1])
        self.width = int(width)
        self.hidden = int(hidden)
        flat = 2 * self.width * _down4(hw[0]) * _down4(hw[1])
        with _seeded(seed):
            self.features = nn.Sequential(
                nn.Conv2d(self.in_channels, self.width, 3, stride=2, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(self.width, 2 * self.width, 3, stride=2, padding=1),
                nn.ReLU(inplace=True),
            )
            if self.hidden:
                self.head: nn.Module = nn.Sequential(
                    nn.Linear(flat, self.hidden), nn.ReLU(inplace=True), nn.Linear(self.hidden, num_classes)
                )
            else:
                self.head = nn.Linear(flat, self.num_classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` the model expects."""
        return (self.in_channels, *self.input_hw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 0.5) / 0.5
        return self.head(torch.flatten(self.features(x), 1))


def _down4(side: int) -> int:
    """Side length after two stride-2, padding-1, 3x3 convolutions."""
    for _ in range(2):
        side = (side + 2 - 3) // 2 + 1
    return side


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    if int(threads) < 1:
        raise InvalidParameterError(f"threads must be >= 1 or None, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class EpochStats:
    """What :func:`train_classifier` reports to ``progress`` after each epoch."""

    epoch: int  # 1-based
    epochs: int
    loss: float  # mean training cross-entropy over the epoch
    train_accuracy: float  # on the (noisy, if noise_sigma > 0) training batches, in training mode
    seconds: float  # wall time of this epoch


def _check_data(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise InvalidInputError(f"x must be a float tensor N x C x H x W, got {getattr(x, 'shape', type(x))}")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise InvalidInputError(
                f"y must be a 1-d tensor of {x.shape[0]} labels, got {getattr(y, 'shape', type(y))}"
            )
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise InvalidInputError(f"y must hold integer labels, got dtype {y.dtype}")


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
    _check_data(x, y)
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
    with _threads(threads):
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


def predict_logits(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000, threads: int | None = None
) -> torch.Tensor:
    """Logits of ``model`` (in eval mode, no autograd) on ``x``, computed in batches."""
    _check_data(x)
    was_training = model.training
    model.eval()
    try:
        with _threads(threads), torch.inference_mode():
            outs = [model(x[i : i + batch_size].float()) for i in range(0, int(x.shape[0]), batch_size)]
    finally:
        model.train(was_training)
    if not outs:
        return torch.empty((0, 0))
    return torch.cat(outs).float()


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
    _check_data(x, y)
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


def _atomic_target(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target, target.with_name(f".tmp-{os.getpid()}-{target.name}")


def export_torchscript(model: nn.Module, path: str | os.PathLike[str], input_shape: Sequence[int]) -> Path:
    """Save ``model`` (traced in eval mode on CPU, float32) as a TorchScript file (``torch.jit.save``).

    ``input_shape`` is ``(C, H, W)`` (a leading batch size is ignored); the traced graph accepts any
    batch size. The file takes ``[0, 1]`` inputs and returns logits, as the model does. torch >= 2.15
    deprecates ``torch.jit`` with a FutureWarning; it is silenced here (loading still works, and
    :func:`export_program` is the forward-looking format). ``model`` itself is not modified. The file
    is written atomically (temporary file + rename). Returns the path.
    """
    m = _frozen_eval_copy(model)
    example = _example_input(m, input_shape, 2)
    target, tmp = _atomic_target(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        with torch.no_grad():
            traced = torch.jit.trace(m, example, check_trace=True)
        try:
            torch.jit.save(traced, str(tmp))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def export_program(model: nn.Module, path: str | os.PathLike[str], input_shape: Sequence[int]) -> Path:
    """Save ``model`` (eval mode, CPU, float32) as a ``torch.export`` program (``.pt2``,
    ``torch.export.save``) whose batch dimension is dynamic (any batch size >= 1).

    ``input_shape`` is ``(C, H, W)``. The program takes ``[0, 1]`` inputs and returns logits.
    ``model`` itself is not modified; the file is written atomically. Returns the path.
    """
    m = _frozen_eval_copy(model)
    example = _example_input(m, input_shape, 2)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.export.export(m, (example,), dynamic_shapes=({0: batch},))
    target, tmp = _atomic_target(path)
    try:
        torch.export.save(program, str(tmp))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
