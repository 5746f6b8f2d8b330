"""Every fenced block of README.md and docs/*.md runs as written (tests/_doc_blocks.py: collector, directives).

One test per chain of blocks, named by the file and line of its first fence. Each runs in a fresh
folder where the files its ``needs`` directive names are made (FIXTURES: small stand-ins for the
user's files, e.g. an official-layout ``od_resnet18_4x.pth`` made from ``dynconv_torch``); shell
commands run there with the checkout's tools importable and ``.venv`` / ``python`` being this
interpreter's. Blocks that need ImageNet, a GPU or minutes of work are skipped with their reason
(listed by ``-ra`` and counted in the docs summary line, tests/conftest.py).
"""

from __future__ import annotations

import doctest
import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict

import pytest
from _doc_blocks import ROOT, Block, Chain, all_chains

COMMAND_TIMEOUT_S = 600  # a documented command that hangs fails instead of stalling the suite (a guard, not a timing)


def _chain_params():
    params = []
    for chain in all_chains():
        marks = [pytest.mark.slow] if chain.slow else []
        params.append(pytest.param(chain, id=chain.id, marks=marks))
    return params


# ----------------------------------------------------------------------------- fixtures: the files blocks name


def _od_resnet18_4x(path: Path) -> None:
    """The official OSVAI/ODConv release layout: ``{'state_dict': ...}`` of ``od_resnet18(kernel_num=4)``."""
    import torch

    from dynconv_torch.models import od_resnet18

    torch.manual_seed(0)
    torch.save({"state_dict": od_resnet18(kernel_num=4).state_dict()}, path)


def _efficientnet_safetensors(path: Path) -> None:
    """A timm-layout ``tf_efficientnet_cc_b0_4e`` checkpoint (``model.safetensors``), randomly initialised."""
    import torch
    from safetensors.torch import save_file

    from dynconv_torch.models.efficientnet_cc import tf_efficientnet_cc_b0_4e

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in tf_efficientnet_cc_b0_4e().state_dict().items()}, str(path))


def _digits_run(path: Path) -> None:
    """A finished two-step ``python -m train`` run of an ODConv ResNet on the digits (``runs/digits``)."""
    command = [
        sys.executable,
        "-m",
        "train",
        "--conv=odconv",
        "--num_steps=2",
        "--base_width=4",
        "--batch_size=16",
        "--progress=false",
        "--tensorboard=false",
        "--export=false",
        f"--workdir={path}",
    ]
    subprocess.run(
        command, cwd=path.parent, env=_command_env(), check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S
    )


FIXTURES: Dict[str, Callable[[Path], None]] = {
    "od_resnet18_4x.pth": _od_resnet18_4x,
    "model.safetensors": _efficientnet_safetensors,
    "runs/digits": _digits_run,
}


@pytest.fixture(scope="session")
def fixture_files(tmp_path_factory):
    """Makes each fixture file once per session, on first use. The xdist workers of a session share the folder
    (pytest's session temp folder, the parent of each worker's): the first worker that needs a file makes it
    under a lock, the others wait for it and read it (the blocks only read these files)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "doc-fixtures"
    root.mkdir(exist_ok=True)

    def get(name: str) -> Path:
        path, stem = root / name, name.replace("/", "_")
        with open(root / f"{stem}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (root / f"{stem}.done").exists():
                shutil.rmtree(path, ignore_errors=True)  # what a worker that failed half-way left
                path.parent.mkdir(parents=True, exist_ok=True)
                FIXTURES[name](path)
                (root / f"{stem}.done").touch()
        return path

    return get


# ----------------------------------------------------------------------------- running blocks


def _command_env() -> Dict[str, str]:
    """This interpreter as ``python``, the checkout's tools (train, parity, benchmarks) importable."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run_command(command: str, cwd: Path, where: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", command],
            cwd=cwd,
            env=_command_env(),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{where}: still running after {COMMAND_TIMEOUT_S} s: {command}\n{error.output or ''}")


def _run_python(block: Block, namespace: dict, cwd: Path) -> None:
    if block.script:
        script = cwd / f"doc_block_{block.line}.py"
        script.write_text(block.source)
        result = _run_command(f"python {script.name}", cwd, block.where)
        if result.returncode:
            pytest.fail(f"{block.where}: the script exited {result.returncode}\n{result.stdout}{result.stderr}")
        return
    # Leading newlines: a traceback names the Markdown file and the line in it.
    code = compile("\n" * (block.source_line - 1) + block.source, str(block.path), "exec")
    exec(code, namespace)


def _run_bash(block: Block, cwd: Path) -> None:
    result = _run_command(block.source, cwd, block.where)
    if result.returncode:
        pytest.fail(f"{block.where}: exit {result.returncode}\n$ {block.source}\n{result.stdout}{result.stderr}")


def _run_console(block: Block, cwd: Path) -> None:
    """``$ command`` lines run; the lines up to the next ``$`` must match the output (``...`` matches anything)."""
    checker, flags = doctest.OutputChecker(), doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for command, want in re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", block.source, re.M):
        result = _run_command(command, cwd, block.where)
        got = result.stdout + result.stderr
        if not checker.check_output(want, got, flags):
            pytest.fail(f"{block.where}: $ {command}\nexpected:\n{want}got (exit {result.returncode}):\n{got}")


@pytest.mark.parametrize("chain", _chain_params())
def test_doc_block(chain: Chain, tmp_path, monkeypatch, fixture_files):
    if chain.skip:
        pytest.skip(chain.skip)
    for name in chain.needs:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(fixture_files(name))
    (tmp_path / ".venv").symlink_to(sys.prefix)  # `.venv/bin/python -m ...` as the docs write it
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for block in chain.blocks:
        if block.language == "python":
            _run_python(block, namespace, tmp_path)
        elif block.language == "bash":
            _run_bash(block, tmp_path)
        else:
            _run_console(block, tmp_path)
