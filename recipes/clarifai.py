"""Certify a Clarifai concept model (default: general-image-recognition; 128 images per request): the script form of ``blackbox-rs api clarifai``.

    python recipes/clarifai.py [certify|labels|check-encoding] IMAGES_FOLDER [flags]

The same flags, defaults, cost estimates and exit codes as ``blackbox-rs api clarifai`` (``--help`` lists
them; see docs/recipes.md). Credentials come from the environment (CLARIFAI_PAT) and are never
written anywhere.
"""

from __future__ import annotations

import sys

from blackbox_rs.api import main as api_main

VENDOR = "clarifai"


def main(argv: list[str] | None = None) -> int:
    """Run the vendor front door with ``argv`` (default: the script's arguments); return the exit code."""
    return api_main(VENDOR, argv)


if __name__ == "__main__":
    sys.exit(main())
