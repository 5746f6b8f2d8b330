"""The code's shape, checked on the source: no function longer than :data:`MAX_FUNCTION_LINES` lines in the
libraries, ``train/`` and ``parity/``, and no import cycle among the project's modules (the imports inside
functions included, which is where cycles hide). And the suite's own setting: what it compiles with quick XLA
options (LLVM level 0 among them) is checked with XLA's defaults where bits depend on them."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
from typing import Dict, Iterator, List, Sequence, Set

import pytest
from _xla_level import without_compile_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("dynconv_spec", "dynconv_jax", "dynconv_torch", "train", "parity", "benchmarks")
LENGTH_CHECKED = ("dynconv_spec", "dynconv_jax", "dynconv_torch", "train", "parity")
MAX_FUNCTION_LINES = 80  # from the ``def`` line to the last line, docstring included


def _modules(root: pathlib.Path, packages: Sequence[str]) -> Dict[str, pathlib.Path]:
    """``{dotted module name: path}`` of every ``.py`` file under ``packages`` (a package is its ``__init__``)."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _long_functions(path: pathlib.Path, root: pathlib.Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                yield f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)"


def _imports(name: str, path: pathlib.Path, modules: Dict[str, pathlib.Path]) -> Set[str]:
    """The project modules ``name`` imports, at its top or inside functions: for ``from X import y`` the
    module ``X.y`` when there is one, else ``X``; for ``import X.Y`` the longest project module it names.
    (Importing ``a.b`` also runs ``a/__init__``; that implicit step is left out, as Python's own
    partially-initialised packages make it harmless.)"""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    components = []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = stack[stack.index(node) :]
            del stack[stack.index(node) :]
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _import_graph(root: pathlib.Path, packages: Sequence[str]) -> Dict[str, Set[str]]:
    modules = _modules(root, packages)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_function_is_longer_than_the_limit():
    long = [where for path in _modules(ROOT, LENGTH_CHECKED).values() for where in _long_functions(path, ROOT)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_import_cycle_among_the_project_modules():
    cycles = _cycles(_import_graph(ROOT, PACKAGES))
    assert not cycles, f"modules that import each other (directly or through others): {cycles}"


def test_the_checks_find_a_long_function_and_a_cycle_through_a_function_local_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .b import g\n")
    (package / "a.py").write_text("def f():\n    from pkg.sub import b\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    (package / "sub" / "b.py").write_text("from .. import a\n\ndef g():\n    return a\n")
    (package / "c.py").write_text("import pkg.sub.b\n")
    assert [line.split(" ")[1] for line in _long_functions(package / "a.py", tmp_path)] == ["f"]
    graph = _import_graph(tmp_path, ["pkg"])
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.sub.b"}
    assert _cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_every_module_imports():
    """Every module of the libraries and tools imports (the fast loop's tests exercise nearly all of them; this
    catches a broken import in the few that only the slow tests and the command lines reach)."""
    import importlib

    for name in _modules(ROOT, PACKAGES):
        if not name.endswith("__main__"):
            importlib.import_module(name)


@pytest.mark.slow
def test_default_level_bits():
    """The tests marked ``xla_default_bits`` (bits of XLA:CPU's default options, which the suite's quick
    compile options round otherwise: tests/_xla_level.py) pass again in a session with XLA's defaults."""
    files = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "@pytest.mark.xla_default_bits" in p.read_text()
    )
    assert files, "no test is marked xla_default_bits"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", "-m", "xla_default_bits"]
        + ["--xla-default-optimisation", *files],
        cwd=ROOT,
        env=without_compile_flags(dict(os.environ)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
