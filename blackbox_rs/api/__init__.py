"""The vendor front door: ``blackbox-rs api <vendor> <action> IMAGES [flags]`` (the recipe scripts in
``recipes/`` are this command). Actions: ``certify`` (the default), ``labels`` (discover the vendor's raw
labels and propose a label map), ``check-encoding``.

Every vendor takes the same flags, defaults, exit codes (:mod:`blackbox_rs.exit_codes`: 0 done; 2 a
user error, one line on stderr; 3 the budget is spent: rerun with a larger budget; 4 the vendor's
quota: wait, then rerun to resume; 5 a service failure after retries: rerun to resume; 130
interrupted) and cost estimates (``--dry-run`` sends nothing and writes nothing). Finished
certificates are always kept, and the reason a run stopped is written to ``OUT/run.log``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blackbox_rs import exit_codes
from blackbox_rs.errors import BlackBoxRSError, ConfigError

if TYPE_CHECKING:
    from blackbox_rs.api.vendors import Vendor

__all__ = ["main"]

log = logging.getLogger("blackbox_rs.api")


def main(vendor: str, argv: Sequence[str] | None = None) -> int:
    """Run ``blackbox-rs api VENDOR [ACTION] ...`` with ``argv`` (after the vendor name); return the exit
    code. The action defaults to ``certify`` when ``argv`` does not start with one."""
    from blackbox_rs.api.args import ACTIONS, build_parser
    from blackbox_rs.api.vendors import get_vendor

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        v = get_vendor(vendor)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return exit_codes.USER_ERROR
    action = argv.pop(0) if argv and argv[0] in ACTIONS else "certify"
    try:
        args = build_parser(v, action).parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad flag (2, one line already on stderr)
        return int(exc.code or 0)
    if action != "certify":  # the flags only certify has
        args.fit, args.method, args.check_encoding, args.fit_images, args.fit_fraction = "none", "", False, None, None
    return _run(v, action, args)


def _run(vendor: Vendor, action: str, args: argparse.Namespace) -> int:
    from blackbox_rs.api.args import echo
    from blackbox_rs.api.images import load_run_images, write_split
    from blackbox_rs.api.run import connector_kwargs, estimate, fit_time, open_budget
    from blackbox_rs.redact import redact

    handler: logging.Handler | None = None
    out: Path = args.out
    try:
        if action == "certify" and args.method == "cohen":
            from blackbox_rs.core import check_certifiable

            check_certifiable(args.n, args.alpha, args.sigma)
        data = load_run_images(args, fitting=args.fit != "none", discovering=action == "labels")
        connector_kwargs(args, data.lm)  # bad settings fail before anything is written
        if action == "certify":
            est = estimate(vendor, args, data)
            timing = fit_time(vendor, args, data, len(data.lm.class_names))
            if timing is not None:
                limit = 60.0 * args.max_fit_minutes
                est["fit_time"] = {**timing.model_dump(mode="json"), "limit_s": limit,
                                   "within_limit": timing.total_seconds <= limit}
            if args.dry_run:
                echo(json.dumps({"dry_run": True, **est}, indent=1))  # stdout: JSON only
                if timing is not None:
                    sys.stderr.write(timing.summary() + "\n")
                return exit_codes.OK
            _say_estimate(est, data)
            if timing is not None:
                from blackbox_rs.fitting.timing import check_fit_time

                echo(timing.summary())
                check_fit_time(timing, limit)  # FitTooSlowError (exit 2) names the estimate and the cures
        elif args.dry_run:
            per = 1 if action == "labels" else (0 if args.encoding == "png" else 2)
            echo(json.dumps({"dry_run": True, "action": action, "images": len(data.names),
                              "queries_at_most": per * len(data.names)}, indent=1))
            return exit_codes.OK
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"output folder {out} is not writable: {exc.strerror or exc}") from None
        handler = _log_to(out / "run.log", redact)
        if action == "certify":
            from blackbox_rs.api.run import certify_action

            write_split(data, out)
            log.info("split (%s): fit on %d image(s) %s; certify %d image(s) %s", (data.split or {}).get("mode"),
                     len(data.fit_names or []), data.fit_names or [], len(data.names), data.names)
            certify_action(vendor, args, data, out)
        elif action == "labels":
            from blackbox_rs.api.labels import discover_labels

            discover_labels(vendor, args, data, out, open_budget(args, out))
        else:
            from blackbox_rs.api.encoding_check import check_encoding

            check_encoding(vendor, args, data, out, open_budget(args, out))
        log.info("done: %s", action)
        return exit_codes.OK
    except (BlackBoxRSError, KeyboardInterrupt) as exc:
        code, line = exit_codes.classify(exc)
        if code in (exit_codes.BUDGET_SPENT, exit_codes.QUOTA_EXHAUSTED, exit_codes.SERVICE_FAILURE,
                    exit_codes.INTERRUPTED) and action == "certify":
            jsonl = out / "certificates.jsonl"
            line += f" [{_finished(jsonl)} certificate(s) kept in {jsonl}]"
        if handler is not None:
            log.error("stopped (exit %d): %s", code, line)
        sys.stderr.write(line + "\n")
        return code
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def _say_estimate(est: dict[str, Any], data: Any) -> None:
    from blackbox_rs.api.args import echo

    fit = f", fit on {est['fit_images']} other image(s)" if getattr(data, "fit_names", None) is not None else ""
    agree = (f" (~{est['queries_if_all_agree']:,} if every sample agrees, ${est['estimated_cost_if_all_agree_usd']:g})"
             if "queries_if_all_agree" in est else "")
    echo(f"{est['vendor']}: {est['images']} images{fit}, {est['method']}, {est['encoding']}: at most "
          f"{est['queries']:,} queries in ~{est['requests']:,} requests, at most ${est['estimated_cost_usd']:g}{agree}")


def _log_to(path: Path, redact: Callable[[str], str]) -> logging.Handler:
    class _Redact(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.msg, record.args = redact(record.getMessage()), None
            return True

    handler = logging.FileHandler(path)
    handler.addFilter(_Redact())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _finished(path: Path) -> int:
    """Certificates in a journal (its header, progress records and a torn last line do not count)."""
    from blackbox_rs.reports import load_certificates

    try:
        return len(load_certificates(path))
    except BlackBoxRSError:
        return 0
