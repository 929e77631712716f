"""Certify a model served by TensorFlow Serving (REST :predict, b64 image bytes): the script form of ``blackbox-rs api tf-serving``.

    python recipes/tf_serving.py [certify|labels|check-encoding] IMAGES_FOLDER [flags]

The same flags, defaults, cost estimates and exit codes as ``blackbox-rs api tf-serving`` (``--help`` lists
them; see docs/recipes.md). Credentials come from the environment (none) and are never
written anywhere.
"""

from __future__ import annotations

import sys

from blackbox_rs.api import main as api_main

VENDOR = "tf-serving"


def main(argv: list[str] | None = None) -> int:
    """Run the vendor front door with ``argv`` (default: the script's arguments); return the exit code."""
    return api_main(VENDOR, argv)


if __name__ == "__main__":
    sys.exit(main())
