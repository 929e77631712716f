"""Certify a model served by TorchServe (token auth on by default): the script form of ``blackbox-rs api torchserve``.

    python recipes/torchserve.py [certify|labels|check-encoding] IMAGES_FOLDER [flags]

The same flags, defaults, cost estimates and exit codes as ``blackbox-rs api torchserve`` (``--help`` lists
them; see docs/recipes.md). Credentials come from the environment (TORCHSERVE_TOKEN) and are never
written anywhere.
"""

from __future__ import annotations

import sys

from blackbox_rs.api import main as api_main

VENDOR = "torchserve"


def main(argv: list[str] | None = None) -> int:
    """Run the vendor front door with ``argv`` (default: the script's arguments); return the exit code."""
    return api_main(VENDOR, argv)


if __name__ == "__main__":
    sys.exit(main())
