"""Every per-sample conv strategy of ``dynconv_jax.ops.dynamic_conv`` equals the naive per-sample loop.

Float64 (``jax.enable_x64``), relative error ``max|a - b| / max|b|`` <= 1e-12, for outputs and for
gradients w.r.t. the input, the experts, every attention and the expert bias, over a fixed grid of
edge cases plus a seeded random sample of configurations (1-D/2-D/3-D, groups incl. depthwise,
dilation, stride, SAME/VALID/explicit padding, spatial/channel/filter attention).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import naive_dynamic_conv
from _xla_level import with_session_compile_flags

from dynconv_jax import ops

TOL = 1e-12
ARG_NAMES = (
    "x",
    "experts",
    "kernel_attention",
    "spatial_attention",
    "channel_attention",
    "filter_attention",
    "expert_bias",
)


def make_case(
    rng,
    *,
    rank,
    kernel,
    stride,
    dilation,
    groups,
    padding,
    spatial,
    channel,
    filt,
    bias,
    batch=2,
    cin_per_group=2,
    cout_per_group=3,
    size=6,
    experts=3,
):
    ks = tuple(kernel) if not isinstance(kernel, int) else (kernel,) * rank
    cin, cout = cin_per_group * groups, cout_per_group * groups
    arrays = {
        "x": rng.normal(size=(batch,) + (size,) * rank + (cin,)),
        "experts": rng.normal(size=(experts,) + ks + (cin_per_group, cout)),
        "kernel_attention": rng.random((batch, experts)),
        "spatial_attention": rng.random((batch,) + ks) if spatial else None,
        "channel_attention": rng.random((batch, cin)) if channel else None,
        "filter_attention": rng.random((batch, cout)) if filt else None,
        "expert_bias": rng.normal(size=(experts, cout)) if bias else None,
    }
    geom = dict(
        strides=(stride,) * rank,
        padding=ops.normalize_padding(padding, rank),
        dilation=(dilation,) * rank,
        groups=groups,
    )
    return arrays, geom


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def check_all_strategies(arrays, geom):
    """Compare the output and every gradient of each applicable strategy (and 'auto') with the naive loop.

    Each side is one jitted program: on CPU, compiling it is cheaper than dispatching its ops one by one."""
    names = [n for n in ARG_NAMES if arrays[n] is not None]
    fixed = {n: None for n in ARG_NAMES if arrays[n] is None}
    kernel_size = arrays["experts"].shape[1:-2]
    strategies = ops.applicable_strategies(kernel_size)

    def naive(*vals):
        kw = {**fixed, **dict(zip(names, vals))}
        return naive_dynamic_conv(
            kw["x"],
            kw["experts"],
            kw["kernel_attention"],
            kw["spatial_attention"],
            kw["channel_attention"],
            kw["filter_attention"],
            kw["expert_bias"],
            **geom,
        )

    def fast(strategy):
        def f(*vals):
            kw = {**fixed, **dict(zip(names, vals))}
            return ops.dynamic_conv(
                kw.pop("x"), kw.pop("experts"), kw.pop("kernel_attention"), **kw, **geom, strategy=strategy
            )

        return f

    def outputs_and_gradients(f):
        """(plain call: the inference path, where 'map' aggregates kernels inside its steps;
        output and gradients under vjp: the training path)."""

        @jax.jit
        def run(vals, cot):
            y, vjp = jax.vjp(f, *vals)
            return f(*vals), y, vjp(cot)

        return run

    vals = [jnp.asarray(arrays[n]) for n in names]
    cot = jnp.asarray(np.random.default_rng(1).normal(size=jax.eval_shape(naive, *vals).shape))
    _, y_ref, g_ref = outputs_and_gradients(naive)(vals, cot)
    for strategy in strategies + ("auto",):
        plain, y, grads = outputs_and_gradients(fast(strategy))(vals, cot)
        assert plain.shape == y_ref.shape, strategy
        assert rel(plain, y_ref) <= TOL, (strategy, "output", rel(plain, y_ref))
        assert rel(y, y_ref) <= TOL, (strategy, "output under vjp", rel(y, y_ref))
        for name, g, gr in zip(names, grads, g_ref):
            assert rel(g, gr) <= TOL, (strategy, f"d/d {name}", rel(g, gr))


# Edge cases, each run in full: (rank, kernel, stride, dilation, groups, padding, spatial, channel, filter, bias)
GRID = [
    (2, 3, 1, 1, 1, "SAME", True, True, True, False),  # ODConv
    (2, 3, 1, 1, 1, "SAME", False, False, False, True),  # DynamicConv
    (2, 3, 2, 1, 1, "VALID", False, False, False, False),  # CondConv, strided
    (2, 3, 2, 2, 2, ((1, 2), (0, 1)), True, True, True, False),  # explicit asymmetric, dilation, groups
    (2, 1, 2, 1, 1, "SAME", False, True, True, True),  # pointwise, strided
    (2, 3, 1, 1, "dw", "SAME", True, True, False, False),  # depthwise (no filter attention, as in ODConv)
    (1, 5, 3, 1, 1, ((2, 2),), True, False, True, True),  # 1-D
    (3, 3, 2, 1, 1, "SAME", True, True, True, False),  # 3-D
    (2, (3, 1), 1, (1), 1, (-1, 1), False, False, False, True),  # non-square kernel, negative (cropping) padding
]


@pytest.mark.slow
@pytest.mark.parametrize("case", GRID, ids=[f"grid{i}" for i in range(len(GRID))])
def test_strategies_match_naive_loop_grid(case, float64):
    rank, kernel, stride, dilation, groups, padding, spatial, channel, filt, bias = case
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    kw = dict(cin_per_group=1, cout_per_group=2, groups=4) if groups == "dw" else dict(groups=groups)
    arrays, geom = make_case(
        rng,
        rank=rank,
        kernel=kernel,
        stride=stride,
        dilation=dilation,
        padding=padding,
        spatial=spatial,
        channel=channel,
        filt=filt,
        bias=bias,
        size=5 if rank == 3 else 6,
        **kw,
    )
    check_all_strategies(arrays, geom)


def _random_configs(n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        rank = int(rng.choice([1, 2, 2, 3]))
        kernel = int(rng.choice([1, 2, 3])) if rank == 3 else int(rng.choice([1, 2, 3, 5]))
        groups = int(rng.choice([1, 2, 3]))
        padding = rng.choice(["SAME", "VALID", "explicit"])
        if padding == "explicit":
            padding = tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(rank))
        yield dict(
            rank=rank,
            kernel=kernel,
            stride=int(rng.integers(1, 4)),
            dilation=int(rng.integers(1, 3)),
            groups=groups,
            padding=padding,
            spatial=bool(rng.random() < 0.5),
            channel=bool(rng.random() < 0.5),
            filt=bool(rng.random() < 0.5),
            bias=bool(rng.random() < 0.5),
            batch=int(rng.integers(1, 4)),
            cin_per_group=int(rng.integers(1, 4)),
            cout_per_group=int(rng.integers(1, 4)),
            size=int(rng.integers(5, 9)) if rank < 3 else 5,
            experts=int(rng.integers(1, 5)),
        )


@pytest.mark.parametrize(
    "config",
    # Three configurations in the fast loop, the other five with the slow tests.
    [c if i < 3 else pytest.param(c, marks=pytest.mark.slow) for i, c in enumerate(_random_configs(8))],
    ids=lambda c: "rank{rank}-k{kernel}-s{stride}-d{dilation}-g{groups}".format(**c),
)
def test_strategies_match_naive_loop_random(config, float64):
    rng = np.random.default_rng(zlib.crc32(str(sorted(config.items())).encode()))
    arrays, geom = make_case(rng, **config)
    check_all_strategies(arrays, geom)


def test_auto_picks_only_applicable_strategies():
    shapes = itertools.product(
        [1, 2, 32],
        [(4,), (32, 32), (4, 4), (8, 8, 8)],
        [1, 3, 5],
        [1, 2],
        [False, True],
        [(64, 1), (64, 64)],
        ["cpu", "gpu", "tpu"],
    )
    for batch, spatial, k, stride, spatial_att, (cin, groups), backend in shapes:
        rank = len(spatial)
        x_shape = (batch,) + spatial + (cin,)
        e_shape = (4,) + (k,) * rank + (cin // groups, 64)
        choice = ops.choose_strategy(
            x_shape,
            e_shape,
            strides=(stride,) * rank,
            dilation=(1,) * rank,
            groups=groups,
            spatial_attention=spatial_att,
            backend=backend,
        )
        assert choice in ops.applicable_strategies((k,) * rank), (x_shape, e_shape)


def test_inapplicable_strategies_raise_clear_errors():
    x = jnp.ones((2, 5, 5, 3))
    experts = jnp.ones((4, 3, 3, 3, 4))
    a = jnp.ones((2, 4))
    geom = dict(strides=(1, 1), padding="SAME", dilation=(1, 1))
    with pytest.raises(ValueError, match="1x1 kernel"):
        ops.dynamic_conv(x, experts, a, strategy="pointwise", **geom)
    with pytest.raises(ValueError, match="strategy='nope'"):
        ops.dynamic_conv(x, experts, a, strategy="nope", **geom)
    with pytest.raises(ValueError, match="groups=2"):
        ops.dynamic_conv(x, experts, a, groups=2, **geom)
    with pytest.raises(ValueError, match="output would be empty"):
        ops.dynamic_conv(
            x, jnp.ones((4, 7, 7, 3, 4)), a, strategy="shifted", strides=(1, 1), padding="VALID", dilation=(1, 1)
        )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["map", "lean"])
def test_custom_vjp_strategies_second_order_gradients_equal_vmap(strategy, float64):
    """'map' and 'lean' have a custom VJP made of differentiable ops, so grad-of-grad (gradient penalties,
    MAML) is exact."""
    arrays, geom = make_case(
        np.random.default_rng(5),
        rank=2,
        kernel=3,
        stride=2,
        dilation=2,
        groups=2,
        padding="SAME",
        spatial=True,
        channel=False,
        filt=False,
        bias=False,
        batch=3,
    )
    x, experts, a, s = (jnp.asarray(arrays[n]) for n in ("x", "experts", "kernel_attention", "spatial_attention"))

    def penalty(strategy):
        def inner(x, experts):
            return jnp.sum(ops.dynamic_conv(x, experts, a, spatial_attention=s, **geom, strategy=strategy) ** 3)

        return lambda x, experts: jnp.sum(jax.grad(inner)(x, experts) ** 2)

    got = jax.grad(penalty(strategy), argnums=(0, 1))(x, experts)
    want = jax.grad(penalty("vmap"), argnums=(0, 1))(x, experts)
    for g, w in zip(got, want):
        assert float(jnp.max(jnp.abs(w))) > 0
        assert rel(g, w) <= TOL


@pytest.mark.slow
def test_lean_strategy_over_several_chunks(monkeypatch, float64):
    """'lean' scans over chunks of samples (at most _LEAN_CHUNK_VALUES kernel values each), the experts' gradient
    summed over them: 3 chunks of 2 samples, against the naive loop."""
    monkeypatch.setattr(ops, "_LEAN_CHUNK_VALUES", 2 * 108)
    assert [ops._chunk_size(b, 108) for b in (6, 7, 1)] == [2, 1, 1] and ops._chunk_size(6, 54) == 3
    arrays, geom = make_case(
        np.random.default_rng(12),
        rank=2,
        kernel=3,
        stride=1,
        dilation=1,
        groups=2,
        padding="SAME",
        spatial=True,
        channel=True,
        filt=True,
        bias=True,
        batch=6,
    )
    assert np.prod(arrays["experts"].shape[1:]) == 108
    monkeypatch.setattr(ops, "applicable_strategies", lambda kernel_size: ("lean",))
    check_all_strategies(arrays, geom)


# ODConv's channel / filter attentions scale the per-sample kernel or the activations, whichever holds
# fewer values (ops.attention_placement); each placement, every strategy, against the naive loop.
PLACEMENTS = [  # (kernel, size, stride, cin_per_group, cout_per_group) -> (fold_channel, fold_filter)
    ((3, 6, 1, 2, 3), (True, True)),  # kernel 54 values; input 72, output 108
    ((5, 3, 1, 4, 4), (False, False)),  # kernel 400; input 36, output 36
    ((3, 8, 4, 2, 2), (True, False)),  # kernel 36; input 128, output 2x2 positions x 2 = 8
    ((3, 3, 1, 1, 2), (False, True)),  # kernel 18; input 9, output 18
]


@pytest.mark.parametrize(  # the first placement in the fast loop, the other three with the slow tests
    "shape,expected",
    [pytest.param(*p, id=str(p[1]), marks=[pytest.mark.slow] if i else []) for i, p in enumerate(PLACEMENTS)],
)
def test_channel_and_filter_attention_placements(shape, expected, float64):
    kernel, size, stride, cin_per_group, cout_per_group = shape
    rng = np.random.default_rng(zlib.crc32(str(shape).encode()))
    arrays, geom = make_case(
        rng,
        rank=2,
        kernel=kernel,
        stride=stride,
        dilation=1,
        groups=1,
        padding="SAME",
        spatial=True,
        channel=True,
        filt=True,
        bias=True,
        size=size,
        cin_per_group=cin_per_group,
        cout_per_group=cout_per_group,
    )
    for strategy in set(ops.applicable_strategies((kernel, kernel))) - {"mix", "lean"}:
        placement = ops.attention_placement(
            arrays["x"].shape,
            arrays["experts"].shape,
            strides=geom["strides"],
            padding=geom["padding"],
            dilation=geom["dilation"],
            strategy=strategy,
            channel_attention=True,
            filter_attention=True,
        )
        assert placement == expected, strategy
    for strategy in ("mix", "lean"):  # no per-sample kernel ('lean' makes them chunk by chunk): the activations
        assert ops.attention_placement(
            arrays["x"].shape,
            arrays["experts"].shape,
            strides=geom["strides"],
            padding=geom["padding"],
            dilation=geom["dilation"],
            strategy=strategy,
            channel_attention=True,
            filter_attention=True,
        ) == (False, False)
    check_all_strategies(arrays, geom)


_SHARDED_MAP_RUN = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dynconv_jax import ops
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
x, e, a, s = (jnp.asarray(rng.normal(size=(16, 6, 6, 4))), jnp.asarray(rng.normal(size=(3, 3, 3, 4, 5))),
              jnp.asarray(rng.random((16, 3))), jnp.asarray(rng.random((16, 3, 3))))
batch, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
args = (jax.device_put(x, batch), jax.device_put(e, repl), jax.device_put(a, batch), jax.device_put(s, batch))
def loss(strategy):
    return lambda *v: jnp.sum(jnp.sin(ops.dynamic_conv(v[0], v[1], v[2], spatial_attention=v[3], strides=(1, 1),
                                                       padding="SAME", dilation=(1, 1), strategy=strategy)))
grad = lambda strategy: jax.jit(jax.value_and_grad(loss(strategy), argnums=(0, 1, 2, 3)))
forward = lambda strategy: jax.jit(lambda *v: ops.dynamic_conv(v[0], v[1], v[2], spatial_attention=v[3],
                                                                strides=(1, 1), padding="SAME", dilation=(1, 1),
                                                                strategy=strategy))
ref, ref_y = grad("vmap")(*args), forward("vmap")(*args)
for strategy in ("map", "lean"):
    with jax.set_mesh(mesh):
        out, y = grad(strategy)(*args), forward(strategy)(*args)
        hlo = grad(strategy).lower(*args).compile().as_text() + forward(strategy).lower(*args).compile().as_text()
    err = max(float(jnp.max(jnp.abs(p - q)) / jnp.max(jnp.abs(q)))
              for p, q in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)))
    print(strategy, "devices", jax.device_count(), "err", err, "all-gathers", hlo.count("all-gather("),
          "forward_err", float(jnp.max(jnp.abs(y - ref_y)) / jnp.max(jnp.abs(ref_y))), "spec", y.sharding.spec)
"""


@pytest.mark.slow
def test_map_and_lean_strategies_keep_a_sharded_batch_on_its_devices():
    """Under jax.set_mesh (as train/ runs its steps) 'map' and 'lean' map (scan) each device over its own
    samples: exact, and the compiled program gathers nothing (one lax.map over the global batch all-gathers)."""
    env = with_session_compile_flags(
        {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_ENABLE_X64": "1"}
    )
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED_MAP_RUN],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith(("map ", "lean "))]
    assert [line.split()[0] for line in lines] == ["map", "lean"], out.stdout
    for line in lines:
        fields = line.split()
        assert fields[2] == "8" and float(fields[4]) < 1e-12 and fields[6] == "0" and float(fields[8]) < 1e-12, line
        assert "data" in line.split("spec", 1)[1], line
