"""What every hosted-API recipe shares: arguments, image folder, label map, dry run, optional fit,
certification with JSONL resume, report, and one-line errors.

A recipe is a :class:`Recipe`: a name, its connector class (whose ``spec`` gives the vendor's rate
limit, batch size and list price), the environment variables it reads, and a ``build`` function
that makes the connector from the parsed arguments and the shared keyword arguments.

Flow of :func:`run`: images (a folder with one sub-folder per class, or a flat folder) -> task
labels (``--labels`` or the sub-folder names) + ``--label-map`` synonyms (``other`` catches the
rest) -> split (with ``--fit``: a held-out split, see below) -> estimate (queries, requests, time at
the rate limit, cost, the fit's real query cap; ``--dry-run`` stops here, prints the split sizes and
sends nothing) -> optional ``--fit`` on the fit images only -> certify every certification image,
each certificate appended to ``OUT/certificates.jsonl`` as soon as it is final -> ``write_report``
into ``OUT``.

Split (only with ``--fit``; without it every image is certified): ``--fit-fraction F`` (default
0.5) fits on ``floor(F * N)`` images drawn by a seeded permutation (``--split-seed``, default 0) of
the folder's files, identical files (same content hash) always on the same side, and certifies the
rest; or ``--fit-images FOLDER`` fits on a separate folder and certifies every image of the main
one, refusing (:class:`SplitOverlapError`) any fit file whose content is also a certification
image. The two sets are disjoint; ``OUT/split.json`` and ``run.log`` list the files used for each,
and a rerun into the same ``OUT`` with another split is refused (:class:`ResumeMismatchError`).
``--limit`` takes the first LIMIT certification images.

Exit codes and stop messages are those of :mod:`blackbox_rs.exit_codes` (the same as the
``blackbox-rs`` command line): 0 done; 2 a user error (one line on stderr, no traceback); 3 the
budget (``--max-queries`` / ``--max-cost``, persisted in ``OUT/budget_ledger.json``) is spent: rerun
with a larger budget; 4 the vendor's quota is exhausted: wait, then rerun the same command to resume;
5 a service failure after retries (timeout, 5xx, unreachable): rerun to resume; 130 interrupted.
Finished certificates are always kept. Credentials are read from the environment only and are never
printed, logged or written. ``--seed`` defaults to a fresh random seed chosen by the core and
recorded in ``certificates.jsonl`` (a resumed run reads it back); give one for reproducible
benchmarks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blackbox_rs import defaults, exit_codes
from blackbox_rs.errors import (
    BlackBoxRSError,
    ConfigError,
    InvalidParameterError,
    ResumeMismatchError,
    SplitOverlapError,
)
from blackbox_rs.paths import atomic_write
from blackbox_rs.redact import redact

__all__ = ["Recipe", "run"]

log = logging.getLogger("blackbox_rs.recipes")


@dataclass(frozen=True)
class Recipe:
    """One hosted API: how to build its connector and what it needs from the environment."""

    name: str
    connector: type
    build: Callable[[argparse.Namespace, dict[str, Any]], Any]
    env: Sequence[str] = ()
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str = ""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention too)
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(exit_codes.USER_ERROR)


def _parser(recipe: Recipe) -> argparse.ArgumentParser:
    spec = recipe.connector.spec
    rate = f"{spec.rate_limit:g} requests/s" if spec.rate_limit else "none"
    p = _Parser(description=recipe.description or f"Certify {spec.vendor} on a folder of images.",
                epilog=f"environment: {', '.join(recipe.env) or 'none'}; vendor defaults: {spec.max_batch} "
                       f"image(s)/request, rate limit {rate}, ${spec.price_per_1k:g} per 1,000 images")
    p.add_argument("images", type=Path, help="folder of images (one sub-folder per class) to certify")
    p.add_argument("--labels", help="comma-separated task labels (default: the sub-folder names)")
    p.add_argument("--label-map", type=Path, help="JSON: {class: [vendor labels]} or a LabelMap dict")
    p.add_argument("--out", type=Path, default=Path(f"runs/{recipe.name}"), help="report and progress folder")
    p.add_argument("--cache-dir", type=Path, help="query cache (default: OUT/cache)")
    p.add_argument("--size", type=int, default=224, help="images are resized to SIZE x SIZE")
    p.add_argument("--limit", type=int, help="certify only the first LIMIT certification images (after the split)")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--n0", type=int, default=defaults.N0)
    p.add_argument("--n", type=int, default=defaults.N_HOSTED,
                   help=f"estimation samples (default {defaults.N_HOSTED}: hosted APIs charge per query)")
    p.add_argument("--alpha", type=float, default=defaults.ALPHA)
    p.add_argument("--seed", type=int, default=None,
                   help="noise seed (default: a fresh random seed, recorded in certificates.jsonl; give one for "
                        "reproducible benchmarks)")
    p.add_argument("--batch-size", type=int, help="noisy images per engine call (default: batch x in-flight)")
    p.add_argument("--fit", choices=["none", "denoise", "surrogate", "zeroth_order"], default="none",
                   help="fit an input module first (denoise: no queries)")
    p.add_argument("--module", default="dncnn", help="input module to fit")
    p.add_argument("--fit-budget", type=int,
                   help="most queries the fit may spend (default: no cap but the run's; the estimate then uses "
                        "the strategy's own query cost)")
    p.add_argument("--fit-steps", type=int, help="module optimisation steps (and pretraining steps)")
    p.add_argument("--fit-fraction", type=float,
                   help="with --fit: share of IMAGES held out for fitting, the rest is certified (default 0.5; "
                        "a seeded permutation, listed in OUT/split.json)")
    p.add_argument("--fit-images", type=Path,
                   help="with --fit: fit on this folder instead and certify every image of IMAGES (a fit image "
                        "that is also a certification image is refused)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the --fit-fraction permutation (default 0)")
    p.add_argument("--max-queries", type=int, help="hard limit on charged queries (all runs, ledger in OUT)")
    p.add_argument("--max-cost", type=float, help="hard limit on estimated spend in USD")
    p.add_argument("--base-url", help="send requests here instead of the vendor's endpoint")
    p.add_argument("--rate-limit", type=float, help=f"requests/s, 0 = no limit (default {rate})")
    p.add_argument("--max-in-flight", type=int, help=f"concurrent requests (default {spec.max_in_flight})")
    p.add_argument("--timeout", type=float, help="seconds to wait for each answer (default 30)")
    p.add_argument("--max-attempts", type=int, help="attempts per request, retries included (default 6)")
    p.add_argument("--label-depth", type=int, default=1,
                   help="how many of the vendor's ranked labels are searched for a task label (default 1: the "
                        "vendor's top answer only)")
    p.add_argument("--price-per-1k", type=float, help=f"USD per 1,000 images (default {spec.price_per_1k:g})")
    p.add_argument("--dry-run", action="store_true", help="print queries and estimated cost, send nothing")
    if recipe.add_arguments is not None:
        recipe.add_arguments(p)
    return p


# ---- inputs ------------------------------------------------------------------------------------------
def _label_map(args: argparse.Namespace, folder_classes: list[str]) -> Any:
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
        raise ConfigError("no task labels: give --labels or a folder with one sub-folder per class")
    return LabelMap(labels, raw)


def _list_images(folder: Path) -> tuple[list[str], list[int] | None, list[str]]:
    """File names (relative, ``/``-separated) in the order :func:`load_images` reads them, their
    sub-folder indices (``None`` for a flat folder) and the sorted sub-folder names."""
    try:
        from blackbox_rs.data_files import _EXTS as exts  # the loader's own rule, not a copy
    except ImportError:  # pragma: no cover - the loader renamed it
        exts = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    names: list[str] = []
    labels: list[int] = []
    if subdirs:
        for label, d in enumerate(subdirs):
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in exts:
                    names.append(f"{d.name}/{f.name}")
                    labels.append(label)
    else:
        names = [f.name for f in sorted(folder.iterdir()) if f.suffix.lower() in exts]
    return names, (labels if subdirs else None), [d.name for d in subdirs]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class _Data:
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

    names, _, folders = _list_images(folder)
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


def _images(args: argparse.Namespace) -> _Data:
    if not args.images.is_dir():
        raise ConfigError(f"{args.images} is not a folder of images")
    folders = sorted(p.name for p in args.images.iterdir() if p.is_dir())
    lm = _label_map(args, folders)
    x, y, names = _load_folder(args.images, args.size, lm)
    fitting = args.fit != "none"
    if not fitting:
        if args.fit_images is not None or args.fit_fraction is not None:
            raise ConfigError("--fit-images and --fit-fraction choose the images of a fit: they need --fit")
        cert = list(range(len(names)))
        data = _Data(x, y, names, lm, split={"mode": "none"})
    elif args.fit_images is not None:
        if args.fit_fraction is not None:
            raise ConfigError("give --fit-images or --fit-fraction, not both")
        if not args.fit_images.is_dir():
            raise ConfigError(f"--fit-images {args.fit_images} is not a folder of images")
        fx, fy, fnames = _load_folder(args.fit_images, args.size, lm)
        seen = {_digest(args.images / n): n for n in names}
        both = [(f, seen[h]) for f in fnames if (h := _digest(args.fit_images / f)) in seen]
        if both:
            shown = ", ".join(f"{args.fit_images / f} = {args.images / c}" for f, c in both[:5])
            raise SplitOverlapError(
                f"{len(both)} fit image(s) are also certification images (same content): {shown}"
                f"{' ...' if len(both) > 5 else ''}; remove them from one of the folders")
        cert = list(range(len(names)))
        data = _Data(x, y, names, lm, fx, fy, fnames,
                     split={"mode": "folder", "fit_folder": str(args.fit_images)})
    else:
        frac = 0.5 if args.fit_fraction is None else float(args.fit_fraction)
        if not 0.0 < frac < 1.0:
            raise InvalidParameterError(f"--fit-fraction must be strictly between 0 and 1, got {frac:g}")
        fit_idx, cert = _split(args.images, names, frac, args.split_seed)
        data = _Data(x, y, names, lm, x[fit_idx], None if y is None else [y[i] for i in fit_idx],
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
        groups.setdefault(_digest(folder / n), []).append(i)
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


def _fit_config(args: argparse.Namespace) -> Any:
    from blackbox_rs.fitting.config import FitConfig

    steps = {} if args.fit_steps is None else {"steps": args.fit_steps, "pretrain_steps": args.fit_steps}
    try:
        return FitConfig(strategy=args.fit, **steps)
    except ValueError as exc:
        raise ConfigError(f"invalid fit settings: {' '.join(str(exc).split())}") from None


def _fit_queries(args: argparse.Namespace, n_fit: int) -> int:
    """Most queries the fit may spend: its ``--fit-budget``, or the strategy's own query cost (the
    command line's estimate) when no budget is given."""
    if args.fit in ("none", "denoise"):
        return 0
    # one estimate for the CLI and the recipes
    from blackbox_rs.fitting.strategies import estimate_fit_queries

    return int(estimate_fit_queries(_fit_config(args), n_fit, args.fit_budget))


def _estimate(recipe: Recipe, args: argparse.Namespace, data: _Data) -> dict[str, Any]:
    spec = recipe.connector.spec
    batch = spec.max_batch
    n_images, labelled = int(data.x.shape[0]), data.y is not None
    per_image = (0 if labelled else 1) + args.n0 + args.n
    requests = n_images * ((0 if labelled else 1) + math.ceil(args.n0 / batch) + math.ceil(args.n / batch))
    n_fit = 0 if data.fit_names is None else len(data.fit_names)
    fit = _fit_queries(args, n_fit)
    queries = n_images * per_image + fit
    requests += math.ceil(fit / batch)
    price = spec.price_per_1k if args.price_per_1k is None else args.price_per_1k
    rate = spec.rate_limit if args.rate_limit is None else (args.rate_limit or None)
    return {"vendor": spec.vendor, "images": n_images, "fit_images": n_fit,
            "split": (data.split or {}).get("mode", "none"), "queries_per_image": per_image, "fit_queries": fit,
            "queries": queries, "requests": requests, "rate_limit_per_s": rate,
            "min_duration_s": round(requests / rate, 1) if rate else None,
            "price_per_1k": price, "estimated_cost_usd": round(queries * price / 1000.0, 4)}


def _kwargs(args: argparse.Namespace, lm: Any, spec: Any = None) -> dict[str, Any]:
    """The keyword arguments every vendor connector takes, from the shared flags (``spec``: the
    connector's :class:`VendorSpec`, whose retried statuses a ``--max-attempts`` policy keeps)."""
    kw: dict[str, Any] = {"label_map": lm, "input_shape": (3, args.size, args.size)}
    if args.rate_limit is not None:
        kw["rate_limit"] = args.rate_limit or None
    if args.max_in_flight is not None:
        kw["max_in_flight"] = args.max_in_flight
    if args.price_per_1k is not None:
        kw["price_per_1k"] = args.price_per_1k
    if args.timeout is not None:
        kw["timeout_s"] = args.timeout
    if args.max_attempts is not None:
        kw["retry"] = {"max_attempts": args.max_attempts,
                       **({"retry_statuses": spec.retry_statuses} if hasattr(spec, "retry_statuses") else {})}
    if args.label_depth < 1:
        raise InvalidParameterError(f"--label-depth must be >= 1, got {args.label_depth}")
    kw["label_depth"] = args.label_depth
    return kw


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


# ---- the run -----------------------------------------------------------------------------------------
def _certify(recipe: Recipe, args: argparse.Namespace, data: _Data, out: Path) -> None:
    from blackbox_rs.budget import QueryBudget
    from blackbox_rs.engine import QueryEngine
    from blackbox_rs.reports import write_report
    from blackbox_rs.smoother import BlackBoxSmoother

    lm = data.lm
    connector = recipe.build(args, _kwargs(args, lm, recipe.connector.spec))
    try:
        info = connector.info
        budget = None
        if args.max_queries is not None or args.max_cost is not None:
            budget = QueryBudget(args.max_queries, args.max_cost, ledger=out / "budget_ledger.json")
        engine = QueryEngine(connector, cache=args.cache_dir or out / "cache", budget=budget)
        smoother = BlackBoxSmoother(engine, module=None if args.fit == "none" else args.module, sigma=args.sigma)
        if data.fit_x is not None:
            steps = {} if args.fit_steps is None else {"steps": args.fit_steps, "pretrain_steps": args.fit_steps}
            fit_data = data.fit_x if data.fit_y is None else (data.fit_x, _tensor(data.fit_y))
            rep = smoother.fit(fit_data, strategy=args.fit, budget=args.fit_budget, checkpoint_dir=out / "fit",
                               **steps)
            log.info("fit done on %d image(s): %s", len(data.fit_names or []),
                     rep.model_dump(exclude={"history"}) if hasattr(rep, "model_dump") else rep)

        def progress(i: int, cert: Any) -> None:
            log.info("image %d (%s): prediction %s radius %.3f queries %d", i, data.names[i], cert.prediction,
                     cert.radius, cert.queries)

        seed = {} if args.seed is None else {"seed": args.seed}  # None: the core chooses (or reads it back)
        res = smoother.certify_dataset(
            data.x, data.y, n0=args.n0, n=args.n, alpha=args.alpha, output=out / "certificates.jsonl",
            batch_size=args.batch_size or info.max_batch * info.max_concurrency, progress=progress, **seed)
        unmapped = list(lm.unmapped_counts().items())[:10]
        notes = [f"model: {info.fingerprint}", f"vendor labels mapped to 'other' (top 10): {unmapped}",
                 _split_note(data)]
        files = write_report({recipe.name: res}, out, title=f"{recipe.connector.spec.vendor}: certified accuracy",
                             notes=notes)
        log.info("transport: %s", connector.transport_stats() if hasattr(connector, "transport_stats") else {})
        acc = ", ".join(f"r={r}: {a:.2f}" for r, a in res.certified_accuracy.items())
        print(f"{len(res.certificates)} images certified ({res.queries} queries charged, {res.cache_hits} from "
              f"the cache); certified accuracy {acc}; report: {files.summary}")
    finally:
        connector.close()


def _split_note(data: _Data) -> str:
    if data.fit_names is None:
        return f"images: all {len(data.names)} certified, none used for fitting (split.json)"
    return (f"images: fitted on {len(data.fit_names)}, certified {len(data.names)} other image(s); the two sets "
            f"are disjoint (files listed in split.json)")


def _write_split(data: _Data, out: Path) -> None:
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


def _tensor(y: Any) -> Any:
    import torch

    return torch.tensor(y, dtype=torch.int64)


def run(recipe: Recipe, argv: Sequence[str] | None = None) -> int:
    """Run ``recipe`` with command-line ``argv``; return the exit code (:mod:`blackbox_rs.exit_codes`)."""
    args = _parser(recipe).parse_args(argv)
    handler: logging.Handler | None = None
    out: Path = args.out
    try:
        from blackbox_rs.core import check_certifiable

        check_certifiable(args.n, args.alpha, args.sigma)
        data = _images(args)
        _kwargs(args, data.lm, recipe.connector.spec)  # refuse bad connector settings before anything is written
        est = _estimate(recipe, args, data)
        if args.dry_run:
            print(json.dumps({"dry_run": True, **est}, indent=1))
            return exit_codes.OK
        fit = f", fit on {est['fit_images']} other image(s)" if data.fit_names is not None else ""
        print(f"{est['vendor']}: {est['images']} images{fit}, {est['queries']:,} queries in ~{est['requests']:,} "
              f"requests, estimated cost ${est['estimated_cost_usd']:g}", flush=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"output folder {out} is not writable: {exc.strerror or exc}") from None
        _write_split(data, out)
        handler = logging.FileHandler(out / "run.log")
        handler.addFilter(_Redact())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.info("split (%s): fit on %d image(s) %s; certify %d image(s) %s", (data.split or {}).get("mode"),
                 len(data.fit_names or []), data.fit_names or [], len(data.names), data.names)
        _certify(recipe, args, data, out)
        return exit_codes.OK
    except (BlackBoxRSError, KeyboardInterrupt) as exc:
        code, line = exit_codes.classify(exc)
        if code in (exit_codes.BUDGET_SPENT, exit_codes.QUOTA_EXHAUSTED, exit_codes.SERVICE_FAILURE,
                    exit_codes.INTERRUPTED):
            jsonl = out / "certificates.jsonl"
            line += f" [{_finished(jsonl)} certificate(s) kept in {jsonl}]"
        sys.stderr.write(line + "\n")
        return code
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _finished(path: Path) -> int:
    """Certificates in a journal (its header line, if any, and a torn last line do not count)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, ValueError):
        return 0
    n = 0
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        n += isinstance(rec, dict) and "blackbox_rs_journal" not in rec
    return n
