"""Certify an OpenAI-compatible vision chat model used as a zero-shot classifier over the task's labels.

    python recipes/openai_chat.py IMAGES_FOLDER [--labels a,b] [--label-map map.json] [--dry-run] [--out DIR]

Credentials come from the environment (OPENAI_API_KEY) and are never written anywhere.
See recipes/_common.py for the shared flags, the output folder and the exit codes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import Recipe, run

from blackbox_rs.connectors.http import Auth
from blackbox_rs.connectors.openai_chat import OpenAIChatConnector


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gpt-4o-mini")
    p.add_argument("--detail", default="low", choices=["low", "high", "auto"])
    p.add_argument("--key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--api-key-header", action="store_true", help="send it as 'api-key' (Azure OpenAI)")


def build(args: argparse.Namespace, kw: dict[str, Any]) -> OpenAIChatConnector:
    auth = Auth.header("api-key", args.key_env) if args.api_key_header else Auth.bearer(args.key_env)
    return OpenAIChatConnector(args.model, base_url=args.base_url or "https://api.openai.com", detail=args.detail,
                               auth=auth, **kw)


RECIPE = Recipe(name="openai-chat", connector=OpenAIChatConnector, build=build, env=("OPENAI_API_KEY",),
                add_arguments=add_arguments, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
