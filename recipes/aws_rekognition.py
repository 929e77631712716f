"""Certify AWS Rekognition DetectLabels (SigV4-signed; no botocore needed): the script form of ``blackbox-rs api aws-rekognition``.

    python recipes/aws_rekognition.py [certify|labels|check-encoding] IMAGES_FOLDER [flags]

The same flags, defaults, cost estimates and exit codes as ``blackbox-rs api aws-rekognition`` (``--help`` lists
them; see docs/recipes.md). Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION) and are never
written anywhere.
"""

from __future__ import annotations

import sys

from blackbox_rs.api import main as api_main

VENDOR = "aws-rekognition"


def main(argv: list[str] | None = None) -> int:
    """Run the vendor front door with ``argv`` (default: the script's arguments); return the exit code."""
    return api_main(VENDOR, argv)


if __name__ == "__main__":
    sys.exit(main())
