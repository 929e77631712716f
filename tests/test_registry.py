"""One registry helper for connectors, input modules and fit strategies; no import cycle between
modules/base and modules/registry; one atomic write, so a write failing half-way keeps the previous
file (issue #17, "the query path does each thing once")."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch
from torch import nn

from blackbox_rs.errors import (
    CacheError,
    ConfigError,
    InvalidParameterError,
    RegistryError,
    UnknownModuleError,
)
from blackbox_rs.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A third-party module ``k_plugin_<n>`` on sys.path, not imported yet."""
    name = f"k_plugin_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**6}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        class Echo:
            def __init__(self, value: int) -> None:
                self.value = value
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


# ---------------------------------------------------------------------------- the helper
def test_duplicate_and_unknown_names_raise_the_family_errors_naming_them():
    reg: Registry[int] = Registry("widget", unknown=InvalidParameterError, duplicate=RegistryError)
    assert reg.register("b", 2) == 2 and reg.register("a", 1) == 1
    with pytest.raises(RegistryError, match="widget name 'a' is already registered"):
        reg.register("a", 3)
    assert reg.get("a") == 1 and reg["b"] == 2  # nothing was replaced
    with pytest.raises(InvalidParameterError, match=r"unknown widget 'zz'; known: a, b$"):
        reg.get("zz")
    with pytest.raises(InvalidParameterError, match="unknown widget"):
        reg.get(["not", "hashable"])  # type: ignore[arg-type]
    assert reg.names() == ["a", "b"] == sorted(reg) and len(reg) == 2
    assert "a" in reg and "zz" not in reg and ["x"] not in reg
    assert reg.pop("a") == 1 and reg.pop("a", None) is None and reg.names() == ["b"]
    with pytest.raises(ConfigError, match=r"known: \(none\)"):
        Registry("empty").get("x")


def test_a_lazy_entry_is_imported_on_first_get_only(plugin):
    reg: Registry[type] = Registry("thing", lazy={"echo": (plugin, "Echo")})
    assert reg.names() == ["echo"] and "echo" in reg and reg.pop("nothing") is None
    assert plugin not in sys.modules  # registering and listing import nothing
    reg.register_lazy("echo", plugin, "Echo")  # the same path again: a no-op
    with pytest.raises(ConfigError, match="thing name 'echo' is already registered"):
        reg.register_lazy("echo", plugin, "Other")
    cls = reg.get("echo")
    assert plugin in sys.modules and cls.__name__ == "Echo" and reg.get("echo") is cls
    reg.register_lazy("echo", plugin, "Echo")  # still a no-op once imported
    assert reg.get("echo") is cls


def test_the_helper_imports_nothing_heavy():
    r = _fresh("import sys, blackbox_rs.registry; print('torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


# ---------------------------------------------------------------------------- the three families
def test_connectors_use_the_helper_and_find_a_third_party_connector(plugin):
    from blackbox_rs.connectors.registry import (
        CONNECTORS,
        build_connector,
        list_connectors,
        register_connector,
    )

    assert isinstance(CONNECTORS, Registry)
    register_connector("k_echo", plugin, "Echo")
    try:
        assert "k_echo" in list_connectors() and plugin not in sys.modules  # lazy until built
        register_connector("k_echo", plugin, "Echo")  # same target again: fine, as before
        with pytest.raises(ConfigError, match="'k_echo' is already registered"):
            register_connector("k_echo", plugin, "Other")
        assert build_connector("k_echo", {"value": 3}).value == 3
        with pytest.raises(ConfigError, match="unknown setting 'vlaue'"):
            build_connector("k_echo", {"vlaue": 3})
        with pytest.raises(ConfigError, match="unknown connector 'k_echoo'; known: .*k_echo"):
            build_connector("k_echoo")
    finally:
        CONNECTORS.pop("k_echo")
    assert "k_echo" not in list_connectors()


def test_listing_connectors_imports_no_backend():
    r = _fresh(
        "import sys\nfrom blackbox_rs.connectors.registry import list_connectors\n"
        "names = list_connectors()\n"
        "assert 'kserve_v2' in names and 'openai_chat' in names, names\n"
        "print(sorted(m for m in ('blackbox_rs.connectors.kserve_v2', 'blackbox_rs.connectors.openai_chat',"
        " 'blackbox_rs.connectors.aws_rekognition') if m in sys.modules))"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def _shift_module_class():
    from blackbox_rs.modules import InputModule, ModuleConfig

    class ShiftConfig(ModuleConfig):
        name: Literal["k_shift"] = "k_shift"

    class Shift(InputModule):
        config_class = ShiftConfig
        spatially_flexible = True

        def __init__(self, config: ShiftConfig) -> None:
            super().__init__(config)
            self.b = nn.Parameter(torch.zeros(1))

        def _forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.b

    return Shift


def test_modules_use_the_helper_and_a_third_party_module_is_built_saved_and_loaded(tmp_path):
    from blackbox_rs.modules import (
        create_module,
        get_module_class,
        list_modules,
        load_module,
        register_module,
    )
    from blackbox_rs.modules.base import MODULES

    assert isinstance(MODULES, Registry)
    Shift = _shift_module_class()
    register_module("k_shift")(Shift)
    try:
        assert "k_shift" in list_modules() and "k_shift" in MODULES and get_module_class("k_shift") is Shift
        m = create_module({"name": "k_shift", "input_shape": [1, 4, 4]})
        with torch.no_grad():
            m.b.fill_(0.25)
        back = load_module(m.save(tmp_path / "shift"))  # base finds the class through the same table
        assert type(back) is Shift and back.digest() == m.digest()
        with pytest.raises(RegistryError, match="'k_shift' is already registered"):
            register_module("k_shift")(_shift_module_class())
    finally:
        MODULES.pop("k_shift")
    with pytest.raises(UnknownModuleError, match="unknown input module 'k_shift'; known: .*dncnn"):
        load_module(tmp_path / "shift")


def test_strategies_use_the_helper_and_a_third_party_strategy_is_found():
    from blackbox_rs.fitting.config import FitConfig
    from blackbox_rs.fitting.strategies import STRATEGIES, Strategy, get_strategy, register_strategy

    assert isinstance(STRATEGIES, Registry)

    class KProbe(Strategy):
        name: ClassVar[str] = "k_probe_strategy"

        def main_step(self, k: int) -> dict[str, float]:  # pragma: no cover - never run here
            return {}

    assert register_strategy(KProbe) is KProbe
    try:
        assert get_strategy("k_probe_strategy") is KProbe and "k_probe_strategy" in sorted(STRATEGIES)
        assert FitConfig(strategy="k_probe_strategy").strategy == "k_probe_strategy"
        with pytest.raises(InvalidParameterError, match="'k_probe_strategy' is already registered"):
            register_strategy(KProbe)
    finally:
        STRATEGIES.pop("k_probe_strategy", None)
    with pytest.raises(InvalidParameterError, match="unknown strategy 'k_probe_strategy'; known: .*denoise"):
        get_strategy("k_probe_strategy")


# ---------------------------------------------------------------------------- no import cycle
def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_modules_base_never_imports_the_registry_file():
    """The dependency runs registry -> base only (at module level and inside functions alike)."""
    base = _imported_modules(ROOT / "blackbox_rs" / "modules" / "base.py")
    assert "blackbox_rs.modules.base" in _imported_modules(ROOT / "blackbox_rs" / "modules" / "registry.py")
    assert not {"blackbox_rs.modules.registry", "blackbox_rs.modules"} & base, sorted(base)


@pytest.mark.parametrize("module", ["blackbox_rs.modules.base", "blackbox_rs.modules.registry"])
def test_each_module_file_imports_in_a_fresh_interpreter(module):
    r = _fresh(f"import {module} as m; print(sorted(m.__all__)[:1])")
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------- one atomic write
def _litter(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".tmp" in p.name)


def _fail_replace_onto(monkeypatch, target_name: str) -> None:
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == target_name:
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


def test_a_failing_smoother_json_write_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    from blackbox_rs import BlackBoxSmoother
    from blackbox_rs.connectors import CallableConnector

    conn = CallableConnector(lambda b: torch.zeros(len(b), dtype=torch.long), input_shape=(1, 4, 4),
                             num_classes=2, fingerprint="k:v1")
    d = BlackBoxSmoother(conn, module=None, sigma=0.25).save(tmp_path / "s")
    before = (d / "smoother.json").read_bytes()
    _fail_replace_onto(monkeypatch, "smoother.json")
    with pytest.raises(ConfigError, match="cannot write .*smoother.json: No space left"):
        BlackBoxSmoother(conn, module=None, sigma=0.5).save(d)
    assert (d / "smoother.json").read_bytes() == before
    assert _litter(d) == []


def test_a_module_save_failing_half_way_keeps_the_previous_pair(tmp_path, monkeypatch):
    import safetensors.torch

    from blackbox_rs.modules import create_module, load_module

    torch.manual_seed(0)
    m = create_module("dncnn", input_shape=(1, 8, 8), depth=2, width=4)
    d = m.save(tmp_path / "m")
    saved = {p.name: p.read_bytes() for p in d.iterdir()}
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    real_save = safetensors.torch.save_file

    def torn(tensors, filename, metadata=None):  # half a file, then the disk is full
        real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", torn)
    with pytest.raises(ConfigError, match="cannot write .*module.safetensors: No space left"):
        m.save(d)
    monkeypatch.undo()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)  # the config file cannot be written either
    monkeypatch.setattr(json, "dumps", full_disk)
    with pytest.raises(ConfigError, match="cannot write .*module_config.json: No space left"):
        m.save(d)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == saved  # old weights, old config, no temp
    assert load_module(d).digest() != m.digest()


def test_a_failing_checkpoint_write_keeps_the_previous_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    from blackbox_rs.fitting.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, {"w": torch.zeros(3)}, {"step": 1})
    _fail_replace_onto(monkeypatch, "fit_state.safetensors")
    with pytest.raises(CacheError, match="No space left"):
        save_checkpoint(tmp_path, {"w": torch.ones(3)}, {"step": 2})
    monkeypatch.undo()
    found = load_checkpoint(tmp_path)
    assert found is not None
    tensors, meta = found
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.zeros(3))
    assert _litter(tmp_path) == []


def test_a_failing_ledger_write_keeps_its_error_and_message_and_the_previous_ledger(tmp_path, monkeypatch):
    from blackbox_rs.budget import QueryBudget

    ledger = tmp_path / "ledger.json"
    budget = QueryBudget(max_queries=10, ledger=ledger)
    budget.reserve(2, 0.0)
    before = ledger.read_bytes()
    _fail_replace_onto(monkeypatch, "ledger.json")
    with pytest.raises(CacheError, match=f"cannot write budget ledger {ledger}: .*No space left"):
        budget.reserve(3, 0.0)
    monkeypatch.undo()
    assert ledger.read_bytes() == before and json.loads(before)["spent_queries"] == 2
    assert budget.spent_queries == 2  # the failed reservation was rolled back
    assert _litter(tmp_path) == []
