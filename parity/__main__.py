"""``python -m parity``: run the parity grid, print the table, optionally write a report.

The default run (every case marked ``default``, every check, both dtypes) is the one
docs/conversion_parity.md describes; ``--full`` adds the long grid. Exits 0 when every row passes, 1 if any
row fails its bound (or a case errors), 2 on bad arguments or a selection that is empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import platform
import sys
import time
from typing import List, Optional

from dynconv_spec.paths import check_output_dir
from parity import cases as registry
from parity.cases import CHECKS, LAYER_FAMILIES, load_extensions
from parity.harness import DTYPES, FLOAT32_NOISE_FACTOR, TOLERANCES, Row, SGDConfig, format_table, run_unit, summarize


def _csv(value: str) -> List[str]:
    return [v for v in value.split(",") if v] if value not in ("", "none") else []


def _parser(families: List[str]) -> argparse.ArgumentParser:
    model_families = [f for f in families if f not in LAYER_FAMILIES]
    p = argparse.ArgumentParser(
        prog="python -m parity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--layers",
        default=",".join(LAYER_FAMILIES),
        help=f"comma-separated layer families, or 'none' (default: all of {','.join(LAYER_FAMILIES)})",
    )
    p.add_argument(
        "--models",
        default=",".join(model_families),
        help=f"comma-separated model families, or 'none' (default: all registered: {','.join(model_families)})",
    )
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"subset of {','.join(DTYPES)} (default both)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"subset of {','.join(CHECKS)} (default all)")
    p.add_argument(
        "--full",
        action="store_true",
        help="also the cases outside the default run, in both dtypes (the long grid: every layer "
        "configuration, bias variant and strategy, every model x conv type)",
    )
    p.add_argument("--quick", action="store_true", help="only the cases marked quick, at most 5 training steps")
    p.add_argument(
        "--match", default=None, help="only cases whose name contains one of these comma-separated substrings"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of every case (default: each case's own, e.g. 20 for layers, 100 for models)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every case's weights and inputs (default: 0)")
    p.add_argument("--report", default=None, metavar="DIR", help="write parity.json and parity.md to DIR")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument(
        "--api",
        choices=("linen", "nnx"),
        default="linen",
        help="Flax side: the Linen modules (default) or their NNX twins (dynconv_jax.nnx; layers, ResNet, MobileNetV2)",
    )
    return p


def select_cases(p: argparse.ArgumentParser, args, families: List[str]):
    """The cases, dtypes and checks the arguments select; ``p.error`` (exit 2) for invalid or empty ones."""
    chosen = _csv(args.layers) + _csv(args.models)
    unknown = sorted(set(chosen) - set(families))
    if unknown:
        p.error(f"--layers/--models: unknown families {unknown}; choose from {','.join(families)} (or 'none')")
    if not chosen:
        p.error(f"--layers/--models select no family; choose from {','.join(families)}")
    dtypes, checks = _csv(args.dtypes), _csv(args.checks)
    for option, given, valid in (("--dtypes", dtypes, DTYPES), ("--checks", checks, CHECKS)):
        bad = [v for v in given if v not in valid]
        if bad:
            p.error(f"{option}: unknown {bad}; choose from {','.join(valid)}")
        if not given:
            p.error(f"{option} is empty; choose from {','.join(valid)}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps}: must be >= 1 (leave out sgd/adamw with --checks to run no training)")
    match = _csv(args.match) if args.match is not None else None
    if match is not None and not match:
        p.error("--match is empty; give a substring of a case name (--list --full lists them)")
    in_families = registry.select(chosen, quick=args.quick, full=args.full)
    selected = [c for c in in_families if match is None or any(m in c.name for m in match)]
    if not selected:
        names = [c.name for c in registry.select(chosen, full=True)]
        close = list(
            dict.fromkeys(n for m in (match or []) for n in difflib.get_close_matches(m, names, n=5, cutoff=0.3))
        )
        scope = "" if args.full else " (without --full; try --full)"
        what = f"--match {args.match!r}" if match else "--layers/--models/--quick"
        p.error(
            f"{what} selects none of the {len(in_families)} cases of families "
            f"{','.join(chosen)}{scope}"
            + (f"; close names: {', '.join(close)}" if close else "")
            + "; --list --full lists every case"
        )
    if args.api == "nnx":
        from parity.nnx_api import NNX_FAMILIES, nnx_case

        if args.models == p.get_default("models"):  # the default: every registered family that has a twin
            selected = [c for c in selected if c.family in NNX_FAMILIES]
        no_twin = sorted({c.family for c in selected} - set(NNX_FAMILIES))
        if no_twin:
            p.error(
                f"--api nnx: no NNX twin for the families {no_twin} (NNX: {', '.join(NNX_FAMILIES)}); "
                f"pass --models with a subset"
            )
        selected = [nnx_case(c) for c in selected]
    if not any(set(checks) & set(c.checks) for c in selected):
        offered = sorted({k for c in selected for k in c.checks}, key=CHECKS.index)
        p.error(f"--checks {','.join(checks)}: no selected case runs these checks; they run {','.join(offered)}")
    return selected, dtypes, checks


def run_units(units, checks, sgd: SGDConfig, seed: int, start: float) -> List[Row]:
    """Run every (case name, dtype); progress goes to stderr as units finish."""
    rows: List[Row] = []
    for name, dtype in units:
        new, seconds = run_unit(((name, dtype), checks, sgd, seed))
        rows.extend(new)
        status = "ok" if all(r.passed for r in new) else "FAIL " + ",".join(r.check for r in new if not r.passed)
        print(f"[{time.time() - start:7.1f}s] {name} {dtype}: {status} ({seconds:.1f}s)", file=sys.stderr, flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    loaded = load_extensions()
    families = sorted({c.family for c in registry.CASES.values()})
    p = _parser(families)
    args = p.parse_args(argv)
    selected, dtypes, checks = select_cases(p, args, families)
    if args.report:
        try:
            check_output_dir(args.report, "--report")
        except ValueError as error:
            p.error(str(error))  # exit 2, before the grid runs
    if args.list:
        print("\n".join(c.name for c in selected))
        return 0
    sgd = SGDConfig(steps=args.steps if args.steps is not None else (5 if args.quick else None))

    units = [(case.name, dtype) for case in selected for dtype in dtypes if args.full or dtype in case.default]
    start = time.time()
    rows = run_units(units, checks, sgd, args.seed, start)
    if not rows:
        print(
            f"the selected cases and --dtypes/--checks produced no row (e.g. running_stats of a layer without "
            f"BatchNorm); {len(selected)} cases, checks {','.join(checks)}",
            file=sys.stderr,
        )
        return 2
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows)} rows, {len(failed)} failed, {len(selected)} cases, {time.time() - start:.0f}s")
    if failed:
        print("FAILED: " + "; ".join(f"{r.case} {r.dtype} {r.check}" for r in failed))

    if args.report:
        write_report(
            args.report,
            rows,
            {
                "argv": sys.argv[1:] if argv is None else list(argv),
                "sgd": dataclasses.asdict(sgd),
                "tolerances": TOLERANCES,
                "float32_noise_factor": FLOAT32_NOISE_FACTOR,
                "extensions": loaded,
                "platform": platform.platform(),
                "seconds": round(time.time() - start, 1),
            },
        )
    return 1 if failed else 0


def write_report(directory: str, rows: List[Row], meta: dict) -> None:
    """``parity.json`` (every row, the worst error per dtype and check) and ``parity.md``."""
    os.makedirs(directory, exist_ok=True)
    failed = [r for r in rows if not r.passed]
    with open(os.path.join(directory, "parity.json"), "w") as f:
        json.dump({"meta": meta, "worst": summarize(rows), "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    with open(os.path.join(directory, "parity.md"), "w") as f:
        f.write(
            f"# Parity report\n\n{len(rows)} rows, {len(failed)} failed; arguments {meta['argv']}.\n\n"
            "## Worst relative error per dtype and check\n\n| dtype | "
            + " | ".join(CHECKS)
            + " |\n|"
            + "---|" * (len(CHECKS) + 1)
            + "\n"
        )
        for dtype, worst in summarize(rows).items():
            f.write(f"| {dtype} | " + " | ".join(f"{worst[c]:.1e}" if c in worst else "–" for c in CHECKS) + " |\n")
        f.write("\n## All rows\n\n" + format_table(rows, markdown=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
