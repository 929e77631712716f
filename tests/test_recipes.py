"""The hosted-API recipes end to end against local fakes: report, resume, quota stop, dry run, user
errors, and no credential in any file, log or output (127.0.0.1 only)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from helpers.vendor_fakes import FAKES, RekognitionFake, VendorFake
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SECRET = VendorFake.secret

# recipe file -> (fake, env var holding the planted secret, extra flags)
CASES: dict[str, tuple[str, str | None, list[str]]] = {
    "huggingface": ("huggingface", "HF_TOKEN", []),
    "google_vision": ("google_vision", "GOOGLE_API_KEY", []),
    "aws_rekognition": ("aws_rekognition", "AWS_SECRET_ACCESS_KEY", []),
    "azure_vision": ("azure_image_analysis", "AZURE_VISION_KEY", []),
    "azure_custom_vision": ("azure_custom_vision", "AZURE_CUSTOM_VISION_KEY",
                            ["--project-id", "proj-1", "--published-name", "Iteration3"]),
    "clarifai": ("clarifai", "CLARIFAI_PAT", []),
    "torchserve": ("torchserve", "TORCHSERVE_TOKEN", ["--model", "resnet-18"]),
    "tf_serving": ("tf_serving", None, ["--model", "classifier", "--vocabulary", "cat,dog,sofa"]),
    "openai_chat": ("openai_chat", "OPENAI_API_KEY", []),
}
TINY = ["--size", "32", "--n0", "5", "--n", "20", "--alpha", "0.01", "--rate-limit", "0"]


def load(name: str) -> ModuleType:
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """3 images: two bright (cat), one dark (dog)."""
    for cls, level, count in (("cat", 225, 2), ("dog", 30, 1)):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((32, 32, 3), level + i, np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
    (tmp_path / "map.json").write_text(json.dumps({"cat": ["tabby, tabby cat", "tabby"],
                                                   "dog": ["golden retriever", "golden_retriever"]}))
    return tmp_path


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> None:
    for _, env, _ in CASES.values():
        if env:
            monkeypatch.setenv(env, SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", RekognitionFake.access_key)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


def argv(folder: Path, fake: VendorFake, name: str, *more: str) -> list[str]:
    return [str(folder / "images"), "--out", str(folder / "out"), "--cache-dir", str(folder / "cache"),
            "--label-map", str(folder / "map.json"), "--base-url", fake.url, *TINY, *CASES[name][2], *more]


@pytest.mark.parametrize("name", sorted(CASES))
def test_recipe_writes_a_report_and_never_writes_the_key(
    name: str, folder: Path, planted: None, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = load(name)
    with FAKES[CASES[name][0]]() as fake:
        assert mod.main(argv(folder, fake, name)) == 0
        assert fake.violations == []
        sent = len(fake.log)
        # rerun: every certificate is in the JSONL output, nothing is sent again
        assert mod.main(argv(folder, fake, name)) == 0
        assert len(fake.log) == sent
    out = folder / "out"
    for f in ("summary.md", "certificates.json", "certificates.csv", "certified_accuracy.csv", "run.log"):
        assert (out / f).is_file(), f
    assert len((out / "certificates.jsonl").read_text().splitlines()) == 3
    certs = json.loads((out / "certificates.json").read_text())
    assert [c["prediction"] for c in next(iter(certs.values()))] == [0, 0, 1]  # cat, cat, dog
    captured = capsys.readouterr()
    assert "certified accuracy" in captured.out
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.parent.name == "cache" or "cache" in p.parts for p in written)
    for p in written:
        assert SECRET.encode() not in p.read_bytes(), p
    assert SECRET not in captured.out + captured.err


def test_quota_stops_keeps_progress_and_resumes(folder: Path, planted: None, capsys: pytest.CaptureFixture[str]) -> None:
    mod = load("google_vision")
    with FAKES["google_vision"]() as fake:
        # first image: selection (5) + estimation (16 + 4) in 3 requests; the quota runs out on the next image
        fake.push("ok", "ok", "ok", "quota")
        assert mod.main(argv(folder, fake, "google_vision")) == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("stopped: the vendor's quota is exhausted") and "resume" in err[-1]
        assert "Traceback" not in "".join(err) and SECRET not in "".join(err)
        assert len((folder / "out" / "certificates.jsonl").read_text().splitlines()) == 1
        before = len(fake.log)
        assert mod.main(argv(folder, fake, "google_vision")) == 0
        assert len(fake.log) - before == 6  # the two images left: 3 requests each, nothing repeated
    assert len((folder / "out" / "certificates.jsonl").read_text().splitlines()) == 3


def test_dry_run_sends_nothing_and_needs_no_credentials(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    mod = load("google_vision")
    with FAKES["google_vision"]() as fake:
        assert mod.main(argv(folder, fake, "google_vision", "--dry-run")) == 0
        assert fake.log == []
    est: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert est["queries"] == 3 * 25 and est["requests"] == 3 * 3  # 16 images per request
    assert est["estimated_cost_usd"] == pytest.approx(75 * 1.5 / 1000)
    assert not (folder / "out").exists()


@pytest.mark.parametrize("flags, message", [
    ([], "environment variable 'GOOGLE_API_KEY'"),
    (["--n", "5"], "can never certify"),
    (["--labels", "bird,fish"], "not a class of this map"),
])
def test_user_errors_are_one_line_exit_2(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    mod = load("google_vision")
    with FAKES["google_vision"]() as fake:
        assert mod.main(argv(folder, fake, "google_vision", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_recipe_runs_as_a_script(folder: Path) -> None:
    proc = subprocess.run([sys.executable, str(RECIPES / "clarifai.py"), str(folder / "images"), "--dry-run",
                           "--n", "100"], capture_output=True, text=True, timeout=60, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["estimated_cost_usd"] == pytest.approx(3 * 200 * 1.2 / 1000)  # labelled: n0 + n each
    bad = subprocess.run([sys.executable, str(RECIPES / "clarifai.py"), str(folder / "nowhere")],
                         capture_output=True, text=True, timeout=60, cwd=folder)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
