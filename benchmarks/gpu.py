"""``python -m benchmarks gpu``: every GPU table in one command, JAX and the PyTorch reference.

On a machine with a CUDA GPU and the CUDA builds of jax and torch: the layer table (static vs CondConv /
DynamicConv / ODConv, forward and forward+backward, memory), the model tables (ResNet-18 and MobileNetV2,
CIFAR stems, every conv type, batch 32 / 128 / 256, float32 and bfloat16 compute: training steps and
serving forwards) and the memory table (peak of a training step against the static model, next to the
official PyTorch ODConv's published ratios). The model programs are lowered one after the other and
compiled in threads (XLA compiles without the GIL), so the whole suite fits in about 8 minutes; the time
it took is written with the results. Files: ``<out>/{layers,models,serving,memory}_gpu.{md,json}``, each
with the device name. ``--dry-run`` runs the same code on the default backend (CPU) at tiny sizes (one model,
two conv types, batch 2, bfloat16) and writes ``*_gpu-dry-run.*``: the suite's own test, not a measurement.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time

import jax
import jax.numpy as jnp

from . import layers
from .models import (
    DonatingStep,
    _mib,
    _ratio,
    compiled_memory,
    cuda_peak,
    jax_model,
    lower_donating,
    model_kwargs,
    setup_torch,
    torch_candidate,
    training_step,
)
from .timing import environment, markdown_table, median_times, synced, write_results

BATCHES = (32, 128, 256)
DTYPES = ("float32", "bfloat16")
MODELS = ("resnet18", "mobilenet_v2")
CONVS = ("static", "condconv", "dynamic", "odconv")
#: Layer rows of the GPU table: (layer name in benchmarks.layers, batch).
LAYER_ROWS = [
    (name, batch)
    for name in (
        "ResNet-18 CIFAR layer1 3x3",
        "ResNet-18 CIFAR layer3 3x3",
        "ResNet-18 CIFAR layer4 3x3",
        "MobileNetV2 CIFAR expand 1x1",
        "MobileNetV2 ImageNet dw 3x3",
    )
    for batch in (32, 128)
]
#: Published cost of the official PyTorch ODConv 4x ResNet-18 on a GPU (batch 128; /work/shared/REFERENCE.md:
#: 24,472 -> 3,653 img/s, 911 -> 6,377 MB).
PUBLISHED_ODCONV_R18 = {"throughput_vs_static": 0.15, "memory_vs_static": 7.0}
BUDGET_S = 8 * 60
#: The dry run: the same code on the default backend, as small as it goes (bfloat16 is the special path).
DRY_RUN = dict(
    batches=(2,),
    models=("resnet18",),
    convs=("static", "condconv"),
    dtypes=("bfloat16",),
    size=8,
    layer_rows=[("dry-run 3x3", 2, (8, 8), 8, 8, 3, 1, 1)],
)


def _layer_rows():
    known = {
        name: (spatial, cin, cout, k, stride, groups) for name, spatial, cin, cout, k, stride, groups in layers._LAYERS
    }
    return [(name, batch) + known[name] for name, batch in LAYER_ROWS]


def _compile_all(lowered):
    """``{key: compiled}`` of ``{key: lowered}``, compiled in threads."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        futures = {key: pool.submit(program.compile) for key, program in lowered.items()}
        return {key: future.result() for key, future in futures.items()}


def _torch_dtype(dtype):
    import torch

    return None if dtype == "float32" else getattr(torch, dtype)


def _serving_jax(model, variables, x):
    """(the eval-mode forward lowered, its arguments: a copy of ``variables``, which the training step donates)."""
    variables = jax.tree_util.tree_map(jnp.copy, variables)
    return jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x), (variables, x)


def _serving_torch(name, conv, batch, dtype, quick, size):
    import contextlib

    import torch

    from dynconv_torch.models import create_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = create_model(name, **model_kwargs(name, conv, quick)).to(dev).eval()
    x = torch.randn(batch, 3, size, size, device=dev)
    cast = torch.autocast(dev, dtype=_torch_dtype(dtype)) if dtype != "float32" else contextlib.nullcontext()

    def forward():
        with torch.no_grad(), cast:
            return model(x)

    return forward


def _group(name, batch, dtype, config, have_torch, sync_torch):
    """Training and serving records of every conv type of one (model, batch, dtype), timed interleaved."""
    quick, size, repeats = config["quick"], config["size"], config["repeats"]
    train, serve = {}, {}
    for conv in config["convs"]:
        built = jax_model(name, conv, batch, quick, dtype=jnp.dtype(dtype), size=size)
        step, args = training_step(*built)
        train[conv] = (lower_donating(step, args), step, args)
        serve[conv] = _serving_jax(*built)
    compiled = _compile_all(
        {**{("train", c): v[0] for c, v in train.items()}, **{("serve", c): v[0] for c, v in serve.items()}}
    )
    runs, records = {}, []
    for conv in config["convs"]:
        _, step, args = train[conv]
        runs[f"jax train {conv}"] = DonatingStep(step, args, compiled[("train", conv)])
        serve_args = serve[conv][1]
        runs[f"jax serve {conv}"] = lambda c=compiled[("serve", conv)], a=serve_args: c(*a)
        record = {
            "model": name,
            "conv": conv,
            "batch": batch,
            "dtype": dtype,
            "jax_memory": compiled_memory(compiled[("train", conv)]),
            "torch_cuda_peak_bytes": None,
        }
        if have_torch:
            torch_dtype = _torch_dtype(dtype)
            runs[f"torch train {conv}"], record["torch_cuda_peak_bytes"] = torch_candidate(
                name, conv, batch, quick, dtype=torch_dtype, size=size
            )
            runs[f"torch serve {conv}"] = _serving_torch(name, conv, batch, dtype, quick, size)
            record["torch_serving_cuda_peak_bytes"] = cuda_peak(runs[f"torch serve {conv}"])
        records.append(record)
    sync = {"jax": jax.block_until_ready, "torch": sync_torch}
    times = median_times(
        {k: synced(r, sync[k.split()[0]]) for k, r in runs.items()}, repeats=repeats, sync=lambda _: None
    )
    for r in records:
        for fw in ("jax", "torch"):
            for mode in ("train", "serve"):
                seconds = times.get(f"{fw} {mode} {r['conv']}")
                r[f"{fw}_{mode}_images_per_s"] = batch / seconds if seconds else None
    return records


def _fmt(value, spec="{:.1f}"):
    return "–" if value is None else spec.format(value)


def _static_of(records, r):
    return next(
        s
        for s in records
        if (s["model"], s["batch"], s["dtype"], s["conv"]) == (r["model"], r["batch"], r["dtype"], "static")
    )


def _model_tables(records):
    """(training table, serving table, memory table) in Markdown."""
    train, serve, memory = [], [], []
    for r in records:
        s = _static_of(records, r)
        key = [r["model"], r["conv"], r["batch"], r["dtype"]]
        for rows, mode in ((train, "train"), (serve, "serve")):
            jax_ips, torch_ips = r[f"jax_{mode}_images_per_s"], r[f"torch_{mode}_images_per_s"]
            rows.append(
                key
                + [
                    _fmt(jax_ips),
                    _fmt(_ratio(jax_ips, s[f"jax_{mode}_images_per_s"]), "{:.2f}"),
                    _fmt(torch_ips),
                    _fmt(_ratio(torch_ips, s[f"torch_{mode}_images_per_s"]), "{:.2f}"),
                    _fmt(_ratio(jax_ips, torch_ips), "{:.2f}"),
                ]
            )
        jax_peak = (r["jax_memory"] or {}).get("peak_bytes")
        published = PUBLISHED_ODCONV_R18 if (r["model"], r["conv"]) == ("resnet18", "odconv") else {}
        memory.append(
            key
            + [
                _fmt(_mib(jax_peak), "{:.0f}"),
                _fmt(_ratio(jax_peak, (s["jax_memory"] or {}).get("peak_bytes")), "{:.2f}"),
                _fmt(_mib(r["torch_cuda_peak_bytes"]), "{:.0f}"),
                _fmt(_ratio(r["torch_cuda_peak_bytes"], s["torch_cuda_peak_bytes"]), "{:.2f}"),
                _fmt(published.get("memory_vs_static"), "{:.1f}"),
                _fmt(published.get("throughput_vs_static"), "{:.2f}"),
            ]
        )
    columns = ["model", "conv", "batch", "dtype", "JAX img/s", "vs static", "torch img/s", "vs static", "JAX / torch"]
    return (
        markdown_table(columns, train),
        markdown_table(columns, serve),
        markdown_table(
            [
                "model",
                "conv",
                "batch",
                "dtype",
                "JAX step peak MiB",
                "vs static",
                "torch step CUDA peak MiB",
                "vs static",
                "published official ODConv memory vs static",
                "published throughput vs static",
            ],
            memory,
        ),
    )


def run_all(out, repeats=None, threads=None, dry_run=False):
    """Run every table; returns the paths written (see the module docstring)."""
    start = time.perf_counter()
    if not dry_run and jax.default_backend() != "gpu":
        print(
            f"python -m benchmarks gpu: JAX sees no GPU (backend {jax.default_backend()!r}); run it on a machine "
            "with a CUDA GPU and the CUDA builds of jax and torch, or pass --dry-run",
            file=sys.stderr,
        )
        raise SystemExit(2)
    settings = (
        DRY_RUN
        if dry_run
        else dict(batches=BATCHES, models=MODELS, convs=CONVS, dtypes=DTYPES, size=32, layer_rows=_layer_rows())
    )
    config = {
        "quick": dry_run,
        "size": settings["size"],
        "convs": settings["convs"],
        "repeats": repeats or (2 if dry_run else 5),
    }
    layers.setup_torch(threads)
    have_torch, sync_torch = setup_torch(threads)
    env = environment()
    tag = "gpu-dry-run" if dry_run else "gpu"
    layer_records, layer_table = layers.measure(settings["layer_rows"], config["repeats"])
    records = [
        r
        for name in settings["models"]
        for dtype in settings["dtypes"]
        for batch in settings["batches"]
        for r in _group(name, batch, dtype, config, have_torch, sync_torch)
    ]
    seconds = time.perf_counter() - start
    env = {**env, "suite_seconds": round(seconds, 1), "budget_seconds": BUDGET_S}
    note = (
        f"The whole `python -m benchmarks gpu` run took {seconds:.0f} s (budget {BUDGET_S} s)"
        + (" — dry run on the default backend at tiny sizes, not a measurement" if dry_run else "")
        + ".\n\n"
    )
    train_md, serve_md, memory_md = _model_tables(records)
    payload = {"records": records, "dry_run": dry_run}
    paths = write_results(
        out,
        "layers",
        env,
        {"results": layer_records},
        note + layers.HEADER + markdown_table(layers.COLUMNS, layer_table),
        tag=tag,
    )
    paths += write_results(
        out,
        "models",
        env,
        payload,
        note + "Training step (forward, cross-entropy, backward, SGD-momentum update), images/s, "
        "every conv type and framework of a (model, batch, dtype) timed in interleaved rounds, "
        "median; bfloat16 = compute dtype (JAX `dtype=`, torch autocast), parameters float32; JAX "
        "with strategy='auto' (the fixed rules, unmeasured on GPU).\n\n" + train_md,
        tag=tag,
    )
    paths += write_results(
        out,
        "serving",
        env,
        payload,
        note + "Serving forward (eval mode), images/s, timed with the training steps.\n\n" + serve_md,
        tag=tag,
    )
    paths += write_results(
        out,
        "memory",
        env,
        payload,
        note + "Peak memory of one training step: JAX from XLA's compiled memory analysis "
        "(arguments + outputs + temporaries - aliased), torch from torch.cuda.max_memory_allocated. "
        "Published: the official PyTorch ODConv 4x ResNet-18 at batch 128 (0.15x throughput, "
        "7x memory of static).\n\n" + memory_md,
        tag=tag,
    )
    return paths
