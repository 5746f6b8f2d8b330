"""Static conv vs CondConv / DynamicConv / ODConv layers, JAX (Flax) vs PyTorch, same shapes, same process.

Each layer is timed forward and forward+backward (gradients w.r.t. input and all
parameters), JAX jit-compiled with ``block_until_ready``, PyTorch eager with
``torch.set_num_threads`` equal to the JAX thread count (or cuDNN on a GPU),
warm-up then interleaved rounds, median. Peak memory: XLA's compiled
``memory_analysis`` (temporaries of the fwd+bwd program) and, on a GPU,
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from dynconv_spec import CONV_TYPES, KW_CONV

from .timing import fmt_ms, fmt_ratio, markdown_table, median_times

# KernelWarehouse layers share a model's warehouses; its rows come with the benchmarks of its models.
KINDS = tuple(c for c in CONV_TYPES if c != KW_CONV)

# (name, batch, spatial, cin, cout, kernel, stride, groups)
_LAYERS = [
    ("ResNet-18 CIFAR layer1 3x3", (32, 32), 64, 64, 3, 1, 1),
    ("ResNet-18 CIFAR layer3 3x3", (8, 8), 256, 256, 3, 1, 1),
    ("ResNet-18 CIFAR layer4 3x3", (4, 4), 512, 512, 3, 1, 1),
    ("ResNet-18 ImageNet layer1 3x3", (56, 56), 64, 64, 3, 1, 1),
    ("ResNet-50 ImageNet layer2 3x3", (28, 28), 128, 128, 3, 1, 1),
    ("ResNet-50 ImageNet layer3 1x1 reduce", (14, 14), 1024, 256, 1, 1, 1),
    ("ResNet-50 ImageNet layer4 3x3/2", (14, 14), 512, 512, 3, 2, 1),
    ("MobileNetV2 CIFAR expand 1x1", (32, 32), 24, 144, 1, 1, 1),
    ("MobileNetV2 ImageNet dw 3x3", (56, 56), 144, 144, 3, 1, 144),
    ("MobileNetV2 ImageNet project 1x1", (28, 28), 192, 32, 1, 1, 1),
]
BATCHES = (1, 32, 128)
QUICK = [("ResNet-18 CIFAR layer1 3x3", 32), ("ResNet-18 CIFAR layer3 3x3", 32), ("MobileNetV2 CIFAR expand 1x1", 32)]
# On CPU, shapes whose static forward exceeds this many multiply-adds are skipped: with
# 4 layer kinds x 2 frameworks x fwd/fwd+bwd x repeats they would push the run past ~8 minutes.
CPU_MAX_MACS = 2.0e9


def shapes(quick: bool, backend: str):
    """``(name, batch, spatial, cin, cout, k, stride, groups)`` rows, and the rows skipped (with why)."""
    chosen, skipped = [], []
    for name, spatial, cin, cout, k, stride, groups in _LAYERS:
        for batch in BATCHES:
            if quick and (name, batch) not in QUICK:
                continue
            macs = batch * math.prod(-(-n // stride) for n in spatial) * cin // groups * cout * k * k
            row = (name, batch, spatial, cin, cout, k, stride, groups)
            if backend == "cpu" and macs > CPU_MAX_MACS:
                skipped.append((row, f"{macs / 1e9:.1f} GMAC static forward > {CPU_MAX_MACS / 1e9:.0f} on CPU"))
            elif backend == "cpu" and groups == cin and batch > 1:
                skipped.append(
                    (
                        row,
                        "XLA:CPU's depthwise conv backward takes seconds per call (1.8 s static at "
                        "B32 28x28x144), too slow for the CPU budget",
                    )
                )
            else:
                chosen.append(row)
    return chosen, skipped


def _jax_layers(cin, cout, k, stride, groups):
    import flax.linen as nn

    import dynconv_jax

    common = dict(
        features=cout, kernel_size=(k, k), strides=(stride, stride), padding="SAME", feature_group_count=groups
    )
    return {
        "static": nn.Conv(use_bias=False, **common),
        "condconv": dynconv_jax.CondConv(**common),
        "dynamic": dynconv_jax.DynamicConv(**common),
        "odconv": dynconv_jax.ODConv(**common),
    }


def _jax_times(batch, spatial, cin, cout, k, stride, groups, repeats):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch,) + spatial + (cin,)), jnp.float32)
    fwd, bwd, mem = {}, {}, {}
    for kind, layer in _jax_layers(cin, cout, k, stride, groups).items():
        variables = layer.init(jax.random.PRNGKey(0), x)
        params = variables["params"]
        rest = {c: v for c, v in variables.items() if c != "params"}
        train = kind != "static" and batch > 1  # batch 1: ODConv's attention BN cannot train on one sample

        def apply(p, x, layer=layer, rest=rest, train=train):
            kwargs = {"train": True, "mutable": list(rest)} if train and rest else ({"train": True} if train else {})
            out = layer.apply({"params": p, **rest}, x, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        f = jax.jit(apply)
        b = jax.jit(jax.value_and_grad(lambda p, x, apply=apply: jnp.sum(apply(p, x) ** 2), argnums=(0, 1)))
        fwd[kind] = lambda f=f, p=params: f(p, x)
        bwd[kind] = lambda b=b, p=params: b(p, x)
        try:
            analysis = b.lower(params, x).compile().memory_analysis()
            mem[kind] = int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
        except Exception:  # memory_analysis is not implemented on every backend
            mem[kind] = None
    tf = median_times(fwd, repeats=repeats, sync=jax.block_until_ready)
    tb = median_times(bwd, repeats=repeats, sync=jax.block_until_ready)
    return tf, tb, mem


def _torch_times(batch, spatial, cin, cout, k, stride, groups, repeats):
    try:
        import torch

        import dynconv_torch
    except ImportError:
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(kernel_size=k, stride=stride, padding=k // 2, groups=groups)
    layers = {
        "static": torch.nn.Conv2d(cin, cout, bias=False, **common),
        "condconv": dynconv_torch.CondConv2d(cin, cout, **common),
        "dynamic": dynconv_torch.DynamicConv2d(cin, cout, **common),
        "odconv": dynconv_torch.ODConv2d(cin, cout, **common),
    }
    x = torch.randn(batch, cin, *spatial, device=dev)
    xg = x.clone().requires_grad_(True)
    sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    fwd, bwd, mem = {}, {}, {}
    for kind, layer in layers.items():
        layer = layer.to(dev).train(x.shape[0] > 1)  # batch 1: eval-mode attention (BN needs 2 samples)

        def f(layer=layer):
            with torch.no_grad():
                return layer(x)

        def b(layer=layer):
            layer.zero_grad(set_to_none=True)
            xg.grad = None
            loss = (layer(xg) ** 2).sum()
            loss.backward()
            return loss

        fwd[kind], bwd[kind] = f, b
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            b()
            torch.cuda.synchronize()
            mem[kind] = int(torch.cuda.max_memory_allocated() - base)
        else:
            mem[kind] = None
    tf = median_times(fwd, repeats=repeats, sync=sync)
    tb = median_times(bwd, repeats=repeats, sync=sync)
    return tf, tb, mem


def measure(rows, repeats):
    """``(records, table rows)`` of the layer shapes ``rows`` (``(name, batch, spatial, cin, cout, k, stride,
    groups)``), JAX and PyTorch."""
    records, table = [], []
    for name, batch, spatial, cin, cout, k, stride, groups in rows:
        jf, jb, jm = _jax_times(batch, spatial, cin, cout, k, stride, groups, repeats)
        torch_res = _torch_times(batch, spatial, cin, cout, k, stride, groups, repeats)
        tf, tb, tm = torch_res if torch_res else ({}, {}, {})
        label = f"{name} B{batch} {'x'.join(map(str, spatial))}"
        records.append(
            {
                "layer": name,
                "batch": batch,
                "spatial": spatial,
                "cin": cin,
                "cout": cout,
                "kernel": k,
                "stride": stride,
                "groups": groups,
                "jax": {
                    kind: {"forward": jf[kind], "forward_backward": jb[kind], "peak_bytes": jm[kind]} for kind in KINDS
                },
                "torch": {
                    kind: {"forward": tf.get(kind), "forward_backward": tb.get(kind), "peak_bytes": tm.get(kind)}
                    for kind in KINDS
                }
                if torch_res
                else None,
            }
        )
        for kind in KINDS:
            mb = "–" if jm[kind] is None else f"{jm[kind] / 2**20:.0f}"
            tmb = "–" if tm.get(kind) is None else f"{tm[kind] / 2**20:.0f}"
            table.append(
                [
                    label,
                    kind,
                    fmt_ms(jf[kind]),
                    fmt_ratio(jf[kind], jf["static"]),
                    fmt_ms(jb[kind]),
                    fmt_ratio(jb[kind], jb["static"]),
                    mb,
                    fmt_ms(tf.get(kind)),
                    fmt_ms(tb.get(kind)),
                    fmt_ratio(tb.get(kind), tb.get("static")),
                    tmb,
                    fmt_ratio(jb[kind], tb.get(kind)),
                ]
            )
        print(
            label
            + ": "
            + ", ".join(f"{kind} jax {fmt_ms(jb[kind])} torch {fmt_ms(tb.get(kind))} ms" for kind in KINDS),
            flush=True,
        )
    return records, table


HEADER = (
    "float32, K = 4 experts, SAME padding (PyTorch: padding k//2), layers in training mode (batch 1: eval-mode "
    "attention, since ODConv's attention BatchNorm cannot train on one sample). fwd+bwd = loss, gradients "
    "w.r.t. input and all parameters. Ratios: dynamic / static of the same framework, and JAX / PyTorch for "
    "fwd+bwd (< 1 = JAX faster). JAX memory: XLA temporaries + outputs of the compiled fwd+bwd program; "
    "torch memory: CUDA peak of one fwd+bwd above the memory allocated before it (GPU only).\n\n"
)
COLUMNS = [
    "layer",
    "kind",
    "JAX fwd ms",
    "/static",
    "JAX fwd+bwd ms",
    "/static",
    "JAX MiB",
    "torch fwd ms",
    "torch fwd+bwd ms",
    "/static",
    "torch CUDA MiB",
    "JAX/torch fwd+bwd",
]


def setup_torch(threads):
    try:
        import torch

        torch.set_num_threads(threads or os.cpu_count())
        torch.backends.cudnn.benchmark = True
    except ImportError:
        pass


def run(quick: bool, repeats: int, threads=None):
    backend = jax.default_backend()
    setup_torch(threads)
    rows_todo, skipped = shapes(quick, backend)
    records, table = measure(rows_todo, repeats)
    md = HEADER + markdown_table(COLUMNS, table)
    if skipped:
        md += "\n\nSkipped on this backend:\n\n" + "\n".join(f"- {r[0]} B{r[1]}: {why}" for r, why in skipped)
    return {"results": records, "skipped": [{"layer": r[0], "batch": r[1], "why": why} for r, why in skipped]}, md
