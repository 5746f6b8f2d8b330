"""The training loop: ``train_and_evaluate(config)`` (what ``python -m train`` runs)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict

import jax
import numpy as np

from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import pipeline as pipeline_lib
from train import metrics as metrics_lib
from train import parallel
from train import steps
from train.config import Config, UsageError, from_json

# Fields that may differ between a run and its resumption (they do not change the maths).
RUNTIME_FIELDS = ("resume", "workdir", "progress", "log_every_steps", "tensorboard", "export", "distributed",
                  "checkpoint_every_steps", "keep_checkpoints", "data_dir", "data_workers", "allow_restart")
EXPORT_EXAMPLES = 512  # eval images the end-of-run export check compares Flax and PyTorch on


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/Inf; the last good checkpoint is kept."""


def default_workdir(config: Config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{config.dataset}-{config.model}-{config.conv}-{stamp}")


def _check_resumable(workdir: str, config: Config) -> None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = from_json(f.read(), path)
    diff = [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(config, f.name)!r}"
            for f in dataclasses.fields(Config)
            if f.name not in RUNTIME_FIELDS and getattr(saved, f.name) != getattr(config, f.name)]
    if diff:
        raise UsageError(f"--resume: the configuration differs from the one saved in {path} "
                         f"({'; '.join(diff)}); an exact resume needs the same configuration")


def _write_config(workdir: str, config: Config) -> None:
    """``workdir/config.json``, replaced in one step: the other processes of a resumed multi-process run
    read it (:func:`_check_resumable`) while process 0 writes it, and must never see it half written."""
    partial_path = os.path.join(workdir, f".config.json.{os.getpid()}")
    with open(partial_path, "w") as f:
        f.write(config.to_json())
    os.replace(partial_path, os.path.join(workdir, "config.json"))


def _close_iterator(batches) -> None:
    """Stop the worker processes of a grain iterator (one without workers has nothing to stop)."""
    if hasattr(batches, "close"):
        batches.close()


def _checkpoint_failure(error: Exception, checkpointer: ckpt_lib.Checkpointer) -> Exception:
    """A failed write (:class:`~train.checkpoint.CheckpointWriteError`) or a refused NaN/Inf state
    (:class:`TrainingDiverged`), naming the last good checkpoint."""
    failure = type(error) if isinstance(error, ckpt_lib.CheckpointWriteError) else TrainingDiverged
    return failure(f"{error}. Last good checkpoint: {checkpointer.last_good()}")


def evaluate(p_eval_step, state, pipeline: pipeline_lib.Pipeline, sharding, temperature) -> Dict[str, float]:
    """Loss and accuracy of ``state`` on the whole eval split (unreadable images are left out)."""
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    for batch in pipeline.eval_batches():
        for index in batch["bad"][batch["bad"] >= 0]:
            print(f"WARNING: left out unreadable eval image {pipeline.dataset.eval.describe(int(index))}",
                  file=sys.stderr, flush=True)
        sums = jax.device_get(p_eval_step(state, *parallel.global_batch(
            sharding, batch["image"], batch["label"], batch["mask"]), temperature))
        for key in totals:
            totals[key] += float(sums[key])
    return {"loss": totals["loss"] / totals["count"], "accuracy": totals["correct"] / totals["count"]}


def _compile_ahead(mesh, pipeline: pipeline_lib.Pipeline, model, tx, init_key, dropout_key, train_step, eval_step):
    """Start compiling the run's three XLA programs at once: the parameter init, then ``train_step`` and
    ``eval_step`` (jitted, with the run's shardings) for the replicated state and the pipeline's global
    batches. Each is lowered here, one after the other, and compiled in a thread of its own (XLA compiles
    without holding the GIL), so they share the cores and the caller goes on meanwhile. Returns futures of
    the three ``jax.stages.Compiled`` programs (the init takes ``init_key``; called with other shapes,
    dtypes or shardings, a compiled program raises instead of compiling again). See docs/performance.md,
    "Start-up"."""
    compiler = ThreadPoolExecutor(max_workers=3, thread_name_prefix="compile")
    init = jax.jit(steps.init_variables_fn(model, pipeline.dataset.image_shape)).lower(init_key)
    compiled_init = compiler.submit(init.compile)
    state = parallel.abstract(jax.eval_shape(
        functools.partial(steps.train_state_from_variables, model=model, tx=tx), init.out_info))
    inputs = {train: [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in pipeline.model_inputs(train)]
              for train in (True, False)}
    compiled_train_step = parallel.compile_ahead(
        compiler, mesh, train_step, state, parallel.abstract(jax.eval_shape(steps.zero_metric_sums)),
        *inputs[True], parallel.abstract(dropout_key))
    compiled_eval_step = parallel.compile_ahead(
        compiler, mesh, eval_step, state, *inputs[False], jax.ShapeDtypeStruct((), np.float32))
    compiler.shutdown(wait=False)  # the compiles run on; nothing more is submitted
    return compiled_init, compiled_train_step, compiled_eval_step


def train_and_evaluate(config: Config) -> Dict[str, Any]:
    """Train ``config``; returns the final metrics, the state and paths (see docs/training.md)."""
    config.validate()
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    parallel.initialize(config.distributed)
    primary = jax.process_index() == 0
    workdir = config.workdir or default_workdir(config)
    config = dataclasses.replace(config, workdir=workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UsageError(f"--workdir={workdir!r} is a file, not a directory; choose a directory for the run")
    os.makedirs(workdir, exist_ok=True)

    dataset = data_lib.load_dataset(config)
    pipeline = pipeline_lib.Pipeline(dataset, config.batch_size, config.seed, config.data_workers,
                                     jax.process_index(), jax.process_count())
    mesh = parallel.make_mesh()
    if config.batch_size % mesh.size:
        raise UsageError(f"--batch_size={config.batch_size} must be divisible by the number of devices "
                         f"({mesh.size})")
    steps.check_image_size(config, dataset.image_shape)
    spe = pipeline.steps_per_epoch
    total_steps = config.num_steps or config.num_epochs * spe

    model = steps.create_model(config, dataset.num_classes, dataset.image_shape)
    tx, lr_schedule = steps.create_optimizer(config, spe, total_steps)
    temperature_fn = steps.temperature_schedule(config, spe)
    # Everything opened from here on is closed on every way out, in reverse order: the progress bar, the
    # metrics writer, the data iterators (their worker processes stop) and last the checkpointer (it waits
    # for a write in flight, also when the run stops with an error).
    with contextlib.ExitStack() as cleanup:
        # Asynchronous: a checkpoint's arrays are written while the next steps run (train/checkpoint.py), in
        # multi-process runs too (Orbax's background threads synchronise through the distributed client).
        checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints, asynchronous=True)
        cleanup.callback(checkpointer.close)
        cleanup.callback(pipeline.close)  # the eval iterator's worker processes
        existing = checkpointer.all_steps()
        if existing and not config.resume:
            raise UsageError(f"{workdir} already has checkpoints (steps {existing}); pass --resume to continue "
                             f"that run or choose another --workdir")
        if config.resume:
            _check_resumable(workdir, config)
        if primary:
            _write_config(workdir, config)

        # Parameters are drawn with the 'rbg' PRNG: XLA:CPU compiles a threefry init of a ResNet
        # several times slower (docs/performance.md, "Compile time"). Dropout keeps threefry,
        # whose sharded random bits equal the unsharded ones.
        init_key = jax.random.key(config.seed, impl="rbg")
        dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)
        repl, data_sharding = parallel.replicated(mesh), parallel.batch_sharded(mesh)
        # The step adds its metrics to on-device sums: the host waits for the device only when it fetches
        # them (every --log_every_steps, at epoch ends and before each checkpoint), not every step.
        train_step = jax.jit(
            functools.partial(steps.accumulating_train_step, temperature_fn=temperature_fn,
                              label_smoothing=config.label_smoothing, learning_rate_fn=lr_schedule,
                              normalize=pipeline.normalize),
            in_shardings=(repl, repl, data_sharding, data_sharding, repl), out_shardings=(repl, repl),
            donate_argnums=(0, 1))
        eval_step = jax.jit(
            functools.partial(steps.eval_step, normalize=pipeline.normalize),
            in_shardings=(repl, data_sharding, data_sharding, data_sharding, repl), out_shardings=repl)
        compiled_init, compiled_train_step, compiled_eval_step = _compile_ahead(
            mesh, pipeline, model, tx, init_key, dropout_key, train_step, eval_step)
        state = steps.train_state_from_variables(compiled_init.result()(init_key), model, tx)

        start_step, skipped = 0, 0
        running = {"loss": 0.0, "accuracy": 0.0, "count": 0}
        try:
            restored = checkpointer.restore_latest(state) if config.resume else None
        except ckpt_lib.NoIntactCheckpoint as error:
            if not config.allow_restart:
                raise ckpt_lib.NoIntactCheckpoint(f"{error}\n--resume refuses to train from step 0 instead: pass "
                                                  f"--allow_restart to do that") from None
            print(f"--resume --allow_restart: {error}\nstarting from step 0", file=sys.stderr, flush=True)
            restored = None
        batches = pipeline.train_iterator(total_steps)
        cleanup.callback(lambda: _close_iterator(batches))  # the one in use when the run stops
        if restored is not None:
            start_step, state, meta = restored
            running, skipped = meta["running"], meta.get("skipped_images", 0)
            if not checkpointer.restore_data(start_step, batches):
                # No data state for this process count (e.g. an older checkpoint): batches are a pure
                # function of (seed, step), so starting the dataset at the step is the same.
                _close_iterator(batches)
                batches = pipeline.train_iterator(total_steps, start_step)
            print(f"resumed from {checkpointer.directory}/{start_step} (step {start_step}/{total_steps})", flush=True)
        elif config.resume:
            quarantined = checkpointer.quarantined_steps()
            if quarantined and not config.allow_restart and not checkpointer.all_steps():
                raise ckpt_lib.CheckpointError(
                    f"--resume: no intact checkpoint in {checkpointer.directory}; the checkpoints of steps "
                    f"{quarantined} failed their integrity check and are in {checkpointer.corrupt_directory}. "
                    f"Restarting would train from step 0: pass --allow_restart to do that, or restore a checkpoint "
                    f"by hand")
            print(f"--resume: no checkpoint in {checkpointer.directory}; starting from step 0", flush=True)

        state, dropout_key = parallel.replicate((state, dropout_key), repl)

        writer = metrics_lib.MetricsWriter(workdir, start_step if restored else None, config.tensorboard, primary)
        cleanup.callback(writer.close)
        if primary:
            print(f"{config.model} conv={config.conv} K={config.num_experts} on {dataset.name} "
                  f"{dataset.image_shape} ({len(dataset.train)} train / {len(dataset.eval)} eval), "
                  f"{jax.process_count()} process(es), {jax.device_count()} device(s) [{jax.devices()[0].platform}], "
                  f"batch {config.batch_size}, {config.data_workers} data worker(s), "
                  f"{total_steps} steps ({spe}/epoch); workdir {workdir}", flush=True)

        p_train_step, p_eval_step = compiled_train_step.result(), compiled_eval_step.result()
        bar = None
        if config.progress and primary:
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
            cleanup.callback(bar.close)
        log = bar.write if bar is not None else functools.partial(print, flush=True)

        t_start = t_epoch = time.time()
        eval_metrics = {"loss": math.nan, "accuracy": math.nan}
        clock = metrics_lib.DataWaitClock()
        sums = parallel.replicate(steps.zero_metric_sums(), repl)
        for step in range(start_step, total_steps):
            clock.waiting()
            batch = next(batches)
            if int(batch["step"][0]) != step:
                raise RuntimeError(f"data iterator out of step: got the batch of step {int(batch['step'][0])} "
                                   f"at step {step}")
            for index in batch["bad"][batch["bad"] >= 0]:
                skipped += 1
                log(f"WARNING: step {step + 1}: skipped unreadable image {dataset.train.describe(int(index))} "
                    f"({skipped} so far)")
            images, labels = parallel.global_batch(data_sharding, batch["image"], batch["label"])  # uint8
            clock.ready(devices_busy=not state.step.is_ready())  # state: the previous step's output
            state, sums = p_train_step(state, sums, images, labels, dropout_key)
            clock.dispatched()
            done = step + 1
            if bar is not None:
                bar.update(1)
            epoch_end = done % spe == 0 or done == total_steps
            checkpoint_due = done % config.checkpoint_every_steps == 0 or done == total_steps
            if not (done % config.log_every_steps == 0 or epoch_end or checkpoint_due):
                continue
            window = {k: float(v) for k, v in jax.device_get(sums).items()}  # the host waits here only
            sums = parallel.replicate(steps.zero_metric_sums(), repl)
            if window["first_nonfinite_step"] >= 0:
                bad = int(window["first_nonfinite_step"])
                name = "loss" if not math.isfinite(window["nonfinite_loss"]) else "grad_norm"
                raise TrainingDiverged(
                    f"step {bad + 1}: training {'loss (cross-entropy' if name == 'loss' else 'gradient norm ('}"
                    f"{f', label smoothing {config.label_smoothing})' if name == 'loss' else 'of the loss)'} "
                    f"is {window['nonfinite_' + name]} (loss {window['nonfinite_loss']}, grad norm "
                    f"{window['nonfinite_grad_norm']}, lr {float(lr_schedule(bad)):.4g}); found at the check after "
                    f"step {done} (steps {done - int(window['steps']) + 1}-{done} checked together: every "
                    f"--log_every_steps, at epoch ends and before checkpoints); stopped. Last good checkpoint: "
                    f"{checkpointer.last_good()}")
            n = config.batch_size
            running["loss"] += window["loss"] * n
            running["accuracy"] += window["accuracy"] * n
            running["count"] += int(window["steps"]) * n
            lr = window["learning_rate"]
            if done % config.log_every_steps == 0:
                mean = {k: window[k] / window["steps"] for k in ("loss", "accuracy")}
                writer.scalars(done, {**mean, "grad_norm": window["last_grad_norm"], "learning_rate": lr,
                                      "temperature": window["temperature"]}, "train")
                if bar is not None:
                    bar.set_postfix(loss=f"{mean['loss']:.4f}", lr=f"{lr:.4g}", T=f"{window['temperature']:.2f}",
                                    refresh=False)
                else:
                    log(f"step {done}/{total_steps} loss {mean['loss']:.4f} acc {mean['accuracy']:.4f} "
                        f"lr {lr:.4g} T {window['temperature']:.3f}")
            if epoch_end:
                temperature = temperature_fn(done)
                with clock.paused():
                    eval_metrics = evaluate(p_eval_step, state, pipeline, data_sharding,
                                            parallel.replicate(np.float32(temperature), repl))
                if not math.isfinite(eval_metrics["loss"]):
                    raise TrainingDiverged(f"step {done}: eval loss (cross-entropy on {config.eval_split}) is "
                                           f"{eval_metrics['loss']}; stopped. Last good checkpoint: "
                                           f"{checkpointer.last_good()}")
                row = {"epoch": math.ceil(done / spe), "step": done,
                       "train_loss": running["loss"] / running["count"],
                       "train_accuracy": running["accuracy"] / running["count"],
                       "eval_loss": eval_metrics["loss"], "eval_accuracy": eval_metrics["accuracy"],
                       "learning_rate": lr, "temperature": float(temperature),
                       "seconds": round(time.time() - t_epoch, 2)}
                writer.epoch(row)
                log(f"epoch {row['epoch']:>3} step {done}: train loss {row['train_loss']:.4f} "
                    f"acc {row['train_accuracy']:.4f} | {config.eval_split} loss {row['eval_loss']:.4f} "
                    f"acc {row['eval_accuracy']:.4f} | lr {lr:.4g} T {row['temperature']:.3f} "
                    f"| {row['seconds']:.1f}s, data wait {100 * clock.epoch_fraction():.0f}%")
                running = {"loss": 0.0, "accuracy": 0.0, "count": 0}
                t_epoch = time.time()
            if checkpoint_due:
                try:
                    with clock.paused():
                        checkpointer.save(done, state, {"running": running, "skipped_images": skipped}, batches)
                except ckpt_lib.CheckpointError as error:
                    raise _checkpoint_failure(error, checkpointer) from None
        data_timing = clock.summary()
        try:
            checkpointer.wait()  # the last checkpoint is on disk before the run reports done
        except ckpt_lib.CheckpointError as error:
            raise _checkpoint_failure(error, checkpointer) from None

    elapsed = time.time() - t_start
    result = {"workdir": workdir, "steps": total_steps, "eval_loss": eval_metrics["loss"],
              "eval_accuracy": eval_metrics["accuracy"], "seconds": elapsed, "state": state,
              "checkpoint_dir": checkpointer.directory, "skipped_images": skipped,
              **{k: data_timing[k] for k in ("data_wait_fraction", "host_data_wait_fraction", "first_batch_seconds")},
              "step_seconds": data_timing["steady_seconds"] / max(total_steps - start_step - 1, 1)}
    if config.export and primary:
        from train.export import export_and_verify

        variables = {"params": state.params, "batch_stats": state.batch_stats}
        result["export"] = export_and_verify(
            config, model, variables, dataset.eval_examples(EXPORT_EXAMPLES), dataset.num_classes,
            float(temperature_fn(total_steps)), os.path.join(workdir, "model.safetensors"))
    if primary:
        log(f"done: {total_steps} steps in {elapsed:.1f}s; {config.eval_split} accuracy "
            f"{eval_metrics['accuracy']:.4f}, loss {eval_metrics['loss']:.4f}"
            + (f"; skipped {skipped} unreadable training image(s)" if skipped else ""))
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in result.items() if k != "state"}, f, indent=2)
    return result
