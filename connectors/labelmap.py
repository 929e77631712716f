"""Map vendor label strings (top-k lists, open vocabularies) to the task's classes.

A hosted classifier answers in its own vocabulary ("tabby", "Egyptian_cat", "/m/01yrx", "Cat"),
often as a ranked top-k list. A :class:`LabelMap` turns that into one task class index, with an
explicit ``other`` class: a label that maps to no task class counts as ``other``; it is never
silently dropped (and it is counted, see :meth:`LabelMap.unmapped_counts`).

Matching, for one label: (1) the exact string, then (2) its normalised form: Unicode NFKC, trimmed,
inner whitespace collapsed to one space, and case-folded unless ``case_sensitive=True``. Every task
class name matches itself; ``synonyms`` adds vendor labels (names, ids, translations) per class. A
synonym list for the ``other`` class is a stop-list ("Photograph", "Rectangle"): those labels are
``other`` on purpose and do not count as unmapped. Two classes claiming the same (normalised) label
is a :class:`ConfigError` at construction.

Top-k rule (:meth:`LabelMap.map_ranked`): the first label *in rank order* among the first ``depth``
labels that maps to a task class other than ``other`` wins; if none does, the answer is ``other``.
``depth=1`` is the ranked list's top answer only; ``depth=None`` searches the whole list (another
classifier: "the first of my labels anywhere in the list"). With scores (:meth:`LabelMap.map_topk`),
rank order is descending score (ties keep the given order).

The map is immutable after construction and safe to share between threads; its
:attr:`LabelMap.fingerprint` is part of a connector's fingerprint, because a different map is a
different base classifier.
"""

from __future__ import annotations

import hashlib
import json
import threading
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from blackbox_rs.errors import ConfigError, UnmappedLabelError

__all__ = ["LabelMap", "normalize_label"]


def normalize_label(label: str, *, case_sensitive: bool = False) -> str:
    """NFKC, trim, collapse whitespace; case-fold unless ``case_sensitive``."""
    s = " ".join(unicodedata.normalize("NFKC", str(label)).split())
    return s if case_sensitive else s.casefold()


class LabelMap:
    """Vendor labels -> task class indices, with an explicit ``other`` class.

    Args:
        classes: the task class names, in index order. If ``other`` is not among them it is appended
            as the last class (see :attr:`class_names`).
        synonyms: ``{task class: [vendor labels ...]}``; keys must be task classes (or ``other``).
        other: name of the catch-all class; ``None`` makes the map strict: an unmapped label raises
            :class:`UnmappedLabelError` instead.
        case_sensitive: compare labels case-sensitively after normalisation (default: no).
    """

    def __init__(
        self,
        classes: Sequence[str],
        synonyms: Mapping[str, Iterable[str]] | None = None,
        *,
        other: str | None = "other",
        case_sensitive: bool = False,
    ) -> None:
        names = [str(c) for c in classes]
        if other is not None and other not in names:
            names.append(other)
        if len(names) < 2:
            raise ConfigError("a label map needs at least 2 classes (including 'other')")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"class {dup!r} appears twice in the label map")
        self._names = tuple(names)
        self._other = other
        self._other_index = names.index(other) if other is not None else None
        self._case_sensitive = bool(case_sensitive)
        self._synonyms: dict[str, tuple[str, ...]] = {}
        self._exact: dict[str, int] = {}
        self._norm: dict[str, int] = {}
        index = {n: i for i, n in enumerate(names)}
        for name, i in index.items():
            self._add(name, i)
        for cls, labels in (synonyms or {}).items():
            if cls not in index:
                raise ConfigError(f"synonyms given for {cls!r}, which is not a class of this map {self._names}")
            if isinstance(labels, str):
                raise ConfigError(f"synonyms of {cls!r} must be a list of labels, not the string {labels!r}")
            labels = tuple(str(v) for v in labels)
            self._synonyms[cls] = labels
            for label in labels:
                self._add(label, index[cls])
        self._lock = threading.Lock()
        self._unmapped: Counter[str] = Counter()
        canon = {
            "classes": list(self._names),
            "synonyms": {k: list(v) for k, v in sorted(self._synonyms.items())},
            "other": other,
            "case_sensitive": self._case_sensitive,
        }
        self._fingerprint = hashlib.sha256(
            json.dumps(canon, sort_keys=True, ensure_ascii=True).encode()
        ).hexdigest()[:16]

    def _add(self, label: str, idx: int) -> None:
        key = normalize_label(label, case_sensitive=self._case_sensitive)
        if not key:
            raise ConfigError("an empty label cannot be mapped")
        prev = self._norm.get(key)
        if prev is not None and prev != idx:
            raise ConfigError(
                f"label {label!r} maps to both {self._names[prev]!r} and {self._names[idx]!r}"
                + ("" if self._case_sensitive else " (labels are compared case-insensitively)")
            )
        self._norm[key] = idx
        self._exact[label] = idx

    # ---- construction helpers --------------------------------------------------------------------

    @classmethod
    def identity(cls, class_names: Sequence[str], *, other: str | None = None, case_sensitive: bool = False
                 ) -> LabelMap:
        """Labels are the class names themselves (a model whose vocabulary is the task's)."""
        return cls(class_names, other=other, case_sensitive=case_sensitive)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelMap:
        """Inverse of :meth:`to_dict` (e.g. from a JSON or YAML config file)."""
        unknown = set(d) - {"classes", "synonyms", "other", "case_sensitive"}
        if unknown:
            raise ConfigError(f"unknown label map keys: {sorted(unknown)}")
        if "classes" not in d:
            raise ConfigError("a label map config needs 'classes'")
        return cls(
            d["classes"],
            d.get("synonyms") or {},
            other=d.get("other", "other"),
            case_sensitive=bool(d.get("case_sensitive", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description that :meth:`from_dict` turns back into an equal map."""
        return {
            "classes": list(self._names),
            "synonyms": {k: list(v) for k, v in self._synonyms.items()},
            "other": self._other,
            "case_sensitive": self._case_sensitive,
        }

    # ---- properties ------------------------------------------------------------------------------

    @property
    def class_names(self) -> tuple[str, ...]:
        """All task classes in index order, ``other`` included."""
        return self._names

    @property
    def other(self) -> str | None:
        return self._other

    @property
    def other_index(self) -> int | None:
        return self._other_index

    @property
    def fingerprint(self) -> str:
        """A short hash of the whole mapping (classes, synonyms, other, case rule)."""
        return self._fingerprint

    def __len__(self) -> int:
        return len(self._names)

    def __eq__(self, other_map: object) -> bool:
        return isinstance(other_map, LabelMap) and other_map.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self._fingerprint)

    def __repr__(self) -> str:
        return f"LabelMap({len(self._names)} classes, other={self._other!r}, fingerprint={self._fingerprint})"

    # ---- lookups ---------------------------------------------------------------------------------

    def lookup(self, label: str) -> int | None:
        """The class index of ``label``, or None if no class claims it (nothing is counted)."""
        label = str(label)
        idx = self._exact.get(label)
        if idx is None:
            idx = self._norm.get(normalize_label(label, case_sensitive=self._case_sensitive))
        return idx

    def _fallback(self, label: str) -> int:
        with self._lock:
            self._unmapped[label] += 1
        if self._other_index is None:
            raise UnmappedLabelError(
                f"label {label!r} maps to no class of {self._names} and this label map has no 'other' class"
            )
        return self._other_index

    def index(self, label: str) -> int:
        """Class index of one label; an unmapped label is ``other`` (counted) or raises if strict."""
        idx = self.lookup(label)
        return self._fallback(str(label)) if idx is None else idx

    def name(self, label: str) -> str:
        """Class name of one label (see :meth:`index`)."""
        return self._names[self.index(label)]

    def map_ranked(self, labels: Sequence[str], *, depth: int | None = None) -> int:
        """Class index for a ranked list (best first): the first of its first ``depth`` labels (all of
        them if ``depth`` is None) that maps to a task class other than ``other``; ``other`` if none
        does (an empty list is ``other`` too). Labels beyond ``depth`` are never looked at. Unmapped
        labels among those searched are counted. Strict maps raise :class:`UnmappedLabelError` if no
        label maps."""
        if depth is not None:
            if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
                raise ConfigError(f"depth must be an integer >= 1 or None, got {depth!r}")
            labels = list(labels)[:depth]
        unmapped: list[str] = []
        for label in labels:
            idx = self.lookup(label)
            if idx is None:
                unmapped.append(str(label))
            elif idx != self._other_index:
                self._count(unmapped)
                return idx
        self._count(unmapped)
        if self._other_index is None:
            raise UnmappedLabelError(f"none of the labels {list(labels)[:10]!r} maps to a class of {self._names}")
        return self._other_index

    def map_topk(self, pairs: Iterable[tuple[str, float]], *, depth: int | None = None) -> int:
        """Like :meth:`map_ranked` for ``(label, score)`` pairs in any order: ranked by descending
        score, ties in the given order."""
        ranked = sorted(pairs, key=lambda p: -float(p[1]))
        return self.map_ranked([p[0] for p in ranked], depth=depth)

    def class_scores(
        self,
        pairs: Iterable[tuple[str, float]],
        *,
        aggregation: Literal["max", "sum", "noisy_or"] = "max",
        missing_mass: Literal["to_other", "none"] = "none",
    ) -> np.ndarray:
        """A float64 score per class from ``(label, score)`` pairs with scores in ``[0, 1]``.

        Several labels of one class combine by ``aggregation``: ``max``, ``sum`` (softmax outputs) or
        ``noisy_or`` (``1 - prod(1 - s)``, independent confidences). Unmapped labels go to ``other``.
        ``missing_mass="to_other"`` adds ``max(0, 1 - sum of all scores)`` to ``other`` (top-k softmax
        lists whose tail was cut off); it needs an ``other`` class.
        """
        if aggregation not in ("max", "sum", "noisy_or"):
            raise ConfigError(f"aggregation must be max, sum or noisy_or, got {aggregation!r}")
        if missing_mass not in ("to_other", "none"):
            raise ConfigError(f"missing_mass must be to_other or none, got {missing_mass!r}")
        k = len(self._names)
        out = np.zeros(k, dtype=np.float64)
        keep = np.ones(k, dtype=np.float64)  # noisy-or: prod(1 - s)
        total = 0.0
        for label, score in pairs:
            s = float(score)
            if not 0.0 <= s <= 1.0:
                raise ConfigError(f"label score {s!r} for {label!r} is outside [0, 1]; rescale it first")
            total += s
            i = self.index(label)
            if aggregation == "max":
                out[i] = max(out[i], s)
            elif aggregation == "sum":
                out[i] += s
            else:
                keep[i] *= 1.0 - s
        if aggregation == "noisy_or":
            out = 1.0 - keep
        if missing_mass == "to_other":
            if self._other_index is None:
                raise ConfigError("missing_mass='to_other' needs an 'other' class")
            out[self._other_index] += max(0.0, 1.0 - total)
        return out

    def unmapped_counts(self) -> dict[str, int]:
        """How often each label without a class was seen (and counted as ``other``), most common first."""
        with self._lock:
            return dict(self._unmapped.most_common())

    def _count(self, labels: list[str]) -> None:
        if labels:
            with self._lock:
                self._unmapped.update(labels)
