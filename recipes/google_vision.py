"""Certify Google Cloud Vision LABEL_DETECTION (batches of 16 images per request).

    python recipes/google_vision.py IMAGES_FOLDER [--labels a,b] [--label-map map.json] [--dry-run] [--out DIR]

Credentials come from the environment (GOOGLE_API_KEY) and are never written anywhere.
See recipes/_common.py for the shared flags, the output folder and the exit codes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import Recipe, run

from blackbox_rs.connectors.google_vision import GoogleVisionConnector
from blackbox_rs.connectors.http import Auth


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-results", type=int, default=20,
                   help="labels per image (maxResults); only matters with --label-depth > 1, since by default only "
                        "the top label is used")


def build(args: argparse.Namespace, kw: dict[str, Any]) -> GoogleVisionConnector:
    return GoogleVisionConnector(base_url=args.base_url or "https://vision.googleapis.com",
                                 auth=Auth.query("key", "GOOGLE_API_KEY"), max_results=args.max_results, **kw)


RECIPE = Recipe(name="google-vision", connector=GoogleVisionConnector, build=build, env=("GOOGLE_API_KEY",),
                add_arguments=add_arguments, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
