"""Build (once) and run a real Seldon MLServer on 127.0.0.1 for connector tests.

MLServer pins fastapi<0.116 and Python<3.13, so it lives in its own venv, never in the SDK's:

* :func:`ensure_mlserver_venv` creates ``$BLACKBOX_RS_MLSERVER_VENV`` (default
  ``~/.cache/blackbox-rs/mlserver-venv``, or under ``$XDG_CACHE_HOME``) with the system Python
  (``$BLACKBOX_RS_MLSERVER_PYTHON``, else ``/usr/bin/python3``, else the first ``python3.12`` /
  ``python3.11`` / ``python3.10`` / ``python3`` below 3.13) and ``pip install mlserver`` from the
  configured package index (~45 s the first time). A marker file records success; a half-built venv
  is rebuilt. A file lock serialises concurrent builders. Failure raises :class:`MLServerUnavailable`
  with pip's last lines.
* :class:`MLServerProcess` writes ``settings.json`` (free ports, ``parallel_workers: 0`` because of
  the uvloop crash, metrics off), starts ``mlserver start <dir>`` in its own process group, waits
  until every model is ready, and stops it (SIGTERM, then SIGKILL).
* :func:`write_linear_model` / :func:`write_label_model` / :func:`write_failing_model` write model
  folders (numpy only, no torch in that venv).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "ENV_SKIP",
    "ENV_VENV",
    "MLServerProcess",
    "MLServerUnavailable",
    "ensure_mlserver_venv",
    "free_port",
    "write_failing_model",
    "write_label_model",
    "write_linear_model",
]

ENV_VENV = "BLACKBOX_RS_MLSERVER_VENV"
ENV_SKIP = "BLACKBOX_RS_SKIP_MLSERVER"
ENV_PYTHON = "BLACKBOX_RS_MLSERVER_PYTHON"
MLSERVER_REQUIREMENT = "mlserver>=1.6,<2"
_MARKER = ".blackbox-rs-mlserver-ok"


class MLServerUnavailable(RuntimeError):
    """MLServer could not be installed or started; the message says why and what was tried."""


def default_venv_dir() -> Path:
    env = os.environ.get(ENV_VENV)
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "blackbox-rs" / "mlserver-venv"


def _python_version(exe: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
        return int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def find_base_python() -> str:
    """A Python 3.10-3.12 interpreter to build the MLServer venv with."""
    candidates = [os.environ.get(ENV_PYTHON), "/usr/bin/python3", shutil.which("python3.12"),
                  shutil.which("python3.11"), shutil.which("python3.10"), shutil.which("python3"), sys.executable]
    tried = []
    for exe in candidates:
        if not exe or not os.path.exists(exe):
            continue
        v = _python_version(exe)
        tried.append(f"{exe} ({'.'.join(map(str, v)) if v else '?'})")
        if v is not None and (3, 10) <= v < (3, 13):
            return exe
    raise MLServerUnavailable(f"no Python 3.10-3.12 found for MLServer's venv (tried {', '.join(tried)}); "
                              f"set {ENV_PYTHON}")


def _venv_ok(venv: Path) -> bool:
    return (venv / _MARKER).exists() and (venv / "bin" / "mlserver").exists()


def ensure_mlserver_venv(venv: Path | None = None, *, timeout_s: float = 900) -> Path:
    """Return the ``mlserver`` executable of a ready venv, building the venv first if needed."""
    venv = venv or default_venv_dir()
    if _venv_ok(venv):
        return venv / "bin" / "mlserver"
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv.parent / (venv.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _venv_ok(venv):  # built by someone else while we waited
            return venv / "bin" / "mlserver"
        if venv.exists():
            shutil.rmtree(venv)
        base = find_base_python()
        log = venv.parent / (venv.name + ".build.log")
        steps = [
            [base, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
             "--no-input", MLSERVER_REQUIREMENT],
            [str(venv / "bin" / "python"), "-c", "import mlserver, numpy; print(mlserver.__version__)"],
        ]
        deadline = time.monotonic() + timeout_s
        with open(log, "w") as logf:
            for cmd in steps:
                logf.write(f"$ {' '.join(cmd)}\n")
                logf.flush()
                try:
                    rc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                        timeout=max(1.0, deadline - time.monotonic())).returncode
                except (OSError, subprocess.TimeoutExpired) as e:
                    rc, msg = -1, str(e)
                    logf.write(msg + "\n")
                if rc != 0:
                    logf.flush()
                    tail = "\n".join(
                        ln for ln in Path(log).read_text(errors="replace").splitlines()
                        if "is ignored: it is neither a file nor a directory" not in ln
                    ).splitlines()[-25:]
                    raise MLServerUnavailable(
                        f"building the MLServer venv at {venv} failed at `{' '.join(cmd[:4])} ...` (exit {rc}). "
                        f"Full log: {log}. Last lines:\n" + "\n".join(tail)
                    )
        (venv / _MARKER).write_text(MLSERVER_REQUIREMENT + "\n")
    return venv / "bin" / "mlserver"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- model folders ----------------------------------------------------------------------------------

_LINEAR_PY = '''
import os
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

class LinearClassifier(MLModel):
    async def load(self) -> bool:
        here = os.path.dirname(os.path.abspath(__file__))
        z = np.load(os.path.join(here, "weights.npz"))
        self.w, self.b, self.scale = z["w"], z["b"], float(z["scale"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float64) * self.scale
        logits = (x.reshape(x.shape[0], -1) @ self.w + self.b).astype(np.float32)
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id,
                                 outputs=[NumpyCodec.encode_output("scores", logits)])
'''

_LABELS_PY = '''
import os
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput

class TopKLabels(MLModel):
    async def load(self) -> bool:
        here = os.path.dirname(os.path.abspath(__file__))
        z = np.load(os.path.join(here, "weights.npz"))
        self.w, self.b = z["w"], z["b"]
        with open(os.path.join(here, "vocab.txt")) as f:
            self.vocab = [ln.rstrip("\\n") for ln in f]
        self.k = int(z["k"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float64)
        logits = x.reshape(x.shape[0], -1) @ self.w + self.b
        order = np.argsort(-logits, axis=1, kind="stable")[:, : self.k]
        data = [self.vocab[i] for row in order for i in row]
        out = ResponseOutput(name="labels", shape=[x.shape[0], self.k], datatype="BYTES", data=data)
        return InferenceResponse(model_name=self.name, model_version=self.version, id=payload.id, outputs=[out])
'''

_FAILING_PY = '''
from mlserver import MLModel

class Failing(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload):
        raise ValueError("this model always fails")
'''


def _write_settings(folder: Path, settings: dict[str, object]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model-settings.json").write_text(json.dumps(settings, indent=1))


def write_linear_model(
    folder: Path, *, name: str, w: np.ndarray, b: np.ndarray, input_shape: Sequence[int],
    datatype: str = "FP32", version: str = "v1",
) -> None:
    """A linear classifier ``logits = (scale * x).flatten() @ w + b``; UINT8 inputs use scale 1/255."""
    module = f"linear_{name.replace('-', '_')}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(_LINEAR_PY)
    scale = 1.0 / 255.0 if datatype == "UINT8" else 1.0
    np.savez(folder / "weights.npz", w=np.asarray(w, np.float64), b=np.asarray(b, np.float64), scale=scale)
    _write_settings(folder, {
        "name": name,
        "implementation": f"{module}.LinearClassifier",
        "versions": [version],
        "parameters": {"version": version},
        "inputs": [{"name": "image", "datatype": datatype, "shape": [-1, *input_shape]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, int(w.shape[1])]}],
    })


def write_label_model(
    folder: Path, *, name: str, w: np.ndarray, b: np.ndarray, vocab: Sequence[str], input_shape: Sequence[int],
    k: int = 2, version: str = "v1",
) -> None:
    """Answers the top-``k`` vendor labels (``vocab[argsort(-logits)]``) as a BYTES ``[N, k]`` tensor."""
    module = f"labels_{name.replace('-', '_')}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(_LABELS_PY)
    np.savez(folder / "weights.npz", w=np.asarray(w, np.float64), b=np.asarray(b, np.float64), k=k)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    _write_settings(folder, {
        "name": name,
        "implementation": f"{module}.TopKLabels",
        "versions": [version],
        "parameters": {"version": version},
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, *input_shape]}],
        "outputs": [{"name": "labels", "datatype": "BYTES", "shape": [-1, k]}],
    })


def write_failing_model(folder: Path, *, name: str, input_shape: Sequence[int]) -> None:
    module = f"failing_{name.replace('-', '_')}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(_FAILING_PY)
    _write_settings(folder, {
        "name": name,
        "implementation": f"{module}.Failing",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, *input_shape]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 2]}],
    })


# ---- the server process -----------------------------------------------------------------------------


class MLServerProcess:
    """``mlserver start <root>`` on 127.0.0.1, free ports, ``parallel_workers: 0``."""

    def __init__(self, mlserver_exe: Path, root: Path, models: Sequence[str]) -> None:
        self.exe = Path(mlserver_exe)
        self.root = Path(root)
        self.models = list(models)
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "mlserver.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 90.0) -> MLServerProcess:
        (self.root / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1",
            "http_port": self.http_port,
            "grpc_port": self.grpc_port,
            "metrics_port": self.metrics_port,
            "metrics_endpoint": None,
            "parallel_workers": 0,
            "debug": False,
        }))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["PATH"] = f"{self.exe.parent}{os.pathsep}{env.get('PATH', '')}"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(self.exe), "start", str(self.root)], cwd=self.root, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        pending = ["/v2/health/ready", *(f"/v2/models/{m}/ready" for m in self.models)]
        while pending:
            if self.proc.poll() is not None:
                self.stop()
                raise MLServerUnavailable(f"mlserver exited with code {self.proc.returncode}; log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise MLServerUnavailable(f"mlserver not ready after {timeout_s:g} s ({pending[0]}); log:\n"
                                          f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + pending[0], timeout=2) as r:  # noqa: S310 - 127.0.0.1
                    if 200 <= r.status < 300:
                        pending.pop(0)
                        continue
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None  # type: ignore[assignment]

    def __enter__(self) -> MLServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
