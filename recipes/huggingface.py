"""Certify a Hugging Face image classifier (serverless Inference Providers or a dedicated Inference Endpoint).

    python recipes/huggingface.py IMAGES_FOLDER [--labels a,b] [--label-map map.json] [--dry-run] [--out DIR]

Credentials come from the environment (HF_TOKEN) and are never written anywhere.
See recipes/_common.py for the shared flags, the output folder and the exit codes.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import Recipe, run

from blackbox_rs.connectors.http import Auth
from blackbox_rs.connectors.huggingface import HuggingFaceConnector
from blackbox_rs.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-id", default="google/vit-base-patch16-224", help="serverless model id")
    p.add_argument("--endpoint-url", help="a dedicated Inference Endpoint URL instead of serverless")
    p.add_argument("--top-k", type=int, default=20, help="labels per answer (the model's label count = all)")
    p.add_argument("--wait-for-model", action="store_true", help="block while a cold model loads")


def build(args: argparse.Namespace, kw: dict[str, Any]) -> HuggingFaceConnector:
    if args.endpoint_url and args.base_url:
        raise ConfigError("give --endpoint-url or --base-url, not both")
    target = {"endpoint_url": args.endpoint_url} if args.endpoint_url else {"model_id": args.model_id}
    return HuggingFaceConnector(**target, base_url=args.base_url or "https://router.huggingface.co",
                                auth=Auth.bearer("HF_TOKEN"), top_k=args.top_k, wait_for_model=args.wait_for_model,
                                **kw)


RECIPE = Recipe(name="huggingface", connector=HuggingFaceConnector, build=build, env=("HF_TOKEN",),
                add_arguments=add_arguments, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
