"""The built-in surrogate architecture: :class:`SmallCNN`, and :func:`predict_logits` to run any
classifier in batches.

The ``surrogate`` fit strategy (``blackbox_rs.fitting.strategies.surrogate``) builds its white-box
stand-in for the black box from :class:`SmallCNN` when the config says ``surrogate="small_cnn"``, and
reads the surrogate's predictions with :func:`predict_logits`. That is all the core needs from a
classifier; training and exporting base models for demos and benchmarks live in the private
``blackbox_rs._demo`` package.

* :class:`SmallCNN` -- two 3x3 stride-2 conv layers (``width`` and ``2*width`` channels, ReLU) and a
  linear head. Takes ``[0, 1]`` images and returns logits; the fixed ``(x - 0.5) / 0.5`` input scaling
  lives inside the model, so exported files follow the connector contract as they are. At width 16 on
  28x28 inputs: 20,490 parameters, ~0.27 MMAC per image.
* :func:`predict_logits` -- logits in eval mode, without autograd, in batches; the model's training
  flag is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from blackbox_rs.connectors.base import check_images
from blackbox_rs.errors import InvalidInputError, InvalidParameterError

__all__ = ["SmallCNN", "check_batch", "predict_logits", "torch_threads"]


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
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads and restore the previous setting after it;
    ``None`` leaves torch's setting alone.

    Raises:
        InvalidParameterError: ``threads`` is below 1.
    """
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


def check_batch(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """Check that ``x`` is a float ``N x C x H x W`` tensor and ``y`` (if given) a 1-d integer tensor of
    ``N`` labels.

    The image part is :func:`~blackbox_rs.connectors.base.check_images` without a shape or value
    range (training data may be normalised).

    Raises:
        InvalidInputError: naming the shape or dtype that is wrong.
    """
    check_images(x, value_range=None, what="x")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise InvalidInputError(
                f"y must be a 1-d tensor of {x.shape[0]} labels, got {getattr(y, 'shape', type(y))}"
            )
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise InvalidInputError(f"y must hold integer labels, got dtype {y.dtype}")


def predict_logits(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000, threads: int | None = None
) -> torch.Tensor:
    """Logits of ``model`` (in eval mode, no autograd) on ``x``, computed in batches, on the device
    ``model`` returns them on (put ``model`` and ``x`` on one device: the fit device in a fit)."""
    check_batch(x)
    was_training = model.training
    model.eval()
    try:
        with torch_threads(threads), torch.inference_mode():
            outs = [model(x[i : i + batch_size].float()) for i in range(0, int(x.shape[0]), batch_size)]
    finally:
        model.train(was_training)
    if not outs:
        return torch.empty((0, 0), device=x.device)
    return torch.cat(outs).float()
