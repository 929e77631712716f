"""Toy black boxes for fit tests (1 x 6 x 6 images, two classes): one where no module step can help,
one where steps clearly do; and a fixture body that runs a test on one torch thread."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def one_thread() -> Iterator[None]:
    """Run the test on one torch thread (fits are then bit-reproducible on any machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def brightness(b: torch.Tensor) -> torch.Tensor:
    """A black box that only sees a coarse feature (mean brightness > 0.5), which an MSE denoiser
    already preserves: nothing a module learns can make its answers more stable."""
    m = b.flatten(1).mean(1)
    return torch.stack([0.5 - m, m - 0.5], 1)


def center_pixel(b: torch.Tensor) -> torch.Tensor:
    """A black box that looks at one pixel: averaging the (constant) image first makes its answers far
    more stable under noise, which the steps learn and the identity module does not do."""
    v = b[:, 0, 3, 3]
    return torch.stack([0.5 - v, v - 0.5], 1)
