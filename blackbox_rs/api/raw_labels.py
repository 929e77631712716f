"""The vendor's raw answer (its ranked labels, before any label map) for clean images, queried through
the engine (budgeted and counted) and kept in ``OUT/raw_labels.json`` so a rerun pays nothing again.

The engine's own cache stores mapped class indices, not the vendor's words, so raw answers get their
own store: keyed by the connector fingerprint (which covers the encoding and the endpoint) and the
content of the image as sent (after resizing). It is written atomically after every image, so a crash
loses at most the answer in flight.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blackbox_rs.errors import ConfigError
from blackbox_rs.paths import atomic_write

__all__ = ["RawAnswers", "query_raw"]

Ranked = list[tuple[str, float]]


class RawAnswers:
    """``{fingerprint: {image digest: [[label, score], ...]}}`` in one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data: dict[str, dict[str, list[list[Any]]]] = {}
        if path.exists():
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path} is unreadable ({exc}); delete it to query the labels again") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path} is not a raw-label store; delete it to query the labels again")
            self._data = raw

    def get(self, fingerprint: str, digest: str) -> Ranked | None:
        got = self._data.get(fingerprint, {}).get(digest)
        return None if got is None else [(str(a), float(s)) for a, s in got]

    def put(self, fingerprint: str, digest: str, ranked: Ranked) -> None:
        self._data.setdefault(fingerprint, {})[digest] = [[a, s] for a, s in ranked]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self._data, indent=1), ConfigError)


def image_digest(x: Any) -> str:
    """Content hash of one image tensor as the engine sends it."""
    return hashlib.sha256(x.detach().to("cpu").float().contiguous().numpy().tobytes()).hexdigest()


def query_raw(engine: Any, x: Any, store: RawAnswers | None,
              done: Callable[[int, Ranked, bool], None] | None = None) -> list[Ranked]:
    """The vendor's ranked labels for each image of ``x`` (N x C x H x W): from ``store`` when it
    has them, else one query each through ``engine`` (budgeted and counted; give it no cache: an
    answer from the query cache carries no words). ``done(i, ranked, paid)`` is called after each image."""
    if engine.cache is not None:
        raise ConfigError("raw labels need an engine without a query cache (cached answers keep no words)")
    connector = engine.connector
    if not hasattr(connector, "label_observer"):
        raise ConfigError(f"{type(connector).__name__} does not report raw labels (only vendor connectors do)")
    fp = connector.info.fingerprint
    out: list[Ranked] = []
    for i in range(int(x.shape[0])):
        digest = image_digest(x[i])
        ranked = store.get(fp, digest) if store is not None else None
        paid = ranked is None
        if ranked is None:
            seen: list[Ranked] = []
            connector.label_observer = seen.append
            try:
                engine.query(x[i: i + 1])
            finally:
                connector.label_observer = None
            if len(seen) != 1:  # pragma: no cover - a connector that answered without mapping labels
                raise ConfigError(f"expected one answer for image {i}, the connector reported {len(seen)}")
            ranked = seen[0]
            if store is not None:
                store.put(fp, digest, ranked)
        out.append(ranked)
        if done is not None:
            done(i, ranked, paid)
    return out
