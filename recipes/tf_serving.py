"""Certify a model served by TensorFlow Serving (REST :predict, b64 image bytes).

    python recipes/tf_serving.py IMAGES_FOLDER [--labels a,b] [--label-map map.json] [--dry-run] [--out DIR]

Credentials come from the environment (none) and are never written anywhere.
See recipes/_common.py for the shared flags, the output folder and the exit codes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import Recipe, run

from blackbox_rs.connectors.tf_serving import TFServingConnector


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name on the server")
    p.add_argument("--model-version")
    p.add_argument("--signature-name")
    p.add_argument("--input-key", default="image_bytes", help="instance key holding {b64: ...}; '' = none")
    p.add_argument("--vocabulary", help="comma-separated class names of the model's score vector")


def build(args: argparse.Namespace, kw: dict[str, Any]) -> TFServingConnector:
    vocab = args.vocabulary.split(",") if args.vocabulary else None
    return TFServingConnector(args.model, base_url=args.base_url or "http://127.0.0.1:8501",
                              model_version=args.model_version, signature_name=args.signature_name,
                              input_key=args.input_key or None, vocabulary=vocab, **kw)


RECIPE = Recipe(name="tf-serving", connector=TFServingConnector, build=build, env=(),
                add_arguments=add_arguments, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
