"""The ``blackbox-rs demo`` pipeline (private): the main job on an embedded default: no network, no data
download, no credentials.

1. Train (or reuse from the cache directory) a small CNN on scikit-learn's bundled digits and export
   it as a TorchScript file: the "other team's model".
2. Serve it on 127.0.0.1 over the Open Inference Protocol v2 (:class:`V2ModelServer`), answering
   labels only: from here on it is an opaque, label-only base model behind HTTP.
3. Connect with :class:`KServeV2Connector` through one :class:`QueryEngine` (budget, cache, counts).
4. Fit a denoiser in front of it with the ``surrogate`` strategy under a query budget.
5. Certify a held-out set with and without the module; write the report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from blackbox_rs._demo.serving import V2ModelServer
from blackbox_rs.connectors.torchscript import file_sha256
from blackbox_rs.dataset import DatasetCertification
from blackbox_rs.engine import QueryEngine
from blackbox_rs.errors import CacheError
from blackbox_rs.fitting.context import FitReport
from blackbox_rs.paths import atomic_write
from blackbox_rs.reports import ReportFiles, accuracy_table, write_report
from blackbox_rs.smoother import BlackBoxSmoother

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

Event = Callable[[str, int, int, dict[str, Any]], None]


class DemoConfig(BaseModel):
    """Sizes of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid")

    out_dir: Path = Path("blackbox-rs-demo")
    cache_dir: Path | None = Field(default=None, description="default: <out_dir>/cache")
    sigma: float = Field(default=0.25, gt=0)
    base_epochs: int = Field(default=30, ge=1)
    fit_budget: int = Field(default=40_000, ge=0, description="black-box queries the fit may spend")
    fit_steps: int = Field(default=400, ge=0)
    pretrain_steps: int = Field(default=400, ge=0)
    certify_inputs: int = Field(default=100, ge=1)
    n0: int = Field(default=100, ge=1)
    n: int = Field(default=1000, ge=1)
    alpha: float = Field(default=0.001, gt=0, lt=1)
    radii: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    seed: int = Field(default=0, ge=0)
    threads: int | None = Field(default=None, ge=1)


class DemoResult(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    report: ReportFiles
    table: str
    base_accuracy: float
    fit: FitReport
    queries: int
    runs: dict[str, DatasetCertification]


def _base_model(cfg: DemoConfig, cache: Path) -> tuple[Path, float]:
    """Train the digits CNN once; reuse the file (checked by hash) on later runs."""
    from blackbox_rs._demo.datasets import load_digits
    from blackbox_rs._demo.zoo import SmallCNN, accuracy, export_torchscript, train_classifier

    path, meta_path = cache / "digits_cnn.pt", cache / "digits_cnn.json"
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") == file_sha256(path) and meta.get("epochs") == cfg.base_epochs:
            return path, float(meta["test_accuracy"])
    xtr, ytr = load_digits("train", seed=cfg.seed)
    xte, yte = load_digits("test", seed=cfg.seed)
    model = train_classifier(SmallCNN(1, 10, (8, 8), width=16, seed=cfg.seed), xtr, ytr, epochs=cfg.base_epochs,
                             seed=cfg.seed, threads=cfg.threads)
    acc = float(accuracy(model, xte, yte))
    export_torchscript(model, path, (1, 8, 8))
    atomic_write(meta_path, json.dumps({"sha256": file_sha256(path), "epochs": cfg.base_epochs,
                                        "test_accuracy": acc}))
    return path, acc


def run_demo(cfg: DemoConfig | None = None, *, event: Event | None = None) -> DemoResult:
    """Run the whole pipeline (see the module docstring). ``event(stage, done, total, info)`` reports
    progress; the library never prints. Rerunning reuses the base model, and the query cache makes
    a rerun after an interruption repeat no query."""
    from blackbox_rs._demo.datasets import load_digits
    from blackbox_rs.connectors.http import TransportSettings
    from blackbox_rs.connectors.kserve_v2 import KServeV2Connector

    cfg = cfg or DemoConfig()
    ev = event or (lambda *a: None)
    out = Path(cfg.out_dir)
    cache = Path(cfg.cache_dir) if cfg.cache_dir is not None else out / "cache"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the demo directories {out} / {cache}: {exc}") from exc
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    ev("base model", 0, 1, {})
    model_path, base_acc = _base_model(cfg, cache)
    ev("base model", 1, 1, {"test_accuracy": base_acc})
    xtr, ytr = load_digits("train", seed=cfg.seed)
    xte, yte = load_digits("test", seed=cfg.seed)
    xte, yte = xte[: cfg.certify_inputs], yte[: cfg.certify_inputs]

    with V2ModelServer(model_path, input_shape=(1, 8, 8), num_classes=10, model_name="digits") as server:
        # the local port changes between runs: identify the endpoint by the model file instead, so a
        # rerun hits the query cache
        conn = KServeV2Connector(server.url, "digits", model_version="1", num_classes=10, max_batch=1000,
                                 transport=TransportSettings(max_in_flight=2), identity=f"local-demo:sha256:{file_sha256(model_path)}")
        engine = QueryEngine(conn, cache=cache / "queries", max_in_flight=2)
        try:
            fit_progress = lambda k, total, info: ev("fit", k, total, info)  # noqa: E731
            smoother = BlackBoxSmoother(engine, module="dncnn", sigma=cfg.sigma)
            report = smoother.fit(
                (xtr, ytr), strategy="surrogate", budget=cfg.fit_budget,
                steps=cfg.fit_steps, pretrain_steps=cfg.pretrain_steps, clean_queries=len(xtr),
                distill_queries=max(1, min(6000, cfg.fit_budget // 6)), redistill_every=max(1, cfg.fit_steps // 4),
                checkpoint_dir=cache / "fit", seed=cfg.seed, progress=fit_progress,
            )
            smoother.save(out / "smoother")
            runs: dict[str, DatasetCertification] = {}
            for name, sm in (("no module", BlackBoxSmoother(engine, module=None, sigma=cfg.sigma)),
                             ("fitted denoiser", smoother)):
                def cert_progress(i: int, c: Any, name: str = name) -> None:
                    ev(f"certify ({name})", i + 1, len(xte), {"queries": engine.stats.queries})

                runs[name] = sm.certify_dataset(
                    xte, yte.tolist(), n0=cfg.n0, n=cfg.n, alpha=cfg.alpha, seed=cfg.seed, radii=cfg.radii,
                    output=out / f"certificates_{name.replace(' ', '_')}.jsonl", progress=cert_progress,
                )
        finally:
            engine.close()
            conn.close()
    files = write_report(
        runs, out / "report", title=f"digits CNN behind OIP v2, sigma={cfg.sigma}",
        notes=[f"base model clean test accuracy: {base_acc:.3f}",
               f"fit: strategy surrogate, {report.queries:,} black-box queries, "
               f"{report.trainable_parameters:,} trainable parameters, stopped: {report.stopped}"],
    )
    return DemoResult(report=files, table=accuracy_table(runs), base_accuracy=base_acc, fit=report,
                      queries=engine.stats.queries, runs=runs)


def default_out_dir() -> Path:
    return Path(os.environ.get("BLACKBOX_RS_DEMO_DIR", "blackbox-rs-demo"))
