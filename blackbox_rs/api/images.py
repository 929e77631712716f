"""The images of a vendor run: the task's label map, the image folder (one sub-folder per class, or
flat), and the split between fitting and certification images.

Split (only with a fit; without one every image is certified): ``--fit-fraction F`` (default 0.5)
fits on ``floor(F * N)`` images drawn by a seeded permutation (``--split-seed``, default 0) of the
folder's files, identical files (same content hash) always on the same side, and certifies the rest;
or ``--fit-images FOLDER`` fits on a separate folder and certifies every image of the main one,
refusing (:class:`SplitOverlapError`) any fit file whose content is also a certification image. The
two sets are disjoint; ``OUT/split.json`` and ``run.log`` list the files used for each, and a rerun
into the same ``OUT`` with another split is refused (:class:`ResumeMismatchError`). ``--limit``
takes the first LIMIT certification images.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blackbox_rs.errors import ConfigError, InvalidParameterError, ResumeMismatchError, SplitOverlapError
from blackbox_rs.paths import atomic_write, file_sha256

__all__ = ["RunImages", "load_run_images", "read_label_map", "write_split"]


def read_label_map(args: argparse.Namespace, folder_classes: list[str], *, discovering: bool = False) -> Any:
    """The task's label map: ``--label-map`` (a LabelMap dict, or synonyms for ``--labels`` / the
    sub-folder names). ``discovering`` (the ``labels`` action on a flat folder without labels): a
    placeholder map, since the point is to find the vendor's labels."""
    from blackbox_rs.connectors.labelmap import LabelMap

    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else folder_classes
    raw: dict[str, Any] = {}
    if args.label_map is not None:
        try:
            raw = json.loads(args.label_map.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read label map {args.label_map}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"label map {args.label_map} must be a JSON object")
    if "classes" in raw:
        return LabelMap.from_dict(raw)
    if not labels:
        if discovering:
            return LabelMap(["(no task labels yet)"])
        raise ConfigError("no task labels: give --labels or a folder with one sub-folder per class")
    return LabelMap(labels, raw)


def _list_images(folder: Path) -> tuple[list[str], list[str]]:
    """File names (relative, ``/``-separated) in the order :func:`load_images` reads them, and the
    sorted sub-folder names."""
    from blackbox_rs.data_files import list_image_files

    files, folders = list_image_files(folder)
    return [f.name if d is None else f"{d}/{f.name}" for f, d in files], folders


@dataclass
class RunImages:
    """The images of one run: what is certified, what is fitted on (``fit_x is None``: no fit)."""

    x: Any
    y: list[int] | None
    names: list[str]
    lm: Any
    fit_x: Any = None
    fit_y: list[int] | None = None
    fit_names: list[str] | None = None
    split: dict[str, Any] | None = None


def _load_folder(folder: Path, size: int, lm: Any) -> tuple[Any, list[int] | None, list[str]]:
    from blackbox_rs.data_files import load_images

    names, folders = _list_images(folder)
    x, y = load_images(folder, (3, size, size))
    if int(x.shape[0]) != len(names):  # pragma: no cover - the loader changed its file rule
        raise ConfigError(f"{folder}: {len(names)} image files listed but {int(x.shape[0])} loaded")
    if y is None:
        return x, None, names
    missing = [f for f in folders if f not in lm.class_names]
    if missing:
        raise ConfigError(f"image folders {missing} in {folder} are not task labels {list(lm.class_names)}")
    idx = [lm.class_names.index(f) for f in folders]  # sub-folder index -> task class index
    return x, [idx[int(v)] for v in y], names


def load_run_images(args: argparse.Namespace, fitting: bool, *, discovering: bool = False) -> RunImages:
    if not args.images.is_dir():
        raise ConfigError(f"{args.images} is not a folder of images")
    folders = sorted(p.name for p in args.images.iterdir() if p.is_dir())
    lm = read_label_map(args, folders, discovering=discovering)
    x, y, names = _load_folder(args.images, args.size, lm)
    if not fitting:
        if args.fit_images is not None or args.fit_fraction is not None:
            raise ConfigError("--fit-images and --fit-fraction choose the images of a fit: they need --fit")
        cert = list(range(len(names)))
        data = RunImages(x, y, names, lm, split={"mode": "none"})
    elif args.fit_images is not None:
        if args.fit_fraction is not None:
            raise ConfigError("give --fit-images or --fit-fraction, not both")
        if not args.fit_images.is_dir():
            raise ConfigError(f"--fit-images {args.fit_images} is not a folder of images")
        fx, fy, fnames = _load_folder(args.fit_images, args.size, lm)
        seen = {file_sha256(args.images / n): n for n in names}
        both = [(f, seen[h]) for f in fnames if (h := file_sha256(args.fit_images / f)) in seen]
        if both:
            shown = ", ".join(f"{args.fit_images / f} = {args.images / c}" for f, c in both[:5])
            raise SplitOverlapError(
                f"{len(both)} fit image(s) are also certification images (same content): {shown}"
                f"{' ...' if len(both) > 5 else ''}; remove them from one of the folders")
        cert = list(range(len(names)))
        data = RunImages(x, y, names, lm, fx, fy, fnames,
                     split={"mode": "folder", "fit_folder": str(args.fit_images)})
    else:
        frac = 0.5 if args.fit_fraction is None else float(args.fit_fraction)
        if not 0.0 < frac < 1.0:
            raise InvalidParameterError(f"--fit-fraction must be strictly between 0 and 1, got {frac:g}")
        fit_idx, cert = _split(args.images, names, frac, args.split_seed)
        data = RunImages(x, y, names, lm, x[fit_idx], None if y is None else [y[i] for i in fit_idx],
                     [names[i] for i in fit_idx],
                     split={"mode": "fraction", "fit_fraction": frac, "split_seed": args.split_seed})
    assert data.split is not None
    data.split.update({"images": str(args.images), "fit": data.fit_names or [], "certify": [names[i] for i in cert]})
    if args.limit is not None:
        cert = cert[: max(0, args.limit)]
    data.split["limit"] = args.limit
    data.x, data.names = x[cert], [names[i] for i in cert]
    data.y = None if y is None else [y[i] for i in cert]
    return data


def _split(folder: Path, names: list[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (folder order) for fitting and for certification: ``floor(fraction * N)`` images by a
    seeded permutation of the files; files with the same content always fall on the same side."""
    import numpy as np

    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(file_sha256(folder / n), []).append(i)
    order = list(groups.values())
    want = max(1, math.floor(fraction * len(names)))
    fit: list[int] = []
    for g in np.random.default_rng(seed).permutation(len(order)):
        if len(fit) >= want:
            break
        fit += order[int(g)]
    if len(fit) >= len(names):
        raise ConfigError(f"--fit-fraction {fraction:g} of {len(names)} image(s) leaves none to certify: give more "
                          f"images, a smaller --fit-fraction, or --fit-images")
    chosen = set(fit)
    return sorted(fit), [i for i in range(len(names)) if i not in chosen]


def write_split(data: RunImages, out: Path) -> None:
    """Write ``OUT/split.json``; refuse a rerun into ``OUT`` whose split differs from the saved one."""
    assert data.split is not None
    path = out / "split.json"
    now = {**data.split, "certified": data.names}
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ResumeMismatchError(f"{path} is unreadable ({exc}); use another --out") from None
        diff = {k: (_shown(saved.get(k)), _shown(now.get(k))) for k in ("mode", "fit", "certify")
                if saved.get(k) != now.get(k)}
        if diff:
            raise ResumeMismatchError(
                f"{out} holds a run with another split of the images ({', '.join(diff)} differ: "
                f"{'; '.join(f'{k}: saved {a}, now {b}' for k, (a, b) in diff.items())}); nothing is mixed: use "
                f"another --out, or the original --fit / --fit-fraction / --fit-images / --split-seed", diff)
    try:
        atomic_write(path, json.dumps(now, indent=1), ConfigError)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


def _shown(v: Any) -> Any:
    return f"{len(v)} file(s)" if isinstance(v, list) else v
