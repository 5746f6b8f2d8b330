"""``python -m train.plot_attention --workdir RUN_DIR --out DIR [--num_samples N]``.

Loads the newest checkpoint of a training run (``python -m train``: ``RUN_DIR/config.json``
and ``RUN_DIR/checkpoints``), runs the model in inference mode at the run's final
temperature on the first N evaluation images and writes the attention plots of
:func:`dynconv_jax.inspect.plot_all` into DIR (see docs/tools.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

import jax

from dynconv_jax.inspect import collect_attentions, plot_all
from dynconv_spec.paths import check_output_dir
from train import checkpoint as ckpt_lib
from train import data as data_lib
from train import steps
from train.config import UsageError, from_json
from train.pipeline import Pipeline


def load_run(workdir: str):
    """``(config, model, variables, dataset, temperature, step)`` of the newest checkpoint in ``workdir``."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: --workdir must be the directory of a `python -m train` run")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoint_dir) or not os.listdir(checkpoint_dir):
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}: the run has not saved one yet")
    with open(config_path) as f:
        config = from_json(f.read(), config_path)
    dataset = data_lib.load_dataset(config)
    spe = Pipeline(dataset, config.batch_size, config.seed).steps_per_epoch
    total_steps = config.num_steps or config.num_epochs * spe
    model = steps.create_model(config, dataset.num_classes, dataset.image_shape)
    tx, _ = steps.create_optimizer(config, spe, total_steps)
    target = steps.create_train_state(jax.random.key(config.seed), model, dataset.image_shape, tx)
    # Read-only: a damaged checkpoint is skipped in place, nothing is created or moved in the run.
    checkpointer = ckpt_lib.Checkpointer(workdir, config.keep_checkpoints, read_only=True)
    try:
        restored = checkpointer.restore_latest(target)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
    step, state, _ = restored
    variables = {"params": state.params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    temperature = float(steps.temperature_schedule(config, spe)(step))
    return config, model, variables, dataset, temperature, step


def check_plot_args(out_dir: str, num_samples: int) -> None:
    """:class:`~train.config.UsageError` for fewer than 2 samples or an ``out_dir`` that cannot be created
    or written."""
    if num_samples < 2:
        raise UsageError(f"--num_samples={num_samples}: need at least 2 samples to show a distribution")
    try:
        check_output_dir(out_dir, "--out")
    except ValueError as error:
        raise UsageError(str(error)) from None


def plot_run(workdir: str, out_dir: str, num_samples: int = 32) -> Tuple[List[str], str]:
    """Write the attention plots of the run in ``workdir`` to ``out_dir``; returns ``(paths, summary line)``.
    The arguments are checked (:func:`check_plot_args`) before the run is loaded."""
    check_plot_args(out_dir, num_samples)
    config, model, variables, dataset, temperature, step = load_run(workdir)
    images = dataset.eval_examples(num_samples)
    attentions = collect_attentions(model, variables, images, temperature=temperature)
    paths = plot_all(attentions, out_dir)
    summary = (
        f"{config.model} conv={config.conv} K={config.num_experts}, checkpoint step {step}, T={temperature:.3g}, "
        f"{len(images)} {config.eval_split} images, {len(attentions)} dynamic layers"
    )
    return paths, summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plot_attention", description=__doc__.split("\n\n")[1])
    parser.add_argument("--workdir", required=True, help="directory of a `python -m train` run")
    parser.add_argument("--out", required=True, help="directory for the PNG files")
    parser.add_argument("--num_samples", type=int, default=32, help="evaluation images to route (default 32)")
    args = parser.parse_args(argv)
    try:
        check_plot_args(args.out, args.num_samples)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        paths, summary = plot_run(args.workdir, args.out, args.num_samples)
    except (FileNotFoundError, ValueError, ckpt_lib.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(summary)
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
