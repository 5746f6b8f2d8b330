"""Per-sample conv strategies vs a static conv, JAX only: the measurements behind ``strategy='auto'``.

For each shape: a static ``lax`` conv and every applicable strategy of
``dynconv_jax.ops.dynamic_conv`` (K=4 kernel attention, plus a spatial attention
in the ODConv rows), forward and forward+backward (gradients w.r.t. the input,
the experts and the attentions), jit-compiled, interleaved, median of repeats; and
the temporaries of each compiled forward+backward (XLA's ``memory_analysis``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dynconv_jax import ops

from .timing import fmt_ms, fmt_ratio, markdown_table, median_times

NUM_EXPERTS = 4

# (name, batch, spatial, cin, cout, kernel, stride, groups)
SHAPES = [
    ("r18-cifar 3x3 64 @32", 32, (32, 32), 64, 64, 3, 1, 1),
    ("r18-cifar 3x3 128 @16", 32, (16, 16), 128, 128, 3, 1, 1),
    ("r18-cifar 3x3 256 @8", 32, (8, 8), 256, 256, 3, 1, 1),
    ("r18-cifar 3x3 512 @4", 32, (4, 4), 512, 512, 3, 1, 1),
    ("r18-cifar 3x3/2 64→128 @32", 32, (32, 32), 64, 128, 3, 2, 1),
    ("r18-cifar 3x3/2 128→256 @16", 32, (16, 16), 128, 256, 3, 2, 1),
    ("r18-cifar 1x1/2 128→256 @16", 32, (16, 16), 128, 256, 1, 2, 1),
    ("r50 1x1 256→64 @14", 32, (14, 14), 256, 64, 1, 1, 1),
    ("mbv2-cifar 1x1 24→144 @32", 32, (32, 32), 24, 144, 1, 1, 1),
    ("mbv2-cifar 1x1 192→32 @16", 32, (16, 16), 192, 32, 1, 1, 1),
    ("mbv2-cifar 1x1 160→960 @4", 32, (4, 4), 160, 960, 1, 1, 1),
    ("mbv2 dw3x3 144 @28", 32, (28, 28), 144, 144, 3, 1, 144),
    ("B1 r18-cifar 3x3 64 @32", 1, (32, 32), 64, 64, 3, 1, 1),
]
QUICK_SHAPES = (0, 2, 5, 10)


def _inputs(batch, spatial, cin, cout, k, groups, spatial_attention):
    rank = len(spatial)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch,) + spatial + (cin,)), jnp.float32)
    experts = jnp.asarray(rng.normal(size=(NUM_EXPERTS,) + (k,) * rank + (cin // groups, cout)) * 0.05, jnp.float32)
    att = jax.nn.softmax(jnp.asarray(rng.normal(size=(batch, NUM_EXPERTS)), jnp.float32))
    sa = None
    if spatial_attention:
        sa = jax.nn.sigmoid(jnp.asarray(rng.normal(size=(batch,) + (k,) * rank), jnp.float32))
    return x, experts, att, sa


def bench_shape(batch, spatial, cin, cout, k, stride, groups, *, spatial_attention, repeats, skip_slow_cpu):
    """Median seconds ``{candidate: (forward, forward+backward)}`` and the 'auto' pick for one shape."""
    rank = len(spatial)
    x, experts, att, sa = _inputs(batch, spatial, cin, cout, k, groups, spatial_attention)
    geom = dict(strides=(stride,) * rank, padding="SAME", dilation=(1,) * rank, groups=groups)
    w0 = experts[0]

    def static(x, w):
        return ops.static_conv(x, w, **geom)

    fwd = {"static": (jax.jit(static), (x, w0))}
    bwd = {"static": (jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(static(x, w) ** 2), argnums=(0, 1))), (x, w0))}
    for name in ops.applicable_strategies((k,) * rank):
        if name == "mix" and groups > 1 and skip_slow_cpu:
            continue  # a grouped conv with K*Cout outputs: XLA:CPU took 317 s fwd+bwd for depthwise 144 @28

        def f(x, e, a, s, name=name):
            return ops.dynamic_conv(x, e, a, spatial_attention=s, strategy=name, **geom)

        fwd[name] = (jax.jit(f), (x, experts, att, sa))
        if name == "vmap" and skip_slow_cpu and batch > 1:
            continue  # its batch_group_count kernel gradient takes seconds on XLA:CPU (see docs/performance.md)
        argnums = (0, 1, 2, 3) if spatial_attention else (0, 1, 2)
        bwd[name] = (
            jax.jit(jax.value_and_grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=argnums)),
            (x, experts, att, sa),
        )
    tf = median_times(
        {n: (lambda fn=fn, a=a: fn(*a)) for n, (fn, a) in fwd.items()}, repeats=repeats, sync=jax.block_until_ready
    )
    tb = median_times(
        {n: (lambda fn=fn, a=a: fn(*a)) for n, (fn, a) in bwd.items()}, repeats=repeats, sync=jax.block_until_ready
    )
    memory = {n: _temp_bytes(fn, a) for n, (fn, a) in bwd.items()}
    auto = ops.choose_strategy(
        x.shape,
        experts.shape,
        strides=geom["strides"],
        dilation=geom["dilation"],
        groups=groups,
        spatial_attention=spatial_attention,
    )
    return {n: (tf[n], tb.get(n), memory.get(n)) for n in fwd}, auto


def _temp_bytes(fn, args):
    """XLA's temporaries of the compiled ``fn(*args)`` (None where the backend has no memory analysis)."""
    try:
        return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:  # memory_analysis is not implemented on every backend
        return None


def run(quick: bool, repeats: int):
    backend = jax.default_backend()
    shapes = [SHAPES[i] for i in QUICK_SHAPES] if quick else SHAPES
    rows, records = [], []
    for name, batch, spatial, cin, cout, k, stride, groups in shapes:
        for spatial_attention in (False, True) if k > 1 else (False,):
            times, auto = bench_shape(
                batch,
                spatial,
                cin,
                cout,
                k,
                stride,
                groups,
                spatial_attention=spatial_attention,
                repeats=repeats,
                skip_slow_cpu=backend == "cpu",
            )
            label = name + (" +spatial" if spatial_attention else "")
            static_f, static_b, static_m = times["static"]
            records.append(
                {
                    "shape": label,
                    "batch": batch,
                    "spatial": spatial,
                    "cin": cin,
                    "cout": cout,
                    "kernel": k,
                    "stride": stride,
                    "groups": groups,
                    "spatial_attention": spatial_attention,
                    "auto": auto,
                    "seconds": {n: {"forward": f, "forward_backward": b} for n, (f, b, _) in times.items()},
                    "forward_backward_temp_bytes": {n: m for n, (_, _, m) in times.items()},
                }
            )
            for n, (f, b, m) in times.items():
                rows.append(
                    [
                        label,
                        n + (" (auto)" if n == auto else ""),
                        fmt_ms(f),
                        fmt_ratio(f, static_f),
                        fmt_ms(b),
                        fmt_ratio(b, static_b),
                        "–" if m is None else f"{m / 2**20:.0f}",
                    ]
                )
            print(
                f"{label}: " + ", ".join(f"{n} {fmt_ms(f)}/{fmt_ms(b)} ms" for n, (f, b, _) in times.items()),
                flush=True,
            )
    md = (
        f"K = {NUM_EXPERTS} experts, float32, SAME padding; ratios are to the static conv of the same shape. "
        "fwd+bwd = value and gradients w.r.t. input, experts and attentions. '–' = not run "
        "(the 'vmap' kernel gradient on XLA:CPU takes seconds per call).\n\n"
    )
    md += markdown_table(
        ["shape", "strategy", "fwd ms", "fwd / static", "fwd+bwd ms", "fwd+bwd / static", "fwd+bwd temp MiB"], rows
    )
    return {"num_experts": NUM_EXPERTS, "repeats": repeats, "results": records}, md
