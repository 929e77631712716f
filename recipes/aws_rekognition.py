"""Certify AWS Rekognition DetectLabels (SigV4-signed; no botocore needed).

    python recipes/aws_rekognition.py IMAGES_FOLDER [--labels a,b] [--label-map map.json] [--dry-run] [--out DIR]

Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION) and are never written anywhere.
See recipes/_common.py for the shared flags, the output folder and the exit codes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import Recipe, run

from blackbox_rs.connectors.aws_rekognition import RekognitionConnector


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", help="AWS region (default $AWS_REGION, else us-east-1)")
    p.add_argument("--max-labels", type=int, default=50)
    p.add_argument("--min-confidence", type=float, default=20.0, help="0-100 (the server's default is 55)")


def build(args: argparse.Namespace, kw: dict[str, Any]) -> RekognitionConnector:
    return RekognitionConnector(args.region, base_url=args.base_url, max_labels=args.max_labels,
                                min_confidence=args.min_confidence, **kw)


RECIPE = Recipe(name="aws-rekognition", connector=RekognitionConnector, build=build, env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION"),
                add_arguments=add_arguments, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
