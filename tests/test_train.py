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

from train.config import Config, UsageError, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny dynamic ResNet: every test compiles it once per process.
TINY = ["--base_width=2", "--conv=dynamic", "--batch_size=32", "--export=false", "--tensorboard=false",
        "--progress=false", "--log_every_steps=1", "--warmup_epochs=0", "--temp_epochs=1"]


def tiny(workdir, *extra) -> Config:
    return parse_args(TINY + [f"--workdir={workdir}", *extra])


def compile_cache_env(directory) -> dict:
    """Environment for subprocesses that share compiled programs through JAX's persistent cache in
    ``directory``: a repeated or resumed run of the same configuration compiles nothing new."""
    return {"JAX_COMPILATION_CACHE_DIR": str(directory), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run_cli(args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}, **kwargs)


def final_params(workdir):
    from train.checkpoint import Checkpointer
    import orbax.checkpoint as ocp
    c = Checkpointer(str(workdir), 3)
    step = c.all_steps()[-1]
    restored = c.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                              meta=ocp.args.JsonRestore()))
    c.close()
    return step, restored["state"]


def test_cli_overrides_and_errors():
    config = parse_args(["--conv=dynamic", "--batch_size=32", "--grad_clip_norm=1.5", "--resume",
                         "--data_dir=none", "--nesterov=false"])
    assert (config.conv, config.batch_size, config.grad_clip_norm, config.resume, config.nesterov) == \
        ("dynamic", 32, 1.5, True, False)
    for args, words in [(["--conv=foo"], "--conv='foo'"), (["--batch_size=abc"], "integer"),
                        (["--bogus=1"], "unknown option --bogus"), (["--batch_size=0"], "> 0"),
                        (["--label_smoothing=1.0"], "[0, 1)"), (["epochs"], "unrecognized arguments: epochs"),
                        (["--conv"], "--conv: expected one argument"),
                        (["--attention_bn_init=1.0"], "applies to --conv=odconv only"),
                        (["--conv=odconv", "--attention_bn_init=0"], "> 0"),
                        (["--attention_norm=layer"], "applies to --conv=odconv only"),
                        (["--conv=odconv", "--attention_norm=group"], "expected one of batch, layer, none"),
                        (["--conv=odconv", "--attention_norm=none", "--attention_bn_init=1.0"], "has none")]:
        with pytest.raises(UsageError, match=__import__("re").escape(words)):
            parse_args(args)
    from train import steps

    official = parse_args(["--conv=odconv", "--attention_bn_init=1.0"])
    assert steps.model_kwargs(official, 10, (8, 8, 1))["conv_options"] == {"attention_bn_init": 1.0}
    assert "conv_options" not in steps.model_kwargs(parse_args(["--conv=odconv"]), 10, (8, 8, 1))
    layer_norm = parse_args(["--conv=odconv", "--attention_norm=layer", "--attention_bn_init=1.0"])
    assert steps.model_kwargs(layer_norm, 10, (8, 8, 1))["conv_options"] == {"attention_bn_init": 1.0,
                                                                            "attention_norm": "layer"}
    proc = run_cli(["--optimizer=adam"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--optimizer='adam': expected one of sgd, adamw" in out


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


def test_metric_sums_keep_their_dtypes_under_x64(tmp_path):
    """The compiled train step takes back the metric sums it returned (here 3 steps between fetches).
    Under ``jax_enable_x64`` (which float64 runs turn on for the process; here a float32 run inside
    ``jax.enable_x64``) the loss and gradient norm are float64, and the sums must stay float32: the
    compiled step refuses other dtypes."""
    import jax
    from train.loop import train_and_evaluate
    with jax.enable_x64(True):
        result = train_and_evaluate(tiny(tmp_path / "run", "--conv=static", "--num_steps=3", "--log_every_steps=3"))
    assert result["steps"] == 3 and np.isfinite(result["eval_loss"])


def test_config_json_is_never_seen_half_written(tmp_path):
    """A resumed multi-process run: process 0 rewrites config.json while the others check it. A reader
    racing 2,000 rewrites always finds a whole configuration (a plain rewrite truncates the file first,
    and a reader that saw it empty stopped its process with 'config.json is not valid JSON')."""
    import threading
    from train import loop
    config = tiny(tmp_path)
    loop._write_config(str(tmp_path), config)
    done, errors = threading.Event(), []

    def read():
        while not done.is_set():
            try:
                loop._check_resumable(str(tmp_path), config)
            except UsageError as error:
                errors.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(2000):
        loop._write_config(str(tmp_path), config)
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
    step(5.0, 20.0)              # first batch (workers starting) and first step (compiling): apart
    assert clock.summary() == {"data_wait_fraction": 0.0, "host_data_wait_fraction": 0.0,
                               "first_batch_seconds": 5.0, "steady_seconds": 20.0}
    step(1.0, 3.0)
    with clock.paused():         # evaluation: not step time
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


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
    from train.loop import TrainingDiverged, train_and_evaluate
    config = tiny(tmp_path / "run", "--num_steps=12", "--checkpoint_every_steps=1", "--learning_rate=1e12",
                  "--weight_decay=0")
    with pytest.raises(TrainingDiverged, match=r"(step \d+: training (loss|gradient norm).* is (nan|inf)|"
                                               r"refusing to save the state of step \d+: NaN/Inf)"):
        train_and_evaluate(config)
    from train.checkpoint import nonfinite_leaves
    if os.listdir(tmp_path / "run" / "checkpoints"):  # whatever was saved is finite
        assert not nonfinite_leaves(final_params(tmp_path / "run")[1])


def test_corrupt_checkpoint_falls_back(tmp_path, capfd):
    from train.loop import train_and_evaluate
    work = tmp_path / "run"
    args = ("--num_steps=6", "--checkpoint_every_steps=2")
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
    result = train_and_evaluate(tiny(work, *args, "--resume"))
    err = capfd.readouterr()
    assert "checkpoint step 6" in err.err and "falling back to the previous checkpoint" in err.err
    assert "checkpoint step 4" in err.err and "checksum" in err.err, err.err
    assert "resumed from" in err.out and "(step 2/6)" in err.out
    assert (work / "corrupt_checkpoints" / "6").is_dir() and (work / "corrupt_checkpoints" / "4").is_dir()
    assert sorted(os.listdir(work / "checkpoints")) == ["2", "4", "6"]  # re-written by the resumed run
    assert result["steps"] == 6


def test_kill_and_resume_is_bit_identical(tmp_path):
    """On an image folder with a truncated JPEG, decoded by 2 grain worker processes: the data iterator's
    state is in the (asynchronously written) checkpoints, the unreadable file is skipped (and counted) again
    after the resume."""
    from train.make_imagefolder import write_image_folder
    total = 10
    data_dir = tmp_path / "folder"
    write_image_folder(str(data_dir), {"train": 64, "test": 16}, num_classes=4, min_size=20, max_size=40)
    bad = data_dir / "train" / "class_002" / "train_000014.jpg"  # a JPEG mid-epoch (record 35 of 64)
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 3])
    args = TINY + [f"--num_steps={total}", "--checkpoint_every_steps=2", "--dataset=imagefolder",
                   f"--data_dir={data_dir}", "--image_size=16", "--data_workers=2"]
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


def test_eight_devices_equal_one(tmp_path):
    """8-device data parallelism == 1 device on the same global batch (BatchNorm statistics,
    loss mean and dropout masks all global). In float64 the two agree to 2.3e-14 relative
    (measured); in float32 they differ by ~1e-5 after 4 steps, which is summation-order
    rounding amplified by training, so the exact check is done in float64."""
    runs = {}
    for n in (1, 8):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_ENABLE_X64": "1"}
        out = subprocess.run([sys.executable, "-c", _DEVICE_RUN, str(tmp_path / f"{n}.npz"), "4"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and f"{n} devices" in out.stdout, out.stdout + out.stderr
        runs[n] = np.load(tmp_path / f"{n}.npz")
    worst = max(float(np.max(np.abs(runs[1][k] - runs[8][k])) / max(np.max(np.abs(runs[1][k])), 1e-300))
                for k in runs[1])
    assert worst < 1e-10, worst


def test_mock_cifar10_path_bf16_writes_metrics(tmp_path):
    """The TFDS path (``tfds.testing.mock_data`` CIFAR-10) with bf16 compute, TensorBoard on."""
    import tensorflow_datasets as tfds
    from train.loop import train_and_evaluate
    work = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=64):
        result = train_and_evaluate(tiny(work, "--dataset=cifar10", "--num_epochs=2", "--batch_size=16",
                                         "--dtype=bfloat16", "--tensorboard=true"))
    assert result["steps"] == 8 and np.isfinite(result["eval_loss"])
    assert jax_dtype_name(result["state"].params) == "float32"  # bf16 compute, float32 parameters
    assert "cifar" in open(work / "config.json").read()
    rows = open(work / "metrics.csv").read().splitlines()
    assert rows[0].startswith("epoch,step,train_loss") and [r.split(",")[:2] for r in rows[1:]] == [["1", "4"],
                                                                                                     ["2", "8"]]
    (events,) = os.listdir(work / "tensorboard")
    assert events.startswith("events.out.tfevents") and os.path.getsize(work / "tensorboard" / events) > 100


def jax_dtype_name(tree) -> str:
    import jax
    (name,) = {str(leaf.dtype) for leaf in jax.tree.leaves(tree)}
    return name
