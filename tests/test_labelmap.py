"""LabelMap: vendor labels -> task classes, with an explicit `other` class."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from blackbox_rs.connectors.labelmap import LabelMap, normalize_label
from blackbox_rs.errors import ConfigError, UnmappedLabelError

SYN = {
    "cat": ["tabby", "Egyptian_cat", "/m/01yrx", "Tiger cat"],
    "dog": ["golden retriever", "Labrador", "/m/0bt9lr"],
    "other": ["Photograph", "Rectangle"],
}


@pytest.fixture
def lm() -> LabelMap:
    return LabelMap(["cat", "dog"], SYN)


def test_other_is_appended_and_explicit(lm: LabelMap) -> None:
    assert lm.class_names == ("cat", "dog", "other")
    assert lm.other == "other" and lm.other_index == 2
    # other already among the classes keeps its place
    lm2 = LabelMap(["other", "cat", "dog"])
    assert lm2.class_names == ("other", "cat", "dog") and lm2.other_index == 0


def test_exact_case_insensitive_and_whitespace(lm: LabelMap) -> None:
    assert lm.index("cat") == 0
    assert lm.index("CAT") == 0
    assert lm.index("  Golden   Retriever ") == 1
    assert lm.index("/m/0bt9lr") == 1
    assert lm.index("egyptian_cat") == 0
    assert lm.name("tiger CAT") == "cat"
    assert normalize_label("  Ｔabby\tCat ") == "tabby cat"  # NFKC folds the full-width T


def test_case_sensitive_mode() -> None:
    lm = LabelMap(["Cat", "dog"], case_sensitive=True)
    assert lm.index("Cat") == 0
    assert lm.index("cat") == lm.other_index


def test_unmapped_label_is_other_and_counted(lm: LabelMap) -> None:
    assert lm.index("Sports car") == lm.other_index
    assert lm.index("Sports car") == lm.other_index
    assert lm.unmapped_counts() == {"Sports car": 2}
    # stop-list labels are other on purpose and not "unmapped"
    assert lm.index("photograph") == lm.other_index
    assert "photograph" not in lm.unmapped_counts()


def test_ranked_first_mapped_task_class_wins(lm: LabelMap) -> None:
    assert lm.map_ranked(["Photograph", "Sports car", "tabby", "Labrador"]) == 0
    assert lm.map_ranked(["Labrador", "tabby"]) == 1
    assert lm.map_ranked(["Photograph", "Sports car"]) == lm.other_index
    assert lm.map_ranked([]) == lm.other_index
    assert lm.unmapped_counts()["Sports car"] == 2


def test_ranked_depth_searches_only_the_first_labels(lm: LabelMap) -> None:
    ranked = ["Photograph", "Sports car", "tabby", "Labrador"]
    assert lm.map_ranked(ranked, depth=1) == lm.other_index  # the top answer is not a task class
    assert lm.map_ranked(ranked, depth=2) == lm.other_index
    assert lm.map_ranked(ranked, depth=3) == 0
    assert lm.map_ranked(["Labrador", "tabby"], depth=1) == 1
    assert lm.unmapped_counts() == {"Sports car": 2}  # labels past the depth are never looked at
    assert lm.map_topk([("tabby", 0.3), ("Photograph", 0.9)], depth=1) == lm.other_index
    assert lm.map_topk([("tabby", 0.3), ("Photograph", 0.9)], depth=2) == 0
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="depth"):
            lm.map_ranked(ranked, depth=bad)  # type: ignore[arg-type]


def test_topk_ranks_by_score(lm: LabelMap) -> None:
    assert lm.map_topk([("tabby", 0.3), ("Labrador", 0.6), ("Photograph", 0.9)]) == 1
    # ties keep the given order
    assert lm.map_topk([("tabby", 0.5), ("Labrador", 0.5)]) == 0


def test_strict_map_raises_typed_error() -> None:
    strict = LabelMap.identity(["cat", "dog"])
    assert strict.other is None and strict.class_names == ("cat", "dog")
    assert strict.index("Dog") == 1
    with pytest.raises(UnmappedLabelError, match="'zebra'"):
        strict.index("zebra")
    with pytest.raises(UnmappedLabelError):
        strict.map_ranked(["zebra", "horse"])


def test_conflicts_and_bad_configs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="maps to both"):
        LabelMap(["cat", "dog"], {"cat": ["pet"], "dog": ["PET"]})
    with pytest.raises(ConfigError, match="not a class"):
        LabelMap(["cat", "dog"], {"horse": ["pony"]})
    with pytest.raises(ConfigError, match="list of labels"):
        LabelMap(["cat", "dog"], {"cat": "tabby"})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="twice"):
        LabelMap(["cat", "cat"])
    with pytest.raises(ConfigError, match="unknown label map keys"):
        LabelMap.from_dict({"classes": ["a", "b"], "synonym": {}})


def test_class_scores_aggregations(lm: LabelMap) -> None:
    pairs = [("tabby", 0.5), ("Tiger cat", 0.2), ("Labrador", 0.1), ("Sports car", 0.1)]
    np.testing.assert_allclose(lm.class_scores(pairs), [0.5, 0.1, 0.1])
    np.testing.assert_allclose(lm.class_scores(pairs, aggregation="sum"), [0.7, 0.1, 0.1])
    np.testing.assert_allclose(lm.class_scores(pairs, aggregation="noisy_or"), [1 - 0.5 * 0.8, 0.1, 0.1])
    np.testing.assert_allclose(lm.class_scores(pairs, aggregation="sum", missing_mass="to_other"),
                               [0.7, 0.1, 0.2])
    with pytest.raises(ConfigError, match="outside"):
        lm.class_scores([("tabby", 87.0)])


def test_roundtrip_and_fingerprint(lm: LabelMap) -> None:
    d = json.loads(json.dumps(lm.to_dict()))
    again = LabelMap.from_dict(d)
    assert again == lm and again.fingerprint == lm.fingerprint
    other = LabelMap(["cat", "dog"], {**SYN, "dog": ["Labrador"]})
    assert other.fingerprint != lm.fingerprint


def test_thread_safe_counting(lm: LabelMap) -> None:
    def work() -> None:
        for _ in range(500):
            lm.index("unknown thing")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lm.unmapped_counts() == {"unknown thing": 2000}
