"""Certify an OpenAI-compatible vision chat model used as a zero-shot classifier over the task's labels: the script form of ``blackbox-rs api openai-chat``.

    python recipes/openai_chat.py [certify|labels|check-encoding] IMAGES_FOLDER [flags]

The same flags, defaults, cost estimates and exit codes as ``blackbox-rs api openai-chat`` (``--help`` lists
them; see docs/recipes.md). Credentials come from the environment (OPENAI_API_KEY (or --key-env)) and are never
written anywhere.
"""

from __future__ import annotations

import sys

from blackbox_rs.api import main as api_main

VENDOR = "openai-chat"


def main(argv: list[str] | None = None) -> int:
    """Run the vendor front door with ``argv`` (default: the script's arguments); return the exit code."""
    return api_main(VENDOR, argv)


if __name__ == "__main__":
    sys.exit(main())
