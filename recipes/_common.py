"""What every hosted-API recipe shares: arguments, image folder, label map, dry run, optional fit,
certification with JSONL resume, report, and one-line errors.

A recipe is a :class:`Recipe`: a name, its connector class (whose ``spec`` gives the vendor's rate
limit, batch size and list price), the environment variables it reads, and a ``build`` function
that makes the connector from the parsed arguments and the shared keyword arguments.

Flow of :func:`run`: images (a folder with one sub-folder per class, or a flat folder) -> task
labels (``--labels`` or the sub-folder names) + ``--label-map`` synonyms (``other`` catches the
rest) -> estimate (queries, requests, time at the rate limit, cost; ``--dry-run`` stops here and
sends nothing) -> optional ``--fit`` -> certify every image, each certificate appended to
``OUT/certificates.jsonl`` as soon as it is final -> ``write_report`` into ``OUT``.

Exit codes: 0 done; 2 a user error (one line on stderr, no traceback); 3 stopped by the vendor's
quota or by ``--max-queries`` / ``--max-cost``: progress is kept, rerun the same command to resume
(answered queries come from the cache); 130 interrupted. Credentials are read from the environment
only and are never printed, logged or written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blackbox_rs.errors import BlackBoxRSError, BudgetExceeded, ConfigError, QuotaExhausted
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
        raise SystemExit(2)


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
    p.add_argument("--limit", type=int, help="certify only the first LIMIT images")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="noisy images per engine call (default: batch x in-flight)")
    p.add_argument("--fit", choices=["none", "denoise", "surrogate", "zeroth_order"], default="none",
                   help="fit an input module first (denoise: no queries)")
    p.add_argument("--module", default="dncnn", help="input module to fit")
    p.add_argument("--fit-budget", type=int, help="most queries the fit may spend")
    p.add_argument("--fit-steps", type=int, help="module optimisation steps (and pretraining steps)")
    p.add_argument("--max-queries", type=int, help="hard limit on charged queries (all runs, ledger in OUT)")
    p.add_argument("--max-cost", type=float, help="hard limit on estimated spend in USD")
    p.add_argument("--base-url", help="send requests here instead of the vendor's endpoint")
    p.add_argument("--rate-limit", type=float, help=f"requests/s, 0 = no limit (default {rate})")
    p.add_argument("--max-in-flight", type=int, help=f"concurrent requests (default {spec.max_in_flight})")
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


def _images(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from blackbox_rs.data_files import load_images

    if not args.images.is_dir():
        raise ConfigError(f"{args.images} is not a folder of images")
    folders = sorted(p.name for p in args.images.iterdir() if p.is_dir())
    lm = _label_map(args, folders)
    x, y = load_images(args.images, (3, args.size, args.size), limit=args.limit)
    if y is not None:  # sub-folder index -> task class index
        missing = [f for f in folders if f not in lm.class_names]
        if missing:
            raise ConfigError(f"image folders {missing} are not task labels {list(lm.class_names)}")
        idx = [lm.class_names.index(f) for f in folders]
        y = [idx[int(v)] for v in y]
    return x, y, lm


def _estimate(recipe: Recipe, args: argparse.Namespace, n_images: int, labelled: bool) -> dict[str, Any]:
    spec = recipe.connector.spec
    batch = spec.max_batch
    per_image = (0 if labelled else 1) + args.n0 + args.n
    requests = n_images * ((0 if labelled else 1) + math.ceil(args.n0 / batch) + math.ceil(args.n / batch))
    fit = 0 if args.fit in ("none", "denoise") else int(args.fit_budget or 0)
    queries = n_images * per_image + fit
    requests += math.ceil(fit / batch)
    price = spec.price_per_1k if args.price_per_1k is None else args.price_per_1k
    rate = spec.rate_limit if args.rate_limit is None else (args.rate_limit or None)
    return {"vendor": spec.vendor, "images": n_images, "queries_per_image": per_image, "fit_queries": fit,
            "queries": queries, "requests": requests, "rate_limit_per_s": rate,
            "min_duration_s": round(requests / rate, 1) if rate else None,
            "price_per_1k": price, "estimated_cost_usd": round(queries * price / 1000.0, 4)}


def _kwargs(args: argparse.Namespace, lm: Any) -> dict[str, Any]:
    kw: dict[str, Any] = {"label_map": lm, "input_shape": (3, args.size, args.size)}
    if args.rate_limit is not None:
        kw["rate_limit"] = args.rate_limit or None
    if args.max_in_flight is not None:
        kw["max_in_flight"] = args.max_in_flight
    if args.price_per_1k is not None:
        kw["price_per_1k"] = args.price_per_1k
    return kw


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


# ---- the run -----------------------------------------------------------------------------------------
def _certify(recipe: Recipe, args: argparse.Namespace, x: Any, y: Any, lm: Any, out: Path) -> None:
    from blackbox_rs.budget import QueryBudget
    from blackbox_rs.engine import QueryEngine
    from blackbox_rs.reports import write_report
    from blackbox_rs.smoother import BlackBoxSmoother

    connector = recipe.build(args, _kwargs(args, lm))
    try:
        info = connector.info
        budget = None
        if args.max_queries is not None or args.max_cost is not None:
            budget = QueryBudget(args.max_queries, args.max_cost, ledger=out / "budget_ledger.json")
        engine = QueryEngine(connector, cache=args.cache_dir or out / "cache", budget=budget,
                             max_in_flight=info.max_concurrency)
        smoother = BlackBoxSmoother(engine, module=None if args.fit == "none" else args.module, sigma=args.sigma)
        if args.fit != "none":
            steps = {} if args.fit_steps is None else {"steps": args.fit_steps, "pretrain_steps": args.fit_steps}
            data = x if y is None else (x, _tensor(y))
            rep = smoother.fit(data, strategy=args.fit, budget=args.fit_budget, checkpoint_dir=out / "fit", **steps)
            log.info("fit done: %s", rep.model_dump(exclude={"history"}) if hasattr(rep, "model_dump") else rep)

        def progress(i: int, cert: Any) -> None:
            log.info("image %d: prediction %s radius %.3f queries %d", i, cert.prediction, cert.radius, cert.queries)

        res = smoother.certify_dataset(
            x, y, n0=args.n0, n=args.n, alpha=args.alpha, seed=args.seed, output=out / "certificates.jsonl",
            batch_size=args.batch_size or info.max_batch * info.max_concurrency, progress=progress)
        unmapped = list(lm.unmapped_counts().items())[:10]
        notes = [f"model: {info.fingerprint}", f"vendor labels mapped to 'other' (top 10): {unmapped}"]
        files = write_report({recipe.name: res}, out, title=f"{recipe.connector.spec.vendor}: certified accuracy",
                             notes=notes)
        log.info("transport: %s", connector.transport_stats() if hasattr(connector, "transport_stats") else {})
        acc = ", ".join(f"r={r}: {a:.2f}" for r, a in res.certified_accuracy.items())
        print(f"{len(res.certificates)} images certified ({res.queries} queries charged, {res.cache_hits} from "
              f"the cache); certified accuracy {acc}; report: {files.summary}")
    finally:
        connector.close()


def _tensor(y: Any) -> Any:
    import torch

    return torch.tensor(y, dtype=torch.int64)


def run(recipe: Recipe, argv: Sequence[str] | None = None) -> int:
    """Run ``recipe`` with command-line ``argv``; return the exit code (see the module docstring)."""
    args = _parser(recipe).parse_args(argv)
    handler: logging.Handler | None = None
    out: Path = args.out
    try:
        from blackbox_rs.certify import check_certifiable

        check_certifiable(args.n, args.alpha, args.sigma)
        x, y, lm = _images(args)
        est = _estimate(recipe, args, int(x.shape[0]), y is not None)
        if args.dry_run:
            print(json.dumps({"dry_run": True, **est}, indent=1))
            return 0
        print(f"{est['vendor']}: {est['images']} images, {est['queries']:,} queries in ~{est['requests']:,} "
              f"requests, estimated cost ${est['estimated_cost_usd']:g}", flush=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"output folder {out} is not writable: {exc.strerror or exc}") from None
        handler = logging.FileHandler(out / "run.log")
        handler.addFilter(_Redact())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        _certify(recipe, args, x, y, lm, out)
        return 0
    except (QuotaExhausted, BudgetExceeded) as exc:
        done = _finished(out / "certificates.jsonl")
        what = "the vendor's quota is exhausted" if isinstance(exc, QuotaExhausted) else "the query budget is spent"
        sys.stderr.write(f"stopped: {what} ({_one_line(exc)}); {done} certificate(s) kept in {out / 'certificates.jsonl'}; "
                         f"run the same command again to resume\n")
        return 3
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: progress is saved; run the same command again to resume\n")
        return 130
    except BlackBoxRSError as exc:
        sys.stderr.write(f"error: {_one_line(exc)}\n")
        return 2
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _one_line(exc: BaseException) -> str:
    return " ".join(redact(exc).split())


def _finished(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0
