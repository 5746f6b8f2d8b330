"""``python -m benchmarks {strategies,layers,models,plans,serving,input,gpu} [--quick] [--out DIR]``."""

from __future__ import annotations

import argparse
import os

SUITES = {
    "strategies": "per-sample conv strategies (JAX)",
    "layers": "static vs dynamic layers, JAX vs PyTorch",
    "models": "ResNet-18 and MobileNetV2 CIFAR training throughput, time to the first step and step memory",
    "plans": "the fixed strategy rules vs a measured plan (autotune) on the models' training steps",
    "serving": "inference throughput of torch eager, ONNX Runtime, JAX jit and loaded StableHLO exports",
    "input": "the grain input pipeline on generated JPEG folders (throughput, peak RSS, data wait)",
    "gpu": "on a CUDA GPU, in one go: layers, models (training and serving; batch 32/128/256; float32 and "
    "bfloat16) and memory, JAX and PyTorch (--dry-run: the same on CPU at tiny sizes)",
}


def _check_args(parser, args):
    """Usage errors exit 2 (``parser.error``) before any suite is imported; a given value is never replaced."""
    for flag, value in (("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: must be >= 1")
    if args.models is not None and args.suite in ("models", "plans", "serving"):
        from .models import check_models

        try:
            check_models([m for m in args.models.split(",") if m])
        except ValueError as error:
            parser.error(str(error))
    if args.convs is not None:
        from dynconv_spec import CONV_TYPES

        unknown = sorted(set(args.convs.split(",")) - set(CONV_TYPES))
        if unknown:
            parser.error(f"--convs: unknown {unknown}; choose from {', '.join(CONV_TYPES)}")


def _parser():
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suite", choices=list(SUITES), help="; ".join(f"{k}: {v}" for k, v in SUITES.items()))
    parser.add_argument("--quick", action="store_true", help="a small subset (a smoke test; still minutes on CPU)")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results"),
        help="directory for the JSON + Markdown results (default: benchmarks/results)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per candidate (median is reported)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: os.cpu_count(), what XLA:CPU uses)"
    )
    parser.add_argument(
        "--models", default=None, help="models, plans, serving: comma-separated models (default: resnet18,mobilenet_v2)"
    )
    parser.add_argument(
        "--formulations",
        action="store_true",
        help="serving: only compare the two ONNX formulations on single dynamic layers",
    )
    parser.add_argument(
        "--convs",
        default=None,
        help="models, plans: comma-separated conv types (default: all; 'static' is always timed "
        "in models, as the reference)",
    )
    parser.add_argument(
        "--plans",
        default=None,
        metavar="DIR",
        help="plans: reuse the plans saved in DIR by an earlier run instead of measuring",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="gpu: run every table on the default backend at tiny sizes (the suite's own test)",
    )
    return parser


def _suite(args):
    """``(module, keyword arguments of its run)`` for the parsed command line."""
    models = args.models.split(",") if args.models else None
    convs = args.convs.split(",") if args.convs else None
    if args.suite == "strategies":
        from . import strategies as suite

        return suite, {}
    if args.suite == "layers":
        from . import layers as suite

        return suite, {"threads": args.threads}
    if args.suite == "serving":
        from . import serving as suite

        return suite, {"threads": args.threads, "models": models, "formulations": args.formulations}
    if args.suite == "input":
        from . import input as suite

        return suite, {}
    if args.suite == "plans":
        from . import plans as suite

        return suite, {"models": models, "convs": convs, "plans_dir": args.plans, "out_dir": args.out}
    if args.suite == "gpu":
        from . import gpu as suite

        return suite, {"threads": args.threads, "dry_run": args.dry_run}
    from . import models as suite

    return suite, {"threads": args.threads, "models": models, "convs": convs}


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)

    from .timing import environment, write_results

    suite, kwargs = _suite(args)
    if args.suite == "gpu":  # writes its own files, one per table
        for path in suite.run_all(args.out, repeats=args.repeats, **kwargs):
            print("wrote", path)
        return
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    payload, markdown = suite.run(quick=args.quick, repeats=repeats, **kwargs)
    env = environment()
    name = args.suite + ("_formulations" if args.formulations else "") + ("_quick" if args.quick else "")
    for path in write_results(args.out, name, env, payload, markdown):
        print("wrote", path)


if __name__ == "__main__":
    main()
