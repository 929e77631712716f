"""Does the image encoding change the vendor's answer? (``check-encoding``, or ``certify --check-encoding``.)

A lossy encoding (JPEG) is a transform before the model: if it changes the vendor's clean label, the
certificate is about "the vendor after JPEG", and an image whose label flips to ``other`` silently
counts against accuracy. The check queries each clean image twice, as lossless PNG and in the chosen
encoding (counted queries through the run's budget; answers kept in ``OUT/raw_labels.json``), and
reports every image whose top label or task class differs, in ``OUT/encoding_check.json``, the run log
and a warning line on stderr. With ``--encoding png`` there is nothing to compare and nothing is sent.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from blackbox_rs.api.args import echo
from blackbox_rs.api.images import RunImages
from blackbox_rs.api.raw_labels import RawAnswers, query_raw
from blackbox_rs.errors import ConfigError
from blackbox_rs.paths import atomic_write

__all__ = ["check_encoding"]

log = logging.getLogger("blackbox_rs.api")


def check_encoding(vendor: Any, args: argparse.Namespace, data: RunImages, out: Path, budget: Any) -> list[dict[str, Any]]:
    """The images whose answer changes with the encoding (empty: none does, or the encoding is PNG)."""
    from blackbox_rs.api.run import connector_kwargs
    from blackbox_rs.engine import QueryEngine

    if args.encoding == "png":
        echo("encoding check: png is lossless; nothing to compare, nothing sent")
        return []
    store = RawAnswers(out / "raw_labels.json")
    results: dict[str, list[Any]] = {}
    classes: dict[str, list[int]] = {}
    charged = 0
    for enc in ("png", args.encoding):
        connector = vendor.build(args, connector_kwargs(args, data.lm, encoding=enc))
        try:
            engine = QueryEngine(connector, cache=None, budget=budget)
            answers = query_raw(engine, data.x, store)
            classes[enc] = [connector.map_labels([((lab,), s) for lab, s in a]) for a in answers]
            charged += engine.stats.queries
        finally:
            connector.close()
        results[enc] = answers
    names = data.lm.class_names
    flips = []
    for i, (a, b) in enumerate(zip(results["png"], results[args.encoding], strict=True)):
        ta, tb = (a[0][0] if a else None), (b[0][0] if b else None)
        ca, cb = classes["png"][i], classes[args.encoding][i]
        if ta != tb or ca != cb:
            flips.append({"image": data.names[i], "png_top_label": ta, f"{args.encoding}_top_label": tb,
                          "png_class": names[ca], f"{args.encoding}_class": names[cb]})
    quality = args.jpeg_quality if args.jpeg_quality is not None else vendor.connector_class.spec.jpeg_quality
    report = {"encoding": args.encoding, "jpeg_quality": quality, "images": len(data.names),
              "queries_charged": charged, "changed": flips}
    atomic_write(out / "encoding_check.json", json.dumps(report, indent=1), ConfigError)
    for f in flips:
        line = (f"warning: {args.encoding} changes the vendor's clean answer on {f['image']}: png "
                f"{f['png_top_label']!r} ({f['png_class']}) -> {args.encoding} {f[f'{args.encoding}_top_label']!r} "
                f"({f[f'{args.encoding}_class']})")
        log.warning(line)
        sys.stderr.write(line + "\n")
    echo(f"encoding check: {len(flips)} of {len(data.names)} clean answer(s) change with {args.encoding} "
          f"({charged} queries charged); details: {out / 'encoding_check.json'}")
    return flips
