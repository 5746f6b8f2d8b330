"""``python -m train.ablate --out DIR [--vary KEY=V1,V2,...]... [--key=value ...]``: training grids.

Trains one run per combination of the varied options (their product, the first ``--vary``
outermost) with everything else shared (any ``python -m train`` option may be given,
``--key=value`` or ``--key value``). Shorthands: ``--ks 1,2,4,8`` is ``--vary num_experts=1,2,4,8``
(the default when nothing is varied), ``--seeds 0,1,2`` is ``--vary seed=0,1,2``. Examples::

    python -m train.ablate --ks 1,2,4,8 --conv=odconv --out runs/ablate-k
    python -m train.ablate --vary conv=static,condconv,dynamic,odconv --seeds 0,1,2 --out runs/convs

Writes ``DIR/ablation.csv`` (one row per run: the varied options, evaluation accuracy and loss,
parameters, MACs for one image, training seconds), ``DIR/ablation.md`` (the runs; with several
seeds also one row per setting with each seed's accuracy, the mean and the minimum) and
``DIR/ablation.png`` (accuracy per setting, each seed a dot; parameters and MACs per setting).
Parameters are counted from the variables, MACs with :func:`dynconv_jax.summary.count_macs`.
Each run's workdir is ``DIR/<name>``: ``K4`` for the number of experts, ``conv-odconv_seed-1``
etc. Every configuration is validated before the first run starts.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from dynconv_spec.paths import check_output_dir
from train.config import Config, UsageError, _field_types, _parse_value, parse_args, usage

METRICS = ("eval_accuracy", "eval_loss", "params", "macs", "train_seconds")
SHORTHANDS = {"ks": "num_experts", "seeds": "seed"}

Grid = List[Tuple[str, List]]  # [(config field, [values])], first field outermost


def _parse_grid(specs: Sequence[Tuple[str, str]]) -> Grid:
    """``[('conv', 'static,odconv'), ('seed', '0,1')]`` -> ``[('conv', ['static', 'odconv']), ('seed', [0, 1])]``."""
    types = _field_types()
    grid: Grid = []
    for key, text in specs:
        key = key.replace("-", "_")
        if key not in types:
            raise UsageError(f"--vary {key}=...: {key!r} is not a training option (see python -m train --help)")
        if key in ("workdir", "resume"):
            raise UsageError(f"--vary {key}=...: the ablation sets it per run")
        if any(key == k for k, _ in grid):
            raise UsageError(f"--vary {key}=... given twice")
        values = [_parse_value(key, v.strip(), types[key]) for v in text.split(",") if v.strip()]
        if not values:
            raise UsageError(f"--vary {key}={text!r}: expected comma-separated values, e.g. {key}=a,b")
        if len(set(map(repr, values))) != len(values):
            raise UsageError(f"--vary {key}={text!r}: a value is repeated")
        grid.append((key, values))
    return grid


def _split_args(
    argv: Sequence[str], default_grid: Sequence[Tuple[str, str]] = (("num_experts", "1,2,4,8"),)
) -> Tuple[Grid, Optional[str], List[str]]:
    """Pull out ``--vary``/``--ks``/``--seeds`` (``default_grid`` when none is given) and ``--out``;
    join ``--key value`` pairs into ``--key=value`` for the train options."""
    types = _field_types()
    specs, out, rest = [], None, []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        field = key.replace("-", "_")
        own = key in ("vary", "out") or key in SHORTHANDS
        needs_value = own or (field in types and types[field] is not bool)
        if arg.startswith("--") and not sep and needs_value and i + 1 < len(argv):
            value, sep, i = argv[i + 1], "=", i + 1
        if own and not sep:
            raise UsageError(f"--{key} needs a value")
        if key == "vary":
            name, eq, values = value.partition("=")
            if not eq:
                raise UsageError(f"--vary {value!r}: expected KEY=V1,V2,... (e.g. --vary conv=dynamic,odconv)")
            specs.append((name, values))
        elif key in SHORTHANDS:
            specs.append((SHORTHANDS[key], value))
        elif key == "out":
            out = value
        else:
            rest.append(f"--{key}={value}" if sep else arg)
        i += 1
    return _parse_grid(specs or list(default_grid)), out, rest


def run_name(setting: Dict[str, object]) -> str:
    """Workdir name of one run: ``K4`` for the number of experts, ``key-value`` for the others, joined by ``_``."""
    return "_".join(f"K{v}" if k == "num_experts" else f"{k}-{v}" for k, v in setting.items())


def grid_configs(grid: Grid, base, out_dir: str) -> List[Tuple[Dict[str, object], object]]:
    """Every (setting, validated config) of the grid, in run order."""
    keys = [k for k, _ in grid]
    runs = []
    for values in itertools.product(*(v for _, v in grid)):
        setting = dict(zip(keys, values))
        config = dataclasses.replace(base, **setting)
        if "num_experts" in setting and config.conv == "static":
            raise ValueError("--conv=static has no experts to sweep; choose condconv, dynamic or odconv")
        runs.append((setting, dataclasses.replace(config, workdir=os.path.join(out_dir, run_name(setting))).validate()))
    return runs


def run_grid(
    runs: Sequence[Tuple[Dict[str, object], object]], on_row: Optional[Callable[[List[Dict[str, object]]], None]] = None
) -> List[Dict[str, object]]:
    """Train the :func:`grid_configs` runs one after the other; one row per run (the varied
    options and :data:`METRICS`). ``on_row(rows so far)`` is called after each run."""
    # Here: JAX and the models load when a grid runs, not for --help or a usage error.
    import jax

    from dynconv_jax.summary import count_macs, count_params
    from train import data as data_lib
    from train import steps
    from train.loop import train_and_evaluate

    rows = []
    for setting, config in runs:
        result = train_and_evaluate(config)  # with --resume, a complete run gives its saved summary (no state)
        dataset = data_lib.load_dataset(config)
        model = steps.create_model(config, dataset.num_classes, dataset.image_shape)
        variables = jax.eval_shape(
            steps.init_variables_fn(model, dataset.image_shape), jax.random.key(0, impl="rbg")
        )  # the counts need the shapes only
        rows.append(
            {
                **setting,
                "eval_accuracy": result["eval_accuracy"],
                "eval_loss": result["eval_loss"],
                "params": count_params(variables),
                "macs": count_macs(model, variables, (1,) + tuple(dataset.image_shape)).total,
                "train_seconds": round(result["seconds"], 1),
            }
        )
        if on_row is not None:
            on_row(rows)
    return rows


def _settings(rows: Sequence[Dict[str, object]], keys: Sequence[str]) -> List[Tuple[tuple, List[Dict[str, object]]]]:
    """Group the rows by their values of ``keys`` (the varied options but the seed), in run order."""
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return list(groups.items())


def markdown(rows: Sequence[Dict[str, object]], grid: Grid, base) -> str:
    """The runs as a Markdown table; with several seeds, one more row per setting (seeds, mean, min)."""
    keys = [k for k, _ in grid]
    budget = f"{base.num_steps} steps" if base.num_steps else f"{base.num_epochs} epochs"
    stated = {"model", "dataset", "num_epochs", "num_steps", "batch_size", "seed", "workdir", "progress"} | set(keys)
    default = Config()
    fixed = "".join(
        f"{f.name}={getattr(base, f.name)}, "
        for f in dataclasses.fields(base)
        if f.name not in stated and getattr(base, f.name) != getattr(default, f.name)
    )
    lines = [
        f"Ablation over {', '.join(keys)}: {base.model} {fixed}on {base.dataset}, {budget} each, batch "
        f"{base.batch_size}, every other option as `python -m train`'s"
        + ("" if "seed" in keys else f" (seed {base.seed})")
        + ".",
        "",
        "| " + " | ".join(keys) + " | eval accuracy | eval loss | params | MACs (1 image) | train s |",
        "|" + "---|" * (len(keys) + 5),
    ]
    for r in rows:
        lines.append(
            "| " + " | ".join(str(r[k]) for k in keys) + f" | {r['eval_accuracy']:.4f} | "
            f"{r['eval_loss']:.4f} | {r['params']:,} | {r['macs']:,} | {r['train_seconds']} |"
        )
    if "seed" in keys:
        seeds = dict(grid)["seed"]
        others = [k for k in keys if k != "seed"]
        lines += [
            "",
            "Test accuracy per setting and seed:",
            "",
            "| " + " | ".join(others + [f"seed {s}" for s in seeds]) + " | mean | min |",
            "|" + "---|" * (len(others) + len(seeds) + 2),
        ]
        for values, group in _settings(rows, others):
            accuracy = {r["seed"]: r["eval_accuracy"] for r in group}
            cells = [f"{100 * accuracy[s]:.1f} %" if s in accuracy else "–" for s in seeds]  # – : not run yet
            mean = sum(accuracy.values()) / len(accuracy)
            lines.append(
                "| "
                + " | ".join([str(v) for v in values] + cells)
                + f" | {100 * mean:.1f} % | {100 * min(accuracy.values()):.1f} % |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(rows: Sequence[Dict[str, object]], grid: Grid, base, out_dir: str) -> List[str]:
    """Write the CSV, Markdown tables and plot; returns their paths."""
    keys = [k for k, _ in grid]
    os.makedirs(out_dir, exist_ok=True)
    csv_path, md_path, png_path = (os.path.join(out_dir, f"ablation.{ext}") for ext in ("csv", "md", "png"))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys + list(METRICS))
        writer.writeheader()
        writer.writerows(rows)
    with open(md_path, "w") as f:
        f.write(markdown(rows, grid, base))

    from matplotlib.figure import Figure  # here: only the plot needs matplotlib, slow to import

    others = [k for k in keys if k != "seed"]
    settings = _settings(rows, others)
    experts_only = others == ["num_experts"]  # numeric axis (log2), as the expert-count sweep
    xs = [values[0] if experts_only else i for i, (values, _) in enumerate(settings)]
    labels = [", ".join(map(str, values)) or "-" for values, _ in settings]
    title = ", ".join(others) or "seed"
    fig = Figure(figsize=(10, 3.8), dpi=100, layout="constrained")
    ax_acc, ax_cost = fig.subplots(1, 2)
    for x, (_, group) in zip(xs, settings):
        ax_acc.plot([x] * len(group), [r["eval_accuracy"] for r in group], "o", color="tab:blue", alpha=0.6)
    ax_acc.plot(xs, [sum(r["eval_accuracy"] for r in g) / len(g) for _, g in settings], "-", color="tab:blue")
    ax_acc.set_ylabel(f"{base.eval_split} accuracy" + (" (dots: seeds, line: mean)" if "seed" in keys else ""))
    ax_acc.set_title(f"accuracy vs {title}")
    ax_cost.plot(xs, [g[0]["params"] / 1e6 for _, g in settings], "o-", color="tab:blue", label="params (M)")
    ax_cost.set_ylabel("params (M)", color="tab:blue")
    ax_macs = ax_cost.twinx()
    ax_macs.plot(xs, [g[0]["macs"] / 1e6 for _, g in settings], "s--", color="tab:orange", label="MACs (M)")
    ax_macs.set_ylabel("MACs per image (M)", color="tab:orange")
    ax_cost.set_title(f"cost vs {title}")
    for ax in (ax_acc, ax_cost):
        if experts_only:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, labels)
        ax.set_xlabel("experts K" if experts_only else title)
        ax.grid(alpha=0.3)
    budget = f"{base.num_steps} steps" if base.num_steps else f"{base.num_epochs} epochs"
    fig.suptitle(f"{base.model} on {base.dataset}, {budget} per run")
    fig.savefig(png_path)
    return [csv_path, md_path, png_path]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(usage())
        return 0
    try:
        grid, out_dir, rest = _split_args(argv)
        base = parse_args(rest)
        out_dir = check_output_dir(
            out_dir or os.path.join("runs", f"ablate-{base.dataset}-{base.model}-" + "-".join(k for k, _ in grid)),
            "--out",
        )
        runs = grid_configs(grid, base, out_dir)  # every configuration checked before the first run
    except (UsageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # The tables are rewritten after every run, so an interrupted grid keeps the runs done so far.
    rows = run_grid(runs, on_row=lambda rows: write_outputs(rows, grid, base, out_dir))
    for path in write_outputs(rows, grid, base, out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
