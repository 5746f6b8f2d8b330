"""The API reference: the site builds in strict mode, every public name is documented, every example runs.

The reference pages (docs/reference/*.md, one ``::: module`` each) name the documented modules. A module's
public names are its ``__all__`` (else the classes and functions it defines without a leading ``_``).
Judged per kind: a public class or function has a docstring with a short runnable ``>>>`` example (the
flax convention), run here with doctest in a fresh namespace (so each example imports what it uses); a
public method of such a class has a docstring; a public constant has one too (a string right after its
assignment, which mkdocstrings shows), but no example: its value is its example.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dynconv_spec", "dynconv_jax", "dynconv_torch")


def reference_modules():
    """The modules the reference pages render, in page order."""
    pages = sorted((ROOT / "docs" / "reference").glob("*.md"))
    return [m for page in pages for m in re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M)]


def _ours(obj) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] in PACKAGES


def public_objects():
    """``{qualified name: object}``, each object once (under the first module that exports it)."""
    seen, out = set(), {}
    for module_name in reference_modules():
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None)
        if names is None:
            names = [
                n
                for n, v in vars(module).items()
                if not n.startswith("_")
                and (inspect.isclass(v) or inspect.isfunction(v))
                and v.__module__ == module_name
            ]
        for name in names:
            obj = getattr(module, name)
            key = id(obj) if inspect.isclass(obj) or inspect.isroutine(obj) else (module_name, name)
            if key not in seen:
                seen.add(key)
                out[f"{module_name}.{name}"] = obj
    return out


def _callables():
    return {name: obj for name, obj in public_objects().items() if inspect.isclass(obj) or inspect.isroutine(obj)}


def test_every_public_class_and_function_has_a_docstring_with_an_example():
    missing = [name for name, obj in _callables().items() if ">>>" not in (inspect.getdoc(obj) or "")]
    assert not missing, f"public names without a docstring example (a short '>>>' session): {missing}"


@pytest.mark.slow  # the examples compile small JAX programs: seconds each on CPU
@pytest.mark.parametrize("name", sorted(_callables()))
def test_docstring_example_runs(name):
    obj = _callables()[name]
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(obj, name, globs={}) if t.examples]
    if not tests:
        pytest.skip(f"{name} has no example yet (test_every_public_class_and_function_has_a_docstring_...)")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = []
    for test in tests:
        runner.run(test, out=report.append)
    assert runner.summarize(verbose=False).failed == 0, f"{name}: the docstring example fails\n" + "".join(report)


def test_public_methods_and_constants_have_docstrings():
    import griffe

    loader = griffe.GriffeLoader(search_paths=[str(ROOT)])
    for package in PACKAGES:
        loader.load(package)
    loader.resolve_aliases()
    missing = []
    for name, obj in public_objects().items():
        if inspect.isclass(obj) and _ours(obj):
            fields = getattr(obj, "__dataclass_fields__", {})  # a Linen field's default (an initializer)
            for attr, value in vars(obj).items():
                if (
                    not attr.startswith("_")
                    and attr not in fields
                    and inspect.isfunction(value)
                    and not inspect.getdoc(value)
                ):
                    missing.append(f"{name}.{attr}")
        elif not (inspect.isroutine(obj) or inspect.ismodule(obj)):
            member = loader.modules_collection[name]
            member = member.final_target if member.is_alias else member
            if not (member.docstring and member.docstring.value.strip()):
                missing.append(name)
    assert not missing, f"public names without a docstring: {missing}"


@pytest.mark.slow
def test_reference_site_builds_in_strict_mode(tmp_path):
    """mkdocs.yml in strict mode: a broken link, anchor or cross-reference, or a docstring griffe cannot parse,
    fails the build (mkdocs exits 1 and names it)."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    for page in sorted((ROOT / "docs" / "reference").glob("*.md")):
        html = (tmp_path / "site" / "reference" / page.stem / "index.html").read_text()
        for module in re.findall(r"^::: ([\w.]+)$", page.read_text(), re.M):
            assert f'id="{module}"' in html, (page.name, module)
