"""How chaotic is a training configuration? PyTorch alone, float64: train a model case twice, the
second time from weights changed by a relative 1e-13 (far below any conversion error), and print
how far apart the two runs are after each reported step.

A training run can only be compared across frameworks where this growth stays small: two exact
implementations differ from the start by rounding (~1e-16 per operation), and that difference grows
like this one. ``python -m parity.sensitivity`` shows the configuration the model cases use
(full-batch training at lr 1e-4) next to the chaotic one of earlier versions (a fresh random batch
every step, lr 1e-3). Numbers: docs/conversion_parity.md, "Whole training runs".
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Dict, Optional

import numpy as np

from parity import cases as registry
from parity.harness import compare_trees, randomize_batchnorm

PERTURBATION = 1e-13
REPORT_STEPS = (1, 10, 30, 100)


def divergence(case_name: str, lr: float, batches: Optional[int], steps: int, seed: int = 0) -> Dict[int, float]:
    """``{step: max relative parameter difference}`` between two float64 PyTorch SGD runs of the case
    (momentum 0.9, weight decay 1e-2) whose initial weights differ by :data:`PERTURBATION` (relative)."""
    import torch

    case = registry.CASES[case_name]
    torch.manual_seed(seed)
    model = case.make_torch().double()
    randomize_batchnorm(model, torch.Generator().manual_seed(seed + 1))
    if case.temperature is not None:
        from dynconv_torch import set_temperature

        set_temperature(model, case.temperature)
    twin = copy.deepcopy(model)
    noise = torch.Generator().manual_seed(seed + 4)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1 + PERTURBATION * torch.randn(p.shape, generator=noise, dtype=p.dtype))
    runs = [(m, torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=1e-2)) for m in (model, twin)]
    data = np.random.default_rng(seed + 3)
    fixed = []
    out = {}
    for i in range(steps):
        if batches and i >= batches:
            x, t = fixed[i % batches]
        else:
            x = torch.from_numpy(data.standard_normal(case.input_shape))
            t = torch.from_numpy(data.standard_normal((case.input_shape[0], 10)))
            fixed.append((x, t))
        for m, opt in runs:
            m.train()
            opt.zero_grad()
            (((m(x) - t) ** 2).sum() / (2 * x.shape[0])).backward()
            opt.step()
        if i + 1 in REPORT_STEPS or i + 1 == steps:
            a, b = ({k: v.detach().numpy() for k, v in m.named_parameters()} for m, _ in runs)
            out[i + 1] = compare_trees(a, b)[1]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m parity.sensitivity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--match", default="resnet50/static", help="model cases whose name contains this (default resnet50/static)"
    )
    p.add_argument("--steps", type=int, default=100, help="training steps of each of the two runs (default: 100)")
    args = p.parse_args(argv)
    names = [n for n, c in registry.CASES.items() if c.family in registry.MODEL_FAMILIES and args.match in n]
    if not names:
        p.error(
            f"--match {args.match!r} selects no model case; model cases: {', '.join(n for n, c in registry.CASES.items() if c.family in registry.MODEL_FAMILIES)}"
        )
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be >= 1")
    import torch

    torch.set_num_threads(1)
    configs = (
        ("parity cases: one fixed batch, lr 1e-4", registry.MODEL_TRAIN["sgd_lr"], 1),
        ("chaotic: fresh batch every step, lr 1e-3", 1e-3, None),
    )
    print(
        f"relative parameter difference after N steps, from a {PERTURBATION:g} relative weight change (PyTorch float64)"
    )
    for name in names:
        for label, lr, batches in configs:
            res = divergence(name, lr, batches, args.steps)
            print(f"{name} [{label}]: " + "  ".join(f"{k}: {v:.1e}" for k, v in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
