"""``python -m benchmarks {strategies,layers,models,input} [--quick] [--out DIR]``."""
from __future__ import annotations

import argparse
import os


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("suite", choices=["strategies", "layers", "models", "input"],
                        help="strategies: per-sample conv strategies (JAX); layers: static vs dynamic layers, "
                             "JAX vs PyTorch; models: ResNet-18 CIFAR training throughput; input: the grain "
                             "input pipeline on generated JPEG folders (throughput, peak RSS, data wait)")
    parser.add_argument("--quick", action="store_true", help="a small subset (smoke test, ~2 minutes on CPU)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="directory for the JSON + Markdown results (default: benchmarks/results)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per candidate (median is reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: os.cpu_count(), what XLA:CPU uses)")
    args = parser.parse_args(argv)

    from .timing import environment, write_results

    if args.suite == "strategies":
        from . import strategies as suite
        kwargs = {}
    elif args.suite == "layers":
        from . import layers as suite
        kwargs = {"threads": args.threads}
    elif args.suite == "input":
        from . import input as suite
        kwargs = {}
    else:
        from . import models as suite
        kwargs = {"threads": args.threads}
    repeats = args.repeats or (3 if args.quick or args.suite == "models" else 5)
    payload, markdown = suite.run(quick=args.quick, repeats=repeats, **kwargs)
    env = environment()
    for path in write_results(args.out, args.suite + ("_quick" if args.quick else ""), env, payload, markdown):
        print("wrote", path)


if __name__ == "__main__":
    main()
