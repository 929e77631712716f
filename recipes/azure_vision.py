"""Certify Azure AI Vision Image Analysis 4.0 tags.

    python recipes/azure_vision.py IMAGES_FOLDER [--labels a,b] [--label-map map.json] [--dry-run] [--out DIR]

Credentials come from the environment (AZURE_VISION_KEY, AZURE_VISION_ENDPOINT) and are never written anywhere.
See recipes/_common.py for the shared flags, the output folder and the exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from _common import Recipe, run

from blackbox_rs.connectors.azure_vision import AzureImageAnalysisConnector
from blackbox_rs.connectors.http import Auth
from blackbox_rs.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="https://<resource>.cognitiveservices.azure.com (default $AZURE_VISION_ENDPOINT)")


def build(args: argparse.Namespace, kw: dict[str, Any]) -> AzureImageAnalysisConnector:
    endpoint = args.base_url or args.endpoint or os.environ.get("AZURE_VISION_ENDPOINT")
    if not endpoint:
        raise ConfigError("give --endpoint or set AZURE_VISION_ENDPOINT")
    return AzureImageAnalysisConnector(endpoint, auth=Auth.header("Ocp-Apim-Subscription-Key", "AZURE_VISION_KEY"),
                                       **kw)


RECIPE = Recipe(name="azure-vision", connector=AzureImageAnalysisConnector, build=build, env=("AZURE_VISION_KEY", "AZURE_VISION_ENDPOINT"),
                add_arguments=add_arguments, description=__doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    return run(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
