"""Inference (serving) throughput in images/s and export exactness, per model and conv type.

For ResNet-18 (CIFAR stem, 32x32) and MobileNetV2 (CIFAR stem, 32x32), each conv type, batch
1 and 32: PyTorch eager (eval, no_grad), ONNX Runtime on CPU running ``dynconv_torch.export.to_onnx``
graphs (both batch-independent formulations, 'matmul' and 'experts'), JAX ``jit`` of
``model.apply`` and the StableHLO module of ``dynconv_jax.export.to_stablehlo`` loaded back.
Each exported ONNX graph is also checked against torch eager at batch 1, 2, 7 and 32 (max
relative error), and so is ``tf_efficientnet_cc_b0_4e`` (64x64 input, check only).
``--formulations``: only the two ONNX formulations on single dynamic layers (:func:`run_formulations`).
"""

from __future__ import annotations

import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from dynconv_spec import CONV_TYPES, KW_CONV

from .models import MODELS, check_models, model_kwargs
from .timing import markdown_table, median_times

try:
    import dynconv_torch
except ImportError:  # the serving suite needs torch; the module stays importable without it
    dynconv_torch = None

# KernelWarehouse has no serving export yet (dynconv_jax.export / dynconv_torch.export refuse it).
CONVS = tuple(c for c in CONV_TYPES if c != KW_CONV)
BATCHES = (1, 32)
CHECK_BATCHES = (1, 2, 7, 32)


def _torch_model(name, conv, quick):
    from dynconv_torch import models

    return models.create_model(name, **model_kwargs(name, conv, quick)).eval()


def _jax_model(name, conv, quick):
    from dynconv_jax import models

    model = models.create_model(name, **model_kwargs(name, conv, quick))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    return model, variables


def _apply_eval(model, variables, x):
    return model.apply(variables, x, train=False)


def _onnx_check(torch_model, path, shape):
    import torch

    from dynconv_torch.export import check_onnx, onnx_session

    session = onnx_session(path)
    gen = torch.Generator().manual_seed(0)
    return max(check_onnx(torch_model, path, torch.randn((b,) + shape, generator=gen), session) for b in CHECK_BATCHES)


def _export_onnx(tm, name: str, conv: str, tmp: str, checks: list) -> dict:
    """``{formulation: path}`` of ``tm``'s ONNX graphs, each checked against torch eager (into ``checks``)."""
    from dynconv_torch.export import to_onnx

    onnx_paths = {}
    # A static model has no dynamic layer: both formulations are the same graph.
    for formulation in ("matmul",) if conv == "static" else ("matmul", "experts"):
        path = os.path.join(tmp, f"{name}_{conv}_{formulation}.onnx")
        start = time.time()
        to_onnx(tm, path, (None, 3, 32, 32), formulation=formulation)
        error = _onnx_check(tm, path, (3, 32, 32))
        checks.append(
            {
                "model": name,
                "conv": conv,
                "formulation": formulation,
                "max_rel_error": error,
                "export_s": time.time() - start,
            }
        )
        onnx_paths[formulation] = path
        print(
            f"{name} {conv} ONNX {formulation}: max rel error vs torch eager {error:.2e} "
            f"(batch {CHECK_BATCHES}), export {checks[-1]['export_s']:.1f}s",
            flush=True,
        )
    return onnx_paths


def _time_batch(x: np.ndarray, tm, sessions: dict, jitted, jv, loaded, repeats: int) -> dict:
    """``{candidate: images/s}`` of torch eager, each ONNX Runtime session, JAX jit and StableHLO on ``x``."""
    import torch

    batch = x.shape[0]
    xt, xj = torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1))

    def eager(xt=xt):
        with torch.no_grad():
            return tm(xt)

    candidates = {
        "torch eager": eager,
        **{f"ORT {f}": (lambda s=s, x=x: s.run(None, {"input": x})[0]) for f, s in sessions.items()},
        "JAX jit": lambda xj=xj: jitted(jv, xj),
        "StableHLO": lambda xj=xj: loaded(xj),
    }
    times = median_times(candidates, repeats=repeats, sync=jax.block_until_ready)
    return {k: batch / v for k, v in times.items()}


def _check_efficientnet(tmp: str) -> dict:
    """The ONNX check of ``tf_efficientnet_cc_b0_4e`` (64x64 input; exactness only, not timed)."""
    from dynconv_torch.export import to_onnx
    from dynconv_torch.models import tf_efficientnet_cc_b0_4e

    effnet = tf_efficientnet_cc_b0_4e().eval()
    path = os.path.join(tmp, "tf_efficientnet_cc_b0_4e.onnx")
    start = time.time()
    to_onnx(effnet, path, (None, 3, 64, 64))
    return {
        "model": "tf_efficientnet_cc_b0_4e",
        "conv": "condconv",
        "formulation": "matmul",
        "max_rel_error": _onnx_check(effnet, path, (3, 64, 64)),
        "export_s": time.time() - start,
    }


def _serving_markdown(rows: list, checks: list, repeats: int, threads: int) -> str:
    header = ["model", "conv", "batch", "torch eager", "ORT matmul", "ORT experts", "JAX jit", "StableHLO"]
    md = (
        "Inference images/s (higher is better), 32x32 random images, CIFAR stems, 10 classes, eval mode, "
        f"median of {repeats} interleaved rounds; {threads} threads for torch and ONNX Runtime (CPU provider). "
        "ORT matmul / experts: the two batch-independent formulations of `dynconv_torch.export.to_onnx`.\n\n"
    )
    md += markdown_table(header, rows)
    md += (
        "\n\nONNX Runtime vs torch eager, max relative error over batch 1, 2, 7, 32 (float32), "
        "and the time of `to_onnx`:\n\n"
    )
    md += markdown_table(
        ["model", "conv", "formulation", "max rel error", "export s"],
        [
            [c["model"], c["conv"], c["formulation"], f"{c['max_rel_error']:.2e}", f"{c['export_s']:.1f}"]
            for c in checks
        ],
    )
    return md


def run(quick: bool, repeats: int, threads=None, models=None, formulations: bool = False):
    if formulations:
        return run_formulations(repeats, threads)
    import torch

    from dynconv_jax.export import load_stablehlo, to_stablehlo
    from dynconv_torch.export import onnx_session

    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    tmp = tempfile.mkdtemp(prefix="dynconv_serving_")
    rng = np.random.default_rng(0)
    models = check_models(models or (("resnet18",) if quick else MODELS))
    records, rows, checks = [], [], []
    for name in models:
        for conv in CONVS:
            t0 = time.time()
            tm = _torch_model(name, conv, quick)
            sessions = {f: onnx_session(p, threads) for f, p in _export_onnx(tm, name, conv, tmp, checks).items()}
            jm, jv = _jax_model(name, conv, quick)
            jitted = jax.jit(functools.partial(_apply_eval, jm))
            loaded = load_stablehlo(to_stablehlo(jm, jv, (None, 32, 32, 3)))
            for batch in BATCHES:
                x = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
                record = {
                    "model": name,
                    "conv": conv,
                    "batch": batch,
                    **_time_batch(x, tm, sessions, jitted, jv, loaded, repeats),
                }
                records.append(record)
                rows.append(
                    [name, conv, batch]
                    + [
                        f"{record[k]:.1f}" if k in record else "–"
                        for k in ("torch eager", "ORT matmul", "ORT experts", "JAX jit", "StableHLO")
                    ]
                )
                print(
                    f"{name} {conv} B{batch}: "
                    + ", ".join(f"{k} {record[k]:.1f} img/s" for k in record if k not in ("model", "conv", "batch")),
                    flush=True,
                )
            print(f"{name} {conv}: {time.time() - t0:.0f}s", flush=True)
    checks.append(_check_efficientnet(tmp))
    md = _serving_markdown(rows, checks, repeats, threads)
    return {"models": models, "batches": BATCHES, "quick": quick, "results": records, "onnx_checks": checks}, md


# Single layers for the formulation comparison: (name, layer factory, input shape [C, H, W]).
FORMULATION_LAYERS = (
    ("CondConv2d 64->64 3x3, 16x16", lambda: dynconv_torch.CondConv2d(64, 64, 3, padding=1), (64, 16, 16)),
    ("DynamicConv2d 64->64 3x3, 16x16", lambda: dynconv_torch.DynamicConv2d(64, 64, 3, padding=1), (64, 16, 16)),
    ("ODConv2d 64->128 1x1, 16x16", lambda: dynconv_torch.ODConv2d(64, 128, 1), (64, 16, 16)),
    (
        "CondConv2d depthwise 128 3x3, 16x16",
        lambda: dynconv_torch.CondConv2d(128, 128, 3, padding=1, groups=128),
        (128, 16, 16),
    ),
)


def run_formulations(repeats: int, threads=None):
    """ONNX Runtime images/s of the 'matmul' and 'experts' formulations of single dynamic layers, batch 1 and 32."""
    import torch

    from dynconv_torch.export import check_onnx, onnx_session, to_onnx

    threads = threads or os.cpu_count()
    tmp = tempfile.mkdtemp(prefix="dynconv_formulations_")
    rng = np.random.default_rng(0)
    records, rows = [], []
    for name, make, shape in FORMULATION_LAYERS:
        torch.manual_seed(0)
        layer = make().eval()
        sessions, errors = {}, {}
        for formulation in ("matmul", "experts"):
            path = to_onnx(layer, os.path.join(tmp, f"{formulation}.onnx"), (None,) + shape, formulation=formulation)
            sessions[formulation] = onnx_session(path, threads)
            errors[formulation] = check_onnx(layer, path, torch.randn((7,) + shape), sessions[formulation])
        for batch in BATCHES:
            x = rng.normal(size=(batch,) + shape).astype(np.float32)
            times = median_times(
                {f: (lambda s=s, x=x: s.run(None, {"input": x})[0]) for f, s in sessions.items()},
                repeats=repeats,
                sync=lambda r: r,
            )
            record = {
                "layer": name,
                "batch": batch,
                **{f"{f}_images_per_s": batch / t for f, t in times.items()},
                **{f"{f}_max_rel_error": e for f, e in errors.items()},
            }
            records.append(record)
            rows.append(
                [
                    name,
                    batch,
                    f"{batch / times['matmul']:.1f}",
                    f"{batch / times['experts']:.1f}",
                    f"{times['matmul'] / times['experts']:.2f}",
                ]
            )
            print(rows[-1], flush=True)
    md = (
        "ONNX Runtime (CPU provider, "
        f"{threads} threads) images/s of the two batch-independent formulations of "
        "`dynconv_torch.export.to_onnx`, single layers, median of interleaved rounds.\n\n"
    )
    md += markdown_table(["layer", "batch", "matmul img/s", "experts img/s", "experts speed-up"], rows)
    return {"results": records}, md
