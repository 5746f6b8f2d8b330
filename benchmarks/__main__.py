"""``python -m benchmarks {strategies,layers,models,serving,input} [--quick] [--out DIR]``."""
from __future__ import annotations

import argparse
import os


def _check_args(parser, args):
    """Usage errors exit 2 (``parser.error``) before any suite is imported; a given value is never replaced."""
    for flag, value in (("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: must be >= 1")
    if args.models is not None and args.suite in ("models", "serving"):
        from .models import check_models

        try:
            check_models([m for m in args.models.split(",") if m])
        except ValueError as error:
            parser.error(str(error))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suite", choices=["strategies", "layers", "models", "serving", "input"],
                        help="strategies: per-sample conv strategies (JAX); layers: static vs dynamic layers, "
                             "JAX vs PyTorch; models: ResNet-18 and MobileNetV2 CIFAR training throughput and step memory; serving: inference "
                             "throughput of torch eager, ONNX Runtime, JAX jit and loaded StableHLO exports; "
                             "input: the grain input pipeline on generated JPEG folders (throughput, peak RSS, "
                             "data wait)")
    parser.add_argument("--quick", action="store_true", help="a small subset (a smoke test; still minutes on CPU)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="directory for the JSON + Markdown results (default: benchmarks/results)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per candidate (median is reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: os.cpu_count(), what XLA:CPU uses)")
    parser.add_argument("--models", default=None,
                        help="models, serving: comma-separated models (default: resnet18,mobilenet_v2)")
    parser.add_argument("--formulations", action="store_true",
                        help="serving: only compare the two ONNX formulations on single dynamic layers")
    args = parser.parse_args(argv)
    _check_args(parser, args)

    from .timing import environment, write_results

    if args.suite == "strategies":
        from . import strategies as suite
        kwargs = {}
    elif args.suite == "layers":
        from . import layers as suite
        kwargs = {"threads": args.threads}
    elif args.suite == "serving":
        from . import serving as suite
        kwargs = {"threads": args.threads, "models": args.models.split(",") if args.models else None,
                  "formulations": args.formulations}
    elif args.suite == "input":
        from . import input as suite
        kwargs = {}
    else:
        from . import models as suite
        kwargs = {"threads": args.threads, "models": args.models.split(",") if args.models else None}
    repeats = args.repeats if args.repeats is not None else (3 if args.quick or args.suite == "models" else 5)
    payload, markdown = suite.run(quick=args.quick, repeats=repeats, **kwargs)
    env = environment()
    name = args.suite + ("_formulations" if args.formulations else "") + ("_quick" if args.quick else "")
    for path in write_results(args.out, name, env, payload, markdown):
        print("wrote", path)


if __name__ == "__main__":
    main()
