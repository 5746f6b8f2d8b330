"""Files several tests read, each made once per session (the ``shared_files`` fixture, tests/conftest.py): small
stand-ins for a user's files, e.g. an official-layout ``od_resnet18_4x.pth`` made from ``dynconv_torch`` or a
finished two-step training run. The docs blocks name them with ``<!-- docs: needs FILE -->`` (tests/test_docs.py);
other tests ask for them by name. Readers never write into them."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict

ROOT = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT_S = 600  # a command that hangs fails instead of stalling the suite (a guard, not a timing)


def command_env() -> Dict[str, str]:
    """This interpreter as ``python``, the checkout's tools (train, parity, benchmarks) importable."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


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
    command = [sys.executable, "-m", "train", "--conv=odconv", "--num_steps=2", "--base_width=4", "--batch_size=16"]
    command += ["--progress=false", "--tensorboard=false", "--export=false", f"--workdir={path}"]
    subprocess.run(
        command, cwd=path.parent, env=command_env(), check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S
    )


MAKERS: Dict[str, Callable[[Path], None]] = {
    "od_resnet18_4x.pth": _od_resnet18_4x,
    "model.safetensors": _efficientnet_safetensors,
    "runs/digits": _digits_run,
}


def shared_file(root: Path, name: str) -> Path:
    """``root / name``, made by ``MAKERS[name]`` unless it is there: the first process that needs it makes it
    under a lock, the others wait for it (a half-made one, of a process that failed, is made again)."""
    path, stem = root / name, name.replace("/", "_")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (root / f"{stem}.done").exists():
            shutil.rmtree(path, ignore_errors=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            MAKERS[name](path)
            (root / f"{stem}.done").touch()
    return path
