"""Certify a model served by TorchServe (token auth on by default).

    python recipes/torchserve.py IMAGES_FOLDER [--labels a,b] [--label-map map.json] [--dry-run] [--out DIR]

Credentials come from the environment (TORCHSERVE_TOKEN) and are never written anywhere.
See recipes/_common.py for the shared flags, the output folder and the exit codes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import Recipe, run

from blackbox_rs.connectors.http import Auth
from blackbox_rs.connectors.torchserve import TorchServeConnector


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name on the server")
    p.add_argument("--model-version")
    p.add_argument("--no-auth", action="store_true", help="the server runs with --disable-token-auth")


def build(args: argparse.Namespace, kw: dict[str, Any]) -> TorchServeConnector:
    auth = None if args.no_auth else Auth.bearer("TORCHSERVE_TOKEN")
    return TorchServeConnector(args.model, base_url=args.base_url or "http://127.0.0.1:8080",
                               model_version=args.model_version, auth=auth, **kw)


RECIPE = Recipe(name="torchserve", connector=TorchServeConnector, build=build, env=("TORCHSERVE_TOKEN",),
                add_arguments=add_arguments, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
