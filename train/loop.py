"""The training loop: ``train_and_evaluate(config)`` (what ``python -m train`` runs), in named steps.

:func:`set_up` (data, mesh, model, optimiser, schedules); :func:`lock_workdir` (one run per folder);
:func:`finished_run` (a ``--resume`` of a complete run returns its summary); :func:`train`: :func:`open_checkpointer`
(refuses to write over another run, checks a resumed run's configuration); :func:`compile_steps` (the init, train
and eval programs, compiled at once); :func:`restore_checkpoint` (the state and the data iterator to start from);
:func:`train_steps` (the step loop: every ``--log_every_steps``, at epoch ends, before checkpoints and after a
preemption notice it fetches the metrics, :func:`check_finite`, logs, :func:`end_epoch` evaluates and
:func:`save_checkpoint` saves); :func:`finish` (the summary and the export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional

import jax
import numpy as np
from safetensors import SafetensorError

from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import metrics as metrics_lib
from train import parallel, steps
from train import pipeline as pipeline_lib
from train import workdir as workdir_lib
from train.config import Config, UsageError, conv_size
from train.export import export_and_verify
from train.preemption import Preempted, PreemptionNotice

EXPORT_EXAMPLES = 512  # eval images the end-of-run export check compares Flax and PyTorch on


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/Inf; the last good checkpoint is kept."""


def default_workdir(config: Config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{config.dataset}-{config.model}-{config.conv}-{stamp}")


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
    """Loss and accuracy of ``state`` on the whole eval split (unreadable images are left out; when none is
    left, a :class:`~train.config.UsageError` names the split)."""
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    unreadable = 0
    for batch in pipeline.eval_batches():
        for index in batch["bad"][batch["bad"] >= 0]:
            unreadable += 1
            print(
                f"WARNING: left out unreadable eval image {pipeline.dataset.eval.describe(int(index))}",
                file=sys.stderr,
                flush=True,
            )
        sums = jax.device_get(
            p_eval_step(
                state, *parallel.global_batch(sharding, batch["image"], batch["label"], batch["mask"]), temperature
            )
        )
        for key in totals:
            totals[key] += float(sums[key])
    if totals["count"] == 0:  # (this process's unreadable count; the sums are global)
        dataset = pipeline.dataset
        raise UsageError(
            f"no image of the eval split {dataset.eval.split!r} of {dataset.name} could be read "
            f"({unreadable} unreadable here): nothing to evaluate on"
        )
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
    state = parallel.abstract(
        jax.eval_shape(functools.partial(steps.train_state_from_variables, model=model, tx=tx), init.out_info)
    )
    inputs = {
        train: [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in pipeline.model_inputs(train)]
        for train in (True, False)
    }
    compiled_train_step = parallel.compile_ahead(
        compiler,
        mesh,
        train_step,
        state,
        parallel.abstract(jax.eval_shape(steps.zero_metric_sums)),
        *inputs[True],
        parallel.abstract(dropout_key),
    )
    compiled_eval_step = parallel.compile_ahead(
        compiler, mesh, eval_step, state, *inputs[False], jax.ShapeDtypeStruct((), np.float32)
    )
    compiler.shutdown(wait=False)  # the compiles run on; nothing more is submitted
    return compiled_init, compiled_train_step, compiled_eval_step


@dataclasses.dataclass(frozen=True)
class Run:
    """What :func:`set_up` builds for a run; the steps below read it and change none of it.

    Attributes:
      config: the validated configuration, ``workdir`` filled in.
      primary: this is process 0 (it writes ``config.json``, the logs, the summary and the export).
      dataset: the sources and their preprocessing.
      pipeline: this process's batches.
      mesh: the devices of all processes.
      total_steps: the steps the run trains for.
      model: the Flax model.
      tx: the optax optimiser.
      learning_rate_fn: the learning-rate schedule (of the step).
      temperature_fn: the attention temperature schedule (of the step).
    """

    config: Config
    primary: bool
    dataset: data_lib.Dataset
    pipeline: pipeline_lib.Pipeline
    mesh: Any
    total_steps: int
    model: Any
    tx: Any
    learning_rate_fn: Callable
    temperature_fn: Callable


@dataclasses.dataclass(frozen=True)
class Programs:
    """The run's three XLA programs (futures of ``jax.stages.Compiled``, compiling in threads), and the
    keys and shardings they are called with."""

    init: Future
    train_step: Future
    eval_step: Future
    init_key: Any
    dropout_key: Any
    replicated: Any
    data_sharding: Any


@dataclasses.dataclass
class Progress:
    """Where the run stands: the state after ``step`` steps, the training batches from there on, the
    loss/accuracy sums of the epoch so far (``running``), the unreadable training images replaced so far,
    and the metrics of the last evaluation."""

    step: int
    state: Any
    batches: Any
    running: Dict[str, float]
    skipped: int = 0
    restored: bool = False
    eval_metrics: Dict[str, float] = dataclasses.field(default_factory=lambda: {"loss": math.nan, "accuracy": math.nan})
    train_start: float = 0.0  # time.time() when the first step started (the programs compiled)
    epoch_start: float = 0.0

    @property
    def evaluated(self) -> bool:
        """Whether ``eval_metrics`` hold an evaluation of this process (NaN until then)."""
        return not math.isnan(self.eval_metrics["loss"])


def set_up(config: Config) -> Run:
    """Validate ``config``, start the distributed runtime, create the workdir and build the run's data,
    mesh, model, optimiser and schedules; a configuration the run cannot use raises :class:`UsageError`."""
    config.validate()
    if config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    parallel.initialize(config.distributed)
    workdir = config.workdir or default_workdir(config)
    config = dataclasses.replace(config, workdir=workdir)
    workdir_lib.check_workdir(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise workdir_lib.WorkdirError(f"could not create --workdir={workdir!r}: {error.strerror}") from None

    dataset = data_lib.load_dataset(config)
    pipeline = pipeline_lib.Pipeline(
        dataset, config.batch_size, config.seed, config.data_workers, jax.process_index(), jax.process_count()
    )
    mesh = parallel.make_mesh()
    if config.batch_size % mesh.size:
        raise UsageError(f"--batch_size={config.batch_size} must be divisible by the number of devices ({mesh.size})")
    steps.check_image_size(config, dataset.image_shape)
    spe = pipeline.steps_per_epoch
    total_steps = config.num_steps or config.num_epochs * spe
    model = steps.create_model(config, dataset.num_classes, dataset.image_shape)
    tx, lr_schedule = steps.create_optimizer(config, spe, total_steps)
    return Run(
        config,
        jax.process_index() == 0,
        dataset,
        pipeline,
        mesh,
        total_steps,
        model,
        tx,
        lr_schedule,
        steps.temperature_schedule(config, spe),
    )


def lock_workdir(run: Run, cleanup: contextlib.ExitStack) -> None:
    """Process 0 takes the run folder's lock (:class:`~train.workdir.WorkdirLock`, released by ``cleanup``);
    when it cannot, every process of the run raises."""
    error = None
    if run.primary:
        lock = workdir_lib.WorkdirLock(run.config.workdir)
        try:
            lock.acquire()
            cleanup.callback(lock.release)
        except (UsageError, workdir_lib.WorkdirError) as failure:
            error = failure
    if jax.process_count() > 1 and parallel.any_process_failed(error is not None) and error is None:
        raise UsageError(
            f"--workdir={run.config.workdir!r}: process 0 could not lock the run folder (its output says why)"
        )
    if error is not None:
        raise error


def open_checkpointer(run: Run, cleanup: contextlib.ExitStack) -> ckpt_lib.Checkpointer:
    """The run's checkpointer, closed by ``cleanup`` (after the pipeline's eval workers); refuses a workdir
    with checkpoints unless ``--resume``, checks a resumed run's configuration; a run that starts from no
    checkpoint writes ``config.json`` here, a resumed one once its checkpoint is restored
    (:func:`train_and_evaluate`): a failed ``--resume`` leaves the saved configuration as it was."""
    config, workdir = run.config, run.config.workdir
    # Asynchronous: a checkpoint's arrays are written while the next steps run (train/checkpoint.py), in
    # multi-process runs too (Orbax's background threads synchronise through the distributed client).
    checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints, asynchronous=True)
    cleanup.callback(checkpointer.close)
    cleanup.callback(run.pipeline.close)  # the eval iterator's worker processes
    existing = checkpointer.all_steps()
    if existing and not config.resume:
        raise UsageError(
            f"{workdir} already has checkpoints (steps {existing}); pass --resume to continue "
            f"that run or choose another --workdir"
        )
    if config.resume:
        workdir_lib.check_resumable(workdir, config)
    if run.primary and not existing:
        workdir_lib.write_config(workdir, config)
    return checkpointer


def compile_steps(run: Run) -> Programs:
    """Jit the train and eval steps with the run's shardings and start compiling them and the init."""
    # Parameters are drawn with the 'rbg' PRNG: XLA:CPU compiles a threefry init of a ResNet
    # several times slower (docs/performance.md, "Compile time"). Dropout keeps threefry,
    # whose sharded random bits equal the unsharded ones.
    config, pipeline = run.config, run.pipeline
    init_key = jax.random.key(config.seed, impl="rbg")
    dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    repl, data_sharding = parallel.replicated(run.mesh), parallel.batch_sharded(run.mesh)
    # The step adds its metrics to on-device sums: the host waits for the device only when it fetches
    # them (every --log_every_steps, at epoch ends and before each checkpoint), not every step.
    train_step = jax.jit(
        functools.partial(
            steps.accumulating_train_step,
            temperature_fn=run.temperature_fn,
            label_smoothing=config.label_smoothing,
            learning_rate_fn=run.learning_rate_fn,
            normalize=pipeline.normalize,
        ),
        in_shardings=(repl, repl, data_sharding, data_sharding, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0, 1),
    )
    eval_step = jax.jit(
        functools.partial(steps.eval_step, normalize=pipeline.normalize),
        in_shardings=(repl, data_sharding, data_sharding, data_sharding, repl),
        out_shardings=repl,
    )
    compiled = _compile_ahead(run.mesh, pipeline, run.model, run.tx, init_key, dropout_key, train_step, eval_step)
    return Programs(*compiled, init_key, dropout_key, repl, data_sharding)


def _restore_latest(checkpointer: ckpt_lib.Checkpointer, state, config: Config):
    """``checkpointer.restore_latest(state)`` with ``--resume`` (None without it, or when every checkpoint
    failed its check and ``--allow_restart`` lets the run start again)."""
    if not config.resume:
        return None
    try:
        return checkpointer.restore_latest(state)
    except ckpt_lib.NoIntactCheckpoint as error:
        if not config.allow_restart:
            raise ckpt_lib.NoIntactCheckpoint(
                f"{error}\n--resume refuses to train from step 0 instead: pass --allow_restart to do that"
            ) from None
        print(f"--resume --allow_restart: {error}\nstarting from step 0", file=sys.stderr, flush=True)
        return None


def restore_checkpoint(run: Run, checkpointer: ckpt_lib.Checkpointer, state, cleanup: contextlib.ExitStack) -> Progress:
    """Where to start: the newest intact checkpoint's state, metrics and data iterator with ``--resume``,
    else ``state`` at step 0 (the iterator in use when the run stops is closed by ``cleanup``)."""
    config = run.config
    restored = _restore_latest(checkpointer, state, config)
    progress = Progress(
        0, state, run.pipeline.train_iterator(run.total_steps), {"loss": 0.0, "accuracy": 0.0, "count": 0}
    )
    cleanup.callback(lambda: _close_iterator(progress.batches))
    if restored is not None:
        progress.step, progress.state, meta = restored
        progress.running, progress.skipped, progress.restored = meta["running"], meta.get("skipped_images", 0), True
        if not checkpointer.restore_data(progress.step, progress.batches):
            # No data state for this process count (e.g. an older checkpoint): batches are a pure
            # function of (seed, step), so starting the dataset at the step is the same.
            _close_iterator(progress.batches)
            progress.batches = run.pipeline.train_iterator(run.total_steps, progress.step)
        print(
            f"resumed from {checkpointer.directory}/{progress.step} (step {progress.step}/{run.total_steps})",
            flush=True,
        )
    elif config.resume:
        quarantined = checkpointer.quarantined_steps()
        if quarantined and not config.allow_restart and not checkpointer.all_steps():
            raise ckpt_lib.CheckpointError(
                f"--resume: no intact checkpoint in {checkpointer.directory}; the checkpoints of steps "
                f"{quarantined} failed their integrity check and are in {checkpointer.corrupt_directory}. "
                f"Restarting would train from step 0: pass --allow_restart to do that, or restore a checkpoint "
                f"by hand"
            )
        print(f"--resume: no checkpoint in {checkpointer.directory}; starting from step 0", flush=True)
    return progress


def _announce(run: Run) -> None:
    config, dataset = run.config, run.dataset
    size = conv_size(config.conv, config.num_experts, config.kw_ratio)
    print(
        f"{config.model} conv={config.conv} {size} on {dataset.name} "
        f"{dataset.image_shape} ({len(dataset.train)} train / {len(dataset.eval)} eval), "
        f"{jax.process_count()} process(es), {jax.device_count()} device(s) [{jax.devices()[0].platform}], "
        f"batch {config.batch_size}, {config.data_workers} data worker(s), "
        f"{run.total_steps} steps ({run.pipeline.steps_per_epoch}/epoch); workdir {config.workdir}",
        flush=True,
    )


def _progress_bar(run: Run, start_step: int, cleanup: contextlib.ExitStack):
    """``(bar, log)``: a tqdm bar on process 0 with ``--progress`` (else None), and the function that prints
    a line (above the bar when there is one)."""
    bar = None
    if run.config.progress and run.primary:
        from tqdm import tqdm  # here: only a run that shows a bar needs it

        bar = tqdm(total=run.total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        cleanup.callback(bar.close)
    return bar, (bar.write if bar is not None else functools.partial(print, flush=True))


def _next_batch(run: Run, progress: Progress, step: int, log) -> Dict[str, np.ndarray]:
    """This process's batch of ``step``; its replaced unreadable images are counted and named."""
    batch = next(progress.batches)
    if int(batch["step"][0]) != step:
        raise RuntimeError(f"data iterator out of step: got the batch of step {int(batch['step'][0])} at step {step}")
    for index in batch["bad"][batch["bad"] >= 0]:
        progress.skipped += 1
        log(
            f"WARNING: step {step + 1}: skipped unreadable image {run.dataset.train.describe(int(index))} "
            f"({progress.skipped} so far)"
        )
    return batch


def evaluate_state(
    run: Run, programs: Programs, progress: Progress, p_eval_step, checkpointer: ckpt_lib.Checkpointer
) -> float:
    """Evaluate ``progress.state`` at the temperature of ``progress.step`` into ``progress.eval_metrics``;
    returns that temperature. An eval split with no readable image stops the run, naming the last checkpoint."""
    temperature = run.temperature_fn(progress.step)
    try:
        progress.eval_metrics = evaluate(
            p_eval_step,
            progress.state,
            run.pipeline,
            programs.data_sharding,
            parallel.replicate(np.float32(temperature), programs.replicated),
        )
    except UsageError as error:
        raise UsageError(f"step {progress.step}: {error}. Last good checkpoint: {checkpointer.last_good()}") from None
    return temperature


def train_steps(
    run: Run,
    programs: Programs,
    progress: Progress,
    checkpointer: ckpt_lib.Checkpointer,
    writer: metrics_lib.MetricsWriter,
    bar,
    log,
    notice: PreemptionNotice,
) -> Dict[str, float]:
    """Train from ``progress.step`` to the end, updating ``progress``. The host fetches the metric sums
    every ``--log_every_steps``, at epoch ends and before each checkpoint (and waits for the devices only
    then); there it checks them, logs, evaluates at epoch ends and saves. After a preemption ``notice`` it
    saves at the step just done and raises :class:`~train.preemption.Preempted`. Returns the data-wait
    summary."""
    config, repl = run.config, programs.replicated
    p_train_step, p_eval_step = programs.train_step.result(), programs.eval_step.result()
    clock = metrics_lib.DataWaitClock()
    sums = parallel.replicate(steps.zero_metric_sums(), repl)
    progress.train_start = progress.epoch_start = time.time()
    for step in range(progress.step, run.total_steps):
        clock.waiting()
        batch = _next_batch(run, progress, step, log)
        images, labels = parallel.global_batch(programs.data_sharding, batch["image"], batch["label"])  # uint8
        clock.ready(devices_busy=not progress.state.step.is_ready())  # state: the previous step's output
        progress.state, sums = p_train_step(progress.state, sums, images, labels, programs.dropout_key)
        clock.dispatched()
        progress.step = done = step + 1
        if bar is not None:
            bar.update(1)
        epoch_end = done % run.pipeline.steps_per_epoch == 0 or done == run.total_steps
        preempted = notice.reached(done) and done < run.total_steps  # asked at every step (multi-process sync)
        checkpoint_due = done % config.checkpoint_every_steps == 0 or done == run.total_steps or preempted
        if not (done % config.log_every_steps == 0 or epoch_end or checkpoint_due):
            continue
        window = {k: float(v) for k, v in jax.device_get(sums).items()}  # the host waits here only
        sums = parallel.replicate(steps.zero_metric_sums(), repl)
        check_finite(run, window, done, checkpointer)
        for key in ("loss", "accuracy"):
            progress.running[key] += window[key] * config.batch_size
        progress.running["count"] += int(window["steps"]) * config.batch_size
        if done % config.log_every_steps == 0:
            _log_train(run, window, done, writer, bar, log)
        if epoch_end:
            with clock.paused():
                temperature = evaluate_state(run, programs, progress, p_eval_step, checkpointer)
            end_epoch(run, progress, window, temperature, checkpointer, writer, log, clock)
        if checkpoint_due:
            with clock.paused():
                save_checkpoint(checkpointer, progress)
        if preempted:
            wait_for_checkpoints(checkpointer)
            raise Preempted(done, run.total_steps, checkpointer.directory)
    if progress.step == run.total_steps and not progress.evaluated:  # a finished run resumed for its summary
        log(
            f"--resume: step {progress.step}/{run.total_steps} was trained already, but the run left no summary: "
            f"evaluating its last checkpoint"
        )
        evaluate_state(run, programs, progress, p_eval_step, checkpointer)
    return clock.summary()


def check_finite(run: Run, window: Dict[str, float], done: int, checkpointer: ckpt_lib.Checkpointer) -> None:
    """Raise :class:`TrainingDiverged` when a step of the fetched ``window`` of metric sums (the steps up to
    ``done``) had a NaN/Inf loss or gradient norm, naming the first such step and the last good checkpoint."""
    if window["first_nonfinite_step"] < 0:
        return
    bad = int(window["first_nonfinite_step"])
    name = "loss" if not math.isfinite(window["nonfinite_loss"]) else "grad_norm"
    smoothing = run.config.label_smoothing
    raise TrainingDiverged(
        f"step {bad + 1}: training {'loss (cross-entropy' if name == 'loss' else 'gradient norm ('}"
        f"{f', label smoothing {smoothing})' if name == 'loss' else 'of the loss)'} "
        f"is {window['nonfinite_' + name]} (loss {window['nonfinite_loss']}, grad norm "
        f"{window['nonfinite_grad_norm']}, lr {float(run.learning_rate_fn(bad)):.4g}); found at the check after "
        f"step {done} (steps {done - int(window['steps']) + 1}-{done} checked together: every "
        f"--log_every_steps, at epoch ends and before checkpoints); stopped. Last good checkpoint: "
        f"{checkpointer.last_good()}"
    )


def _log_train(run: Run, window: Dict[str, float], done: int, writer: metrics_lib.MetricsWriter, bar, log) -> None:
    """The mean loss and accuracy of the steps since the last fetch, to the metrics and the bar (or a line)."""
    lr = window["learning_rate"]
    mean = {k: window[k] / window["steps"] for k in ("loss", "accuracy")}
    writer.scalars(
        done,
        {**mean, "grad_norm": window["last_grad_norm"], "learning_rate": lr, "temperature": window["temperature"]},
        "train",
    )
    if bar is not None:
        bar.set_postfix(loss=f"{mean['loss']:.4f}", lr=f"{lr:.4g}", T=f"{window['temperature']:.2f}", refresh=False)
    else:
        log(
            f"step {done}/{run.total_steps} loss {mean['loss']:.4f} acc {mean['accuracy']:.4f} "
            f"lr {lr:.4g} T {window['temperature']:.3f}"
        )


def end_epoch(
    run: Run,
    progress: Progress,
    window: Dict[str, float],
    temperature,
    checkpointer: ckpt_lib.Checkpointer,
    writer: metrics_lib.MetricsWriter,
    log,
    clock: metrics_lib.DataWaitClock,
) -> None:
    """After the epoch's evaluation (``progress.eval_metrics``): refuse a NaN/Inf eval loss, write and log the
    epoch's row and start the next epoch's sums."""
    config, done, eval_metrics = run.config, progress.step, progress.eval_metrics
    if not math.isfinite(eval_metrics["loss"]):
        raise TrainingDiverged(
            f"step {done}: eval loss (cross-entropy on {config.eval_split}) is "
            f"{eval_metrics['loss']}; stopped. Last good checkpoint: {checkpointer.last_good()}"
        )
    running, lr = progress.running, window["learning_rate"]
    row = {
        "epoch": math.ceil(done / run.pipeline.steps_per_epoch),
        "step": done,
        "train_loss": running["loss"] / running["count"],
        "train_accuracy": running["accuracy"] / running["count"],
        "eval_loss": eval_metrics["loss"],
        "eval_accuracy": eval_metrics["accuracy"],
        "learning_rate": lr,
        "temperature": float(temperature),
        "seconds": round(time.time() - progress.epoch_start, 2),
    }
    writer.epoch(row)
    log(
        f"epoch {row['epoch']:>3} step {done}: train loss {row['train_loss']:.4f} "
        f"acc {row['train_accuracy']:.4f} | {config.eval_split} loss {row['eval_loss']:.4f} "
        f"acc {row['eval_accuracy']:.4f} | lr {lr:.4g} T {row['temperature']:.3f} "
        f"| {row['seconds']:.1f}s, data wait {100 * clock.epoch_fraction():.0f}%"
    )
    progress.running = {"loss": 0.0, "accuracy": 0.0, "count": 0}
    progress.epoch_start = time.time()


def save_checkpoint(checkpointer: ckpt_lib.Checkpointer, progress: Progress) -> None:
    """Start saving the state, the epoch's metric sums and the data iterator at ``progress.step``."""
    try:
        checkpointer.save(
            progress.step,
            progress.state,
            {"running": progress.running, "skipped_images": progress.skipped},
            progress.batches,
        )
    except ckpt_lib.CheckpointError as error:
        raise _checkpoint_failure(error, checkpointer) from None


def wait_for_checkpoints(checkpointer: ckpt_lib.Checkpointer) -> None:
    """Return once the last checkpoint is on disk (the run reports done only then)."""
    try:
        checkpointer.wait()
    except ckpt_lib.CheckpointError as error:
        raise _checkpoint_failure(error, checkpointer) from None


def finished_run(run: Run) -> Optional[Dict[str, Any]]:
    """With ``--resume``, a run whose newest checkpoint is its last step and whose ``summary.json`` is complete
    (its export written, if it exports) is done: its summary is returned as it is, and nothing is trained,
    evaluated or written. A run whose last step was trained but whose summary is missing is evaluated and
    summarised again by :func:`train_and_evaluate` (its last checkpoint restored, no step trained)."""
    config = run.config
    if not config.resume or not os.path.exists(os.path.join(config.workdir, "config.json")):
        return None  # without the saved configuration, only a restore can tell whether the checkpoints fit
    workdir_lib.check_resumable(config.workdir, config)
    summary = workdir_lib.read_summary(config.workdir)
    if (
        summary is None
        or summary.get("steps") != run.total_steps
        or not isinstance(summary.get("eval_accuracy"), (int, float))
        or (config.export and isinstance(summary.get("export"), dict) and "error" in summary["export"])
        or ckpt_lib.committed_steps(config.workdir)[-1:] != [run.total_steps]
    ):
        return None
    if run.primary:
        print(
            f"--resume: {config.workdir} is already complete (step {run.total_steps}/{run.total_steps}); its "
            f"summary is unchanged: {config.eval_split} accuracy {summary['eval_accuracy']:.4f}, "
            f"{os.path.join(config.workdir, 'summary.json')}",
            flush=True,
        )
    return dict(summary, already_complete=True)


def train_and_evaluate(config: Config) -> Dict[str, Any]:
    """Train ``config``; returns the final metrics, the state and paths (see docs/training.md). A ``--resume``
    of a complete run returns its saved summary (:func:`finished_run`)."""
    run = set_up(config)
    with contextlib.ExitStack() as held:  # the run folder's lock, held until the summary is written
        lock_workdir(run, held)
        complete = finished_run(run)
        if complete is not None:
            return complete
        progress, checkpointer, data_timing, start_step, log = train(run)
        return finish(run, progress, checkpointer, data_timing, start_step, time.time() - progress.train_start, log)


def train(run: Run):
    """Train from the start or the restored checkpoint to the last step; returns ``(progress, checkpointer,
    data_timing, start_step, log)`` for :func:`finish`."""
    # Everything opened from here on is closed on every way out, in reverse order: the progress bar, the
    # metrics writer, the data iterators (their worker processes stop), the SIGTERM handler and last the
    # checkpointer (it waits for a write in flight, also when the run stops with an error).
    with contextlib.ExitStack() as cleanup:
        checkpointer = open_checkpointer(run, cleanup)
        notice = PreemptionNotice(run.config.distributed)
        cleanup.callback(notice.close)
        programs = compile_steps(run)
        state = steps.train_state_from_variables(programs.init.result()(programs.init_key), run.model, run.tx)
        progress = restore_checkpoint(run, checkpointer, state, cleanup)
        if progress.restored and run.primary:  # only now: a --resume that failed leaves config.json as it was
            workdir_lib.write_config(run.config.workdir, run.config)
        start_step = progress.step
        progress.state, dropout_key = parallel.replicate((progress.state, programs.dropout_key), programs.replicated)
        programs = dataclasses.replace(programs, dropout_key=dropout_key)
        writer = metrics_lib.MetricsWriter(
            run.config.workdir, start_step if progress.restored else None, run.config.tensorboard, run.primary
        )
        cleanup.callback(writer.close)
        if run.primary:
            _announce(run)
        bar, log = _progress_bar(run, start_step, cleanup)
        data_timing = train_steps(run, programs, progress, checkpointer, writer, bar, log, notice)
        wait_for_checkpoints(checkpointer)
    return progress, checkpointer, data_timing, start_step, log


def _export(run: Run, progress: Progress) -> Dict[str, Any]:
    """The end-of-run export (:func:`~train.export.export_and_verify`); a write that fails (a full disk) is
    returned as ``{'error': ...}``, so that the summary is still written (the checkpoints hold the state)."""
    config = run.config
    path = os.path.join(config.workdir, "model.safetensors")
    variables = {"params": progress.state.params, "batch_stats": progress.state.batch_stats}
    try:
        return export_and_verify(
            config,
            run.model,
            variables,
            run.dataset.eval_examples(EXPORT_EXAMPLES),
            run.dataset.num_classes,
            float(run.temperature_fn(run.total_steps)),
            path,
        )
    except (OSError, SafetensorError) as error:
        return {
            "error": f"the export to {path} failed ({getattr(error, 'strerror', None) or error}); summary.json "
            f"is written and the checkpoints are intact: make room and run the same command with "
            f"--resume to export again"
        }


def finish(
    run: Run,
    progress: Progress,
    checkpointer: ckpt_lib.Checkpointer,
    data_timing: Dict[str, float],
    start_step: int,
    elapsed: float,
    log,
) -> Dict[str, Any]:
    """The run's result (metrics, state, paths, data-wait timing); on process 0 also the export (with
    ``--export``) and ``summary.json`` (strict JSON). A failed export raises
    :class:`~train.workdir.WorkdirError` after the summary is written."""
    config, total_steps, eval_metrics = run.config, run.total_steps, progress.eval_metrics
    result = {
        "workdir": config.workdir,
        "steps": total_steps,
        "eval_loss": eval_metrics["loss"],
        "eval_accuracy": eval_metrics["accuracy"],
        "seconds": elapsed,
        "state": progress.state,
        "checkpoint_dir": checkpointer.directory,
        "skipped_images": progress.skipped,
        **{k: data_timing[k] for k in ("data_wait_fraction", "host_data_wait_fraction", "first_batch_seconds")},
        "step_seconds": data_timing["steady_seconds"] / max(total_steps - start_step - 1, 1),
    }
    if config.export and run.primary:
        result["export"] = _export(run, progress)
    if run.primary:
        log(
            f"done: {total_steps} steps in {elapsed:.1f}s; {config.eval_split} accuracy "
            f"{eval_metrics['accuracy']:.4f}, loss {eval_metrics['loss']:.4f}"
            + (f"; skipped {progress.skipped} unreadable training image(s)" if progress.skipped else "")
        )
        workdir_lib.write_summary(config.workdir, {k: v for k, v in result.items() if k != "state"})
    if isinstance(result.get("export"), dict) and "error" in result["export"]:
        raise workdir_lib.WorkdirError(result["export"]["error"])
    return result
