"""Package layout: demo and benchmark code stay out of the library core.

The core is every module of ``blackbox_rs`` (and ``connectors/``, shipped as ``blackbox_rs.connectors``)
outside the private ``blackbox_rs._demo`` package. Read with ``ast``, without importing anything:

* no core module imports ``blackbox_rs._demo`` (absolutely, relatively, or by ``importlib``), except
  ``blackbox_rs/cli.py`` inside a function (the ``demo`` command's lazy import);
* no core module imports scikit-learn (``sklearn``): it is a demo/dev dependency, not the SDK's.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = "blackbox_rs._demo"
LAZY_DEMO_ALLOWED = {"blackbox_rs.cli"}  # only inside a function


def _module_name(path: Path) -> tuple[str, bool]:
    """Dotted name of a source file and whether it is a package ``__init__``."""
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "connectors":
        parts = ["blackbox_rs", *parts]
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _core_files() -> list[Path]:
    files = sorted((ROOT / "blackbox_rs").rglob("*.py")) + sorted((ROOT / "connectors").rglob("*.py"))
    return [p for p in files if "_demo" not in p.relative_to(ROOT).parts]


def _resolve(module: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _imports(source: str, module: str, is_pkg: bool) -> list[tuple[str, int, bool]]:
    """Every module ``source`` imports: ``(dotted name, line, inside a function)``. ``from X import Y``
    yields both ``X`` and ``X.Y`` (Y may be a submodule); ``importlib.import_module("X")`` and
    ``__import__("X")`` with a constant name count too."""
    tree = ast.parse(source)
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_pkg, node.level, node.module)
            found.append((base, node.lineno, in_function))
            found.extend((f"{base}.{alias.name}", node.lineno, in_function) for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, node.lineno, in_function))
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def _is(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(source: str, module: str, is_pkg: bool = False) -> list[str]:
    out = []
    for name, line, in_function in _imports(source, module, is_pkg):
        if _is(name, DEMO) and not (module in LAZY_DEMO_ALLOWED and in_function):
            where = "at module level" if not in_function else "(only the CLI may, inside a function)"
            out.append(f"{module}:{line} imports {name} {where}")
        if _is(name, "sklearn"):
            out.append(f"{module}:{line} imports scikit-learn ({name})")
    return out


def test_core_modules_are_found():
    names = {_module_name(p)[0] for p in _core_files()}
    assert {"blackbox_rs", "blackbox_rs.cli", "blackbox_rs.connectors", "blackbox_rs.surrogates",
            "blackbox_rs.fitting.strategies.surrogate"} <= names
    assert not any(_is(n, DEMO) for n in names)


def test_core_never_imports_the_demo_package_or_scikit_learn():
    problems = []
    for path in _core_files():
        module, is_pkg = _module_name(path)
        problems += _violations(path.read_text(encoding="utf-8"), module, is_pkg)
    assert not problems, "the library core must not import demo code or scikit-learn:\n" + "\n".join(problems)


def test_the_demo_command_imports_the_demo_package_lazily():
    module, is_pkg = _module_name(ROOT / "blackbox_rs" / "cli.py")
    demo = [(n, fn) for n, _, fn in _imports((ROOT / "blackbox_rs" / "cli.py").read_text(), module, is_pkg)
            if _is(n, DEMO)]
    assert demo and all(in_function for _, in_function in demo)


def test_demo_package_is_private_and_shipped():
    init = ROOT / "blackbox_rs" / "_demo" / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    assert doc.startswith("Private") and "not part of the public api" in doc.lower()
    assert "no stability promise" in doc
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert DEMO in packages
    shipped = {p.parent for p in (ROOT / "blackbox_rs").rglob("__init__.py")}
    missing = [p for p in shipped if _module_name(p / "__init__.py")[0] not in packages]
    assert not missing, f"packages not listed in pyproject.toml: {missing}"


def test_surrogate_strategy_uses_the_core_architecture():
    path = ROOT / "blackbox_rs" / "fitting" / "strategies" / "surrogate.py"
    module, is_pkg = _module_name(path)
    names = {n for n, _, _ in _imports(path.read_text(), module, is_pkg)}
    assert "blackbox_rs.surrogates.SmallCNN" in names and "blackbox_rs.surrogates.predict_logits" in names


@pytest.mark.parametrize(("source", "module", "is_pkg"), [
    ("import blackbox_rs._demo.zoo\n", "blackbox_rs.engine", False),
    ("from blackbox_rs._demo import zoo\n", "blackbox_rs.engine", False),
    ("from blackbox_rs import _demo\n", "blackbox_rs.engine", False),
    ("from ._demo.zoo import SmallCNN\n", "blackbox_rs.engine", False),
    ("from .._demo import pipeline\n", "blackbox_rs.fitting", True),
    ("from ... import _demo\n", "blackbox_rs.fitting.strategies.surrogate", False),
    ("import importlib\nimportlib.import_module('blackbox_rs._demo.zoo')\n", "blackbox_rs.engine", False),
    ("def f():\n    from blackbox_rs._demo import zoo\n", "blackbox_rs.engine", False),
    ("from blackbox_rs._demo.pipeline import run_demo\n", "blackbox_rs.cli", False),
    ("class C:\n    from blackbox_rs._demo import zoo\n", "blackbox_rs.cli", False),
    ("import sklearn\n", "blackbox_rs.engine", False),
    ("def f():\n    from sklearn.datasets import load_digits\n", "blackbox_rs.connectors.base", False),
])
def test_checker_catches(source, module, is_pkg):
    assert _violations(source, module, is_pkg)


@pytest.mark.parametrize(("source", "module"), [
    ("def demo():\n    from blackbox_rs._demo.pipeline import run_demo\n", "blackbox_rs.cli"),
    ("from blackbox_rs.surrogates import SmallCNN\nimport sklearnish\n", "blackbox_rs.engine"),
    ("from . import demo_helpers\n", "blackbox_rs.engine"),
])
def test_checker_allows(source, module):
    assert _violations(source, module) == []
