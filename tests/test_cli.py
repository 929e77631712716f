"""The `blackbox-rs` command: demo pipeline, fit/certify/report from a TOML file, user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from blackbox_rs._demo.pipeline import DemoConfig, run_demo
from blackbox_rs._demo.zoo import SmallCNN, export_torchscript, train_classifier
from blackbox_rs.cli import app

runner = CliRunner()


def one_line_error(result) -> str:
    out = (result.stderr if hasattr(result, "stderr") else "") or result.output
    assert result.exit_code == 2, (result.exit_code, out)
    assert "Traceback" not in out
    lines = [line for line in out.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    return lines[0]


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(out_dir=out, base_epochs=30, fit_budget=12_000, fit_steps=150, pretrain_steps=300,
                     certify_inputs=40, n0=50, n=300, sigma=0.25)
    events = []
    return run_demo(cfg, event=lambda *e: events.append(e)), out, events


def test_demo_pipeline_writes_the_report_and_the_module_helps(demo_result):
    result, out, events = demo_result
    files = result.report
    for f in (files.summary, files.certificates_json, files.certificates_csv, files.accuracy_csv):
        assert Path(f).is_file() and Path(f).stat().st_size > 0
    assert files.plot is not None and Path(files.plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = Path(files.summary).read_text()
    for needle in ("sigma = 0.25", "n0 = 50", "n = 300", "alpha = 0.001", "ground-truth labels", "queries charged"):
        assert needle in summary
    assert result.fit.queries <= 12_000 and result.fit.queries > 0
    none = result.runs["no module"].certificates
    fitted = result.runs["fitted denoiser"].certificates
    # the fitted module certifies more than no module: a larger mean certified radius over correct inputs
    score = lambda certs: sum(c.radius for c in certs if c.correct)  # noqa: E731
    assert score(fitted) > score(none) * 1.05, (score(fitted), score(none))
    assert {e[0] for e in events} >= {"base model", "fit", "certify (no module)", "certify (fitted denoiser)"}
    json.loads(Path(files.certificates_json).read_text())


def test_demo_rerun_repeats_no_query(demo_result):
    result, out, _ = demo_result
    cfg = DemoConfig(out_dir=out, base_epochs=30, fit_budget=12_000, fit_steps=150, pretrain_steps=300,
                     certify_inputs=40, n0=50, n=300, sigma=0.25)
    again = run_demo(cfg)
    assert again.queries == 0  # base model reused, fit resumed from its final checkpoint, certificates reloaded
    assert again.table == result.table


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    from blackbox_rs._demo.datasets import load_digits

    d = tmp_path_factory.mktemp("run")
    xtr, ytr = load_digits("train")
    xte, yte = load_digits("test")
    model = train_classifier(SmallCNN(1, 10, (8, 8), width=8, seed=0), xtr, ytr, epochs=5, seed=0, threads=1)
    export_torchscript(model, d / "m.pt", (1, 8, 8))
    np.savez(d / "train.npz", x=xtr[:200].numpy(), y=ytr[:200].numpy())
    np.savez(d / "test.npz", x=(xte[:6].numpy() * 255).astype(np.uint8), y=yte[:6].numpy())
    cfg = f"""
[connector]
name = "torchscript"
path = "{d / 'm.pt'}"
input_shape = [1, 8, 8]
num_classes = 10
label_only = true

[data]
fit = "{d / 'train.npz'}"
certify = "{d / 'test.npz'}"

[fit]
strategy = "denoise"
pretrain_steps = 20
steps = 0

[certify]
sigma = 0.25
n0 = 10
n = 100
alpha = 0.01

[run]
out_dir = "{d / 'out'}"
"""
    (d / "run.toml").write_text(cfg)
    return d


def test_fit_certify_report_from_a_config_file(run_files):
    d = run_files
    r = runner.invoke(app, ["certify", str(d / "run.toml"), "--dry-run"])
    assert r.exit_code == 0 and "660 queries" in r.output and "nothing was sent" in r.output
    assert not list((d / "out").glob("certificates*.jsonl"))
    r = runner.invoke(app, ["fit", str(d / "run.toml")])
    assert r.exit_code == 0, r.output
    assert (d / "out" / "smoother" / "smoother.json").is_file()
    r = runner.invoke(app, ["certify", str(d / "run.toml"), "--module-dir", str(d / "out" / "smoother")])
    assert r.exit_code == 0, r.output
    (journal,) = (d / "out").glob("certificates-module-*.jsonl")
    lines = journal.read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[0])["blackbox_rs_journal"] == 2  # header + 6 certificates
    # the same command again resumes: nothing new is appended, nothing is re-queried
    r = runner.invoke(app, ["certify", str(d / "run.toml"), "--module-dir", str(d / "out" / "smoother")])
    assert r.exit_code == 0 and len(journal.read_text().splitlines()) == 7
    r = runner.invoke(app, ["report", str(journal), "--out-dir", str(d / "rep")])
    assert r.exit_code == 0 and (d / "rep" / "summary.md").is_file()


def test_bare_and_module_runs_never_share_a_journal(run_files, tmp_path):
    """Regression (#16 item 1): `certify run.toml` then `certify run.toml --module-dir ...` wrote both into
    one certificates.jsonl, and the second run returned the bare model's certificates, labelled as the
    fitted module's, with 0 queries."""
    d = run_files
    out = tmp_path / "out"
    r = runner.invoke(app, ["fit", str(d / "run.toml"), "--out-dir", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["certify", str(d / "run.toml"), "--out-dir", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["certify", str(d / "run.toml"), "--out-dir", str(out), "--module-dir",
                            str(out / "smoother")])
    assert r.exit_code == 0, r.output
    bare = [json.loads(x) for x in (out / "certificates-bare.jsonl").read_text().splitlines()[1:]]
    (mod_path,) = out.glob("certificates-module-*.jsonl")
    mod = [json.loads(x) for x in mod_path.read_text().splitlines()[1:]]
    assert len(bare) == len(mod) == 6
    assert {c["transform"] for c in bare} == {"none"}
    assert all(c["transform"].startswith("module:dncnn:sha256:") for c in mod)
    assert sum(c["queries"] for c in mod) > 0  # the module's certificates were computed, not copied


def test_user_errors_are_one_line(run_files, tmp_path, monkeypatch):
    d = run_files
    base = (d / "run.toml").read_text()

    def run_with(text: str, *extra: str) -> str:
        p = tmp_path / "c.toml"
        p.write_text(text)
        return one_line_error(runner.invoke(app, ["certify", str(p), *extra]))

    assert "unknown connector 'torchscrip'" in run_with(base.replace('name = "torchscript"', 'name = "torchscrip"'))
    assert "certify.nn" in run_with(base.replace("n = 100", "nn = 100")) and "unknown key" in run_with(
        base.replace("n = 100", "nn = 100"))
    assert "'pathh'" in run_with(base.replace("path =", "pathh ="))
    monkeypatch.delenv("BBRS_TEST_TOKEN", raising=False)
    v2 = base.replace('name = "torchscript"', 'name = "kserve_v2"\nbase_url = "http://127.0.0.1:9"\n'
                      'model_name = "m"\nbearer_token_env = "BBRS_TEST_TOKEN"')
    v2 = "\n".join(line for line in v2.splitlines() if not line.startswith(("path", "label_only")))
    assert "BBRS_TEST_TOKEN" in run_with(v2)
    blocked = tmp_path / "ro"
    blocked.write_text("a file, not a directory")
    assert "not writable" in run_with(base, "--out-dir", str(blocked / "sub"))
    assert "not valid TOML" in run_with("[connector\nname=")
    assert "does not exist" in run_with(base.replace(str(d / "test.npz"), str(d / "missing.npz")))


def test_dry_runs_create_nothing(run_files, tmp_path):
    """#17: `--dry-run` created the cache (and the output folder)."""
    d = run_files
    for cmd in ("certify", "fit"):
        out = tmp_path / cmd
        r = runner.invoke(app, [cmd, str(d / "run.toml"), "--out-dir", str(out), "--dry-run"])
        assert r.exit_code == 0 and "nothing was sent" in r.output, r.output
        assert not out.exists()


def test_exit_codes_match_the_recipes(run_files, tmp_path, monkeypatch):
    """Regression (#16 item 15): a spent budget and a service failure are not user errors (code 2)."""
    from blackbox_rs import exit_codes

    d = run_files
    r = runner.invoke(app, ["certify", str(d / "run.toml"), "--out-dir", str(tmp_path / "o"), "--budget", "50"])
    assert r.exit_code == exit_codes.BUDGET_SPENT == 3, r.output
    assert "larger budget" in r.output and "nothing was sent" in r.output
    monkeypatch.setenv("BBRS_TEST_TOKEN", "s3cret-token")
    base = (d / "run.toml").read_text()
    v2 = base.replace('name = "torchscript"', 'name = "kserve_v2"\nbase_url = "http://127.0.0.1:9"\n'
                      'model_name = "m"\nbearer_token_env = "BBRS_TEST_TOKEN"')
    v2 = "\n".join(line for line in v2.splitlines() if not line.startswith(("path", "label_only")))
    p = tmp_path / "v2.toml"
    p.write_text(v2)
    r = runner.invoke(app, ["certify", str(p), "--out-dir", str(tmp_path / "o2")])
    assert r.exit_code == exit_codes.SERVICE_FAILURE == 5, r.output
    assert "s3cret-token" not in r.output


def test_console_script_entry_point(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "blackbox_rs.cli", "certify", str(tmp_path / "none.toml")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_a_fit_dry_run_shows_the_cap_and_what_its_pilot_spends_when_nothing_helps(run_files, tmp_path):
    """#23: the dry run prints both figures; the second is the pilot's cost (a tenth of the cap at most)."""
    from blackbox_rs.fitting.config import FitConfig
    from blackbox_rs.fitting.strategies import estimate_fit_queries, expected_fit_queries

    d = run_files
    fit = {"strategy": "surrogate", "pretrain_steps": 10, "steps": 400, "score_every": 10, "batch_size": 8,
           "distill_queries": 2000, "redistill_every": 10}
    text = (d / "run.toml").read_text().replace(
        '[fit]\nstrategy = "denoise"\npretrain_steps = 20\nsteps = 0\n',
        "[fit]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in fit.items()))
    assert 'strategy = "surrogate"' in text
    (tmp_path / "run.toml").write_text(text)
    r = runner.invoke(app, ["fit", str(tmp_path / "run.toml"), "--out-dir", str(tmp_path / "o"), "--dry-run"])
    assert r.exit_code == 0, r.output
    cfg = FitConfig(**fit)
    cap, expected = estimate_fit_queries(cfg, 200), expected_fit_queries(cfg, 200)
    assert expected <= 0.1 * cap
    assert f"at most {cap:,} queries" in r.output
    assert f"{expected:,} if its pilot's 2 scoring rounds show no gain (early stop)" in r.output
