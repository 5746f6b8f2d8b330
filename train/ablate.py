"""``python -m train.ablate --ks 1,2,4,8 --out DIR [--key=value ...]``: the expert-count sweep.

Trains one run per number of experts K with the same budget (every other option, steps and
seed included, is shared; any ``python -m train`` option may be given, ``--key=value`` or
``--key value``), then writes ``DIR/ablation.csv``, ``DIR/ablation.md`` and
``DIR/ablation.png`` (evaluation accuracy vs K; parameters and MACs vs K). Parameters are
counted from the variables, MACs with :func:`dynconv_jax.summary.count_macs` for one image.
Each run's workdir is ``DIR/K<k>``.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import sys
from typing import Dict, List, Optional, Sequence

FIELDS = ("num_experts", "eval_accuracy", "eval_loss", "params", "macs", "train_seconds")


def _split_args(argv: Sequence[str]):
    """Pull out ``--ks`` and ``--out``; join ``--key value`` pairs into ``--key=value`` for the train options."""
    from train.config import _field_types

    types = _field_types()
    ks, out, rest = "1,2,4,8", None, []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        needs_value = key in ("ks", "out") or (key.replace("-", "_") in types and types[key.replace("-", "_")] is not bool)
        if arg.startswith("--") and not sep and needs_value and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
            arg = f"--{key}={value}"
        if key == "ks":
            ks = value
        elif key == "out":
            out = value
        else:
            rest.append(arg)
        i += 1
    try:
        expert_counts = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--ks={ks!r}: expected comma-separated integers, e.g. --ks 1,2,4,8") from None
    if not expert_counts or any(k < 1 for k in expert_counts):
        raise ValueError(f"--ks={ks!r}: expected positive integers")
    if len(set(expert_counts)) != len(expert_counts):  # each K trains into DIR/K<k>: a repeat would collide
        raise ValueError(f"--ks={ks!r}: each number of experts may appear once")
    return expert_counts, out, rest


def run_sweep(expert_counts: Sequence[int], base, out_dir: str) -> List[Dict[str, float]]:
    """Train ``base`` once per K (workdir ``out_dir/K<k>``); returns one row per K (see :data:`FIELDS`)."""
    from dynconv_jax.summary import count_macs, count_params
    from train import data as data_lib
    from train import steps
    from train.loop import train_and_evaluate

    if base.conv == "static":
        raise ValueError("--conv=static has no experts to sweep; choose condconv, dynamic or odconv")
    rows = []
    for k in expert_counts:
        config = dataclasses.replace(base, num_experts=k, workdir=os.path.join(out_dir, f"K{k}")).validate()
        result = train_and_evaluate(config)
        state = result["state"]
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        dataset = data_lib.load_dataset(config)
        model = steps.create_model(config, dataset.num_classes, dataset.image_shape)
        rows.append({"num_experts": k, "eval_accuracy": result["eval_accuracy"], "eval_loss": result["eval_loss"],
                     "params": count_params(variables),
                     "macs": count_macs(model, variables, (1,) + tuple(dataset.image_shape)).total,
                     "train_seconds": round(result["seconds"], 1)})
    return rows


def write_outputs(rows: Sequence[Dict[str, float]], base, out_dir: str) -> List[str]:
    """Write the CSV, Markdown table and plot; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path, md_path, png_path = (os.path.join(out_dir, f"ablation.{ext}") for ext in ("csv", "md", "png"))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    budget = f"{base.num_steps} steps" if base.num_steps else f"{base.num_epochs} epochs"
    lines = [f"Expert-count sweep: {base.model} conv={base.conv} on {base.dataset}, {budget} each, batch "
             f"{base.batch_size}, seed {base.seed}.", "",
             "| K | eval accuracy | eval loss | params | MACs (1 image) | train s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['num_experts']} | {r['eval_accuracy']:.4f} | {r['eval_loss']:.4f} | {r['params']:,} | "
                     f"{r['macs']:,} | {r['train_seconds']} |")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")

    from matplotlib.figure import Figure

    ks = [r["num_experts"] for r in rows]
    fig = Figure(figsize=(10, 3.8), dpi=100, layout="constrained")
    ax_acc, ax_cost = fig.subplots(1, 2)
    ax_acc.plot(ks, [r["eval_accuracy"] for r in rows], "o-")
    ax_acc.set_xlabel("experts K")
    ax_acc.set_ylabel(f"{base.eval_split} accuracy")
    ax_acc.set_title("accuracy vs K")
    ax_cost.plot(ks, [r["params"] / 1e6 for r in rows], "o-", color="tab:blue", label="params (M)")
    ax_cost.set_xlabel("experts K")
    ax_cost.set_ylabel("params (M)", color="tab:blue")
    ax_macs = ax_cost.twinx()
    ax_macs.plot(ks, [r["macs"] / 1e6 for r in rows], "s--", color="tab:orange", label="MACs (M)")
    ax_macs.set_ylabel("MACs per image (M)", color="tab:orange")
    ax_cost.set_title("cost vs K")
    for ax in (ax_acc, ax_cost):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.grid(alpha=0.3)
    fig.suptitle(f"{base.model} conv={base.conv} on {base.dataset}, {budget} per K")
    fig.savefig(png_path)
    return [csv_path, md_path, png_path]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from train.config import UsageError, parse_args, usage

    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(usage())
        return 0
    try:
        expert_counts, out_dir, rest = _split_args(argv)
        base = parse_args(rest)
        out_dir = out_dir or os.path.join("runs", f"ablate-{base.dataset}-{base.model}-{base.conv}")
        rows = run_sweep(expert_counts, base, out_dir)
    except (UsageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in write_outputs(rows, base, out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
