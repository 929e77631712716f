"""Deterministic wire encodings of an image batch (``N x C x H x W`` float32 in ``[0, 1]``).

Every function here is a pure function of its input: the same batch always gives the same bytes
(on one Pillow/zlib/libjpeg build), so the encoding is deterministic post-processing of ``x + δ``
and belongs to the base classifier (the certificate stays valid). No metadata, timestamps or
random state enter the output.

* ``fp32``: the float values themselves (JSON lists of float32 values, exact round trip).
* ``uint8``: ``round(255 * x)`` with round-half-to-even, clamped to ``[0, 255]``.
* ``png``: lossless PNG of the uint8 image (zlib level 6, no optimisation, no metadata).
* ``jpeg``: baseline JPEG of the uint8 image at a fixed quality and 4:4:4 chroma (lossy, still
  deterministic).

Pillow is imported lazily, only for PNG/JPEG.
"""

from __future__ import annotations

import base64
import io
from enum import StrEnum
from typing import Literal

import numpy as np
import torch

from blackbox_rs.errors import InvalidParameterError

__all__ = [
    "ImageEncoding",
    "Layout",
    "b64encode",
    "encode_images",
    "to_float32_array",
    "to_uint8_array",
]

Layout = Literal["NCHW", "NHWC"]


class ImageEncoding(StrEnum):
    """How images travel on the wire."""

    FP32 = "fp32"
    UINT8 = "uint8"
    PNG = "png"
    JPEG = "jpeg"

    @property
    def is_bytes(self) -> bool:
        """True for encoded-file formats (PNG/JPEG), False for raw tensors."""
        return self in (ImageEncoding.PNG, ImageEncoding.JPEG)

    @property
    def mime(self) -> str:
        return {"png": "image/png", "jpeg": "image/jpeg"}.get(self.value, "application/octet-stream")


def _check_layout(layout: str) -> None:
    if layout not in ("NCHW", "NHWC"):
        raise InvalidParameterError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")


def to_float32_array(batch: torch.Tensor, layout: Layout = "NCHW") -> np.ndarray:
    """The batch as a C-contiguous float32 numpy array in ``layout``."""
    _check_layout(layout)
    x = batch.detach().to("cpu", torch.float32)
    if layout == "NHWC":
        x = x.permute(0, 2, 3, 1)
    return np.ascontiguousarray(x.numpy())


def to_uint8_array(batch: torch.Tensor, layout: Layout = "NCHW") -> np.ndarray:
    """The batch quantised to uint8: ``round_half_even(255 * x)`` clamped to ``[0, 255]``."""
    _check_layout(layout)
    x = batch.detach().to("cpu", torch.float32)
    q = torch.round(x * 255.0).clamp_(0, 255).to(torch.uint8)
    if layout == "NHWC":
        q = q.permute(0, 2, 3, 1)
    return np.ascontiguousarray(q.numpy())


_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def encode_images(
    batch: torch.Tensor, encoding: ImageEncoding | str, *, jpeg_quality: int = 95
) -> list[bytes]:
    """Encode each image of the batch as PNG or JPEG bytes (one ``bytes`` per image).

    Raises :class:`InvalidParameterError` for a channel count the format cannot hold (PNG: 1, 3 or
    4 channels; JPEG: 1 or 3) or a quality outside ``[1, 100]``.
    """
    enc = ImageEncoding(encoding)
    if not enc.is_bytes:
        raise InvalidParameterError(f"encode_images encodes png or jpeg, not {enc.value}")
    c = int(batch.shape[1])
    if c not in _MODES or (enc is ImageEncoding.JPEG and c == 4):
        raise InvalidParameterError(f"{enc.value} cannot hold images with {c} channels")
    if not 1 <= int(jpeg_quality) <= 100:
        raise InvalidParameterError(f"jpeg_quality must be in [1, 100], got {jpeg_quality!r}")
    from PIL import Image  # lazy: only the byte encodings need Pillow

    arr = to_uint8_array(batch, "NHWC")
    out: list[bytes] = []
    for img in arr:
        pil = Image.fromarray(img[:, :, 0] if c == 1 else img)
        buf = io.BytesIO()
        if enc is ImageEncoding.PNG:
            pil.save(buf, format="PNG", compress_level=6, optimize=False)
        else:
            pil.save(buf, format="JPEG", quality=int(jpeg_quality), subsampling=0, optimize=False,
                     progressive=False)
        out.append(buf.getvalue())
    return out


def b64encode(data: bytes) -> str:
    """Standard base64 (RFC 4648, with padding, no line breaks, no ``data:`` prefix)."""
    return base64.b64encode(data).decode("ascii")
