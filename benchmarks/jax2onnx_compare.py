"""jax2onnx against this project's ONNX path (the PyTorch twin through ``dynconv_torch.export.to_onnx``).

The single dynamic layers of ``python -m benchmarks serving --formulations``, built in Flax and
converted by jax2onnx with a symbolic batch, next to the project's two batch-independent
formulations: conversion success and time, ONNX Runtime error against the JAX (resp. torch)
model at batch 1, 2, 7, 32, and ONNX Runtime images/s at batch 1 and 32 in one process.

Two steps, because jax2onnx (0.17.1) requires ``orbax-checkpoint < 0.11.37`` and the project
pins a newer one, so it lives in its own environment (same jax, flax and onnxruntime pins)::

    python -m venv /tmp/j2o
    grep -v '^orbax' constraints.txt > /tmp/j2o.txt
    /tmp/j2o/bin/pip install -c /tmp/j2o.txt jax2onnx==0.17.1 onnxruntime onnx flax optax
    PYTHONPATH=. /tmp/j2o/bin/python -m benchmarks.jax2onnx_compare export --dir /tmp/j2o_out
    .venv/bin/python -m benchmarks.jax2onnx_compare compare --dir /tmp/j2o_out [--threads N]

``export`` writes ``<layer>.onnx`` (or the conversion error), the inputs and the JAX outputs;
``compare`` writes ``benchmarks/results/jax2onnx_<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import numpy as np

CHECK_BATCHES = (1, 2, 7, 32)
BATCHES = (1, 32)
#: The Flax twin of each layer of benchmarks.serving.FORMULATION_LAYERS (same name; its input shape,
#: NCHW there, is used as NHWC here): (file stem, factory given the dynconv_jax module).
FLAX_LAYERS = {
    "CondConv2d 64->64 3x3, 16x16": ("condconv_3x3_64", lambda m: m.CondConv(64, (3, 3), padding=1)),
    "DynamicConv2d 64->64 3x3, 16x16": ("dynamic_3x3_64", lambda m: m.DynamicConv(64, (3, 3), padding=1)),
    "ODConv2d 64->128 1x1, 16x16": ("odconv_1x1_64_128", lambda m: m.ODConv(128, (1, 1))),
    "CondConv2d depthwise 128 3x3, 16x16": (
        "condconv_dw3x3_128",
        lambda m: m.CondConv(128, (3, 3), padding=1, feature_group_count=128),
    ),
}


def _layers():
    """(name, file stem, Flax factory, PyTorch factory, NCHW shape, NHWC shape) of every compared layer."""
    from .serving import FORMULATION_LAYERS

    return [
        (name, *FLAX_LAYERS[name], make_torch, shape, shape[1:] + shape[:1])
        for name, make_torch, shape in FORMULATION_LAYERS
    ]


def export(out_dir: str, strategy: str):
    import jax
    import jax.numpy as jnp
    from jax2onnx import to_onnx

    import dynconv_jax

    os.makedirs(out_dir, exist_ok=True)
    report = {"jax": jax.__version__, "strategy": strategy, "layers": {}}
    rng = np.random.default_rng(0)
    for _, stem, make, _, _, shape in _layers():
        layer = make(dynconv_jax).clone(strategy=strategy)
        variables = jax.jit(layer.init)(jax.random.PRNGKey(0), jnp.zeros((2,) + shape, jnp.float32))
        served = lambda x, layer=layer, variables=variables: layer.apply(variables, x)  # noqa: E731
        inputs = {f"b{b}": rng.normal(size=(b,) + shape).astype(np.float32) for b in CHECK_BATCHES}
        np.savez(
            os.path.join(out_dir, stem + "_io.npz"),
            **inputs,
            **{f"out_{k}": np.asarray(jax.jit(served)(v)) for k, v in inputs.items()},
        )
        entry = {"shape": list(shape)}
        start = time.perf_counter()
        try:
            to_onnx(
                served,
                [("B",) + shape],
                model_name=stem,
                return_mode="file",
                output_path=os.path.join(out_dir, stem + ".onnx"),
            )
            entry["converted"] = True
        except Exception as e:  # the comparison records every failure, it does not stop at the first
            entry.update(
                converted=False, error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-4000:]
            )
        entry["seconds"] = time.perf_counter() - start
        report["layers"][stem] = entry
        print(stem, {k: v for k, v in entry.items() if k != "traceback"}, flush=True)
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(report, f, indent=1)


def compare(out_dir: str, threads, repeats: int, results_dir: str):
    import torch

    from dynconv_torch.export import check_onnx, onnx_session, to_onnx

    from .timing import environment, markdown_table, median_times, write_results

    report_path = os.path.join(out_dir, "export.json")
    if not os.path.isfile(report_path):
        raise SystemExit(
            f"compare: {report_path} does not exist; run the 'export' step with --dir {out_dir} "
            "first (in the jax2onnx environment, see --help)"
        )
    with open(report_path) as f:
        report = json.load(f)
    threads = threads or os.cpu_count()
    rng = np.random.default_rng(0)
    records, rows = [], []
    for name, stem, _, make_torch, torch_shape, shape in _layers():
        entry = report["layers"][stem]
        record = {
            "layer": name,
            "jax2onnx_converted": entry["converted"],
            "jax2onnx_seconds": entry["seconds"],
            "jax2onnx_error": entry.get("error"),
        }
        sessions = {}
        if entry["converted"]:
            path = os.path.join(out_dir, stem + ".onnx")
            session = onnx_session(path, threads)
            io = np.load(os.path.join(out_dir, stem + "_io.npz"))
            input_name = session.get_inputs()[0].name
            errors = []
            for b in CHECK_BATCHES:
                got, want = session.run(None, {input_name: io[f"b{b}"]})[0], io[f"out_b{b}"]
                errors.append(float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
            record["jax2onnx_max_rel_error"] = max(errors)
            sessions["jax2onnx"] = (session, input_name, "nhwc")
        torch.manual_seed(0)
        layer = make_torch().eval()
        for formulation in ("matmul", "experts"):
            start = time.perf_counter()
            path = to_onnx(
                layer,
                os.path.join(out_dir, f"{stem}_torch_{formulation}.onnx"),
                (None,) + torch_shape,
                formulation=formulation,
            )
            record[f"{formulation}_seconds"] = time.perf_counter() - start
            session = onnx_session(path, threads)
            record[f"{formulation}_max_rel_error"] = max(
                check_onnx(layer, path, torch.randn((b,) + torch_shape), session) for b in CHECK_BATCHES
            )
            sessions[formulation] = (session, "input", "nchw")
        for batch in BATCHES:
            x = rng.normal(size=(batch,) + shape).astype(np.float32)
            feeds = {
                k: {n: (x if layout == "nhwc" else np.ascontiguousarray(x.transpose(0, 3, 1, 2)))}
                for k, (_, n, layout) in sessions.items()
            }
            times = median_times(
                {k: (lambda s=s, f=feeds[k]: s.run(None, f)[0]) for k, (s, _, _) in sessions.items()},
                repeats=repeats,
                sync=lambda r: r,
            )
            record[f"b{batch}_images_per_s"] = {k: batch / t for k, t in times.items()}
            rows.append(
                [
                    name,
                    batch,
                    (f"{batch / times['jax2onnx']:.1f}" if "jax2onnx" in times else "conversion failed"),
                    f"{batch / times['matmul']:.1f}",
                    f"{batch / times['experts']:.1f}",
                    (f"{record['jax2onnx_max_rel_error']:.1e}" if "jax2onnx" in times else "–"),
                    f"{max(record['matmul_max_rel_error'], record['experts_max_rel_error']):.1e}",
                ]
            )
            print(rows[-1], flush=True)
        records.append(record)
    md = (
        f"ONNX Runtime (CPU provider, {threads} threads) images/s of single dynamic layers exported by jax2onnx "
        f"{report.get('jax2onnx', '0.17.1')} from the Flax layer (strategy '{report['strategy']}', symbolic batch) "
        "and by `dynconv_torch.export.to_onnx` from the PyTorch twin (both formulations), median of interleaved "
        "rounds; max relative error of each graph against its own framework's model over batch 1, 2, 7, 32.\n\n"
    )
    md += markdown_table(
        [
            "layer",
            "batch",
            "jax2onnx img/s",
            "to_onnx matmul img/s",
            "to_onnx experts img/s",
            "jax2onnx error",
            "to_onnx error",
        ],
        rows,
    )
    failures = [f"- {r['layer']}: {r['jax2onnx_error']}" for r in records if not r["jax2onnx_converted"]]
    if failures:
        md += "\n\njax2onnx conversion failures:\n" + "\n".join(failures)
    for path in write_results(results_dir, "jax2onnx", environment(), {"export": report, "results": records}, md):
        print("wrote", path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.jax2onnx_compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("step", choices=["export", "compare"])
    parser.add_argument("--dir", required=True, help="folder for the jax2onnx graphs and reference outputs")
    parser.add_argument("--strategy", default="auto", help="export: the Flax layers' per-sample strategy")
    parser.add_argument("--threads", type=int, default=None, help="compare: ONNX Runtime threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if args.step == "export":
        export(args.dir, args.strategy)
    else:
        compare(args.dir, args.threads, args.repeats, args.out)


if __name__ == "__main__":
    main()
