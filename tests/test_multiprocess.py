"""Multi-process training, proven: 2 processes on 127.0.0.1 (``jax.distributed`` with a local coordinator,
gloo CPU collectives), 2 CPU devices each, train a static ResNet-18 through ``python -m train --distributed``
on the embedded digits and on an image folder; the parameters equal a 1-process 4-device run of the same
global batch in float64, and a checkpoint the 2-process run wrote resumes bit-identically."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from _xla_level import with_session_compile_flags

from train.make_imagefolder import write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Static convolutions: what the test proves (global batch statistics, per-process data slices, gloo
# collectives, multi-process checkpoints) does not depend on the conv type, and a dynamic ResNet's float64
# compile made each of the five runs cost over a minute of CPU (dynamic layers on several devices:
# tests/test_train.py::test_eight_devices_equal_one).
ARGS = [
    "--base_width=2",
    "--conv=static",
    "--batch_size=8",
    "--num_steps=4",
    "--checkpoint_every_steps=2",
    "--dtype=float64",
    "--dropout=0.2",
    "--warmup_epochs=0",
    "--temp_epochs=1",
    "--export=false",
    "--tensorboard=false",
    "--progress=false",
    "--log_every_steps=1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args, processes: int, devices: int, cache_dir, timeout: int = 1200):
    """Run ``python -m train`` as ``processes`` processes of ``devices`` CPU devices; returns their outputs.
    Compiled programs go to the persistent cache ``cache_dir`` (a resumed run compiles nothing new)."""
    from test_train import compile_cache_env

    env = with_session_compile_flags(
        {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            **compile_cache_env(cache_dir),
        }
    )
    if processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}", JAX_NUM_PROCESSES=str(processes))
        args = args + ["--distributed"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "train", *args],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**env, "JAX_PROCESS_ID": str(i)},
        )
        for i in range(processes)
    ]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out
    return outs


def final_params(workdir):
    from test_train import final_params as read

    step, state = read(workdir)
    return step, [np.asarray(x) for x in __import__("jax").tree.leaves(state)]


def assert_equal_runs(one, two):
    (s1, a), (s2, b) = final_params(one), final_params(two)
    assert s1 == s2 == 4 and any(x.dtype == np.float64 for x in a)
    worst = max(
        float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-300)) for x, y in zip(a, b) if x.dtype.kind == "f"
    )
    assert worst <= 1e-10, worst
    return b


@pytest.mark.slow
def test_two_processes_equal_one_and_resume(tmp_path):
    data_dir = str(tmp_path / "folder")
    write_image_folder(data_dir, {"train": 32, "test": 8}, num_classes=4, min_size=20, max_size=40)
    cache = tmp_path / "jax_cache"
    sources = {"digits": ARGS, "folder": ARGS + ["--dataset=imagefolder", f"--data_dir={data_dir}", "--image_size=16"]}
    for name, args in sources.items():
        (one,) = train(args + [f"--workdir={tmp_path / name / 'one'}"], processes=1, devices=4, cache_dir=cache)
        assert "1 process(es), 4 device(s)" in one
        two = train(args + [f"--workdir={tmp_path / name / 'two'}"], processes=2, devices=2, cache_dir=cache)
        assert "2 process(es), 4 device(s)" in two[0] and "done:" in two[0] and "done:" not in two[1]
        assert os.path.exists(tmp_path / name / "two" / "summary.json")  # written by process 0
        params = assert_equal_runs(tmp_path / name / "one", tmp_path / name / "two")
    # Resume the 2-process folder run from its step-2 checkpoint (step 4 removed): bit-identical to the full run.
    shutil.rmtree(tmp_path / "folder" / "two" / "checkpoints" / "4")
    again = train(
        sources["folder"] + [f"--workdir={tmp_path / 'folder' / 'two'}", "--resume"],
        processes=2,
        devices=2,
        cache_dir=cache,
    )
    assert all("resumed from" in out and "(step 2/4)" in out for out in again), again
    s3, resumed = final_params(tmp_path / "folder" / "two")
    assert s3 == 4 and all(np.array_equal(x, y) for x, y in zip(params, resumed))
