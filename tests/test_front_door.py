"""The smoother's sequential methods, dataset validation before the first query, saving errors, the
default futility level and the command's --version / --help (issue #17, first part)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from blackbox_rs import BlackBoxSmoother, defaults
from blackbox_rs.certify_sequential import certify_radius_dataset
from blackbox_rs.connectors import CallableConnector
from blackbox_rs.dataset import certify_dataset
from blackbox_rs.errors import ConfigError, InvalidInputError, ResumeMismatchError

SHAPE = (1, 4, 4)


class Counting:
    def __init__(self) -> None:
        self.sent = 0

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        self.sent += len(b)
        return (b.flatten(1).mean(1) > 0.5).long()


def conn(fn=None) -> CallableConnector:
    return CallableConnector(fn or Counting(), input_shape=SHAPE, num_classes=2, fingerprint="t:v1")


def test_a_bad_image_late_in_the_dataset_is_found_before_any_query():
    fn = Counting()
    xs = torch.rand(5, *SHAPE)
    xs[4, 0, 0, 0] = float("nan")
    for run in (lambda: certify_dataset(conn(fn), xs, [0] * 5, sigma=0.25, n0=10, n=100, alpha=0.01, seed=0),
                lambda: certify_radius_dataset(conn(fn), xs, [0] * 5, radius=0.1, sigma=0.25, alpha=0.01, seed=0),
                lambda: certify_dataset(conn(fn), iter(list(xs)), sigma=0.25, n0=10, n=100, alpha=0.01, seed=0)):
        with pytest.raises(InvalidInputError, match="input 4.*NaN.*nothing was sent"):
            run()
    with pytest.raises(InvalidInputError, match="label 7"):
        certify_dataset(conn(fn), torch.rand(3, *SHAPE), [0, 1, 7], sigma=0.25, n0=10, n=100, alpha=0.01, seed=0)
    with pytest.raises(InvalidInputError, match="4 labels for 3 inputs"):
        certify_dataset(conn(fn), torch.rand(3, *SHAPE), [0, 1, 0, 1], sigma=0.25, n0=10, n=100, alpha=0.01)
    assert fn.sent == 0
    # a one-shot iterator is certified in full after the check
    ok = certify_dataset(conn(fn), iter(list(torch.rand(3, *SHAPE))), sigma=0.25, n0=10, n=100, alpha=0.01, seed=0)
    assert len(ok.certificates) == 3


def test_the_smoother_certifies_at_radii_bound_to_its_module(tmp_path):
    torch.manual_seed(0)
    sm = BlackBoxSmoother(conn(), module={"name": "dncnn", "depth": 2, "width": 4}, sigma=0.25)
    x = torch.full(SHAPE, 0.9)
    cert = sm.certify_radius(x, radius=0.1, alpha=0.01, seed=1)
    assert cert.transform == sm.module.digest() and cert.futility == defaults.FUTILITY == 0.05
    out = tmp_path / "s.jsonl"
    res = sm.certify_radius_dataset(torch.stack([x, 1 - x]), [1, 0], radius=0.1, alpha=0.01, seed=1, output=out)
    assert {c.transform for c in res.certificates} == {sm.module.digest()}
    bare = BlackBoxSmoother(conn(), module=None, sigma=0.25)
    with pytest.raises(ResumeMismatchError, match="transform"):
        bare.certify_radius_dataset(torch.stack([x, 1 - x]), [1, 0], radius=0.1, alpha=0.01, seed=1, output=out)


def test_save_errors_are_typed_and_a_tampered_module_is_refused(tmp_path):
    torch.manual_seed(0)
    sm = BlackBoxSmoother(conn(), module={"name": "dncnn", "depth": 2, "width": 4}, sigma=0.25)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(ConfigError, match="not writable"):
        sm.save(blocked / "sub")
    d = sm.save(tmp_path / "s")
    meta = json.loads((d / "smoother.json").read_text())
    assert meta["module_digest"] == sm.module.digest()
    assert BlackBoxSmoother.load(d, conn()).module.digest() == sm.module.digest()
    meta["module_digest"] = "module:dncnn:sha256:" + "0" * 64
    (d / "smoother.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="digest"):
        BlackBoxSmoother.load(d, conn())


def test_version_and_fast_help():
    from blackbox_rs import __version__

    r = subprocess.run([sys.executable, "-m", "blackbox_rs.cli", "--version"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"blackbox-rs {__version__}"
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "import sys, blackbox_rs.cli as c; sys.argv=['blackbox-rs','--help']\n"
                        "try:\n c.main()\nexcept SystemExit:\n pass\nprint('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t
    assert r.returncode == 0 and "certify" in r.stdout
    assert r.stdout.strip().endswith("False"), "--help imported torch"
    assert elapsed < 5  # well under a second on an idle machine; generous for a loaded CI runner


def test_a_run_refused_by_validation_creates_no_journal(tmp_path):
    xs = torch.rand(3, *SHAPE)
    xs[2] = 2.0
    for run in (lambda o: certify_dataset(conn(), xs, [0, 1, 0], sigma=0.25, n0=10, n=100, alpha=0.01, output=o),
                lambda o: certify_radius_dataset(conn(), xs, [0, 1, 0], radius=0.1, sigma=0.25, alpha=0.01,
                                                 output=o)):
        out = tmp_path / "never.jsonl"
        with pytest.raises(InvalidInputError, match="input 2"):
            run(out)
        assert not out.exists()


def test_the_engines_concurrency_comes_from_the_connector():
    """#17: the engine's default was 1 while the connector declared its concurrency (set twice)."""
    from blackbox_rs import QueryEngine

    c = CallableConnector(Counting(), input_shape=SHAPE, num_classes=2, max_concurrency=6)
    assert QueryEngine(c).max_in_flight == 6
    assert QueryEngine(c, max_in_flight=2).max_in_flight == 2
    assert QueryEngine(c, max_in_flight=50).max_in_flight == 6  # never more than declared


def test_the_python_api_shows_progress_on_a_terminal_only(monkeypatch, capsys):
    """#17: a 40-minute fit through the Python API was silent."""
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    x = torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(0))
    sm = BlackBoxSmoother(CallableConnector(Counting(), input_shape=SHAPE, num_classes=2, cost_per_query=0.01),
                          module={"name": "dncnn", "depth": 2, "width": 4}, sigma=0.25)
    sm.fit(x, strategy="denoise", pretrain_steps=3, steps=0)
    sm.certify_dataset(x[:2], [0, 1], n0=10, n=100, alpha=0.01, seed=0)
    assert capsys.readouterr().err == ""  # not a terminal: nothing
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    sm.certify_dataset(x[:2], [0, 1], n0=10, n=100, alpha=0.01, seed=0)
    out = tty.getvalue()
    assert "certify" in out and "2/2" in out and "queries 220" in out and "cost 2.2" in out
    tty.truncate(0)
    sm.certify_dataset(x[:2], [0, 1], n0=10, n=100, alpha=0.01, seed=0, progress=None)
    assert tty.getvalue().strip("\x00") == ""


def test_a_fit_checkpoint_is_never_resumed_on_other_data_of_the_same_size(tmp_path):
    """Review finding: the fit checkpoint recorded only len(data), so other images resumed it."""
    from blackbox_rs.errors import CacheError

    a = torch.rand(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    b = torch.rand(8, *SHAPE, generator=torch.Generator().manual_seed(1))
    sm = BlackBoxSmoother(conn(), module={"name": "dncnn", "depth": 2, "width": 4}, sigma=0.25)
    sm.fit(a, strategy="denoise", pretrain_steps=3, steps=0, checkpoint_dir=tmp_path / "fit")
    again = BlackBoxSmoother(conn(), module={"name": "dncnn", "depth": 2, "width": 4}, sigma=0.25)
    assert again.fit(a, strategy="denoise", pretrain_steps=3, steps=0,
                     checkpoint_dir=tmp_path / "fit").resumed_from == 3
    other = BlackBoxSmoother(conn(), module={"name": "dncnn", "depth": 2, "width": 4}, sigma=0.25)
    with pytest.raises(CacheError):
        other.fit(b, strategy="denoise", pretrain_steps=3, steps=0, checkpoint_dir=tmp_path / "fit")
