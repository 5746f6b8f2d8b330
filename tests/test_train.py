"""Tests of the training loop (train/): CLI, learning, NaN guard, checkpoint fallback,
kill-and-resume bit-identity (image folder, 2 data workers), 8-device == 1-device, mock CIFAR-10 path."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
from _xla_level import with_session_compile_flags

from train.config import Config, UsageError, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny dynamic ResNet: every test compiles it once per process.
TINY = [
    "--base_width=2",
    "--conv=dynamic",
    "--batch_size=32",
    "--export=false",
    "--tensorboard=false",
    "--progress=false",
    "--log_every_steps=1",
    "--warmup_epochs=0",
    "--temp_epochs=1",
]


def tiny(workdir, *extra) -> Config:
    return parse_args(TINY + [f"--workdir={workdir}", *extra])


def compile_cache_env(directory) -> dict:
    """Environment for subprocesses that share compiled programs through JAX's persistent cache in
    ``directory``: a repeated or resumed run of the same configuration compiles nothing new."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(directory),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def run_cli(args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def final_params(workdir):
    import orbax.checkpoint as ocp

    from train.checkpoint import Checkpointer

    c = Checkpointer(str(workdir), 3)
    step = c.all_steps()[-1]
    restored = c.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    )
    c.close()
    return step, restored["state"]


def test_cli_overrides_and_errors():
    config = parse_args(
        ["--conv=dynamic", "--batch_size=32", "--grad_clip_norm=1.5", "--resume", "--data_dir=none", "--nesterov=false"]
    )
    assert (config.conv, config.batch_size, config.grad_clip_norm, config.resume, config.nesterov) == (
        "dynamic",
        32,
        1.5,
        True,
        False,
    )
    for args, words in [
        (["--conv=foo"], "--conv='foo'"),
        (["--batch_size=abc"], "integer"),
        (["--bogus=1"], "unknown option --bogus"),
        (["--batch_size=0"], "> 0"),
        (["--label_smoothing=1.0"], "[0, 1)"),
        (["epochs"], "unrecognized arguments: epochs"),
        (["--conv"], "--conv: expected one argument"),
        (["--attention_bn_init=1.0"], "applies to --conv=odconv only"),
        (["--conv=odconv", "--attention_bn_init=0"], "> 0"),
        (["--attention_norm=layer"], "applies to --conv=odconv only"),
        (["--conv=odconv", "--attention_norm=group"], "expected one of batch, layer, none"),
        (["--conv=odconv", "--attention_norm=none", "--attention_bn_init=1.0"], "has none"),
        (["--seed=-1"], "--seed=-1: must be an integer from 0 to 2**63 - 1"),  # was NumPy's, late
        ([f"--seed={2**63}"], "from 0 to 2**63 - 1"),  # was JAX's overflow
        (["--dataset="], "--dataset='': name a data set"),
    ]:
        with pytest.raises(UsageError, match=__import__("re").escape(words)):
            parse_args(args)
    from train import steps

    official = parse_args(["--conv=odconv", "--attention_bn_init=1.0"])
    assert steps.model_kwargs(official, 10, (8, 8, 1))["conv_options"] == {"attention_bn_init": 1.0}
    assert "conv_options" not in steps.model_kwargs(parse_args(["--conv=odconv"]), 10, (8, 8, 1))
    layer_norm = parse_args(["--conv=odconv", "--attention_norm=layer", "--attention_bn_init=1.0"])
    assert steps.model_kwargs(layer_norm, 10, (8, 8, 1))["conv_options"] == {
        "attention_bn_init": 1.0,
        "attention_norm": "layer",
    }
    for flag, words in (
        ("--optimizer=adam", "--optimizer='adam': expected one of sgd, adamw"),
        ("--seed=-1", "--seed=-1: must be an integer"),
    ):
        proc = run_cli([flag])
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2 and out == f"error: {words}" + out.split(words, 1)[1], out


@pytest.mark.parametrize(
    "error, code",
    [
        ("usage", 2),  # found after the start: the data (--data_dir, a one-class folder), the workdir, --resume
        ("diverged", 1),
        ("checkpoint", 1),
        ("worker", 1),
    ],
)
def test_cli_errors_after_the_start_are_one_line(monkeypatch, capsys, error, code):
    """``python -m train``: an error raised by the run is one line on stderr, no traceback; usage errors exit 2
    (a missing --data_dir exited 1), the others 1."""
    import logging

    from train import __main__ as cli
    from train import loop
    from train.checkpoint import CheckpointError
    from train.worker_watchdog import WorkerDied

    raised = {
        "usage": UsageError("--data_dir=/x: no such directory"),
        "diverged": loop.TrainingDiverged("nan"),
        "checkpoint": CheckpointError("disk"),
        "worker": WorkerDied("a grain data worker process ... died"),
    }
    monkeypatch.setattr(loop, "train_and_evaluate", lambda config: (_ for _ in ()).throw(raised[error]))
    assert cli.main(["--num_steps=1"]) == code
    err = capsys.readouterr().err
    assert err == f"error: {raised[error]}\n"
    assert cli._orbax_failure_reports in logging.getLogger("absl").filters  # Orbax's own reports kept off stderr


@pytest.mark.slow
def test_learning_happens_on_digits(tmp_path):
    from train.loop import train_and_evaluate

    result = train_and_evaluate(tiny(tmp_path / "run", "--num_epochs=2", "--base_width=4"))
    rows = open(tmp_path / "run" / "metrics.csv").read().splitlines()
    assert len(rows) == 3
    # Chance is 10% / loss 2.30; measured: ~0.5 accuracy after 2 epochs at this size.
    assert result["eval_accuracy"] > 0.3, result
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert 0 <= summary["data_wait_fraction"] <= summary["host_data_wait_fraction"] < 1
    assert summary["first_batch_seconds"] >= 0
    assert 0 < summary["step_seconds"] < summary["seconds"]


@pytest.mark.slow
def test_metric_sums_keep_their_dtypes_under_x64(tmp_path, float64):
    """The compiled train step takes back the metric sums it returned (here 3 steps between fetches).
    Under ``jax_enable_x64`` (which float64 runs turn on for the process; here a float32 run inside
    float64 fixture) the loss and gradient norm are float64, and the sums must stay float32: the
    compiled step refuses other dtypes."""
    from train.loop import train_and_evaluate

    result = train_and_evaluate(tiny(tmp_path / "run", "--conv=static", "--num_steps=3", "--log_every_steps=3"))
    assert result["steps"] == 3 and np.isfinite(result["eval_loss"])


@pytest.mark.slow
def test_config_json_is_never_seen_half_written(tmp_path):
    """A resumed multi-process run: process 0 rewrites config.json while the others check it. A reader
    racing 2,000 rewrites always finds a whole configuration (a plain rewrite truncates the file first,
    and a reader that saw it empty stopped its process with 'config.json is not valid JSON')."""
    import threading

    from train import workdir

    config = tiny(tmp_path)
    workdir.write_config(str(tmp_path), config)
    done, errors = threading.Event(), []

    def read():
        while not done.is_set():
            try:
                workdir.check_resumable(str(tmp_path), config)
            except UsageError as error:
                errors.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(2000):
        workdir.write_config(str(tmp_path), config)
    done.set()
    reader.join()
    assert not errors, errors[0]
    assert os.listdir(tmp_path) == ["config.json"]


def test_data_wait_clock_keeps_the_first_step_and_pauses_apart(monkeypatch):
    from train import metrics

    now = [0.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])

    def step(wait, run, devices_busy=False):
        clock.waiting()
        now[0] += wait
        clock.ready(devices_busy)
        clock.dispatched()
        now[0] += run

    clock = metrics.DataWaitClock()
    step(5.0, 20.0)  # first batch (workers starting) and first step (compiling): apart
    assert clock.summary() == {
        "data_wait_fraction": 0.0,
        "host_data_wait_fraction": 0.0,
        "first_batch_seconds": 5.0,
        "steady_seconds": 20.0,
    }
    step(1.0, 3.0)
    with clock.paused():  # evaluation: not step time
        now[0] += 100.0
    step(1.0, 3.0)
    timing = clock.summary()
    assert timing["steady_seconds"] == 28.0
    assert timing["data_wait_fraction"] == timing["host_data_wait_fraction"] == 2 / 28
    assert clock.epoch_fraction() == 2.0 / 28.0
    step(2.0, 2.0)
    assert clock.epoch_fraction() == 0.5 and clock.summary()["data_wait_fraction"] == 4 / 32
    step(4.0, 0.0, devices_busy=True)  # the devices were still running the previous step: not starved
    timing = clock.summary()
    assert timing["data_wait_fraction"] == 4 / 36 and timing["host_data_wait_fraction"] == 8 / 36


@pytest.mark.slow
def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
    from train.loop import TrainingDiverged, train_and_evaluate

    config = tiny(  # static convolutions: the guard does not depend on the conv type, and they compile in a third
        tmp_path / "run",
        "--conv=static",
        "--num_steps=12",
        "--checkpoint_every_steps=1",
        "--learning_rate=1e12",
        "--weight_decay=0",
    )
    with pytest.raises(
        TrainingDiverged,
        match=r"(step \d+: training (loss|gradient norm).* is (nan|inf)|"
        r"refusing to save the state of step \d+: NaN/Inf)",
    ):
        train_and_evaluate(config)
    from train.checkpoint import nonfinite_leaves

    if os.listdir(tmp_path / "run" / "checkpoints"):  # whatever was saved is finite
        assert not nonfinite_leaves(final_params(tmp_path / "run")[1])


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back(tmp_path, capfd):
    from train.loop import train_and_evaluate

    work = tmp_path / "run"
    args = ("--conv=static", "--num_steps=6", "--checkpoint_every_steps=2")  # static: checkpoints are conv-agnostic
    train_and_evaluate(tiny(work, *args))
    # Step 6: every file truncated (unreadable). Step 4: readable, but its recorded checksum
    # no longer matches the arrays (as if the array data had been altered after saving).
    for root, _, files in os.walk(work / "checkpoints" / "6"):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    meta_dir = work / "checkpoints" / "4" / "meta"
    (meta_file,) = [p for p in meta_dir.iterdir() if p.is_file() and '"checksum"' in p.read_text()]
    meta = json.loads(meta_file.read_text())
    meta["checksum"] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    # Without its summary, as if the run had stopped after its last checkpoint: --resume restores (with its
    # summary, the finished run's --resume reports it complete and reads no checkpoint).
    os.remove(work / "summary.json")
    result = train_and_evaluate(tiny(work, *args, "--resume"))
    err = capfd.readouterr()
    assert "checkpoint step 6" in err.err and "falling back to the previous checkpoint" in err.err
    assert "checkpoint step 4" in err.err and "checksum" in err.err, err.err
    assert "resumed from" in err.out and "(step 2/6)" in err.out
    assert (work / "corrupt_checkpoints" / "6").is_dir() and (work / "corrupt_checkpoints" / "4").is_dir()
    assert sorted(os.listdir(work / "checkpoints")) == ["2", "4", "6"]  # re-written by the resumed run
    assert result["steps"] == 6


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path):
    """On an image folder with a truncated JPEG, decoded by 2 grain worker processes: the data iterator's
    state is in the (asynchronously written) checkpoints, the unreadable file is skipped (and counted) again
    after the resume."""
    from train.make_imagefolder import write_image_folder

    total = 10
    data_dir = tmp_path / "folder"
    write_image_folder(str(data_dir), {"train": 64, "test": 16}, num_classes=4, min_size=20, max_size=40)
    bad = data_dir / "train" / "class_002" / "train_000014.jpg"  # a JPEG mid-epoch (record 35 of 64)
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 3])
    args = TINY + [
        f"--num_steps={total}",
        "--checkpoint_every_steps=2",
        "--dataset=imagefolder",
        f"--data_dir={data_dir}",
        "--image_size=16",
        "--data_workers=2",
    ]
    cache = compile_cache_env(tmp_path / "jax_cache")
    ref = run_cli(args + [f"--workdir={tmp_path / 'ref'}"], env=cache)
    out, _ = ref.communicate(timeout=900)
    assert ref.returncode == 0, out
    # Killed right after step 5..8 is logged: checkpoints are written in the background, one at a time, so
    # by then the write of step 2 has finished (the save at step 4 waited for it) and the one of step 4, 6
    # or 8 may be in flight. Before that, --resume could rightly start from scratch.
    kill_at = random.Random().randint(5, total - 2)
    proc = run_cli(args + [f"--workdir={tmp_path / 'killed'}"], env=cache)
    for line in proc.stdout:
        if line.startswith(f"step {kill_at}/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"not killed (kill_at={kill_at})"
    again = run_cli(args + [f"--workdir={tmp_path / 'killed'}", "--resume"], env=cache)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    assert "resumed from" in out and "unreadable or corrupt" not in out, out  # intact checkpoints pass the checksum
    assert f"skipped unreadable image {bad}" in out, out
    (s1, a), (s2, b) = final_params(tmp_path / "ref"), final_params(tmp_path / "killed")
    assert s1 == s2 == total
    import jax

    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{jax.tree_util.keystr(path)} differs (kill at {kill_at})"
    strip = lambda p: [r.rsplit(",", 1)[0] for r in open(p).read().splitlines()]  # drop 'seconds'
    assert strip(tmp_path / "ref" / "metrics.csv") == strip(tmp_path / "killed" / "metrics.csv")
    skipped = [json.load(open(tmp_path / run / "summary.json"))["skipped_images"] for run in ("ref", "killed")]
    assert skipped == [5, 5]  # once per epoch (5 epochs of 2 steps), before and after the kill


# Runs train_step under the loop's shardings and mesh (train/parallel.py) on the loop's batches for
# n steps in a subprocess with D host devices, in float64 (x64 + float64 parameters).
_DEVICE_RUN = """
import functools, sys, jax, jax.numpy as jnp, numpy as np
from dynconv_jax import models
from train import data, parallel, steps
from train.pipeline import Pipeline
from train.config import parse_args
cfg = parse_args(["--base_width=2", "--conv=dynamic", "--batch_size=32", "--warmup_epochs=0", "--dropout=0.2",
                  "--augment=none"])
ds = data.load_dataset(cfg)
batches = Pipeline(ds, cfg.batch_size, cfg.seed)
model = models.resnet18(**steps.model_kwargs(cfg, 10, ds.image_shape), param_dtype=jnp.float64)
tx, _ = steps.create_optimizer(cfg, batches.steps_per_epoch, 8)
state = steps.create_train_state(jax.random.key(0, impl="rbg"), model, ds.image_shape, tx)
mesh = parallel.make_mesh()
repl, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
train = parallel.under_mesh(mesh, jax.jit(
    functools.partial(steps.train_step, label_smoothing=0.1,
                      temperature_fn=steps.temperature_schedule(cfg, batches.steps_per_epoch)),
    in_shardings=(repl, shard, shard, repl), out_shardings=(repl, repl)))
state, key = jax.device_put(state, repl), jax.device_put(jax.random.key(1), repl)
for step in range(int(sys.argv[2])):
    x, y = batches.train_batch(step)
    state, metrics = train(state, *parallel.global_batch(shard, x.astype(np.float64), y), key)
assert jax.tree.leaves(state.params)[0].dtype == np.float64
print(jax.device_count(), "devices")
np.savez(sys.argv[1], *jax.tree.leaves(jax.device_get((state.params, state.batch_stats))))
"""


@pytest.mark.slow
def test_eight_devices_equal_one(tmp_path):
    """8-device data parallelism == 1 device on the same global batch (BatchNorm statistics,
    loss mean and dropout masks all global). In float64 the two agree to 2.3e-14 relative
    (measured); in float32 they differ by ~1e-5 after 4 steps, which is summation-order
    rounding amplified by training, so the exact check is done in float64."""
    runs = {}
    for n in (1, 8):
        env = with_session_compile_flags(
            {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_ENABLE_X64": "1"}
        )
        out = subprocess.run(
            [sys.executable, "-c", _DEVICE_RUN, str(tmp_path / f"{n}.npz"), "4"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0 and f"{n} devices" in out.stdout, out.stdout + out.stderr
        runs[n] = np.load(tmp_path / f"{n}.npz")
    worst = max(
        float(np.max(np.abs(runs[1][k] - runs[8][k])) / max(np.max(np.abs(runs[1][k])), 1e-300)) for k in runs[1]
    )
    assert worst < 1e-10, worst


@pytest.mark.slow
def test_mock_cifar10_path_bf16_writes_metrics(tmp_path):
    """The TFDS path (``tfds.testing.mock_data`` CIFAR-10) with bf16 compute, TensorBoard on."""
    import tensorflow_datasets as tfds

    from train.loop import train_and_evaluate

    work = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=64):
        result = train_and_evaluate(
            tiny(
                work, "--dataset=cifar10", "--num_epochs=2", "--batch_size=16", "--dtype=bfloat16", "--tensorboard=true"
            )
        )
    assert result["steps"] == 8 and np.isfinite(result["eval_loss"])
    assert jax_dtype_name(result["state"].params) == "float32"  # bf16 compute, float32 parameters
    assert "cifar" in open(work / "config.json").read()
    rows = open(work / "metrics.csv").read().splitlines()
    assert rows[0].startswith("epoch,step,train_loss") and [r.split(",")[:2] for r in rows[1:]] == [
        ["1", "4"],
        ["2", "8"],
    ]
    (events,) = os.listdir(work / "tensorboard")
    assert events.startswith("events.out.tfevents") and os.path.getsize(work / "tensorboard" / events) > 100


def jax_dtype_name(tree) -> str:
    import jax

    (name,) = {str(leaf.dtype) for leaf in jax.tree.leaves(tree)}
    return name


# --------------------------------------------------------------------------- the run folder (train/workdir.py)
_HOLD_LOCK = """
import sys, time
from train.workdir import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_one_run_per_workdir_and_a_dead_holder_leaves_no_lock(tmp_path):
    """Two runs on one workdir interleaved metrics.csv and mixed their checkpoints: the second is refused before it
    writes anything, naming the holder; a holder killed with SIGKILL leaves the folder free (the kernel drops an
    flock with its process)."""
    import socket

    from train import workdir
    from train.loop import train_and_evaluate

    work = tmp_path / "run"
    work.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(work)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UsageError) as info:
            train_and_evaluate(tiny(work))
        message = str(info.value)
        assert f"is in use by another run (pid {holder.pid} on host {socket.gethostname()}, since " in message
        assert sorted(os.listdir(work)) == [workdir.LOCK_NAME], os.listdir(work)  # nothing written
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
        lock = workdir.WorkdirLock(str(work))
        lock.acquire()  # the dead holder's lock is gone
        with pytest.raises(UsageError, match=f"pid {os.getpid()} on host"):
            workdir.WorkdirLock(str(work)).acquire()  # one lock per open file: refused in this process too
        lock.release()
        workdir.WorkdirLock(str(work)).acquire()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_run_folder_writes_fail_in_one_line_and_keep_what_was_saved(tmp_path, monkeypatch):
    """A --workdir under a file is a usage error naming it, before anything is created; a full disk while
    config.json is written (here the rename fails with ENOSPC) leaves the old file and no '.config.json.<pid>'."""
    import errno

    from train import workdir
    from train.loop import train_and_evaluate

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match=r"--workdir=.*file/run' cannot be created: .*file' is a file"):
        train_and_evaluate(tiny(blocker / "run"))
    work = tmp_path / "run"
    work.mkdir()
    workdir.write_config(str(work), tiny(work))
    saved = (work / "config.json").read_text()

    def full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workdir.os, "replace", full)
    with pytest.raises(workdir.WorkdirError) as info:
        workdir.write_config(str(work), tiny(work, "--seed=3"))
    assert str(info.value) == f"could not write {work / 'config.json'} (disk full): No space left on device"
    assert os.listdir(work) == ["config.json"] and (work / "config.json").read_text() == saved


@pytest.mark.slow
def test_metrics_csv_garbage_rows_do_not_stop_a_resume(tmp_path, capfd):
    """A line of garbage in metrics.csv (an edit, a crash mid-write) used to stop --resume with a ValueError:
    it is left out, named by its line number, and the rows up to the resumed step are kept."""
    from train.metrics import COLUMNS, MetricsWriter

    writer = MetricsWriter(str(tmp_path), None, tensorboard=False)
    for step in (2, 4, 6):
        writer.epoch({k: step for k in COLUMNS})
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("garbage\n3,x,1,1,1,1,1,1,1\n1,2,3,4,5,6,7,8,9,10\n")
    MetricsWriter(str(tmp_path), 4, tensorboard=False)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows == [",".join(COLUMNS), ",".join(["2"] * 9), ",".join(["4"] * 9)]
    assert "left out 3 line(s) that are not metrics rows (line(s) 5, 6, 7)" in capfd.readouterr().err


@pytest.mark.slow
def test_summary_is_strict_json_and_a_failed_export_keeps_it(tmp_path, monkeypatch):
    """summary.json never holds NaN (a finished run's --resume wrote 'NaN', not JSON); an export that fails on a
    full disk still leaves the summary (with the error) and ends the run with one line."""
    import errno
    import types

    from safetensors import SafetensorError

    from train import loop, workdir

    config = tiny(tmp_path, "--export=true", "--num_steps=3")
    run = types.SimpleNamespace(
        config=config,
        total_steps=3,
        primary=True,
        model=None,
        temperature_fn=lambda s: 1.0,
        dataset=types.SimpleNamespace(eval_examples=lambda n: None, num_classes=10),
    )
    progress = types.SimpleNamespace(
        eval_metrics={"loss": float("nan"), "accuracy": 0.5},
        skipped=0,
        state=types.SimpleNamespace(params={}, batch_stats={}),
    )
    timing = {
        "data_wait_fraction": 0.0,
        "host_data_wait_fraction": float("inf"),
        "first_batch_seconds": None,
        "steady_seconds": 1.0,
    }
    for failure in (
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ):
        monkeypatch.setattr(loop, "export_and_verify", lambda *args, error=failure: (_ for _ in ()).throw(error))
        with pytest.raises(workdir.WorkdirError, match="the export to .*model.safetensors failed .*No space left"):
            loop.finish(run, progress, types.SimpleNamespace(directory="ckpt"), timing, 0, 1.0, print)

        def refuse(text):
            raise ValueError(f"not strict JSON: {text}")

        summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
        assert summary["eval_loss"] is None and summary["host_data_wait_fraction"] is None
        assert summary["eval_accuracy"] == 0.5 and "No space left on device" in summary["export"]["error"]
    # A summary whose export failed is not a complete run: --resume exports again. With the export, it is one.
    resume = types.SimpleNamespace(
        config=tiny(tmp_path, "--export=true", "--num_steps=3", "--resume"), total_steps=3, primary=True
    )
    workdir.write_config(str(tmp_path), config)
    os.makedirs(tmp_path / "checkpoints" / "3")
    assert loop.finished_run(resume) is None
    workdir.write_summary(str(tmp_path), dict(summary, export={"path": "model.safetensors"}))
    assert loop.finished_run(resume)["already_complete"] is True


def test_an_eval_split_with_no_readable_image_is_a_clear_error(monkeypatch):
    """Was a ZeroDivisionError after all the training (the data set refuses such a split before training:
    tests/test_data.py; this is what a run meets if the files go unreadable meanwhile)."""
    import types

    from train import loop, parallel

    batch = {
        "image": np.zeros((2, 8, 8, 1), np.uint8),
        "label": np.zeros(2, np.int32),
        "mask": np.zeros(2, np.float32),
        "bad": np.array([0, 1]),
    }
    source = types.SimpleNamespace(split="test", describe=lambda index: f"record {index}")
    pipeline = types.SimpleNamespace(
        eval_batches=lambda: iter([batch]), dataset=types.SimpleNamespace(name="digits", eval=source)
    )
    sums = lambda *args: {"loss": np.float32(0), "correct": np.float32(0), "count": np.float32(0)}
    with pytest.raises(
        UsageError,
        match="no image of the eval split 'test' of digits could be read "
        r"\(2 unreadable here\)",
    ):
        loop.evaluate(sums, None, pipeline, parallel.batch_sharded(parallel.make_mesh()), np.float32(1))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_run(tmp_path, monkeypatch, capsys):
    """Preemption, with a real SIGTERM sent to the whole process group (as SLURM and a stopping VM do: the grain
    worker gets it too): the run saves a checkpoint at the next step boundary and exits with 143; --resume
    continues from that step (past a garbage line in metrics.csv) to the end; a --resume of the finished run says
    so and changes nothing (it printed 'accuracy nan' and wrote NaN into summary.json); a finished run without its
    summary is evaluated again; a --resume that fails keeps config.json as it was."""
    total, work = 40, tmp_path / "run"
    # Static convolutions: preemption does not depend on the conv type (kill-and-resume above runs a dynamic one).
    args = TINY + ["--conv=static", f"--num_steps={total}", "--checkpoint_every_steps=1000", "--data_workers=1"]
    args += [f"--workdir={work}"]
    proc = run_cli(args, start_new_session=True)  # the suite's compilation cache
    for line in proc.stdout:
        if line.startswith("step 3/"):
            os.killpg(proc.pid, signal.SIGTERM)
            break
    out = line + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out
    stopped = int(out.split("preempted (SIGTERM) at step ")[1].split("/")[0])
    assert 3 <= stopped < total and os.listdir(work / "checkpoints") == [str(stopped)], out
    assert "--resume to continue" in out and "Traceback" not in out, out
    with open(work / "metrics.csv", "a") as f:
        f.write("garbage\n")
    resumed = run_cli(args + ["--resume"])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert f"(step {stopped}/{total})" in out and "left out 1 line(s) that are not metrics rows" in out, out
    summary = (work / "summary.json").read_text()
    assert json.loads(summary)["steps"] == total and "NaN" not in summary
    accuracy = json.loads(summary)["eval_accuracy"]
    from train import loop  # in this process: a complete run's --resume starts nothing, compiles nothing

    assert loop.train_and_evaluate(parse_args(args + ["--resume"]))["already_complete"] is True
    assert "is already complete (step 40/40)" in capsys.readouterr().out
    assert (work / "summary.json").read_text() == summary
    os.remove(work / "summary.json")  # as if the run had stopped between its last checkpoint and its summary
    again = run_cli(args + ["--resume", "--data_workers=0"])  # the workers may change on --resume
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "evaluating its last checkpoint" in out, out
    assert json.loads((work / "summary.json").read_text())["eval_accuracy"] == accuracy
    # A --resume that fails after the checkpoints were opened writes no config.json (without one to compare, a
    # wrong --num_experts used to save its own, and the right --resume was then refused).
    os.remove(work / "config.json")
    monkeypatch.setattr(loop, "compile_steps", lambda run: (_ for _ in ()).throw(RuntimeError("stopped here")))
    with pytest.raises(RuntimeError, match="stopped here"):
        loop.train_and_evaluate(tiny(work, f"--num_steps={total}", "--num_experts=2", "--resume"))
    assert not (work / "config.json").exists()


_FULL_TMPFS = (
    'mount -t tmpfs -o size=16k tmpfs "$1" && head -c 12288 /dev/zero > "$1/fill" && '
    '"$2" -m train --workdir="$1/run" --base_width=2 --num_steps=2 --progress=false'
)


@pytest.mark.slow
def test_a_full_or_read_only_disk_is_one_line(tmp_path):
    """A real full disk: a 16 KiB tmpfs (private user and mount namespace) with one page left, which the lock
    file takes; config.json's write fails: one line, exit 1, and no '.config.json.<pid>' left. The same file
    system remounted read-only: a new --workdir there is a usage error before the run starts (exit 2; it was an
    OSError traceback)."""
    from _helpers import skip_without_private_tmpfs

    mount = tmp_path / "tmpfs"
    mount.mkdir()
    skip_without_private_tmpfs(mount, "16k")
    script = (
        _FULL_TMPFS + ' ; echo "exit $?"; ls -A "$1/run"; mount -o remount,ro "$1" && '
        '"$2" -m train --workdir="$1/new" --progress=false; echo "exit $?"'
    )
    out = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(mount), sys.executable],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.stderr == (
        f"error: could not write {mount}/run/config.json (disk full): No space left on device\n"
        f"error: --workdir='{mount}/new' cannot be written: '{mount}' is not writable\n"
    ), out.stderr
    assert out.stdout.split() == ["exit", "1", ".lock", "checkpoints", "exit", "2"], out.stdout


def test_the_cli_keeps_orbax_failure_reports_off_the_terminal():
    """Orbax's background threads log each failed write with a traceback (~300 lines on a full disk) before the
    run raises it in one line: python -m train filters those records, and nothing else."""
    import logging

    from train.__main__ import _orbax_failure_reports

    record = lambda level, path: logging.LogRecord("absl", level, path, 1, "message", None, None)
    orbax = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
    assert not _orbax_failure_reports(record(logging.ERROR, orbax))
    assert _orbax_failure_reports(record(logging.WARNING, orbax))
    assert _orbax_failure_reports(record(logging.ERROR, os.path.join("site-packages", "jax", "x.py")))
