"""Checkpoints (train/checkpoint.py) under faults: damaged, mismatched or unfinished checkpoints, write
failures, a full disk and SIGKILL during a write. No intact checkpoint is ever set aside; each fault gets a
clear message or the right behaviour (docs/reliability.md).

The fault tests inject faults inside Orbax through its private modules
(``orbax.checkpoint._src.path.atomicity``: a commit that raises or stalls; ``async_path.rmtree``: a slowed
removal): Orbax has no public hook at those points. Library and tool code use Orbax's public API only
(tests/test_compat.py greps for it).
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import skip_without_private_tmpfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(path):
    return sorted(os.path.relpath(os.path.join(r, n), path) for r, ds, fs in os.walk(path) for n in ds + fs)


def _state(step, width=3, value=None):
    w = np.full((2, width), step if value is None else value, np.float32)
    return {"step": jnp.asarray(step), "params": {"w": jnp.asarray(w)}, "batch_stats": {}}


def _target(width=3):
    return {"step": 0, "params": {"w": jnp.zeros((2, width))}, "batch_stats": {}}


def _saved(workdir, steps=(1, 2)):
    from train.checkpoint import Checkpointer

    ckpt = Checkpointer(str(workdir), 3)
    for s in steps:
        ckpt.save(s, _state(s), {"running": {"count": s}})
    ckpt.close()


def _damage_arrays(step_dir):
    """Overwrite the array data files of a checkpoint with zeros, in place (same size)."""
    damaged = 0
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":  # Orbax/OCDBT data files
            for name in files:
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    f.write(b"\x00" * os.path.getsize(path))
                damaged += 1
    assert damaged, "no array data file found"


@pytest.mark.slow
def test_restore_normalises_dtypes_under_x64(tmp_path):
    """Saved without x64 (step int32), restored with JAX_ENABLE_X64=1 (template int64): intact, nothing moved."""
    _saved(tmp_path)
    code = (
        "import jax.numpy as jnp, numpy as np, sys\n"
        "from train.checkpoint import Checkpointer\n"
        "c = Checkpointer(sys.argv[1], 3)\n"
        "step, state, meta = c.restore_latest({'step': jnp.asarray(0), 'params': {'w': jnp.zeros((2, 3))},"
        " 'batch_stats': {}})\n"
        "print(step, state['step'].dtype, state['params']['w'].dtype, float(state['params']['w'][0, 0]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_ENABLE_X64": "1"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "int64", "float64", "2.0"], out.stdout + out.stderr
    assert "WARNING" not in out.stderr and not (tmp_path / "corrupt_checkpoints").exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_structure_mismatch_names_keys_and_moves_nothing(tmp_path):
    from train.checkpoint import Checkpointer, CheckpointMismatch

    _saved(tmp_path)
    ckpt = Checkpointer(str(tmp_path), 3)
    target = {"step": 0, "params": {"w": jnp.zeros((2, 4)), "b": jnp.zeros(2)}, "batch_stats": {}}
    with pytest.raises(
        CheckpointMismatch,
        match=r"step 2 .* is intact but does not fit(.|\n)*every checkpoint was "
        r"left in place(.|\n)*differs: \['params'\]\['w'\] stored "
        r"float32\[2, 3\], current float32\[2, 4\](.|\n)*missing in the "
        r"checkpoint: \['params'\]\['b'\]",
    ):
        ckpt.restore_latest(target)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_damaged_checkpoint_is_moved_and_the_previous_restored(tmp_path, capfd):
    from train.checkpoint import Checkpointer

    _saved(tmp_path)
    _damage_arrays(tmp_path / "checkpoints" / "2")
    ckpt = Checkpointer(str(tmp_path), 3)
    step, state, meta = ckpt.restore_latest(_target())
    ckpt.close()
    assert (step, float(state["params"]["w"][0, 0]), meta["running"]) == (1, 1.0, {"count": 1})
    assert "checkpoint step 2" in capfd.readouterr().err
    assert os.listdir(tmp_path / "checkpoints") == ["1"] and os.listdir(tmp_path / "corrupt_checkpoints") == ["2"]


def test_read_only_checkpointer_moves_and_creates_nothing(tmp_path, capfd):
    from train.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "empty"), 3, read_only=True)
    assert ckpt.all_steps() == [] and ckpt.restore_latest(_target()) is None
    ckpt.close()
    assert not (tmp_path / "empty").exists()
    _saved(tmp_path / "run")
    _damage_arrays(tmp_path / "run" / "checkpoints" / "2")
    before = _tree(tmp_path / "run")
    ckpt = Checkpointer(str(tmp_path / "run"), 3, read_only=True)
    assert ckpt.restore_latest(_target())[0] == 1
    ckpt.close()
    assert "left it in place (read-only)" in capfd.readouterr().err and _tree(tmp_path / "run") == before


def test_environment_error_is_not_corruption(tmp_path, monkeypatch):
    from train.checkpoint import Checkpointer, CheckpointError

    _saved(tmp_path)
    ckpt = Checkpointer(str(tmp_path), 3)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "checkpoints" / "2"))

    monkeypatch.setattr(ckpt.manager, "restore", denied)
    with pytest.raises(
        CheckpointError,
        match=r"cannot read the metadata of checkpoint step 2 .*Permission denied.*"
        r"left in place",
    ):
        ckpt.restore_latest(_target())
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    assert not (tmp_path / "corrupt_checkpoints").exists()


@pytest.mark.parametrize("process_index", [0, 1])
def test_quarantine_with_several_processes(tmp_path, monkeypatch, process_index):
    """Every process waits for process 0's removal of unfinished writes (none here) when it opens the run; then
    every process checks, waits at a barrier, process 0 alone moves, all wait again, then go on."""
    from train import checkpoint as ckpt_lib

    _saved(tmp_path)
    _damage_arrays(tmp_path / "checkpoints" / "2")
    barriers = []
    monkeypatch.setattr(
        ckpt_lib, "_sync", lambda name: barriers.append((name, sorted(os.listdir(tmp_path / "checkpoints"))))
    )
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), 3)
    assert ckpt.restore_latest(_target())[0] == 1
    ckpt.close()
    moved_by_me = ["1"] if process_index == 0 else ["1", "2"]
    assert barriers == [
        ("dynconv-remove-unfinished-writes", ["1", "2"]),
        ("dynconv-quarantine-2-checked", ["1", "2"]),
        ("dynconv-quarantine-2-moved", moved_by_me),
    ]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch, asynchronous):
    """Disk full simulated by fault injection: the commit step of Orbax's atomic write raises ENOSPC (in the
    background thread when asynchronous: raised by the next wait)."""
    from orbax.checkpoint._src.path import atomicity

    from train.checkpoint import Checkpointer, CheckpointWriteError

    _saved(tmp_path, steps=(1,))

    async def disk_full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
    ckpt = Checkpointer(str(tmp_path), 3, asynchronous=asynchronous)
    with pytest.raises(
        CheckpointWriteError,
        match=r"could not write the checkpoint of step 2 .*\(disk full\).*No space "
        r"left on device.*the earlier checkpoints \(\[1\]\) are untouched",
    ):
        ckpt.save(2, _state(2), {"running": {}})
        ckpt.wait()  # asynchronous: the background failure is raised here
    if asynchronous:  # or described by the loop's error messages ("Last good checkpoint: ...")
        ckpt.save(2, _state(2), {"running": {}})
        assert re.match(r"step 1 in .* \(could not write the checkpoint of step 2 .*\(disk full\)", ckpt.last_good())
    monkeypatch.undo()
    assert os.listdir(tmp_path / "checkpoints") == ["1"]  # the temporary directory was removed
    assert ckpt.restore_latest(_target())[0] == 1
    ckpt.save(2, _state(2), {"running": {}})  # the next write works
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2] and ckpt.latest_committed == 2
    ckpt.close()


_DISK_FULL = """
import os, sys, numpy as np
from train.checkpoint import Checkpointer, CheckpointWriteError
def state(s):
    return {"step": np.int32(s), "params": {"w": np.random.default_rng(s).normal(size=40_000).astype(np.float32)}}

target = {"step": 0, "params": {"w": np.zeros(40_000, np.float32)}}
c = Checkpointer(sys.argv[1], 3, asynchronous=True)  # as the training loop writes
c.save(1, state(1), {})
try:
    c.save(2, state(2), {})  # waits for step 1's write
    c.wait()
    print("SAVED 2 (the file system was not full)")
except CheckpointWriteError as error:
    print("WRITE ERROR", error)
print("LEFT", sorted(os.listdir(os.path.join(sys.argv[1], "checkpoints"))))
step, restored, _ = c.restore_latest(target)
print("RESTORED", step, np.array_equal(restored["params"]["w"], state(1)["params"]["w"]))
"""


@pytest.mark.slow
def test_disk_full_on_a_small_tmpfs(tmp_path):
    """A real full disk: a 256 KiB tmpfs (mounted in a private user+mount namespace) holds one checkpoint, not two."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    skip_without_private_tmpfs(mount, "256k")
    script = f'mount -t tmpfs -o size=256k tmpfs "$1" && exec "{sys.executable}" -c "$2" "$1/run"'
    out = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(mount), _DISK_FULL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(
        r"WRITE ERROR could not write the checkpoint of step 2 to .* \(disk full\) .*No space left on "
        r"device.*earlier checkpoints \(\[1\]\) are untouched",
        out.stdout,
    ), out.stdout + out.stderr
    assert "LEFT ['1']" in out.stdout and "RESTORED 1 True" in out.stdout, out.stdout + out.stderr


_KILLED_WRITER = """
import sys, time, numpy as np
from train.checkpoint import Checkpointer
mode, workdir = sys.argv[1:3]
state = lambda s: {"step": np.int32(s), "params": {"w": np.full(4_000_000, s, np.float32)}}
c = Checkpointer(workdir, 3)
c.save(1, state(1), {})
if mode == "commit":
    from orbax.checkpoint._src.path import atomicity
    async def stall(self):
        print("COMMITTING", flush=True)
        time.sleep(300)
    atomicity.AtomicRenameTemporaryPath.finalize = stall
print("SAVING 2", flush=True)
c.save(2, state(2), {})
print("SAVED 2", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["write", "commit"])
def test_sigkill_during_a_checkpoint_write(tmp_path, mode):
    """SIGKILL while step 2 is written (as soon as its temporary directory appears), or just before its
    commit: step 1 stays intact and restores, the temporary is cleaned up when the run is reopened."""
    from train.checkpoint import Checkpointer

    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, mode, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    wait_for = "COMMITTING" if mode == "commit" else "SAVING 2"
    for line in proc.stdout:
        if line.startswith(wait_for):
            break
    deadline = time.time() + 60
    while mode == "write" and not any(".orbax-checkpoint-tmp" in n for n in os.listdir(tmp_path / "checkpoints")):
        assert time.time() < deadline and proc.poll() is None, "the write of step 2 never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path / "checkpoints")
    assert "1" in left and "2" not in left and any(".orbax-checkpoint-tmp" in n for n in left), left
    ckpt = Checkpointer(str(tmp_path), 3)
    step, state, _ = ckpt.restore_latest({"step": 0, "params": {"w": np.zeros(4_000_000, np.float32)}})
    ckpt.close()
    assert step == 1 and float(state["params"]["w"][-1]) == 1.0
    assert os.listdir(tmp_path / "checkpoints") == ["1"] and not (tmp_path / "corrupt_checkpoints").exists()


def test_reopening_a_run_removes_unfinished_writes_before_it_returns(tmp_path, monkeypatch):
    """A run opened, read and closed (no save) leaves no temporary of an unfinished write behind: the Checkpointer
    removes them before it returns. Orbax's own removal (cleanup_tmp_directories) runs in a background thread that
    only its next save waits for; made slow here, it would still be running at the end (CI once caught it)."""
    import asyncio

    from orbax.checkpoint._src.path import async_path

    from train.checkpoint import Checkpointer

    _saved(tmp_path, steps=(1,))
    shutil.copytree(tmp_path / "checkpoints" / "1", tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp")
    remove = async_path.rmtree

    async def slow_remove(path):
        await asyncio.sleep(2)
        await remove(path)

    monkeypatch.setattr(async_path, "rmtree", slow_remove)
    ckpt = Checkpointer(str(tmp_path), 3)
    assert os.listdir(tmp_path / "checkpoints") == ["1"]
    step, _, _ = ckpt.restore_latest(_target())
    ckpt.close()
    assert step == 1 and os.listdir(tmp_path / "checkpoints") == ["1"]


@pytest.mark.slow
def test_resume_after_every_checkpoint_was_quarantined(tmp_path, capfd, monkeypatch):
    """--resume refuses to restart from step 0 once every checkpoint failed its check, unless --allow_restart
    (a stand-in state replaces the model's, and the run stops right after that decision: nothing compiles)."""
    from train import loop
    from train.checkpoint import Checkpointer, CheckpointError, NoIntactCheckpoint
    from train.config import parse_args
    from train.loop import train_and_evaluate

    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    def stand_in(*args):  # an init that compiles nothing; no steps
        init = concurrent.futures.Future()
        init.set_result(lambda key: {"params": _target()["params"]})
        return init, None, None

    monkeypatch.setattr(loop.metrics_lib, "MetricsWriter", started)
    monkeypatch.setattr(loop, "_compile_ahead", stand_in)
    work = tmp_path / "run"
    args = [
        "--base_width=2",
        "--conv=static",
        "--batch_size=32",
        "--export=false",
        "--tensorboard=false",
        "--progress=false",
        f"--workdir={work}",
        "--num_steps=2",
        "--checkpoint_every_steps=2",
        "--resume",
    ]
    work.mkdir()
    (work / "config.json").write_text(parse_args(args).to_json())
    ckpt = Checkpointer(str(work), 3)
    ckpt.save(2, _state(2), {"running": {}})
    ckpt.close()
    meta_dir = work / "checkpoints" / "2" / "meta"
    for path in meta_dir.iterdir():
        if path.is_file():
            path.write_text("{damaged")
    with pytest.raises(
        NoIntactCheckpoint,
        match=r"checkpoint step 2 .* is damaged: its metadata cannot be read"
        r"(.|\n)*pass --allow_restart",
    ):
        train_and_evaluate(parse_args(args))
    assert os.listdir(work / "corrupt_checkpoints") == ["2"]
    with pytest.raises(CheckpointError, match=r"steps \['2'\] failed their integrity check .*pass --allow_restart"):
        train_and_evaluate(parse_args(args))
    with pytest.raises(Started):
        train_and_evaluate(parse_args(args + ["--allow_restart"]))
    assert "--resume: no checkpoint in" in capfd.readouterr().out and "starting from step 0"


@pytest.mark.slow
def test_a_run_that_stops_with_an_error_closes_what_it_opened(tmp_path, monkeypatch):
    """An error before the first step (the metrics writer's) or in a step (after the data workers started)
    still closes the asynchronous checkpointer and stops the grain workers: a notebook or a sweep that calls
    ``train_and_evaluate`` again keeps no Orbax threads or orphaned worker processes. A stand-in state and
    stand-in steps replace the model's: nothing compiles."""
    import multiprocessing

    from train import loop
    from train.checkpoint import Checkpointer
    from train.config import parse_args
    from train.loop import train_and_evaluate

    closed, workers = [], []
    close = Checkpointer.close
    monkeypatch.setattr(Checkpointer, "close", lambda self: (closed.append(self.directory), close(self))[1])

    def failing_step(*args):
        workers.extend(multiprocessing.active_children())
        raise RuntimeError("device lost")

    def stand_in(*args):
        init, step = concurrent.futures.Future(), concurrent.futures.Future()
        init.set_result(lambda key: {"params": _target()["params"]})
        step.set_result(failing_step)
        return init, step, step

    monkeypatch.setattr(loop, "_compile_ahead", stand_in)
    args = [
        "--base_width=2",
        "--conv=static",
        "--batch_size=32",
        "--export=false",
        "--tensorboard=false",
        "--progress=false",
        "--num_steps=2",
        "--data_workers=1",
    ]

    def failing_writer(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(loop.metrics_lib, "MetricsWriter", failing_writer)
        with pytest.raises(OSError, match="disk full"):
            train_and_evaluate(parse_args(args + [f"--workdir={tmp_path / 'writer'}"]))
    assert closed == [str(tmp_path / "writer" / "checkpoints")]
    with pytest.raises(RuntimeError, match="device lost"):
        train_and_evaluate(parse_args(args + [f"--workdir={tmp_path / 'step'}"]))
    assert closed[1:] == [str(tmp_path / "step" / "checkpoints")]
    assert workers and "grain" in workers[0].name  # the step ran after the worker process started
    for worker in workers:
        worker.join(timeout=30)
        assert not worker.is_alive(), worker
