"""Mutation test of the parity harness: does ``python -m parity`` fail on a wrong build?

Each :class:`Mutant` is one plausible bug, written as one exact source edit of ``dynconv_jax``
(layers, ops, BatchNorm, converter). For each, :func:`run_mutant` copies the package into a
temporary directory, applies the edit there (the working tree is never touched), and runs
``python -m parity --full`` on the cases the bug affects (its own ``--dtypes``/``--checks``) in a
subprocess whose ``dynconv_jax`` is the copy. The mutant is **killed** when that run exits 1 with
at least one failing row, and the failing checks are recorded (the kill table also says whether
the check the bug targets is among them); the edit must match the current source exactly (else
the mutant is reported ``stale``, so a refactor cannot silently turn the test into a no-op).

``python -m parity.mutants`` runs every mutant and prints the kill table (docs/conversion_parity.md
records it); ``--only a,b`` runs some; exit status 1 unless every mutant is killed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Tuple

from parity.cases import CHECKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYER = "dynamic/i8o16k3s1p1d1g1K4"  # DynamicConv 3x3, 8 -> 16
LAYER_T3 = "dynamic/i8o12k3s2p1d1g2K4-T3"  # temperature 3, stride 2, 2 groups
SQUARE = "i8o8k3s1p2d2g1K1"  # in == out, dilation 2, one expert
ODCONV = "odconv/i8o16k3s1p1d1g1K4"
EVEN = "i6o8k4s1psamed1g1K2"  # 4x4 kernel, 'same' padding (asymmetric)
# KernelWarehouse 8 -> 8 with 4x4 cells (2 x 2 channel blocks x 9 positions), warm-up tau 0.3
KW = "kernelwarehouse/i8o8k3s1p1d1g1-cell_inplane_ratio0.5-cell_outplane_ratio0.5-T0.3"


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One injected bug.

    Attributes:
      name: identifier (``--only``).
      bug: what the edit does, in words.
      file: the edited file, relative to ``dynconv_jax/``.
      old, new: the exact source text and its replacement (``old`` must occur ``count`` times;
        every occurrence is replaced).
      match: ``--match`` of the parity run (the cases the bug affects).
      args: further ``python -m parity`` arguments (dtypes, checks).
      expect: the check that must be among the failing ones.
      count: occurrences of ``old``.
    """

    name: str
    bug: str
    file: str
    old: str
    new: str
    match: str
    args: Tuple[str, ...]
    expect: str
    count: int = 1


F64 = ("--dtypes", "float64")

MUTANTS: Tuple[Mutant, ...] = (
    Mutant(
        "experts-io-swapped",
        "expert stacks converted to [K, *k, O, I] (in/out transposed)",
        "convert.py",
        "return lead_axes + tuple(range(lead + 2, ndim)) + (lead + 1, lead)",
        "return lead_axes + tuple(range(lead + 2, ndim)) + ((lead, lead + 1) if lead else (lead + 1, lead))",
        f"dynamic/{SQUARE}",
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "kernel-not-flipped",
        "every conv/expert kernel flipped spatially in conversion (convolution vs cross-correlation)",
        "convert.py",
        "to_flax=lambda a, f: np.transpose(a, perm),",
        "to_flax=lambda a, f: np.flip(np.transpose(a, perm), axis=tuple(range(lead, ndim - 2))),",
        LAYER,
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "conv-kernel-hw-transposed",
        "static conv kernels [O, I, kh, kw] converted with kh and kw swapped",
        "convert.py",
        "return lead_axes + tuple(range(lead + 2, ndim)) + (lead + 1, lead)",
        "return lead_axes + (tuple(range(lead + 2, ndim)) if lead else tuple(range(ndim - 1, lead + 1, -1)))"
        " + (lead + 1, lead)",
        "resnet18/static-",
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "flat-experts-as-hwio",
        "timm's flattened CondConv experts read as HWIO rows instead of OIHW",
        "convert.py",
        "return np.transpose(a.reshape(oihw), perm)",
        "return a.reshape(f)",
        "condconv/i8o16k3s1p1d1g1K4",
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "linear-reshaped",
        "Linear [O, I] -> Dense [I, O] by reshape instead of transpose",
        "convert.py",
        "to_flax=lambda a, f: a.T,",
        "to_flax=lambda a, f: a.reshape(f),",
        LAYER,
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "running-stats-swapped",
        "running_mean and running_var converted into each other",
        "convert.py",
        'BATCH_STATS_NAMES = {"running_mean": "mean", "running_var": "var"}',
        'BATCH_STATS_NAMES = {"running_mean": "var", "running_var": "mean"}',
        ODCONV,
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "module-prefix-half-stripped",
        "DataParallel 'module.' prefix stripped without its dot",
        "convert.py",
        "state = {k[len(prefix) :]: v for k, v in state.items()}",
        "state = {k[len(prefix.rstrip('.')) :]: v for k, v in state.items()}",
        LAYER,
        F64 + ("--checks", "checkpoint"),
        "checkpoint",
    ),
    Mutant(
        "temperature-twice",
        "attention logits divided by the temperature twice (softmax)",
        "attention.py",
        "return jax.nn.softmax(logits / temperature, axis=-1)",
        "return jax.nn.softmax(logits / temperature / temperature, axis=-1)",
        LAYER_T3,
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "softmax-over-batch",
        "kernel attention softmax over the batch axis instead of the experts",
        "attention.py",
        "return jax.nn.softmax(logits / temperature, axis=-1)",
        "return jax.nn.softmax(logits / temperature, axis=0)",
        LAYER,
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "condconv-softmax-routing",
        "CondConv routing by softmax instead of independent sigmoids",
        "attention.py",
        "return sigmoid_attention(routing_fn(dropout(pooled)), temperature)",
        "return softmax_attention(routing_fn(dropout(pooled)), temperature)",
        "condconv/i8o16k3s1p1d1g1K4",
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "no-relu-in-attention",
        "DynamicConv attention MLP without its ReLU",
        "attention.py",
        "return softmax_attention(fc2(jax.nn.relu(fc1(pooled))), temperature)",
        "return softmax_attention(fc2(fc1(pooled)), temperature)",
        LAYER,
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "expert-bias-missing",
        "the attention-mixed expert bias never added",
        "conv_base.py",
        "expert_bias=expert_bias,",
        "expert_bias=None,",
        LAYER,
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "spatial-attention-flipped",
        "ODConv spatial attention applied to the kernel taps in reverse order",
        "attention.py",
        "spatial = sigmoid_attention(spatial_fc(h), temperature).reshape((batch, *kernel_size))",
        "spatial = sigmoid_attention(spatial_fc(h), temperature)[:, ::-1].reshape((batch, *kernel_size))",
        ODCONV,
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "channel-filter-swapped",
        "ODConv channel and filter attentions swapped (in == out, so shapes fit)",
        "odconv.py",
        "channel_attention=channel,\n            filter_attention=filter_,",
        "channel_attention=filter_,\n            filter_attention=channel,",
        f"odconv/{SQUARE}",
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "attention-bn-running-in-train",
        "ODConv attention BatchNorm uses running statistics in training",
        "odconv.py",
        "BatchNorm(\n                use_running_average=not train,",
        "BatchNorm(\n                use_running_average=True,",
        ODCONV,
        F64 + ("--checks", "forward_train,running_stats"),
        "forward_train",
    ),
    Mutant(
        "bn-momentum-flax-sense",
        "BatchNorm momentum 0.1 read in Flax's sense (decay of the running average)",
        "norm.py",
        "new_mean = ((1 - torch_momentum) * running_mean + torch_momentum * mean)",
        "new_mean = (torch_momentum * running_mean + (1 - torch_momentum) * mean)",
        ODCONV,
        F64 + ("--checks", "running_stats"),
        "running_stats",
    ),
    Mutant(
        "bn-biased-running-var",
        "running variance updated with the biased batch variance",
        "norm.py",
        "unbiased = var * (count / (count - 1))",
        "unbiased = var",
        ODCONV,
        F64 + ("--checks", "running_stats"),
        "running_stats",
    ),
    Mutant(
        "bn-eps-keras",
        "BatchNorm epsilon 1e-3 (Keras/TF default) instead of PyTorch's 1e-5",
        "norm.py",
        "    epsilon: float = 1e-5\n",
        "    epsilon: float = 1e-3\n",
        ODCONV,
        F64 + ("--checks", "forward_train"),
        "forward_train",
    ),
    Mutant(
        "even-kernel-padding",
        "'same' padding of an even kernel puts the extra row/column first",
        "ops.py",
        "return tuple(tuple(p) for p in lax.padtype_to_pads(spatial_shape, window, strides, padding))",
        "return tuple(tuple(p)[::-1] for p in lax.padtype_to_pads(spatial_shape, window, strides, padding))",
        f"dynamic/{EVEN}",
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "dilation-ignored-in-grad",
        "the kernel gradient's im2col ignores the dilation",
        "ops.py",
        "start = tuple(i * d for i, d in zip(offset, dilation))",
        "start = tuple(offset)",
        f"dynamic/{SQUARE}",
        F64 + ("--checks", "grad_params"),
        "grad_params",
    ),
    Mutant(
        "kw-cell-order",
        "KernelWarehouse cells assembled with the output and input channel blocks swapped "
        "(cell (o, i) placed at (i, o))",
        "cells.py",
        "order = (0, 1, *range(6, 6 + rank), 3, 5, 2, 4)",
        "order = (0, 1, *range(6, 6 + rank), 2, 5, 3, 4)",
        KW,
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "kw-zero-cell-missing",
        "KernelWarehouse's zero cell kept as a real cell (each mixture's first cell dropped instead of the last)",
        "attention.py",
        "return a[..., :-1]",
        "return a[..., 1:]",
        KW,
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "kw-signed-normalisation",
        "KernelWarehouse attention divided by its signed sum instead of the sum of |.|",
        "attention.py",
        "a = a / (jnp.sum(jnp.abs(a), axis=-1, keepdims=True) + eps)",
        "a = a / (jnp.abs(jnp.sum(a, axis=-1, keepdims=True)) + eps)",
        KW,
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "kw-warmup-blend-swapped",
        "KernelWarehouse warm-up blend tau * attention + (1 - tau) * one-hot",
        "attention.py",
        "a = (1.0 - tau) * a + tau * temp_bias.reshape(num_mixtures, -1).astype(a.dtype)",
        "a = tau * a + (1.0 - tau) * temp_bias.reshape(num_mixtures, -1).astype(a.dtype)",
        KW,
        F64 + ("--checks", "forward_eval"),
        "forward_eval",
    ),
    Mutant(
        "float32-attention-in-bfloat16",
        "attention branch computed in bfloat16 when the layer runs in float32 "
        "(a float32-only bug: judged by the noise-aware float32 verdict)",
        "attention.py",
        "return jnp.promote_types(dtype, jnp.float32)",
        "return jnp.bfloat16 if jnp.dtype(dtype) == jnp.float32 else jnp.promote_types(dtype, jnp.float32)",
        LAYER,
        ("--dtypes", "float32", "--checks", "forward_eval"),
        "forward_eval",
    ),
)


@dataclasses.dataclass
class Result:
    mutant: str
    status: str  # killed | survived | stale | error | timeout (control: passes | FAILS)
    failed_checks: List[str]
    exit_code: Optional[int]
    seconds: float
    note: str = ""


def mutated_copy(mutant: Mutant, directory: str) -> str:
    """Copy ``dynconv_jax`` into ``directory`` and apply the edit; returns the package path.
    Raises ValueError when ``old`` does not occur exactly ``count`` times (a stale mutant)."""
    package = os.path.join(directory, "dynconv_jax")
    shutil.copytree(os.path.join(ROOT, "dynconv_jax"), package, ignore=shutil.ignore_patterns("__pycache__"))
    path = os.path.join(package, mutant.file)
    if not mutant.old:  # the control: an unmodified copy
        return package
    with open(path) as f:
        source = f.read()
    found = source.count(mutant.old)
    if found != mutant.count:
        raise ValueError(
            f"mutant {mutant.name!r}: {mutant.old!r} occurs {found} times in dynconv_jax/{mutant.file}, "
            f"expected {mutant.count} (the source changed: update the mutant)"
        )
    with open(path, "w") as f:
        f.write(source.replace(mutant.old, mutant.new))
    return package


def run_mutant(mutant: Mutant, timeout: float = 900) -> Result:
    """``python -m parity --match <cases> <args>`` against a mutated copy of ``dynconv_jax``."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        try:
            package = mutated_copy(mutant, tmp)
        except ValueError as e:
            return Result(mutant.name, "stale", [], None, 0.0, str(e))
        report = os.path.join(tmp, "report")
        # cwd = the copy's parent: ``python -m`` puts the cwd first on sys.path, so ``import dynconv_jax``
        # finds the copy; parity and dynconv_torch come from the repository (PYTHONPATH).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        code = (
            "import runpy, sys, dynconv_jax; "
            f"assert dynconv_jax.__file__.startswith({package!r}), dynconv_jax.__file__; "
            "sys.argv = ['parity'] + sys.argv[1:]; runpy.run_module('parity', run_name='__main__')"
        )
        cmd = [sys.executable, "-c", code, "--full", "--match", mutant.match, *mutant.args, "--report", report]
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Result(mutant.name, "timeout", [], None, time.time() - start, f"no result within {timeout:.0f} s")
        seconds = time.time() - start
        try:
            with open(os.path.join(report, "parity.json")) as f:
                rows = json.load(f)["rows"]
        except OSError:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return Result(mutant.name, "error", [], proc.returncode, seconds, " / ".join(tail))
    failed = sorted({r["check"] for r in rows if not r["passed"]})
    if not mutant.old:
        status = "passes" if proc.returncode == 0 and not failed else "FAILS"
    else:
        status = "killed" if proc.returncode == 1 and failed else "survived"
    return Result(mutant.name, status, failed, proc.returncode, seconds, f"{len(rows)} rows")


def control() -> Mutant:
    """No edit: every case and check the mutants use, both dtypes, on an unmodified copy (must pass,
    or a kill would prove nothing)."""
    checks = sorted({c for m in MUTANTS for c in m.args[m.args.index("--checks") + 1].split(",")}, key=CHECKS.index)
    return Mutant(
        "control",
        "none (unmodified copy)",
        "__init__.py",
        "",
        "",
        ",".join(sorted({m.match for m in MUTANTS})),
        ("--dtypes", "float64,float32", "--checks", ",".join(checks)),
        "",
    )


def kill_table(results: List[Result]) -> str:
    """Markdown: mutant, bug, cases, exit status, failing checks, result."""
    by_name = {m.name: m for m in MUTANTS + (control(),)}
    lines = [
        "| mutant | bug | `--match` | exit | failing checks | targeted check failed | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = by_name[r.mutant]
        targeted = "–" if not m.expect else ("yes" if m.expect in r.failed_checks else f"**no** ({m.expect})")
        lines.append(
            f"| `{m.name}` | {m.bug} ({m.file}) | `{m.match}` {' '.join(m.args)} | {r.exit_code} | "
            f"{', '.join(r.failed_checks) or '–'} | {targeted} | {r.status}"
            f"{' — ' + r.note if r.status != 'killed' else ''} ({r.seconds:.0f} s) |"
        )
    killed = sum(r.status == "killed" for r in results)
    lines.append(f"\n{killed} of {sum(r.mutant != 'control' for r in results)} mutants killed.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m parity.mutants", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    names = [m.name for m in MUTANTS]
    p.add_argument("--only", default=None, help=f"comma-separated mutants (default all): {','.join(names)}")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--no-control", action="store_true", help="skip the control run on the unmodified copy")
    args = p.parse_args(argv)
    chosen = MUTANTS
    if args.only is not None:
        wanted = [n for n in args.only.split(",") if n]
        unknown = [n for n in wanted if n not in names]
        if unknown or not wanted:
            p.error(f"--only: unknown or empty {unknown or args.only!r}; choose from {','.join(names)}")
        chosen = tuple(m for m in MUTANTS if m.name in wanted)
    if args.list:
        print("\n".join(f"{m.name}: {m.bug}" for m in chosen))
        return 0
    results = []
    for m in chosen if args.no_control else (control(),) + chosen:
        r = run_mutant(m)
        print(
            f"{m.name}: {r.status} ({', '.join(r.failed_checks) or '-'}; exit {r.exit_code}; {r.seconds:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
        results.append(r)
    print(kill_table(results))
    return 0 if all(r.status in ("killed", "passes") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
