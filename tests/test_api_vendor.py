"""The vendor front door (`blackbox-rs api <vendor>`, and the recipes which are it): label discovery,
lossless encoding by default and the encoding check, sequential certification by default, with what
the fake vendor billed equal to what the SDK counted."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import vendor_fakes
from helpers.vendor_fakes import GoogleVisionFake
from PIL import Image

SECRET = GoogleVisionFake.secret
FAST = ["--size", "32", "--rate-limit", "0"]


class FreeTextVision(GoogleVisionFake):
    """Google-Vision-compatible, answering free-text labels like a real ImageNet-backed endpoint."""

    labels = {"cat": ("/m/tabby", "tabby cat"), "dog": ("/m/golden", "golden retriever"),
              "sofa": ("/m/couch", "studio couch")}

    def billed(self) -> int:
        """Images in every request the vendor answered with 200 (what it bills)."""
        return sum(s.n_images for s in self.log if s.fault in ("ok", "item_error", "item_fatal"))

    def formats(self) -> set[str]:
        out = set()
        for s in self.log:
            for r in json.loads(s.body).get("requests", []):
                raw = base64.b64decode(r["image"]["content"])
                out.add("png" if raw.startswith(b"\x89PNG") else "jpeg" if raw.startswith(b"\xff\xd8") else "?")
        return out


@pytest.fixture
def photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """4 images in class folders named by the task (cat: bright, dog: dark), no label map yet."""
    monkeypatch.setenv("GOOGLE_API_KEY", SECRET)
    for cls, level, count in (("cat", 225, 2), ("dog", 30, 2)):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((32, 32, 3), level + 3 * i, np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
    return tmp_path


def api(*argv: str) -> int:
    from blackbox_rs.api import main

    return main("google-vision", list(argv))


def test_discover_labels_edit_map_certify_sequentially_report_billed_equals_counted(
    photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = photos / "out"
    common = [*FAST, "--out", str(out), "--max-queries", "100000"]
    with FreeTextVision() as fake:
        # 1. without a map, the vendor's words are all `other`: discover them (one query per image)
        assert api("labels", str(photos / "images"), "--base-url", fake.url, *common) == 0
        printed = capsys.readouterr().out
        assert "tabby cat" in printed and "golden retriever" in printed
        proposal = json.loads((out / "label_map.proposed.json").read_text())
        assert proposal["classes"][:2] == ["cat", "dog"]
        assert proposal["synonyms"]["cat"] == ["tabby cat"] and proposal["synonyms"]["dog"] == ["golden retriever"]
        assert fake.billed() == 4
        # a rerun is free: the raw answers are kept
        assert api("labels", str(photos / "images"), "--base-url", fake.url, *common) == 0
        assert fake.billed() == 4
        # 2. the user edits the proposal (adds a synonym) and passes it back
        proposal["synonyms"]["dog"].append("labrador retriever")
        edited = photos / "map.json"
        edited.write_text(json.dumps(proposal))
        # 3. sequential certification at r = 0.25 is the default
        assert api(str(photos / "images"), "--base-url", fake.url, "--label-map", str(edited), *common) == 0
        assert fake.formats() == {"png"}  # lossless by default
        billed = fake.billed()
    certs = [json.loads(line) for line in (out / "certificates.jsonl").read_text().splitlines()
             if '"prediction"' in line]
    assert len(certs) == 4 and {c["method"] for c in certs} == {"sequential_certify"}
    assert [c["prediction"] for c in certs] == [0, 0, 1, 1] and all(c["decision"] == "certified" for c in certs)
    # every sample agrees: each image stops at the first target look, far below the 1,101 cap
    assert all(c["queries"] < 200 for c in certs)
    # 4. what the vendor billed is what the SDK counted (ledger over both actions), and the report says so
    ledger = json.loads((out / "budget_ledger.json").read_text())
    assert ledger["spent_queries"] == billed == 4 + sum(c["queries"] for c in certs)
    summary = (out / "summary.md").read_text()
    assert "sequential test at r = 0.25" in summary and "png (lossless)" in summary
    log = (out / "run.log").read_text()
    assert "certified (resolved)" in log and "(cat)" in log and "(dog)" in log  # stop reasons and class names
    for p in out.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


def test_dry_run_gives_worst_case_and_all_agree_cost_and_writes_nothing(
    photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert api(str(photos / "images"), *FAST, "--out", str(photos / "out"), "--radius", "0.25", "--radius", "0.1",
               "--dry-run") == 0
    est = json.loads(capsys.readouterr().out)
    assert est["method"] == "sequential" and est["radii"] == [0.1, 0.25]
    assert est["queries_per_image_worst"] == 1101 and est["queries"] == 4 * 1101
    assert 10 < est["queries_per_image_if_all_agree"] < 200
    assert est["queries_if_all_agree"] == 4 * est["queries_per_image_if_all_agree"]
    assert est["encoding"] == "png (lossless)"
    assert not (photos / "out").exists()


def test_dry_run_all_agree_figure_is_what_an_agreeing_image_spends(photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = photos / "out"
    with FreeTextVision() as fake:
        flags = [str(photos / "images"), "--base-url", fake.url, "--labels", "cat,dog", *FAST, "--out", str(out),
                 "--label-map", str(_map(photos))]
        assert api(*flags, "--dry-run") == 0
        est = json.loads(capsys.readouterr().out)
        assert api(*flags) == 0
    certs = [json.loads(line) for line in (out / "certificates.jsonl").read_text().splitlines()
             if '"prediction"' in line]
    # labelled images: no clean query; every sample agrees with the fake's deterministic answer
    assert all(c["queries"] == est["queries_per_image_if_all_agree"] for c in certs)


def _map(photos: Path) -> Path:
    p = photos / "map.json"
    p.write_text(json.dumps({"cat": ["tabby cat"], "dog": ["golden retriever"]}))
    return p


def _edges(image: bytes) -> str:
    """A fake model sensitive to compression artefacts: an image of at most 4 grey levels is a cat,
    one with the many levels that JPEG's ringing adds to a sharp texture is a dog."""
    with Image.open(io.BytesIO(image)) as im:
        a = np.asarray(im.convert("L"))
    return "cat" if len(np.unique(a)) <= 4 else "dog"


def test_jpeg_that_flips_a_clean_label_is_reported_by_the_check(
    photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(vendor_fakes, "brightness_class", _edges)
    board = (np.indices((32, 32)).sum(0) % 2 * 120 + 60).astype(np.uint8)
    Image.fromarray(np.stack([board] * 3, -1)).save(photos / "images" / "cat" / "texture.png")
    out = photos / "out"
    with FreeTextVision() as fake:
        flags = [str(photos / "images"), "--base-url", fake.url, "--label-map", str(_map(photos)), *FAST,
                 "--out", str(out), "--encoding", "jpeg", "--jpeg-quality", "10"]
        assert api("check-encoding", *flags) == 0
        captured = capsys.readouterr()
        report = json.loads((out / "encoding_check.json").read_text())
        assert [f["image"] for f in report["changed"]] == ["cat/texture.png"]
        flip = report["changed"][0]
        assert flip["png_top_label"] == "tabby cat" and flip["jpeg_top_label"] == "golden retriever"
        assert flip["png_class"] == "cat" and flip["jpeg_class"] == "dog"
        assert "cat/texture.png" in captured.err and captured.err.startswith("warning: jpeg changes")
        assert report["queries_charged"] == 2 * 5 == fake.billed()
        # PNG: lossless, nothing to compare, nothing sent
        assert api("check-encoding", *flags[:-4], "--out", str(photos / "o2")) == 0
        assert fake.billed() == 10


def test_jpeg_is_an_explicit_option_recorded_in_the_fingerprint_and_the_report(photos: Path) -> None:
    from blackbox_rs.api.args import build_parser
    from blackbox_rs.api.run import connector_kwargs
    from blackbox_rs.api.vendors import get_vendor

    gv = get_vendor("google-vision")
    fps = {}
    for flags in ([], ["--encoding", "jpeg"], ["--encoding", "jpeg", "--jpeg-quality", "70"]):
        ns = build_parser(gv, "certify").parse_args(["imgs", *flags])
        conn = gv.build(ns, connector_kwargs(ns, ["cat", "dog"]))
        fps[tuple(flags)] = conn.info.fingerprint
        conn.close()
    assert len(set(fps.values())) == 3
    assert "enc=png" in fps[()] and "jpeg70" in fps[("--encoding", "jpeg", "--jpeg-quality", "70")]
    ns = build_parser(gv, "certify").parse_args(["imgs", "--jpeg-quality", "70"])
    from blackbox_rs.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="--jpeg-quality needs --encoding jpeg"):
        connector_kwargs(ns, ["cat", "dog"])


def test_cohen_on_request_and_the_command_line_is_the_same_front_door(photos: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "blackbox_rs.cli", "api", "google-vision", str(photos / "images"),
                           "--dry-run", "--method", "cohen", "--n", "100"], capture_output=True, text=True,
                          timeout=120, cwd=photos)
    assert proc.returncode == 0, proc.stderr
    est: dict[str, Any] = json.loads(proc.stdout)
    assert est["method"] == "cohen" and est["queries"] == 4 * (100 + 100)
    bad = subprocess.run([sys.executable, "-m", "blackbox_rs.cli", "api", "no-such-vendor", "x"],
                         capture_output=True, text=True, timeout=120, cwd=photos)
    assert bad.returncode == 2 and "unknown vendor" in bad.stderr and "google-vision" in bad.stderr


def test_a_fit_is_timed_before_it_starts_and_refused_over_the_limit(photos: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = [str(photos / "images"), *FAST, "--out", str(photos / "out"), "--fit", "denoise", "--fit-steps", "2",
             "--module-config", '{"factor": 4, "depth": 2, "width": 4}']
    assert api(*flags, "--dry-run") == 0
    captured = capsys.readouterr()
    est = json.loads(captured.out)
    timing = est["fit_time"]
    assert timing["module"] == "lowres" and timing["strategy"] == "denoise" and timing["queries"] == 0
    assert timing["total_seconds"] > 0 and timing["within_limit"] and timing["limit_s"] == 3600
    assert "measured, not guessed" in captured.err  # the human summary, beside the JSON
    # a limit the measured estimate exceeds: refused before anything is sent or written (exit 2)
    with FreeTextVision() as fake:
        assert api(*flags, "--base-url", fake.url, "--max-fit-minutes", "0.0001") == 2
        assert fake.log == []
    err = capsys.readouterr().err
    assert "the fit is estimated at" in err and "over the limit" in err
    assert not (photos / "out" / "certificates.jsonl").exists()


def test_labels_deeper_than_the_top_answer_never_propose_a_label_of_two_classes(
    photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """'Animal' is every image's second label: at --label-depth 2 it was proposed for cat and dog
    alike, and building the proposal failed after the queries were paid."""
    out = photos / "out"
    with FreeTextVision() as fake:
        assert api("labels", str(photos / "images"), "--base-url", fake.url, *FAST, "--out", str(out),
                   "--label-depth", "2") == 0
    proposal = json.loads((out / "label_map.proposed.json").read_text())
    assert proposal["synonyms"] == {"cat": ["tabby cat"], "dog": ["golden retriever"]}
    assert json.loads((out / "labels.json").read_text())["ambiguous"] == ["Animal"]


def test_labels_on_a_flat_folder_needs_no_task_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_API_KEY", SECRET)
    (tmp_path / "flat").mkdir()
    for i, level in enumerate((225, 228, 30)):
        Image.fromarray(np.full((32, 32, 3), level, np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    with FreeTextVision() as fake:
        assert api("labels", str(tmp_path / "flat"), "--base-url", fake.url, *FAST, "--out", str(tmp_path / "o")) == 0
        assert fake.billed() == 3
    proposal = json.loads((tmp_path / "o" / "label_map.proposed.json").read_text())
    assert proposal["classes"][:2] == ["tabby cat", "golden retriever"]


def test_the_dry_run_counts_the_encoding_check_and_reports_the_quality_sent(
    photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = [str(photos / "images"), *FAST, "--out", str(photos / "out"), "--method", "cohen", "--n", "100"]
    assert api(*flags, "--dry-run") == 0
    plain = json.loads(capsys.readouterr().out)
    assert api(*flags, "--encoding", "jpeg", "--check-encoding", "--dry-run") == 0
    checked = json.loads(capsys.readouterr().out)
    assert checked["queries"] == plain["queries"] + 2 * 4 and checked["encoding_check_queries"] == 8
    with FreeTextVision() as fake:
        assert api("check-encoding", str(photos / "images"), "--base-url", fake.url, *FAST, "--out",
                   str(photos / "out"), "--encoding", "jpeg") == 0
    assert json.loads((photos / "out" / "encoding_check.json").read_text())["jpeg_quality"] == 90


@pytest.mark.parametrize("flags", [["--size", "0"], ["--limit", "-1"], ["--help"]])
def test_bad_sizes_and_help_return_an_exit_code(photos: Path, flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = api(str(photos / "images"), *flags)
    assert code == (0 if flags == ["--help"] else 2)
    if code:
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "must be >= 1" in err
