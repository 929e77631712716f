"""KServeV2Connector against a real Seldon MLServer (its own venv, built once and cached).

The fixture builds the venv if needed (see helpers/mlserver_fixture.py), starts MLServer on
127.0.0.1 with free ports, serves numpy models whose weights this test writes, and stops it. If the
venv cannot be built the tests FAIL with pip's output; set BLACKBOX_RS_SKIP_MLSERVER=1 to skip them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.mlserver_fixture import (
    ENV_SKIP,
    MLServerProcess,
    MLServerUnavailable,
    ensure_mlserver_venv,
    write_failing_model,
    write_label_model,
    write_linear_model,
)

from blackbox_rs.connectors.callable import CallableConnector
from blackbox_rs.connectors.http import RetryPolicy, TransportSettings
from blackbox_rs.connectors.kserve_v2 import KServeV2Connector
from blackbox_rs.connectors.labelmap import LabelMap
from blackbox_rs.errors import ConfigError, HTTPStatusError, InvalidResponseError

SHAPE = (3, 8, 8)
D = int(np.prod(SHAPE))
K = 3
VOCAB = ["tabby", "Labrador", "sports car", "Photograph", "toaster"]


@dataclass
class Served:
    proc: MLServerProcess
    prototypes: np.ndarray  # [K, D] images in [0, 1], one per class
    w: np.ndarray
    b: np.ndarray
    w_labels: np.ndarray

    @property
    def url(self) -> str:
        return self.proc.url

    def logits(self, x: np.ndarray, w: np.ndarray | None = None, b: np.ndarray | None = None) -> np.ndarray:
        w = self.w if w is None else w
        b = self.b if b is None else b
        return x.reshape(x.shape[0], -1).astype(np.float64) @ w + b


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if os.environ.get(ENV_SKIP) == "1":
        pytest.skip(f"{ENV_SKIP}=1: MLServer tests skipped on request")
    problem = None
    try:
        exe = ensure_mlserver_venv()
    except MLServerUnavailable as e:
        problem = str(e)
    if problem is not None:  # outside the except block: no chained traceback around the message
        pytest.fail(f"cannot build MLServer's venv (set {ENV_SKIP}=1 to skip these tests): {problem}",
                    pytrace=False)
    rng = np.random.default_rng(7)
    protos = rng.random((K, D))
    w = (protos - 0.5).T.copy()  # [D, K]: class c scores high on its own prototype
    b = np.zeros(K)
    w_labels = rng.standard_normal((D, len(VOCAB)))
    root: Path = tmp_path_factory.mktemp("mlserver-models")
    write_linear_model(root / "linear", name="linear", w=w, b=b, input_shape=SHAPE)
    write_linear_model(root / "linear-u8", name="linear-u8", w=w, b=b, input_shape=SHAPE, datatype="UINT8")
    write_label_model(root / "vendor", name="vendor", w=w_labels, b=np.zeros(len(VOCAB)), vocab=VOCAB,
                      input_shape=SHAPE, k=2)
    write_failing_model(root / "broken", name="broken", input_shape=SHAPE)
    proc = MLServerProcess(exe, root, models=["linear", "linear-u8", "vendor", "broken"])
    try:
        proc.start()
    except MLServerUnavailable as e:
        problem = str(e)
    if problem is not None:
        pytest.fail(f"MLServer did not start: {problem}", pytrace=False)
    try:
        yield Served(proc, protos, w, b, w_labels)
    finally:
        proc.stop()


def rand(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_discovery_from_real_metadata(mlserver: Served) -> None:
    with KServeV2Connector(mlserver.url, "linear") as c:
        assert c.info.input_shape == SHAPE and c.info.num_classes == K and c.info.returns_scores
        assert c.input_name == "image" and c.output_name == "scores"
        assert "|model=linear|version=v1|" in c.info.fingerprint
    with KServeV2Connector(mlserver.url, "linear", model_version="v1") as pinned:
        assert pinned.info.fingerprint == c.info.fingerprint


def test_scores_match_the_model_in_batches_and_threads(mlserver: Served) -> None:
    x = rand(10)
    ref = mlserver.logits(x.numpy())
    with KServeV2Connector(mlserver.url, "linear", max_batch=4, transport=TransportSettings(max_in_flight=3)) as c:
        pred = c.query(x)
        np.testing.assert_allclose(pred.scores.numpy(), ref, rtol=1e-5, atol=1e-5)
        assert pred.labels.tolist() == ref.argmax(1).tolist()
        assert c.transport_stats()["calls"] == 2 + 3  # ready + metadata + ceil(10 / 4) infers
        with ThreadPoolExecutor(4) as pool:
            preds = list(pool.map(lambda i: c.query(x[i : i + 1]), range(10)))
        assert [int(p.labels[0]) for p in preds] == ref.argmax(1).tolist()


def test_uint8_model(mlserver: Served) -> None:
    x = rand(6, seed=1)
    q = torch.round(x * 255) / 255
    with KServeV2Connector(mlserver.url, "linear-u8", encoding="uint8") as c:
        pred = c.query(x)
        np.testing.assert_allclose(pred.scores.numpy(), mlserver.logits(q.numpy()), rtol=1e-5, atol=1e-5)


def test_vendor_labels_through_labelmap(mlserver: Served) -> None:
    lm = LabelMap(["cat", "dog"], {"cat": ["Tabby"], "dog": ["labrador"], "other": ["Photograph"]})
    x = rand(30, seed=2)
    with KServeV2Connector(mlserver.url, "vendor", label_map=lm) as c:
        assert c.output_kind == "label" and c.info.class_names == ("cat", "dog", "other")
        got = c.query(x).labels.tolist()
    logits = mlserver.logits(x.numpy(), mlserver.w_labels, np.zeros(len(VOCAB)))
    top2 = np.argsort(-logits, axis=1, kind="stable")[:, :2]
    assert got == [lm.map_ranked([VOCAB[i] for i in row], depth=1) for row in top2]  # top answer by default
    assert set(lm.unmapped_counts()) <= {"sports car", "toaster"}


def test_model_error_is_http_500_with_body(mlserver: Served) -> None:
    with KServeV2Connector(mlserver.url, "broken", num_classes=2,
                           transport=TransportSettings(retry=RetryPolicy(max_attempts=3, backoff_base_s=0.0))) as c:
        with pytest.raises(HTTPStatusError) as ei:
            c.query(rand(1))
        assert ei.value.status == 500 and ei.value.attempts == 1
        assert ei.value.body_excerpt == "Internal Server Error"  # MLServer's text/plain 500 body


def test_unknown_model_and_version_are_404(mlserver: Served) -> None:
    with pytest.raises(HTTPStatusError, match="'nope' not found") as ei:
        KServeV2Connector(mlserver.url, "nope")
    assert ei.value.status == 404
    with pytest.raises(HTTPStatusError, match="version 'v9'") as ei:
        KServeV2Connector(mlserver.url, "linear", model_version="v9")
    assert ei.value.status == 404


def test_wrong_width_is_caught_at_discovery_and_in_answers(mlserver: Served) -> None:
    with pytest.raises(ConfigError, match="declared with 3 scores per image, but 4 classes"):
        KServeV2Connector(mlserver.url, "linear", num_classes=4)
    meta = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, *SHAPE]}], "versions": ["v1"]}
    with KServeV2Connector(mlserver.url, "linear", num_classes=4, output="scores", metadata=meta) as c:
        with pytest.raises(InvalidResponseError, match="scores of width 3 .*4 classes"):
            c.query(rand(2))


def test_certify_end_to_end_through_mlserver(mlserver: Served) -> None:
    """Certificates through MLServer equal those of the same model run in-process."""
    certify_mod = pytest.importorskip("blackbox_rs.core")
    from blackbox_rs.engine import QueryEngine

    w, b = mlserver.w, mlserver.b

    def local(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(x.numpy().reshape(x.shape[0], -1).astype(np.float64) @ w + b)

    ref_conn = CallableConnector(local, input_shape=SHAPE, num_classes=K, returns_scores=True, max_batch=50)
    xs = [torch.from_numpy(p.reshape(SHAPE)).float() for p in mlserver.prototypes]
    kw = dict(sigma=0.25, n0=20, n=200, alpha=0.01, seed=3)
    with KServeV2Connector(mlserver.url, "linear", max_batch=50, transport=TransportSettings(max_in_flight=4)) as remote:
        engine = QueryEngine(remote, max_in_flight=4)
        certs = [certify_mod.certify(engine, x, **kw) for x in xs]
        assert engine.stats.queries == len(xs) * 220
    refs = [certify_mod.certify(ref_conn, x, **kw) for x in xs]
    for c, r, cls in zip(certs, refs, range(K), strict=True):
        assert c.counts == r.counts and c.selection_counts == r.selection_counts
        assert c.prediction == r.prediction == cls and c.radius > 0
