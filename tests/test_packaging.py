"""dynconv as users install it, at the oldest versions it declares (slow: it builds a venv), and its metadata.

``python -m build`` makes the sdist and, from it, the wheel (from a copy of the sources, so the checkout
gets no ``build/`` or ``*.egg-info``). A new venv gets the wheel alone, with ``constraints-oldest.txt``
(the lower bounds of pyproject.toml: jax, flax, numpy, safetensors): ``import dynconv_jax`` works without
torch and the README's first example (the Linen layer) runs, from a folder outside the checkout. Then the
same venv gets the ``train`` and ``dev`` extras at their oldest (optax, orbax-checkpoint, grain) and runs
a smoke subset of this suite against them: the compat module's details, layers, sown attentions, Orbax
checkpoints and the grain pipeline. The newest end of the range is ``constraints.txt``, the venv the
whole suite runs in. pip installs from the package index and its cache (nothing else is downloaded).
The core dependencies are exactly the libraries the three packages import (a quick test).
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dynconv_spec", "dynconv_jax", "dynconv_torch")
#: The smoke subset run under the oldest versions.
SMOKE = (
    "tests/test_compat.py",
    "tests/test_jax_layers.py::test_sown_intermediates",
    "tests/test_jax_layers.py::test_batchnorm_refuses_momentum_and_torch_momentum_is_one_minus_flax_momentum",
    "tests/test_checkpoint.py::test_reopening_a_run_removes_unfinished_writes_before_it_returns",
    "tests/test_checkpoint.py::test_damaged_checkpoint_is_moved_and_the_previous_restored",
    "tests/test_checkpoint.py::test_write_failure_keeps_the_previous_checkpoint",
    "tests/test_data.py::test_digits_batches_are_a_pure_function_of_seed_and_step",
)

#: Imports of the libraries that their core dependencies do not bring, with the extra that does.
OPTIONAL_IMPORTS = {"torch": "torch", "onnxruntime": "export", "matplotlib": "train"}
#: Imported but not declared: a dependency of jax (bfloat16 tensors read from torch).
THROUGH_JAX = {"ml_dtypes"}


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=900, **kwargs)
    output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{output}"
    return result


def _pip_install(python: str, *requirements: str) -> None:
    """Install into the venv of ``python`` with this venv's pip, pinned by constraints-oldest.txt."""
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-compile",
            "-c",
            os.path.join(ROOT, "constraints-oldest.txt"),
            *requirements,
        ]
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """``{'wheel': path, 'sdist': path}`` built by ``python -m build`` from a copy of the sources."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, name), source)
    for package in PACKAGES:
        shutil.copytree(os.path.join(ROOT, package), source / package, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)])
    return {"wheel": str(next(out.glob("*.whl"))), "sdist": str(next(out.glob("*.tar.gz")))}


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("-", "_")


def _imported_libraries() -> set:
    """Top-level names of the other libraries the three packages import (lazy imports too)."""
    roots = set()
    for package in PACKAGES:
        for path in sorted(pathlib.Path(ROOT, package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    roots.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    roots.add(node.module.split(".")[0])
    return roots - set(sys.stdlib_module_names) - set(PACKAGES)


def test_core_dependencies_are_what_the_libraries_import():
    """No core dependency that no ``dynconv_*`` module imports (optax was one), none missing; the optional
    imports are in their extras."""
    project = _project()
    core = {_requirement_name(r) for r in project["dependencies"]}
    imported = _imported_libraries()
    assert core == imported - set(OPTIONAL_IMPORTS) - THROUGH_JAX
    for module, extra in OPTIONAL_IMPORTS.items():
        assert module in imported and module in {_requirement_name(r) for r in project["optional-dependencies"][extra]}


def _version() -> str:
    return _project()["version"]


@pytest.mark.slow
def test_the_sdist_and_the_wheel_hold_the_three_libraries_typed(dist):
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = wheel.namelist()
    assert {n.split("/")[0] for n in names} == {*PACKAGES, f"dynconv-{_version()}.dist-info"}
    with tarfile.open(dist["sdist"]) as sdist:
        members = [m.split("/", 1)[1] for m in sdist.getnames() if "/" in m]
    for package in PACKAGES:
        assert f"{package}/py.typed" in names and f"{package}/py.typed" in members
    assert "pyproject.toml" in members and not any(m.startswith("tests") for m in members)


def _readme_first_python_example() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)


def _check_the_wheel_alone(python: str, cwd) -> None:
    """``import dynconv_jax`` without torch and the README's first example, run from ``cwd`` (outside the
    checkout, so the installed wheel is what is imported)."""
    example = _readme_first_python_example()
    assert "from dynconv_jax import" in example
    check = (
        "import importlib.util, os, dynconv_jax, dynconv_spec\n"
        "assert importlib.util.find_spec('torch') is None\n"
        "assert 'site-packages' in dynconv_jax.__file__, dynconv_jax.__file__\n"
        "print(dynconv_jax.__version__, dynconv_spec.__version__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = _run([python, "-c", check + example], cwd=cwd, env=env)
    assert result.stdout.split()[:2] == [_version(), _version()]


def _check_the_oldest_versions(python: str) -> None:
    """Each lower bound of pyproject.toml is the version installed, and pinned in constraints-oldest.txt."""
    bounds = ("jax", "flax", "numpy", "safetensors", "optax", "orbax-checkpoint", "grain")
    installed = _run(
        [
            python,
            "-c",
            "import sys; from importlib.metadata import version; print(*(version(name) for name in sys.argv[1:]))",
            *bounds,
        ]
    ).stdout.split()
    with open(os.path.join(ROOT, "constraints-oldest.txt")) as f:
        pins = dict(line.strip().split("==") for line in f if "==" in line and not line.startswith("#"))
    project = _project()
    declared = project["dependencies"] + project["optional-dependencies"]["train"]
    for name, version in zip(bounds, installed):
        assert version == pins[name] and f"{name}>={version}" in declared, (name, version)


@pytest.mark.slow
def test_the_wheel_in_a_new_venv_at_the_oldest_supported_versions(tmp_path, dist):
    """One venv (most of the time is its installs): the wheel alone, then with the train and dev extras,
    running the smoke subset from the checkout."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = str(venv / "bin" / "python")
    _pip_install(python, dist["wheel"])
    _check_the_wheel_alone(python, tmp_path)
    _pip_install(python, f"{dist['wheel']}[train,dev]")
    _check_the_oldest_versions(python)
    _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *SMOKE], cwd=ROOT)


def test_pre_commit_runs_the_ruff_that_ci_pins():
    """.pre-commit-config.yaml's ruff is constraints.txt's: a contributor's hook and CI's check agree."""
    pin = re.search(r"^ruff==(\S+)$", pathlib.Path(ROOT, "constraints.txt").read_text(), re.M)
    assert pin, "constraints.txt pins no ruff"
    assert f"rev: v{pin.group(1)}" in pathlib.Path(ROOT, ".pre-commit-config.yaml").read_text()
