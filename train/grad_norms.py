"""``python -m train.grad_norms --out DIR [--vary KEY=V1,V2]... [--seeds 0,1,2] [--temperatures 30,3,1]
[--trace_epochs N] [--key=value ...]``: gradient norms per stage, against the temperature.

For every setting of the grid (``--vary``/``--seeds`` as in :mod:`train.ablate`; every other
``python -m train`` option shared):

* **at initialisation**: the gradient of the training objective on the run's first training
  batch (training mode, as step 1 of ``python -m train``) at each of ``--temperatures``;
* with ``--trace_epochs N``: the first N epochs of the run's training (same initial state,
  batches, dropout keys, optimiser and temperature schedule as ``python -m train``), recording
  the gradient of every step.

Norms are global and per stage: the parameters grouped by their top-level module with a
trailing block index dropped (``conv1``, ``bn1``, ``layer1`` .. ``layer4``, ``fc`` for a
ResNet), plus ``attention`` (every leaf under a dynamic layer's ``attention``).
Writes ``DIR/init.csv``, ``DIR/trace.csv`` (one row per step) and ``DIR/grad_norms.md`` (with
several seeds also the seeds side by side), rewritten after every setting. The settings that
differ only in the seed share one compilation. Used for the ODConv measurements in
docs/training.md, e.g.::

    python -m train.grad_norms --conv=odconv --seeds 0,1,2 --vary attention_bn_init=1.0,0.1 \
        --temperatures=30,10,5,3,2,1 --trace_epochs=5 --out runs/grad-norms
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from train.ablate import _split_args, grid_configs
from train.config import UsageError, parse_args, usage

# JAX, flax and the training modules are imported in the functions that use them: --help and a usage
# error answer without loading them.

DEFAULT_TEMPERATURES = "30,10,3,2,1"


def stage_of(path: Sequence[str]) -> str:
    """``('layer1_0', 'conv1', 'kernel')`` -> ``'layer1'``; ``('conv1', 'kernel')`` -> ``'conv1'``."""
    return re.sub(r"_\d+$", "", path[0])


def stage_norms(grads) -> Dict[str, float]:
    """Global, per-stage and attention gradient norms of a Flax parameter tree (floats)."""
    import flax
    import jax.numpy as jnp

    squares: Dict[str, object] = {}
    for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(grads)).items():
        square = jnp.sum(jnp.square(leaf.astype(jnp.float32)))
        for group in ("global", stage_of(path)) + (("attention",) if "attention" in path else ()):
            squares[group] = squares.get(group, 0.0) + square
    return {k: jnp.sqrt(v) for k, v in squares.items()}


def _setup(config):
    """The run's input pipeline, temperature schedule, initial state, dropout key and number of steps,
    made as :func:`train.loop.train_and_evaluate` makes them."""
    import jax

    from train import data as data_lib
    from train import steps
    from train.pipeline import Pipeline

    dataset = data_lib.load_dataset(config)
    pipeline = Pipeline(dataset, config.batch_size, config.seed)
    spe = pipeline.steps_per_epoch
    total_steps = config.num_steps or config.num_epochs * spe
    model = steps.create_model(config, dataset.num_classes, dataset.image_shape)
    tx, _ = steps.create_optimizer(config, spe, total_steps)
    state = steps.create_train_state(jax.random.key(config.seed, impl="rbg"), model, dataset.image_shape, tx)
    dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    return pipeline, steps.temperature_schedule(config, spe), state, dropout_key, total_steps


#: The jitted functions of one configuration but its seed (same model, optimiser and schedule): the
#: seeds of a grid reuse one compilation. Key: ``repr`` of the configuration with seed and workdir unset.
_JITTED: Dict[str, Tuple[Callable, Callable]] = {}


def _jitted(config, tx) -> Tuple[Callable, Callable]:
    """``(norms(state, images, labels, key, T), step(state, images, labels, key, T))`` for ``config``'s
    model; ``state`` without its optimiser (``tx=None``), so states of other seeds share the compilation."""
    import jax

    from train import parallel, steps

    key = repr(dataclasses.replace(config, seed=0, workdir=None))
    if key not in _JITTED:

        def norms(state, images, labels, dropout_key, temperature):
            grads = steps.loss_and_grads(state, images, labels, dropout_key, temperature, config.label_smoothing)[3]
            return stage_norms(grads)

        def step(state, images, labels, dropout_key, temperature):
            loss, _, updates, grads = steps.loss_and_grads(
                state, images, labels, dropout_key, temperature, config.label_smoothing
            )
            new_state = state.replace(tx=tx).apply_gradients(
                grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats)
            )
            return new_state.replace(tx=None), {"loss": loss, **stage_norms(grads)}

        mesh = parallel.make_mesh()
        _JITTED[key] = (
            parallel.under_mesh(mesh, jax.jit(norms)),
            parallel.under_mesh(mesh, jax.jit(step, donate_argnums=0)),
        )
    return _JITTED[key]


def at_init(config, temperatures: Sequence[float]) -> List[Dict[str, float]]:
    """Stage norms of the first step's gradient at each temperature (one row per temperature)."""
    pipeline, _, state, dropout_key, _ = _setup(config)
    images, labels = pipeline.train_batch(0)
    norms, _ = _jitted(config, state.tx)
    state = state.replace(tx=None)
    return [
        {"temperature": t, **{k: float(v) for k, v in norms(state, images, labels, dropout_key, np.float32(t)).items()}}
        for t in temperatures
    ]


def trace(config, epochs: float) -> List[Dict[str, float]]:
    """Train the first ``epochs`` epochs as ``python -m train`` does; one row of stage norms per step."""
    import jax

    pipeline, temperature_fn, state, dropout_key, total_steps = _setup(config)
    num_steps = min(total_steps, int(round(epochs * pipeline.steps_per_epoch)))
    _, step_fn = _jitted(config, state.tx)
    state = state.replace(tx=None)
    rows = []
    for step in range(num_steps):
        images, labels = pipeline.train_batch(step)
        temperature = np.float32(temperature_fn(step))  # the schedule at the step count before this update
        state, metrics = step_fn(state, images, labels, dropout_key, temperature)
        rows.append(
            {
                "step": step + 1,
                "epoch": step // pipeline.steps_per_epoch + 1,
                "temperature": float(temperature),
                **{k: float(v) for k, v in jax.device_get(metrics).items()},
            }
        )
    return rows


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def _span(values: Sequence[float]) -> str:
    """``'2.5'`` for one value, ``'2.5–610'`` (smallest–largest) for several."""
    low, high = min(values), max(values)
    return _fmt(low) if len(values) == 1 or _fmt(low) == _fmt(high) else f"{_fmt(low)}–{_fmt(high)}"


def over_seeds(init_rows, trace_rows, keys: Sequence[str]) -> str:
    """The seeds side by side (``'seed'`` varied): each stage's norm at init against the temperature,
    smallest–largest over the seeds; per epoch of the trace, the median and largest global norm
    (smallest–largest over the seeds) and each stage's largest norm over the epoch's steps and the seeds."""
    others = [k for k in keys if k != "seed"]
    label = lambda r: ", ".join(f"{k}={r[k]}" for k in others) or "-"  # noqa: E731
    lines = []
    if init_rows:
        temps = sorted({r["temperature"] for r in init_rows}, reverse=True)
        stages = [k for k in init_rows[0] if k not in set(keys) | {"temperature"}]
        lines += [
            "Over the seeds: first-step gradient norm per stage against the temperature "
            "(smallest–largest over the seeds):",
            "",
            "| setting | stage | " + " | ".join(f"T={t:g}" for t in temps) + " |",
            "|---|---|" + "---|" * len(temps),
        ]
        for setting in dict.fromkeys(label(r) for r in init_rows):
            rows = [r for r in init_rows if label(r) == setting]
            for stage in stages:
                lines.append(
                    f"| {setting} | {stage} | "
                    + " | ".join(_span([r[stage] for r in rows if r["temperature"] == t]) for t in temps)
                    + " |"
                )
    if trace_rows:
        stages = [k for k in trace_rows[0] if k not in set(keys) | {"step", "epoch", "loss", "temperature", "global"}]
        lines += [
            "",
            "Over the seeds, training: per epoch, the temperature, the median and the largest global "
            "gradient norm of each seed's steps (smallest–largest over the seeds) and each stage's largest "
            "norm over the steps and seeds:",
            "",
            "| setting | epoch | T | median | max | " + " | ".join(stages) + " |",
            "|---|---|---|---|---|" + "---|" * len(stages),
        ]
        finite = lambda v: v if math.isfinite(v) else math.inf  # noqa: E731
        for setting in dict.fromkeys(label(r) for r in trace_rows):
            rows = [r for r in trace_rows if label(r) == setting]
            for epoch in sorted({r["epoch"] for r in rows}):
                in_epoch = [r for r in rows if r["epoch"] == epoch]
                seeds = sorted({r["seed"] for r in in_epoch})
                per_seed = [[finite(r["global"]) for r in in_epoch if r["seed"] == s] for s in seeds]
                lines.append(
                    f"| {setting} | {epoch} | {_span([r['temperature'] for r in in_epoch])} | "
                    f"{_span([float(np.median(g)) for g in per_seed])} | {_span([max(g) for g in per_seed])} | "
                    + " | ".join(_fmt(max(finite(r[s]) for r in in_epoch)) for s in stages)
                    + " |"
                )
    return "\n".join(lines) + "\n"


def markdown(init_rows, trace_rows, keys: Sequence[str]) -> str:
    """Tables: global norm at init per temperature; stage norms at init at the lowest and highest
    temperature; per epoch of the trace, the largest global norm and its stage breakdown; with
    several seeds, :func:`over_seeds` too."""
    lines = [over_seeds(init_rows, trace_rows, keys)] if "seed" in keys else []
    label = lambda r: ", ".join(f"{k}={r[k]}" for k in keys) or "-"  # noqa: E731
    temps = sorted({r["temperature"] for r in init_rows}, reverse=True)
    stages = [k for k in init_rows[0] if k not in set(keys) | {"temperature", "global"}] if init_rows else []
    if init_rows:
        lines += [
            "Global gradient norm of the first step, against the temperature:",
            "",
            "| setting | " + " | ".join(f"T={t:g}" for t in temps) + " |",
            "|---|" + "---|" * len(temps),
        ]
        for setting in dict.fromkeys(label(r) for r in init_rows):
            norms = {r["temperature"]: r["global"] for r in init_rows if label(r) == setting}
            lines.append(f"| {setting} | " + " | ".join(_fmt(norms[t]) for t in temps) + " |")
        lines += [
            "",
            f"Per stage, first step, at T={temps[-1]:g} and T={temps[0]:g}:",
            "",
            "| setting | T | " + " | ".join(stages) + " |",
            "|---|---|" + "---|" * len(stages),
        ]
        for r in init_rows:
            if r["temperature"] in (temps[0], temps[-1]):
                lines.append(f"| {label(r)} | {r['temperature']:g} | " + " | ".join(_fmt(r[s]) for s in stages) + " |")
    if trace_rows:
        stages = [k for k in trace_rows[0] if k not in set(keys) | {"step", "epoch", "loss", "temperature", "global"}]
        lines += [
            "",
            "Training: per epoch, the step with the largest global gradient norm (its temperature and "
            "stage norms) and the median global norm of the epoch:",
            "",
            "| setting | epoch | T | median | max | " + " | ".join(stages) + " |",
            "|---|---|---|---|---|" + "---|" * len(stages),
        ]
        for setting in dict.fromkeys(label(r) for r in trace_rows):
            rows = [r for r in trace_rows if label(r) == setting]
            for epoch in sorted({r["epoch"] for r in rows}):
                in_epoch = [r for r in rows if r["epoch"] == epoch]
                top = max(in_epoch, key=lambda r: r["global"] if math.isfinite(r["global"]) else math.inf)
                median = float(np.median([r["global"] for r in in_epoch]))
                lines.append(
                    f"| {setting} | {epoch} | {top['temperature']:.2f} | {_fmt(median)} | "
                    f"{_fmt(top['global'])} | " + " | ".join(_fmt(top[s]) for s in stages) + " |"
                )
    return "\n".join(lines) + "\n"


def _write_csv(path: str, rows: Sequence[Dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(usage())
        return 0
    own = {"temperatures": DEFAULT_TEMPERATURES, "trace_epochs": "0"}
    rest = []
    for arg in argv:
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key in own and sep:
            own[key] = value
        else:
            rest.append(arg)
    try:
        try:
            temperatures = [float(t) for t in own["temperatures"].split(",") if t.strip()]
            trace_epochs = float(own["trace_epochs"])
        except ValueError:
            raise UsageError(
                f"--temperatures={own['temperatures']!r} / --trace_epochs={own['trace_epochs']!r}: "
                "expected numbers, e.g. --temperatures=30,3,1 --trace_epochs=7"
            ) from None
        if not temperatures or min(temperatures) <= 0 or trace_epochs < 0:
            raise UsageError("--temperatures must be positive numbers and --trace_epochs >= 0")
        grid, out_dir, rest = _split_args(rest, default_grid=())  # nothing varied: one run of the given options
        base = parse_args(rest)
        out_dir = out_dir or os.path.join("runs", "grad-norms")
        runs = grid_configs(grid, base, out_dir)
    except (UsageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    keys = [k for k, _ in grid]
    os.makedirs(out_dir, exist_ok=True)
    init_rows, trace_rows = [], []
    for setting, config in runs:
        init_rows += [{**setting, **r} for r in at_init(config, temperatures)]
        print(
            f"{setting}: init global norms "
            + ", ".join(f"T={r['temperature']:g}: {_fmt(r['global'])}" for r in init_rows[-len(temperatures) :]),
            flush=True,
        )
        if trace_epochs:
            rows = trace(config, trace_epochs)
            trace_rows += [{**setting, **r} for r in rows]
            print(
                f"{setting}: traced {len(rows)} steps, max global norm {_fmt(max(r['global'] for r in rows))}",
                flush=True,
            )
        # rewritten after every setting: a long grid stopped early keeps what it measured
        _write_csv(os.path.join(out_dir, "init.csv"), init_rows)
        if trace_rows:
            _write_csv(os.path.join(out_dir, "trace.csv"), trace_rows)
        with open(os.path.join(out_dir, "grad_norms.md"), "w") as f:
            f.write(markdown(init_rows, trace_rows, keys))
    print(f"wrote {out_dir}/grad_norms.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
