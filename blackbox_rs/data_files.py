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

__all__ = ["load_images"]

_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _to_nchw(x: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    if x.ndim == 3 and shape[0] == 1:
        x = x[:, None]
    if x.ndim != 4:
        raise InvalidInputError(f"x must be 4-D (N x C x H x W or N x H x W x C), got shape {x.shape}")
    if tuple(x.shape[1:]) != shape and tuple(x.shape[1:]) == (shape[1], shape[2], shape[0]):
        x = x.transpose(0, 3, 1, 2)
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    return t.float()


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
    subdirs = sorted(p for p in path.iterdir() if p.is_dir())
    items: list[tuple[Path, int | None]] = []
    if subdirs:
        for label, d in zip(_folder_labels(subdirs, class_names), subdirs, strict=True):
            items += [(f, label) for f in sorted(d.iterdir()) if f.suffix.lower() in _EXTS]
    else:
        items = [(f, None) for f in sorted(path.iterdir()) if f.suffix.lower() in _EXTS]
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
                x = _to_nchw(z["x"], shape)  # type: ignore[arg-type]
                y = torch.from_numpy(z["y"].astype(np.int64)) if "y" in z else None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {p}: {exc}") from exc
    else:
        raise ConfigError(f"unsupported data file {p}: use a .npz file or a folder of images")
    if limit is not None:
        x, y = x[:limit], (None if y is None else y[:limit])
    return x, y
