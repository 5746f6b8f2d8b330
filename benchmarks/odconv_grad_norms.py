"""``python -m benchmarks.odconv_grad_norms [--seeds 0,1,2] [--temperatures 30,1] [--attention_bn_init 1.0,0.1]
[--out DIR]``: the PyTorch reference's first gradient against the temperature.

The ``dynconv_torch`` ResNet-18 of the main command (``python -m train --conv=odconv``: CIFAR stem,
base_width 16, K = 4, digits, dropout 0), built with ``torch.manual_seed(seed)``, in training mode;
the gradient of the training objective (cross-entropy, label smoothing 0.1) on the main command's
first training batch (64 digits, the batch of :mod:`train.data` for seed 0), at each temperature.
``attention_bn_init=1.0`` is the official OSVAI/ODConv initialisation (``dynconv_torch.ODConv2d``
loads official state dicts strictly and equals the official layer to float64 rounding,
docs/torch_layers.md); the other values change only the attention BatchNorm's initial weight, with
every other parameter drawn alike. Norms are global and per stage (the first segment of the
parameter name: ``conv1``, ``bn1``, ``layer1`` .. ``layer4``, ``fc``) plus ``attention`` (every
parameter under an ``attention`` module). Prints and writes ``DIR/odconv_grad_norms_torch.md``
and ``.csv``. Used in docs/training.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from typing import Dict, List, Sequence

import numpy as np


def first_batch():
    """The main command's first training batch: NCHW float32 images ``[64, 1, 8, 8]`` and int64 labels."""
    import torch

    from train import data as data_lib
    from train.config import Config
    from train.pipeline import Pipeline

    config = Config()
    images, labels = Pipeline(data_lib.load_dataset(config), config.batch_size, config.seed).train_batch(0)
    return (
        torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(np.asarray(labels)).long(),
    )


def grad_norms(model, images, labels, temperature: float) -> Dict[str, float]:
    """Global, per-stage and attention norms of the training objective's gradient at ``temperature``."""
    import torch

    from dynconv_torch import set_temperature

    set_temperature(model, temperature)
    model.train()
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1)
    loss.backward()
    squares: Dict[str, float] = {}
    for name, param in model.named_parameters():
        square = param.grad.double().square().sum().item()
        groups = ("global", name.split(".")[0]) + (("attention",) if ".attention." in name else ())
        for group in groups:
            squares[group] = squares.get(group, 0.0) + square
    return {k: math.sqrt(v) for k, v in squares.items()}


def measure(seeds: Sequence[int], temperatures: Sequence[float], bn_inits: Sequence[float]) -> List[Dict]:
    """One row per (attention_bn_init, seed, temperature); the model's BN state is restored between temperatures."""
    import torch

    from dynconv_torch.models import resnet18

    images, labels = first_batch()
    rows = []
    for bn_init in bn_inits:
        for seed in seeds:
            torch.manual_seed(seed)
            model = resnet18(
                conv="odconv",
                num_experts=4,
                num_classes=10,
                in_channels=1,
                stem="cifar",
                base_width=16,
                dropout=0.0,
                conv_options={"attention_bn_init": bn_init},
            )
            initial = {k: v.clone() for k, v in model.state_dict().items()}
            for temperature in temperatures:
                model.load_state_dict(initial)  # train-mode forwards update the running statistics
                rows.append(
                    {
                        "attention_bn_init": bn_init,
                        "seed": seed,
                        "temperature": temperature,
                        **grad_norms(model, images, labels, temperature),
                    }
                )
                print(
                    f"attention_bn_init={bn_init} seed={seed} T={temperature:g}: global {rows[-1]['global']:.4g}",
                    flush=True,
                )
    return rows


def markdown(rows: Sequence[Dict]) -> str:
    """Global norm per seed and temperature, each init side by side; stages at the lowest temperature."""
    inits = list(dict.fromkeys(r["attention_bn_init"] for r in rows))
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    temps = list(dict.fromkeys(r["temperature"] for r in rows))
    cell = {(r["attention_bn_init"], r["seed"], r["temperature"]): r for r in rows}
    head = " | ".join(f"γ={g:g}: T={t:g}" for g in inits for t in temps)
    lines = [
        "Global gradient norm of the first step (dynconv_torch ResNet-18, ODConv):",
        "",
        f"| seed | {head} |",
        "|---|" + "---|" * (len(inits) * len(temps)),
    ]
    for seed in seeds:
        lines.append(
            f"| {seed} | " + " | ".join(f"{cell[g, seed, t]['global']:.3g}" for g in inits for t in temps) + " |"
        )
    low = min(temps)
    stages = [k for k in rows[0] if k not in ("attention_bn_init", "seed", "temperature", "global")]
    lines += [
        "",
        f"Per stage at T={low:g}:",
        "",
        "| γ | seed | " + " | ".join(stages) + " |",
        "|---|---|" + "---|" * len(stages),
    ]
    for g in inits:
        for seed in seeds:
            lines.append(f"| {g:g} | {seed} | " + " | ".join(f"{cell[g, seed, low][s]:.3g}" for s in stages) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.odconv_grad_norms", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--temperatures", default="30,1")
    parser.add_argument("--attention_bn_init", default="1.0,0.1")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        temperatures = [float(t) for t in args.temperatures.split(",")]
        bn_inits = [float(g) for g in args.attention_bn_init.split(",")]
    except ValueError:
        parser.error("--seeds, --temperatures and --attention_bn_init take comma-separated numbers")
    if min(temperatures) <= 0 or min(bn_inits) <= 0:
        parser.error("--temperatures and --attention_bn_init must be > 0")
    import torch

    torch.set_num_threads(1)
    rows = measure(seeds, temperatures, bn_inits)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, "odconv_grad_norms_torch")
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = markdown(rows)
    with open(base + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
