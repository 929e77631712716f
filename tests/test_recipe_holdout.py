"""Recipes with ``--fit`` never certify the images they fitted on: a held-out split by default
(``--fit-fraction``, seeded, recorded in split.json) or a separate ``--fit-images`` folder (disjoint by
content hash), and the fit's real query cap in the estimate (127.0.0.1 only, a fake vendor)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.vendor_fakes import FAKES, VendorFake
from PIL import Image
from test_recipes import TINY, load, n_certificates

SECRET = VendorFake.secret


def _make(folder: Path, spec: dict[str, tuple[int, int]]) -> None:
    for cls, (level, count) in spec.items():
        (folder / cls).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((32, 32, 3), level + 3 * i, np.uint8)).save(folder / cls / f"{i}.png")


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """6 images (4 bright cats, 2 dark dogs), every one with its own pixel value."""
    _make(tmp_path / "images", {"cat": (200, 4), "dog": (20, 2)})
    (tmp_path / "map.json").write_text(json.dumps({"cat": ["Cat", "/m/01yrx"], "dog": ["Dog", "/m/0bt9lr"]}))
    monkeypatch.setenv("GOOGLE_API_KEY", SECRET)
    return tmp_path


def args(work: Path, fake: Any, *more: str) -> list[str]:
    return [str(work / "images"), "--out", str(work / "out"), "--cache-dir", str(work / "cache"),
            "--label-map", str(work / "map.json"), "--base-url", fake.url, *TINY, *more]


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Record what the smoother fits on and what it certifies (the real methods still run)."""
    from blackbox_rs.smoother import BlackBoxSmoother

    got: dict[str, list[Any]] = {"fit": [], "certify": []}
    fit, certify = BlackBoxSmoother.fit, BlackBoxSmoother.certify_dataset

    def rec_fit(self: Any, dataset: Any, **kw: Any) -> Any:
        got["fit"].append(dataset[0] if isinstance(dataset, tuple) else dataset)
        return fit(self, dataset, **kw)

    def rec_certify(self: Any, inputs: Any, *a: Any, **kw: Any) -> Any:
        got["certify"].append(inputs)
        return certify(self, inputs, *a, **kw)

    monkeypatch.setattr(BlackBoxSmoother, "fit", rec_fit)
    monkeypatch.setattr(BlackBoxSmoother, "certify_dataset", rec_certify)
    return got


def _values(x: torch.Tensor) -> set[int]:
    """The pixel value (0..255) of each of these uniform images."""
    return {round(float(v) * 255) for v in x.mean(dim=(1, 2, 3))}


def test_fit_holds_out_half_and_certifies_only_the_rest(work: Path, seen: dict[str, list[Any]]) -> None:
    mod = load("google_vision")
    with FAKES["google_vision"]() as fake:
        assert mod.main(args(work, fake, "--fit", "denoise", "--fit-steps", "1", "--module", "prompt_full")) == 0
        sent = len(fake.log)
        assert mod.main(args(work, fake, "--fit", "denoise", "--fit-steps", "1", "--module", "prompt_full")) == 0  # same split: resumes
        assert len(fake.log) == sent
    split = json.loads((work / "out" / "split.json").read_text())
    assert split["mode"] == "fraction" and split["fit_fraction"] == 0.5 and split["split_seed"] == 0
    every = {"cat/0.png", "cat/1.png", "cat/2.png", "cat/3.png", "dog/0.png", "dog/1.png"}
    assert len(split["fit"]) == 3 and len(split["certify"]) == 3
    assert set(split["fit"]).isdisjoint(split["certify"]) and set(split["fit"]) | set(split["certify"]) == every
    assert split["certified"] == split["certify"]
    # the smoother was given exactly those images, never the same image on both sides
    fit_x, cert_x = seen["fit"][0], seen["certify"][0]
    assert len(fit_x) == 3 and len(cert_x) == 3 and _values(fit_x).isdisjoint(_values(cert_x))
    level = {f"{c}/{i}.png": lv + 3 * i for c, (lv, k) in {"cat": (200, 4), "dog": (20, 2)}.items() for i in range(k)}
    assert _values(fit_x) == {level[n] for n in split["fit"]}
    assert n_certificates(work / "out") == 3
    log = (work / "out" / "run.log").read_text()
    assert "split (fraction): fit on 3 image(s)" in log and all(n in log for n in every)
    assert "split.json" in (work / "out" / "summary.md").read_text()


def test_the_split_is_seeded_and_another_split_into_the_same_out_is_refused(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = load("google_vision")
    with FAKES["google_vision"]() as fake:
        assert mod.main(args(work, fake, "--fit", "denoise", "--fit-steps", "1", "--module", "prompt_full")) == 0
        first = json.loads((work / "out" / "split.json").read_text())
        capsys.readouterr()
        sent = len(fake.log)
        assert mod.main(args(work, fake, "--fit", "denoise", "--fit-steps", "1", "--module", "prompt_full", "--split-seed", "5")) == 2
        assert len(fake.log) == sent
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another split" in err[0] and "--out" in err[0]
        # the same seed into a fresh folder draws the same split
        assert mod.main(args(work, fake, "--fit", "denoise", "--fit-steps", "1", "--module", "prompt_full", "--out", str(work / "o2"))) == 0
    assert json.loads((work / "o2" / "split.json").read_text())["fit"] == first["fit"]


def test_fit_images_folder_is_fitted_on_and_every_image_is_certified(
    work: Path, seen: dict[str, list[Any]]
) -> None:
    _make(work / "fitset", {"cat": (230, 2), "dog": (40, 1)})
    mod = load("google_vision")
    with FAKES["google_vision"]() as fake:
        assert mod.main(args(work, fake, "--fit", "denoise", "--fit-steps", "1", "--module", "prompt_full",
                             "--fit-images", str(work / "fitset"))) == 0
    split = json.loads((work / "out" / "split.json").read_text())
    assert split["mode"] == "folder" and split["fit_folder"] == str(work / "fitset")
    assert split["fit"] == ["cat/0.png", "cat/1.png", "dog/0.png"] and len(split["certify"]) == 6
    assert _values(seen["fit"][0]) == {230, 233, 40} and len(seen["certify"][0]) == 6


def test_a_fit_image_that_is_also_a_certification_image_is_refused(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (work / "fitset" / "cat").mkdir(parents=True)
    shutil.copy(work / "images" / "dog" / "1.png", work / "fitset" / "cat" / "renamed.png")  # same bytes
    mod = load("google_vision")
    with FAKES["google_vision"]() as fake:
        assert mod.main(args(work, fake, "--fit", "denoise", "--fit-images", str(work / "fitset"))) == 2
        assert fake.log == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "also certification images" in err[0] and "renamed.png" in err[0]
    assert str(work / "images" / "dog" / "1.png") in err[0]
    assert not (work / "out").exists()


def test_without_fit_every_image_is_certified(work: Path) -> None:
    mod = load("google_vision")
    with FAKES["google_vision"]() as fake:
        assert mod.main(args(work, fake)) == 0
    split = json.loads((work / "out" / "split.json").read_text())
    assert split["mode"] == "none" and split["fit"] == [] and len(split["certify"]) == 6
    assert n_certificates(work / "out") == 6


def test_dry_run_reports_the_split_and_the_fits_real_query_cap(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blackbox_rs.fitting.config import FitConfig

    mod = load("google_vision")
    with FAKES["google_vision"]() as fake:
        assert mod.main(args(work, fake, "--fit", "surrogate", "--dry-run")) == 0
        est = json.loads(capsys.readouterr().out)
        assert mod.main(args(work, fake, "--fit", "surrogate", "--fit-budget", "500", "--dry-run")) == 0
        capped = json.loads(capsys.readouterr().out)
        assert mod.main(args(work, fake, "--fit", "zeroth_order", "--module", "dncnn", "--fit-steps", "10", "--dry-run")) == 0
        zo = json.loads(capsys.readouterr().out)
        assert fake.log == []
    assert est["images"] == 3 and est["fit_images"] == 3 and est["split"] == "fraction"
    from blackbox_rs.fitting.strategies import estimate_fit_queries  # the command line's own estimate

    # no --fit-budget: the strategy's own default query cost on the 3 fit images, not 0
    vendor_fit = {"steps": 300, "pretrain_steps": 300, "batch_size": 16, "lr_schedule": "cosine"}  # front-door defaults
    assert est["fit_queries"] == estimate_fit_queries(FitConfig(strategy="surrogate", **vendor_fit), 3, None) > 1000
    assert est["queries"] == 3 * 25 + est["fit_queries"]
    assert est["estimated_cost_usd"] == pytest.approx(est["queries"] * 1.5 / 1000)
    assert capped["fit_queries"] == 500
    assert zo["fit_queries"] == estimate_fit_queries(FitConfig(strategy="zeroth_order", **{**vendor_fit, "steps": 10,
                                                                                           "pretrain_steps": 10}),
                                                     3, None) > 0
    assert not (work / "out").exists()
