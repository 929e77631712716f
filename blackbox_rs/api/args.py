"""The flags of ``blackbox-rs api <vendor> <action>`` (and of the recipe scripts, which are this command):
one parser per action, the same flags and defaults for every vendor, plus the vendor's own."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from blackbox_rs import defaults, exit_codes

__all__ = ["ACTIONS", "build_parser", "echo"]

#: What the vendor front door does: certify a folder, discover the vendor's raw labels, or check that
#: the image encoding leaves every clean label unchanged.
ACTIONS = ("certify", "labels", "check-encoding")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention too)
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(exit_codes.USER_ERROR)


def _radius(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not r > 0:
        raise argparse.ArgumentTypeError(f"a radius must be > 0, got {text}")
    return r


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return v


def build_parser(vendor: Any, action: str) -> argparse.ArgumentParser:
    """The parser of ``action`` for ``vendor`` (a :class:`~blackbox_rs.api.vendors.Vendor`)."""
    spec = vendor.connector_class.spec
    rate = f"{spec.rate_limit:g} requests/s" if spec.rate_limit else "none"
    what = {"certify": "certify", "labels": "list the raw labels", "check-encoding": "check the encoding"}[action]
    p = _Parser(prog=f"blackbox-rs api {vendor.name} {action}",
                description=f"{vendor.description or spec.vendor}: {what} on a folder of images.",
                epilog=f"environment: {', '.join(vendor.env) or 'none'}; vendor defaults: {spec.max_batch} "
                       f"image(s)/request, rate limit {rate}, ${spec.price_per_1k:g} per 1,000 images. Exit codes: 0 "
                       "done, 2 user error, 3 budget spent (rerun with a larger budget), 4 vendor quota (wait, "
                       "rerun to resume), 5 service failure after retries (rerun to resume), 130 interrupted.")
    p.add_argument("images", type=Path, help="folder of images (one sub-folder per class, or flat)")
    p.add_argument("--labels", help="comma-separated task labels (default: the sub-folder names)")
    p.add_argument("--label-map", type=Path, help="JSON: {class: [vendor labels]} or a LabelMap dict "
                   "(`labels` writes a proposal)")
    p.add_argument("--out", type=Path, default=Path(f"runs/{vendor.name}"), help="report and progress folder")
    p.add_argument("--cache-dir", type=Path, help="query cache (default: OUT/cache)")
    p.add_argument("--size", type=_positive, default=224, help="images are resized to SIZE x SIZE")
    p.add_argument("--limit", type=_positive, help="use only the first LIMIT (certification) images")
    g = p.add_argument_group("encoding")
    g.add_argument("--encoding", choices=["png", "jpeg"], default="png",
                   help="how images travel: png (lossless, default) or jpeg (smaller requests; may change the "
                        "vendor's answer: see `check-encoding`)")
    g.add_argument("--jpeg-quality", type=int, help=f"with --encoding jpeg (default {spec.jpeg_quality})")
    if action == "certify":
        g.add_argument("--check-encoding", action="store_true",
                       help="before certifying, query each clean image as PNG and in the chosen encoding (counted "
                            "queries) and warn when a label changes")
        _certify_args(p)
    b = p.add_argument_group("budget and transport")
    b.add_argument("--max-queries", type=int, help="hard limit on charged queries (all runs, ledger in OUT)")
    b.add_argument("--max-cost", type=float, help="hard limit on estimated spend in USD")
    b.add_argument("--base-url", help="send requests here instead of the vendor's endpoint")
    b.add_argument("--rate-limit", type=float, help=f"requests/s, 0 = no limit (default {rate})")
    b.add_argument("--max-in-flight", type=int, help=f"concurrent requests (default {spec.max_in_flight})")
    b.add_argument("--timeout", type=float, help="seconds to wait for each answer (default 30)")
    b.add_argument("--max-attempts", type=int, help="attempts per request, retries included (default 6)")
    b.add_argument("--label-depth", type=int, default=1,
                   help="how many of the vendor's ranked labels are searched for a task label (default 1: the "
                        "vendor's top answer only)")
    b.add_argument("--price-per-1k", type=float, help=f"USD per 1,000 images (default {spec.price_per_1k:g})")
    p.add_argument("--dry-run", action="store_true", help="print queries, cost and time; send nothing, write nothing")
    if vendor.add_arguments is not None:
        vendor.add_arguments(p.add_argument_group(f"{spec.vendor}"))
    return p


def _certify_args(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("certification")
    c.add_argument("--method", choices=["sequential", "cohen"], default="sequential",
                   help="sequential (default): the anytime-valid test at --radius, which stops as soon as the "
                        "evidence allows; cohen: Cohen's CERTIFY with fixed --n0/--n (a radius per image)")
    c.add_argument("--radius", type=_radius, action="append",
                   help=f"sequential: radius to certify (repeat for several; default "
                        f"{', '.join(f'{r:g}' for r in defaults.RADII_HOSTED)})")
    c.add_argument("--max-queries-per-image", type=int, default=defaults.SEQ_MAX_QUERIES_HOSTED,
                   help=f"sequential: per-image cap (default {defaults.SEQ_MAX_QUERIES_HOSTED:,}, Cohen's cost at "
                        f"n={defaults.N_HOSTED:,})")
    c.add_argument("--futility", type=float, default=defaults.FUTILITY,
                   help=f"sequential: give up early (no claim) on an image that cannot reach the radius (default "
                        f"{defaults.FUTILITY:g}; 0 = never)")
    c.add_argument("--sigma", type=float, default=0.25)
    c.add_argument("--n0", type=int, help=f"selection samples (default {defaults.SEQ_N0} sequential, "
                                          f"{defaults.N0} cohen)")
    c.add_argument("--n", type=int, default=defaults.N_HOSTED,
                   help=f"cohen: estimation samples (default {defaults.N_HOSTED:,}: hosted APIs charge per query)")
    c.add_argument("--alpha", type=float, default=defaults.ALPHA)
    c.add_argument("--seed", type=int, default=None,
                   help="noise seed (default: a fresh random seed, recorded in certificates.jsonl; give one for "
                        "reproducible benchmarks)")
    c.add_argument("--batch-size", type=int, help="noisy images per engine call (default: batch x in-flight)")
    f = p.add_argument_group("fitting (an input module in front of the vendor, fitted on other images)")
    f.add_argument("--fit", choices=["none", "denoise", "surrogate", "zeroth_order"], default="none",
                   help="fit an input module first (denoise: no queries)")
    f.add_argument("--module", default=defaults.MODULE_HOSTED,
                   help=f"input module to fit (default {defaults.MODULE_HOSTED}: works at reduced resolution, "
                        "practical on a CPU at 224x224)")
    f.add_argument("--module-config", help="JSON object of the module's settings (e.g. '{\"factor\": 4}')")
    f.add_argument("--fit-budget", type=int,
                   help="most queries the fit may spend (default: the strategy's own query cost)")
    f.add_argument("--fit-steps", type=int, default=defaults.FIT_STEPS_HOSTED,
                   help=f"module optimisation steps, and as many MSE pretraining steps first (default "
                        f"{defaults.FIT_STEPS_HOSTED}: the documented large-input fit, docs/large-inputs.md)")
    f.add_argument("--fit-batch-size", type=int, default=defaults.FIT_BATCH_HOSTED,
                   help=f"clean images per fit step (default {defaults.FIT_BATCH_HOSTED})")
    f.add_argument("--max-fit-minutes", type=float, default=60.0,
                   help="refuse a fit whose measured time estimate exceeds this (default 60; the dry run shows it)")
    f.add_argument("--fit-fraction", type=float,
                   help="with --fit: share of IMAGES held out for fitting, the rest is certified (default 0.5; "
                        "a seeded permutation, listed in OUT/split.json)")
    f.add_argument("--fit-images", type=Path,
                   help="with --fit: fit on this folder instead and certify every image of IMAGES (a fit image "
                        "that is also a certification image is refused)")
    f.add_argument("--split-seed", type=int, default=0, help="seed of the --fit-fraction permutation (default 0)")


def echo(line: str = "") -> None:
    """One line of the command's own output on stdout (the command line's, never the library's)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
