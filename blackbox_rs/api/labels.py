"""``blackbox-rs api <vendor> labels IMAGES``: which raw labels does the vendor answer on these images?

Queries the vendor once per clean image (through the engine: budgeted and counted; answers kept in
``OUT/raw_labels.json``, so a rerun is free), prints every raw label with how many images it appeared
on (as the top label and anywhere in the answer), and writes ``OUT/label_map.proposed.json``: a
complete label map (the :class:`~blackbox_rs.connectors.labelmap.LabelMap` dict form) to edit and pass
back with ``--label-map``. With one sub-folder per class, each vendor label seen (within
``--label-depth``) on images of exactly one class is proposed as a synonym of that class (labels seen
on several classes, or naming another class, are listed as ambiguous, not proposed); for a flat
folder (no class per image; ``--labels`` not needed), the ten most frequent top labels are proposed as
classes of their own.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from blackbox_rs.api.args import echo
from blackbox_rs.api.images import RunImages
from blackbox_rs.api.raw_labels import RawAnswers, query_raw
from blackbox_rs.errors import ConfigError
from blackbox_rs.paths import atomic_write

__all__ = ["discover_labels"]


def discover_labels(vendor: Any, args: argparse.Namespace, data: RunImages, out: Path, budget: Any) -> dict[str, Any]:
    """Query, tabulate and propose (see the module docstring); returns the summary it printed."""
    from blackbox_rs.api.run import connector_kwargs
    from blackbox_rs.connectors.labelmap import LabelMap
    from blackbox_rs.engine import QueryEngine

    connector = vendor.build(args, connector_kwargs(args, data.lm))
    try:
        engine = QueryEngine(connector, cache=None, budget=budget)
        answers = query_raw(engine, data.x, RawAnswers(out / "raw_labels.json"))
        charged = engine.stats.queries
    finally:
        connector.close()
    depth = max(1, int(args.label_depth))
    top = Counter(a[0][0] for a in answers if a)
    anywhere = Counter(lab for a in answers for lab in dict.fromkeys(x for x, _ in a))
    classes = [c for c in data.lm.class_names if c != data.lm.other] if data.y is not None else []
    per_class: dict[str, Counter[str]] = defaultdict(Counter)
    if data.y is not None:
        for a, y in zip(answers, data.y, strict=True):
            for lab, _ in a[:depth]:
                per_class[data.lm.class_names[y]][lab] += 1
    from blackbox_rs.connectors.labelmap import normalize_label

    seen = {lab for c in per_class for lab in per_class[c]}
    names = {normalize_label(c): c for c in classes}

    def claimed(lab: str) -> set[str]:  # the classes a vendor label would be proposed for (or already names)
        own = {c for c in per_class if lab in per_class[c]}
        return own | ({names[normalize_label(lab)]} if normalize_label(lab) in names else set())

    # a label seen (within --label-depth) on images of several classes, or that names another class,
    # cannot be a synonym of one class: listed as ambiguous, never proposed
    ambiguous = sorted(lab for lab in seen if len(claimed(lab)) > 1)
    if classes:
        synonyms = {c: [lab for lab, _ in per_class[c].most_common()
                        if lab not in ambiguous and normalize_label(lab) != normalize_label(c)]
                    for c in classes}
        proposal = LabelMap(classes, {c: s for c, s in synonyms.items() if s})
    else:
        proposed = [lab for lab, _ in top.most_common(10)]
        if len(proposed) < 1:
            raise ConfigError("the vendor returned no labels for these images: nothing to propose")
        proposal = LabelMap(proposed)
    path = out / "label_map.proposed.json"
    atomic_write(path, json.dumps(proposal.to_dict(), indent=1), ConfigError)
    table = sorted(({"label": lab, "top_label_on": top.get(lab, 0), "anywhere_on": n} for lab, n in anywhere.items()),
                   key=lambda row: (-row["top_label_on"], -row["anywhere_on"], row["label"]))
    atomic_write(out / "labels.json", json.dumps({"images": len(answers), "queries_charged": charged,
                                                  "labels": table, "ambiguous": ambiguous,
                                                  "per_image": {n: a for n, a in zip(data.names, answers,
                                                                                     strict=True)}}, indent=1),
                 ConfigError)
    echo(f"{len(answers)} image(s), {charged} queries charged ({len(answers) - charged} from {out / 'raw_labels.json'})")
    echo(f"{'top label on':>12}  {'anywhere on':>11}  vendor label")
    for row in table[:50]:
        echo(f"{row['top_label_on']:>12}  {row['anywhere_on']:>11}  {row['label']}")
    if len(table) > 50:
        echo(f"... {len(table) - 50} more in {out / 'labels.json'}")
    if ambiguous:
        echo(f"top label on images of several classes (not proposed): {', '.join(ambiguous)}")
    echo(f"proposed label map: {path} (edit it, then pass --label-map {path})")
    return {"images": len(answers), "queries_charged": charged, "labels": table, "proposal": str(path)}
