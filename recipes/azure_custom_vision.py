"""Certify an Azure Custom Vision classifier (published iteration, nostore): the script form of ``blackbox-rs api azure-custom-vision``.

    python recipes/azure_custom_vision.py [certify|labels|check-encoding] IMAGES_FOLDER [flags]

The same flags, defaults, cost estimates and exit codes as ``blackbox-rs api azure-custom-vision`` (``--help`` lists
them; see docs/recipes.md). Credentials come from the environment (AZURE_CUSTOM_VISION_KEY, AZURE_CUSTOM_VISION_ENDPOINT) and are never
written anywhere.
"""

from __future__ import annotations

import sys

from blackbox_rs.api import main as api_main

VENDOR = "azure-custom-vision"


def main(argv: list[str] | None = None) -> int:
    """Run the vendor front door with ``argv`` (default: the script's arguments); return the exit code."""
    return api_main(VENDOR, argv)


if __name__ == "__main__":
    sys.exit(main())
