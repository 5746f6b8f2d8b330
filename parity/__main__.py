"""``python -m parity``: run the parity grid, print the table, optionally write a report.

Exits 1 if any row fails its tolerance (or a case errors), 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import platform
import sys
import time

from parity import cases as registry
from parity.cases import CHECKS, LAYER_FAMILIES, MODEL_FAMILIES
from parity.harness import DTYPES, TOLERANCES, SGDConfig, format_table, run_case, summarize

#: Modules that register further cases when present (owned by other engineers).
EXTENSIONS = ("parity.efficientnet_cases",)


def _csv(value: str):
    return [v for v in value.split(",") if v] if value not in ("", "none") else []


def load_extensions() -> list:
    """Import the optional case modules that exist; returns the names imported."""
    loaded = []
    for name in EXTENSIONS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
            loaded.append(name)
    return loaded


def main(argv=None) -> int:
    loaded = load_extensions()
    families = sorted({c.family for c in registry.CASES.values()})
    p = argparse.ArgumentParser(prog="python -m parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default=",".join(LAYER_FAMILIES),
                   help=f"comma-separated layer families, or 'none' (default: all of {','.join(LAYER_FAMILIES)})")
    p.add_argument("--models", default=",".join(f for f in families if f not in LAYER_FAMILIES),
                   help=f"comma-separated model families, or 'none' (default: all registered: "
                        f"{','.join(f for f in families if f not in LAYER_FAMILIES)})")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="float64,float32 (default both)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"subset of {','.join(CHECKS)}")
    p.add_argument("--quick", action="store_true", help="only the cases marked quick, and 5 SGD steps")
    p.add_argument("--match", default=None, help="only cases whose name contains this string")
    p.add_argument("--steps", type=int, default=None, help="SGD steps (default 20, 5 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", default=None, metavar="DIR", help="write parity.json and parity.md to DIR")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--api", choices=("linen", "nnx"), default="linen",
                   help="Flax side: the Linen modules (default) or their NNX twins (dynconv_jax.nnx; layers, "
                        "ResNet, MobileNetV2)")
    args = p.parse_args(argv)

    chosen = _csv(args.layers) + _csv(args.models)
    unknown = sorted(set(chosen) - set(families))
    dtypes, checks = _csv(args.dtypes), _csv(args.checks)
    bad = [d for d in dtypes if d not in DTYPES] + [c for c in checks if c not in CHECKS]
    if unknown or bad:
        p.error(f"unknown families {unknown} / values {bad}; families: {families}")
    selected = registry.select(chosen, quick=args.quick, match=args.match)
    if args.api == "nnx":
        from parity.nnx_api import NNX_FAMILIES, nnx_case

        if args.models == p.get_default("models"):  # the default: every registered family that has a twin
            selected = [c for c in selected if c.family in NNX_FAMILIES]
        no_twin = sorted({c.family for c in selected} - set(NNX_FAMILIES))
        if no_twin:
            p.error(f"--api nnx: no NNX twin for the families {no_twin} (NNX: {', '.join(NNX_FAMILIES)}); "
                    f"pass --models with a subset")
        selected = [nnx_case(c) for c in selected]
    if args.list:
        print("\n".join(c.name for c in selected))
        return 0
    sgd = SGDConfig(steps=args.steps if args.steps is not None else (5 if args.quick else 20))

    rows, start = [], time.time()
    for case in selected:
        for dtype in dtypes:
            t0 = time.time()
            new = run_case(case, dtype, checks, sgd, seed=args.seed)
            rows.extend(new)
            status = "ok" if all(r.passed for r in new) else "FAIL"
            print(f"[{time.time() - start:7.1f}s] {case.name} {dtype}: {status} ({time.time() - t0:.1f}s)",
                  file=sys.stderr, flush=True)
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"\n{len(rows)} rows, {len(failed)} failed, {len(selected)} cases, {time.time() - start:.0f}s")

    if args.report:
        os.makedirs(args.report, exist_ok=True)
        meta = {"argv": sys.argv[1:] if argv is None else list(argv), "sgd": dataclasses.asdict(sgd),
                "tolerances": TOLERANCES, "extensions": loaded, "platform": platform.platform(),
                "seconds": round(time.time() - start, 1)}
        with open(os.path.join(args.report, "parity.json"), "w") as f:
            json.dump({"meta": meta, "worst": summarize(rows), "rows": [dataclasses.asdict(r) for r in rows]}, f,
                      indent=1)
        with open(os.path.join(args.report, "parity.md"), "w") as f:
            f.write(f"# Parity report\n\nSGD: {dataclasses.asdict(sgd)} (a case with its own lr names it in its "
                    f"sgd row); {len(rows)} rows, {len(failed)} failed.\n\n")
            f.write("## Worst relative error per dtype and check\n\n| dtype | " + " | ".join(CHECKS) + " |\n|"
                    + "---|" * (len(CHECKS) + 1) + "\n")
            for dtype, worst in summarize(rows).items():
                f.write(f"| {dtype} | " + " | ".join(
                    f"{worst[c]:.1e}" if c in worst else "–" for c in CHECKS) + " |\n")
            f.write("\n## All rows\n\n" + format_table(rows, markdown=True) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
