"""Every fenced block of README.md and docs/*.md runs as written (tests/_doc_blocks.py: collector, directives).

One test per chain of blocks, named by the file and line of its first fence. Each runs in a fresh
folder where the files its ``needs`` directive names are made (``shared_files``, tests/_shared_files.py: small
stand-ins for the user's files, e.g. an official-layout ``od_resnet18_4x.pth`` made from ``dynconv_torch``); shell
commands run there with the checkout's tools importable and ``.venv`` / ``python`` being this
interpreter's. Blocks that need ImageNet, a GPU or minutes of work are skipped with their reason
(listed by ``-ra`` and counted in the docs summary line, tests/conftest.py).
"""

from __future__ import annotations

import doctest
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _doc_blocks import Block, Chain, all_chains
from _shared_files import COMMAND_TIMEOUT_S, command_env


def _chain_params():
    params = []
    for chain in all_chains():
        marks = [pytest.mark.slow] if chain.slow else []
        params.append(pytest.param(chain, id=chain.id, marks=marks))
    return params


# ----------------------------------------------------------------------------- running blocks


def _run_command(command: str, cwd: Path, where: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", command],
            cwd=cwd,
            env=command_env(),
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
def test_doc_block(chain: Chain, tmp_path, monkeypatch, shared_files):
    if chain.skip:
        pytest.skip(chain.skip)
    for name in chain.needs:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(shared_files(name))
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
