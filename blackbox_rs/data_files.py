"""Read image sets from files for the command line: ``.npz`` arrays or folders of images.

* ``.npz`` with ``x`` (``N x C x H x W`` or ``N x H x W x C``; float in [0, 1] or uint8 0..255) and
  optional ``y`` (int labels). Loaded with ``allow_pickle=False``.
* A folder with one sub-folder per class, or a flat folder of images (unlabeled). Images are
  converted to the model's channels and resized to its H x W (Pillow).

Labels of a folder of sub-folders: with ``class_names`` (the connector's, ``engine.info.class_names``)
each sub-folder is labelled by its *name*: the index of the class of that exact name, or, when the
class names are ``"0" .. "K-1"``, an integer name that is a valid index (``03`` -> 3). Sub-folders
``0, 3, 4, 6`` therefore give labels 0, 3, 4, 6. A sub-folder whose name matches no class raises
:class:`~blackbox_rs.errors.ConfigError` naming the folder and the known classes, before any image is
read. Without ``class_names`` (nothing is known about the classes) the old rule holds: the sorted
sub-folder names are labelled 0, 1, 2, ... by position.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from blackbox_rs.errors import ConfigError, InvalidInputError

__all__ = ["IMAGE_EXTENSIONS", "as_image_tensor", "list_image_files", "load_images"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""File suffixes (lower case) read as images; other files in an image folder are ignored."""
_EXTS = IMAGE_EXTENSIONS


def list_image_files(path: str | os.PathLike[str]) -> tuple[list[tuple[Path, str | None]], list[str]]:
    """The image files of a folder in the order :func:`load_images` reads them, each with its class
    sub-folder's name (``None`` in a flat folder), and the sorted sub-folder names."""
    folder = Path(path)
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if subdirs:
        files = [(f, d.name) for d in subdirs for f in sorted(d.iterdir()) if f.suffix.lower() in _EXTS]
    else:
        files = [(f, None) for f in sorted(folder.iterdir()) if f.suffix.lower() in _EXTS]
    return files, [d.name for d in subdirs]


def as_image_tensor(x: np.ndarray, shape: tuple[int, ...], batched: bool) -> torch.Tensor:
    """A numpy image array (a batch ``N x ...`` or, ``batched=False``, one image) as a float32
    tensor in the model's ``C x H x W`` layout: uint8 is scaled from 0..255, float taken as [0, 1],
    ``H x W`` images get their channel for a 1-channel model and channels-last arrays are moved to
    channels-first. The one numpy-to-tensor converter of the SDK (files and in-memory fit data alike);
    the shape itself is checked by the caller."""
    if x.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    else:
        raise InvalidInputError(f"images must be a float array in [0, 1] or uint8 0..255, got numpy dtype {x.dtype}")
    base = 1 if batched else 0
    c, h, w = (int(d) for d in shape)
    if t.ndim == base + 2 and c == 1 and tuple(t.shape[base:]) == (h, w):
        t = t.unsqueeze(base)  # H x W images for a 1-channel model
    elif t.ndim == base + 3 and tuple(t.shape[base:]) != (c, h, w) and tuple(t.shape[base:]) == (h, w, c):
        t = t.movedim(-1, base)  # channels last -> channels first
    return t


def _known(class_names: Sequence[str]) -> str:
    names = [str(c) for c in class_names]
    shown = ", ".join(repr(c) for c in names[:20])
    return shown + (f", ... ({len(names)} classes)" if len(names) > 20 else "")


def _folder_labels(subdirs: Sequence[Path], class_names: Sequence[str] | None) -> list[int]:
    """The label of each class sub-folder: by name against ``class_names`` (see the module
    docstring), or by sorted position when ``class_names`` is None."""
    if class_names is None:
        return list(range(len(subdirs)))
    names = [str(c) for c in class_names]
    index = {c: i for i, c in enumerate(names)}
    numeric = names == [str(i) for i in range(len(names))]
    labels = []
    for d in subdirs:
        label = index.get(d.name)
        if label is None and numeric and d.name.isascii() and d.name.isdigit() and int(d.name) < len(names):
            label = int(d.name)
        if label is None:
            raise ConfigError(f"image folder {d.name!r} (in {d.parent}) matches no class of the model; "
                              f"name each sub-folder after a class: {_known(names)}")
        labels.append(label)
    return labels


def _folder(path: Path, shape: tuple[int, int, int],
            class_names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    from PIL import Image

    mode = {1: "L", 3: "RGB"}.get(shape[0])
    if mode is None:
        raise ConfigError(f"image folders need a 1- or 3-channel model, this one has {shape[0]} channels")
    files, folders = list_image_files(path)
    subdirs = [path / d for d in folders]
    label_of = dict(zip(folders, _folder_labels(subdirs, class_names), strict=True))
    items = [(f, None if d is None else label_of[d]) for f, d in files]
    if not items:
        raise InvalidInputError(f"no images ({', '.join(sorted(_EXTS))}) found in {path}")
    arrs = []
    for f, _ in items:
        with Image.open(f) as im:
            im = im.convert(mode).resize((shape[2], shape[1]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
        arrs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrs)).float() / 255.0
    y = None if subdirs == [] else torch.tensor([lab for _, lab in items], dtype=torch.int64)
    return x, y


def load_images(path: str | os.PathLike[str], input_shape: tuple[int, int, int],
                limit: int | None = None, *,
                class_names: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (float32 N x C x H x W in [0, 1]) and optional labels from ``path``.

    ``class_names`` (the connector's ``info.class_names``): class sub-folders are labelled by name
    against them, and a folder that names no class is a :class:`ConfigError`; without them, by
    sorted position (see the module docstring). ``.npz`` labels are taken as stored.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"data path {p} does not exist")
    shape = tuple(int(d) for d in input_shape)
    if p.is_dir():
        x, y = _folder(p, shape, class_names)  # type: ignore[arg-type]
    elif p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                if "x" not in z:
                    raise ConfigError(f"{p} has no array named 'x' (found: {', '.join(z.files)})")
                x = as_image_tensor(z["x"], shape, batched=True)
                if x.ndim != 4:
                    raise InvalidInputError(f"{p}: x must be 4-D (N x C x H x W or N x H x W x C), got shape "
                                            f"{tuple(z['x'].shape)}")
                y = torch.from_numpy(z["y"].astype(np.int64)) if "y" in z else None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {p}: {exc}") from exc
    else:
        raise ConfigError(f"unsupported data file {p}: use a .npz file or a folder of images")
    if limit is not None:
        x, y = x[:limit], (None if y is None else y[:limit])
    return x, y
