"""Certify a Clarifai concept model (default: general-image-recognition; 128 images per request).

    python recipes/clarifai.py IMAGES_FOLDER [--labels a,b] [--label-map map.json] [--dry-run] [--out DIR]

Credentials come from the environment (CLARIFAI_PAT) and are never written anywhere.
See recipes/_common.py for the shared flags, the output folder and the exit codes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import Recipe, run

from blackbox_rs.connectors.clarifai import ClarifaiConnector
from blackbox_rs.connectors.http import Auth


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--user-id", default="clarifai")
    p.add_argument("--app-id", default="main")
    p.add_argument("--model-id", default="general-image-recognition")
    p.add_argument("--version-id", help="pin a model version (recommended)")
    p.add_argument("--max-concepts", type=int, default=20)


def build(args: argparse.Namespace, kw: dict[str, Any]) -> ClarifaiConnector:
    return ClarifaiConnector(base_url=args.base_url or "https://api.clarifai.com", auth=Auth.scheme("Key", "CLARIFAI_PAT"),
                             user_id=args.user_id, app_id=args.app_id, model_id=args.model_id,
                             version_id=args.version_id, max_concepts=args.max_concepts, **kw)


RECIPE = Recipe(name="clarifai", connector=ClarifaiConnector, build=build, env=("CLARIFAI_PAT",),
                add_arguments=add_arguments, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
