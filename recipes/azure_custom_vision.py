"""Certify an Azure Custom Vision classifier (published iteration, nostore).

    python recipes/azure_custom_vision.py IMAGES_FOLDER [--labels a,b] [--label-map map.json] [--dry-run] [--out DIR]

Credentials come from the environment (AZURE_CUSTOM_VISION_KEY, AZURE_CUSTOM_VISION_ENDPOINT) and are never written anywhere.
See recipes/_common.py for the shared flags, the output folder and the exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from _common import Recipe, run

from blackbox_rs.connectors.azure_vision import AzureCustomVisionConnector
from blackbox_rs.connectors.http import Auth
from blackbox_rs.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="prediction resource endpoint (default $AZURE_CUSTOM_VISION_ENDPOINT)")
    p.add_argument("--project-id", required=True)
    p.add_argument("--published-name", required=True, help="published iteration name")
    p.add_argument("--store", action="store_true", help="let Custom Vision store the (noisy) images")


def build(args: argparse.Namespace, kw: dict[str, Any]) -> AzureCustomVisionConnector:
    endpoint = args.base_url or args.endpoint or os.environ.get("AZURE_CUSTOM_VISION_ENDPOINT")
    if not endpoint:
        raise ConfigError("give --endpoint or set AZURE_CUSTOM_VISION_ENDPOINT")
    return AzureCustomVisionConnector(endpoint, args.project_id, args.published_name, store=args.store,
                                      auth=Auth.header("Prediction-Key", "AZURE_CUSTOM_VISION_KEY"), **kw)


RECIPE = Recipe(name="azure-custom-vision", connector=AzureCustomVisionConnector, build=build, env=("AZURE_CUSTOM_VISION_KEY", "AZURE_CUSTOM_VISION_ENDPOINT"),
                add_arguments=add_arguments, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
