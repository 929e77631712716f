"""Certify a Hugging Face image classifier (serverless Inference Providers or a dedicated Inference Endpoint): the script form of ``blackbox-rs api huggingface``.

    python recipes/huggingface.py [certify|labels|check-encoding] IMAGES_FOLDER [flags]

The same flags, defaults, cost estimates and exit codes as ``blackbox-rs api huggingface`` (``--help`` lists
them; see docs/recipes.md). Credentials come from the environment (HF_TOKEN) and are never
written anywhere.
"""

from __future__ import annotations

import sys

from blackbox_rs.api import main as api_main

VENDOR = "huggingface"


def main(argv: list[str] | None = None) -> int:
    """Run the vendor front door with ``argv`` (default: the script's arguments); return the exit code."""
    return api_main(VENDOR, argv)


if __name__ == "__main__":
    sys.exit(main())
