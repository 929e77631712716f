"""A planted API key never reaches a cache file, ledger, certificate, report, log line, repr or exception."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from blackbox_rs import QueryBudget, QueryEngine, certify_dataset
from blackbox_rs._demo.serving import V2ModelServer
from blackbox_rs._demo.zoo import SmallCNN, export_torchscript
from blackbox_rs.connectors import Auth, KServeV2Connector
from blackbox_rs.errors import BlackBoxRSError
from blackbox_rs.reports import write_report

KEY = "sk-live-PLANTED-7f3a9c2e51b84d06"


def test_planted_key_appears_nowhere(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BBRS_PLANTED_KEY", KEY)
    caplog.set_level(logging.DEBUG)  # urllib3/requests debug logs included
    model = SmallCNN(1, 3, (8, 8), width=4, seed=0).eval()
    export_torchscript(model, tmp_path / "m.pt", (1, 8, 8))
    texts: list[str] = []
    with V2ModelServer(tmp_path / "m.pt", input_shape=(1, 8, 8), num_classes=3, model_name="m") as server:
        conn = KServeV2Connector(server.url, "m", num_classes=3, auth=Auth.bearer("BBRS_PLANTED_KEY"),
                                 max_batch=64)
        engine = QueryEngine(conn, cache=tmp_path / "cache",
                             budget=QueryBudget(max_queries=10_000, ledger=tmp_path / "ledger.json"))
        x = torch.rand(3, 1, 8, 8)
        res = certify_dataset(engine, x, [0, 1, 2], sigma=0.25, n0=10, n=50, alpha=0.01,
                              output=tmp_path / "certs.jsonl", seed=0)
        write_report({"run": res}, tmp_path / "report")
        texts += [repr(conn), repr(engine), repr(conn.info), conn.info.model_dump_json(), repr(engine.budget)]
        # errors raised on the way: bad input and a model name the server does not know
        for bad in (lambda: engine.query(torch.full((1, 1, 8, 8), 2.0)),
                    lambda: KServeV2Connector(server.url, "nope", num_classes=3, auth=Auth.bearer("BBRS_PLANTED_KEY"))):
            with pytest.raises(BlackBoxRSError) as info:
                bad()
            texts += [str(info.value), repr(info.value)]
        engine.close()
        conn.close()
    texts += [r.getMessage() for r in caplog.records]
    assert any("Authorization" in t or "127.0.0.1" in t for t in texts)  # the logs did capture HTTP traffic
    for t in texts:
        assert KEY not in t
    written = [p for p in Path(tmp_path).rglob("*") if p.is_file()]
    assert any(p.suffix == ".jsonl" for p in written) and any("cache" in p.parts for p in written)
    for p in written:
        assert KEY.encode() not in p.read_bytes(), p
