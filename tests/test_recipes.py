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
# Cohen's CERTIFY at tiny n (the sequential default has its own tests: tests/test_api_vendor.py)
TINY = ["--size", "32", "--method", "cohen", "--n0", "5", "--n", "20", "--alpha", "0.01", "--rate-limit", "0"]


def n_certificates(out: Path) -> int:
    """Certificates in OUT/certificates.jsonl (the header and progress records do not count)."""
    lines = (out / "certificates.jsonl").read_text().splitlines()
    return sum(1 for line in lines if line.strip() and "prediction" in json.loads(line))


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
    assert n_certificates(out) == 3
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
        assert mod.main(argv(folder, fake, "google_vision")) == 4  # exit_codes.QUOTA_EXHAUSTED
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("stopped: the vendor's quota is exhausted") and "resume" in err[-1]
        assert "Traceback" not in "".join(err) and SECRET not in "".join(err)
        assert n_certificates(folder / "out") == 1
        before = len(fake.log)
        assert mod.main(argv(folder, fake, "google_vision")) == 0
        assert len(fake.log) - before == 6  # the two images left: 3 requests each, nothing repeated
    assert n_certificates(folder / "out") == 3


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
                           "--method", "cohen", "--n", "100"], capture_output=True, text=True, timeout=60, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["estimated_cost_usd"] == pytest.approx(3 * 200 * 1.2 / 1000)  # labelled: n0 + n each
    bad = subprocess.run([sys.executable, str(RECIPES / "clarifai.py"), str(folder / "nowhere")],
                         capture_output=True, text=True, timeout=60, cwd=folder)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


# ---- exit codes (blackbox_rs.exit_codes), shared with the blackbox-rs command line ------------------
def _exit_cases() -> list[tuple[BaseException, int, tuple[str, ...]]]:
    from blackbox_rs import errors as e

    return [
        (e.BudgetSpentError("ledger out/budget_ledger.json: 30 of 30 spent"), 3, ("larger budget", "persisted")),
        (e.BudgetExceeded("query budget exhausted: 20 of 20"), 3, ("larger budget", "from the cache")),
        (e.QuotaExhausted("429 daily quota", status=429, retry_after=60), 4, ("quota is exhausted", "wait", "60")),
        (e.RateLimitedError("still 429", status=429), 5, ("rate-limited", "resume")),
        (e.RequestTimeoutError("no answer within 0.3 s"), 5, ("service failure", "resume")),
        (e.ServiceUnavailableError("503", status=503), 5, ("service failure",)),
        (e.EndpointUnreachableError("connection refused"), 5, ("service failure",)),
        (e.ModelVersionChangedError("v1 -> v2"), 5, ("service failure",)),
        (e.ConnectorError("odd answer"), 5, ("service failure",)),
        (e.AuthenticationError("401 bad key", status=401), 2, ("error: ",)),
        (e.ConfigError("missing environment variable 'X'"), 2, ("error: ",)),
        (e.InvalidParameterError("n0 must be >= 1"), 2, ("error: ",)),
        (e.ResumeMismatchError("another seed", {"seed": (1, 2)}), 2, ("error: ",)),
        (e.SplitOverlapError("cat/0.png is also a certification image"), 2, ("error: ",)),
        (KeyboardInterrupt(), 130, ("interrupted", "resume")),
        (RuntimeError("bug"), 1, ("internal error", "RuntimeError")),
    ]


@pytest.mark.parametrize("case", range(16))
def test_each_exception_family_has_its_exit_code_and_hint(case: int) -> None:
    from blackbox_rs.exit_codes import classify

    exc, code, hints = _exit_cases()[case]
    got, line = classify(exc)
    assert got == code, (exc, line)
    assert "\n" not in line and all(h in line for h in hints), line


def test_exit_code_constants_and_redacted_one_line() -> None:
    from blackbox_rs import exit_codes as ec
    from blackbox_rs.errors import RequestTimeoutError
    from blackbox_rs.redact import register_secret

    assert (ec.OK, ec.USER_ERROR, ec.BUDGET_SPENT, ec.QUOTA_EXHAUSTED, ec.SERVICE_FAILURE, ec.INTERRUPTED) == \
        (0, 2, 3, 4, 5, 130)
    register_secret(SECRET)
    code, line = ec.classify(RequestTimeoutError(f"POST https://x/?key={SECRET}\n  timed out\n"))
    assert code == ec.SERVICE_FAILURE and SECRET not in line and "\n" not in line and "timed out" in line
    assert len(_exit_cases()) == 16


class _Silent:
    """A loopback TCP server that accepts connections and never answers."""

    def __enter__(self) -> _Silent:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.conns: list[Any] = []
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

        def accept() -> None:
            while True:
                try:
                    self.conns.append(self.sock.accept()[0])
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("via", ["flags", "build"])
def test_a_timeout_exits_with_the_service_code_not_the_user_error_code(
    folder: Path, planted: None, capsys: pytest.CaptureFixture[str], via: str
) -> None:
    mod = load("google_vision")
    from blackbox_rs.api import main as api_main
    from blackbox_rs.api.vendors import VENDORS, Vendor, get_vendor
    from blackbox_rs.connectors.http import TransportSettings

    common = [str(folder / "images"), "--out", str(folder / "out"), "--label-map", str(folder / "map.json"), *TINY]
    with _Silent() as server:
        if via == "flags":  # the shared --timeout / --max-attempts flags
            rc = mod.main([*common, "--base-url", server.url, "--timeout", "0.3", "--max-attempts", "1"])
        else:  # the same settings given by a recipe's own build function
            gv = get_vendor("google-vision")

            def build(args: Any, kw: dict[str, Any]) -> Any:
                return gv.build(args, {**kw, "transport": TransportSettings(timeout_s=0.3, max_attempts=1)})

            VENDORS.register("gv-timeout", Vendor("gv-timeout", gv.connector, build, gv.env, gv.add_arguments))
            try:
                rc = api_main("gv-timeout", [*common, "--base-url", server.url])
            finally:
                VENDORS.pop("gv-timeout")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 5, err
    assert len(err) == 1 and err[0].startswith("service failure:") and "resume" in err[0]
    assert "0 certificate(s) kept" in err[0] and "Traceback" not in err[0] and SECRET not in err[0]


def test_a_spent_budget_ledger_says_raise_the_limit_not_resume(
    folder: Path, planted: None, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = load("google_vision")
    with FAKES["google_vision"]() as fake:
        # 25 queries per labelled image: the second image's estimation (16 more) does not fit in 30
        assert mod.main(argv(folder, fake, "google_vision", "--max-queries", "30")) == 3
        err = capsys.readouterr().err.strip().splitlines()
        ledger = folder / "out" / "budget_ledger.json"
        assert len(err) == 1 and err[0].startswith("stopped: the query budget is spent")
        assert str(ledger) in err[0] and "30 of 30" in err[0] and "larger budget" in err[0]
        assert "run the same command again to resume" not in err[0] and "1 certificate(s) kept" in err[0]
        sent = len(fake.log)
        assert mod.main(argv(folder, fake, "google_vision", "--max-queries", "30")) == 3  # cannot progress
        assert len(fake.log) == sent
        assert mod.main(argv(folder, fake, "google_vision", "--max-queries", "100")) == 0  # a larger budget can
    assert json.loads(ledger.read_text())["spent_queries"] == 75
    assert n_certificates(folder / "out") == 3


# ---- label depth and seeds ------------------------------------------------------------------------------
def test_label_depth_flag_reaches_every_vendor_connector(folder: Path, planted: None) -> None:
    from blackbox_rs.api import main as api_main
    from blackbox_rs.api.args import build_parser
    from blackbox_rs.api.run import connector_kwargs
    from blackbox_rs.api.vendors import VENDORS, Vendor, get_vendor

    gv = get_vendor("google_vision")
    helps = {a.dest: a.help for a in build_parser(gv, "certify")._actions}
    assert "--label-depth" in helps["max_results"] and "> 1" in helps["max_results"]
    assert build_parser(gv, "certify").parse_args(["imgs"]).label_depth == 1  # the vendor's top answer
    for name in CASES:  # every vendor builds its connector with the shared flag
        vendor = get_vendor(load(name).VENDOR)
        ns = build_parser(vendor, "certify").parse_args([str(folder / "images"), "--label-depth", "3", "--base-url",
                                                         "http://127.0.0.1:9", *CASES[name][2]])
        kw = connector_kwargs(ns, ["cat", "dog"])
        assert kw["label_depth"] == 3
        conn = vendor.build(ns, {**kw, "input_shape": (3, 32, 32)})
        try:
            assert conn.label_depth == 3, name
        finally:
            conn.close()
    built: list[Any] = []

    def spy(args: Any, kw: dict[str, Any]) -> Any:
        built.append(gv.build(args, kw))
        return built[-1]

    with FAKES["google_vision"]() as fake:
        VENDORS.register("gv-spy", Vendor("gv-spy", gv.connector, spy, gv.env, gv.add_arguments))
        try:
            assert api_main("gv-spy", argv(folder, fake, "google_vision", "--label-depth", "2")) == 0
        finally:
            VENDORS.pop("gv-spy")
    assert built[0].label_depth == 2
    with pytest.raises(SystemExit):
        build_parser(gv, "certify").parse_args(["imgs", "--label-depth", "x"])


@pytest.mark.parametrize("flags, expected", [([], None), (["--seed", "7"], 7)])
def test_seed_defaults_to_none_and_is_passed_through(
    folder: Path, planted: None, monkeypatch: pytest.MonkeyPatch, flags: list[str], expected: int | None
) -> None:
    from blackbox_rs.smoother import BlackBoxSmoother

    seeds: list[Any] = []
    real = BlackBoxSmoother.certify_dataset

    def spy(self: Any, *a: Any, **kw: Any) -> Any:
        seeds.append(kw.get("seed"))
        return real(self, *a, **kw)

    monkeypatch.setattr(BlackBoxSmoother, "certify_dataset", spy)
    mod = load("google_vision")
    assert _common_parser_seed(mod) is None
    with FAKES["google_vision"]() as fake:
        assert mod.main(argv(folder, fake, "google_vision", *flags)) == 0
    assert seeds == [expected]


def _common_parser_seed(mod: ModuleType) -> Any:
    from blackbox_rs.api.args import build_parser
    from blackbox_rs.api.vendors import get_vendor

    action = next(a for a in build_parser(get_vendor(mod.VENDOR), "certify")._actions if a.dest == "seed")
    assert "random" in (action.help or "") and "reproducible" in (action.help or "")
    return action.default
