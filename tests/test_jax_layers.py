"""Tests of the Flax layers CondConv, DynamicConv, ODConv and the PyTorch-semantics BatchNorm.

The reference for every layer is a naive per-sample loop written here in plain jax.numpy /
``lax.conv_general_dilated`` (no dynconv_jax code): attention from the params, kernel
aggregation expert by expert, one single-sample convolution per sample. Relative error is
``max|a - b| / max|b|``.
"""

from __future__ import annotations

import math
import random

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _helpers import DIMENSION_NUMBERS, naive_dynamic_conv
from _xla_level import quick_compile
from jax import lax
from jax.test_util import check_grads

from dynconv_jax import BatchNorm, CondConv, DynamicConv, ODConv

LAYERS = {"condconv": CondConv, "dynamic": DynamicConv, "odconv": ODConv}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def randomize(variables, seed: int, dtype=jnp.float64):
    """Replace every leaf by random values so that no attention is trivial (running var > 0).

    NumPy draws: an eager ``jax.random`` draw compiles one XLA program per leaf shape."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), dtype)
        return jnp.asarray(0.5 * rng.standard_normal(leaf.shape), dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


# --------------------------------------------------------------------------- naive reference
def naive_attentions(kind, params, stats, x, temperature, train, bn_eps=1e-5):
    """Per-sample attentions from the params: returns (a [B,K], s [B,*k]|None, c [B,I]|None, f [B,O]|None)."""
    rank = x.ndim - 2
    pooled = jnp.stack([x[b].mean(axis=tuple(range(rank))) for b in range(x.shape[0])])  # [B, I]
    sig = lambda z: 1.0 / (1.0 + jnp.exp(-z / temperature))  # noqa: E731
    smax = lambda z: jnp.exp(z / temperature) / jnp.exp(z / temperature).sum(-1, keepdims=True)  # noqa: E731
    if kind == "condconv":
        r = params["routing_fn"]
        return sig(pooled @ r["kernel"] + r["bias"]), None, None, None
    att = params["attention"]
    if kind == "dynamic":
        h = jnp.maximum(pooled @ att["fc1"]["kernel"] + att["fc1"]["bias"], 0.0)
        return smax(h @ att["fc2"]["kernel"] + att["fc2"]["bias"]), None, None, None
    z = pooled @ att["fc"]["kernel"]  # [B, A]
    if train:  # batch statistics, biased variance
        mean, var = z.mean(0), ((z - z.mean(0)) ** 2).mean(0)
    else:
        mean, var = stats["attention"]["bn"]["mean"], stats["attention"]["bn"]["var"]
    h = (z - mean) / jnp.sqrt(var + bn_eps) * att["bn"]["scale"] + att["bn"]["bias"]
    h = jnp.maximum(h, 0.0)
    head = lambda n: h @ att[n]["kernel"] + att[n]["bias"]  # noqa: E731
    kernel = params["kernel"]
    k_shape = kernel.shape[1:-2]
    a = smax(head("kernel_fc")) if "kernel_fc" in att else jnp.ones((x.shape[0], 1), x.dtype)
    s = sig(head("spatial_fc")).reshape((x.shape[0], *k_shape)) if "spatial_fc" in att else None
    f = sig(head("filter_fc")) if "filter_fc" in att else None
    return a, s, sig(head("channel_fc")), f


def naive_layer(kind, variables, x, cfg, temperature=1.0, train=False):
    """The naive per-sample loop: for each b, aggregate the kernel, convolve that one sample."""
    params = variables["params"]
    a, s, c, f = naive_attentions(kind, params, variables.get("batch_stats"), x, temperature, train)
    return naive_dynamic_conv(
        x,
        params["kernel"],
        a,
        s,
        c,
        f,
        params.get("bias"),
        strides=cfg["strides"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=cfg["groups"],
    )


def make_layer(kind, cfg, **extra):
    kwargs = dict(
        features=cfg["cout"],
        kernel_size=cfg["kernel"],
        strides=cfg["strides"],
        padding=cfg["padding"],
        kernel_dilation=cfg["dilation"],
        feature_group_count=cfg["groups"],
        num_experts=cfg["K"],
    )
    if kind != "odconv":
        kwargs["use_bias"] = cfg["bias"]
    if kind == "odconv":
        kwargs["min_channels"] = 3  # small attention width keeps shapes tiny
    kwargs.update(extra)
    return LAYERS[kind](**kwargs)


# --------------------------------------------------------------------------- the randomized config grid
def random_config(rng: random.Random, rank: int):
    kernel = tuple(rng.choice((1, 3, 5)) if rank < 3 else rng.choice((1, 3)) for _ in range(rank))
    strides = tuple(rng.choice((1, 2)) for _ in range(rank))
    dilation = tuple(rng.choice((1, 2)) for _ in range(rank))
    groups_kind = rng.choice(("1", "2", "depthwise"))
    if groups_kind == "depthwise":
        cin = cout = groups = rng.choice((2, 4))
    else:
        groups = int(groups_kind)
        cin, cout = 2 * rng.randint(1, 3), 2 * rng.randint(1, 3)
    pad_kind = rng.choice(("SAME", "VALID", "explicit"))
    padding = pad_kind if pad_kind != "explicit" else tuple((rng.randint(0, 2), rng.randint(0, 2)) for _ in range(rank))
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    spatial = tuple(max(e, rng.choice((3, 5, 7) if rank < 3 else (3, 5))) for e in extent)
    return dict(
        rank=rank,
        kernel=kernel,
        strides=strides,
        dilation=dilation,
        groups=groups,
        cin=cin,
        cout=cout,
        padding=padding,
        spatial=spatial,
        K=rng.choice((1, 4)),
        bias=rng.random() < 0.5,
        batch=rng.choice((1, 2, 3)),
    )


def config_grid():
    """``(hand-picked corners, random configurations)``, each a list of ``(kind, config)``."""
    rng = random.Random(20261123)
    cases, random_cases = [], []
    for kind in LAYERS:
        # hand-picked corners: depthwise 5x5 stride 2, pointwise K=1 batch 1, 1-D dilated VALID, 3-D grouped
        cases.append(
            (
                kind,
                dict(
                    rank=2,
                    kernel=(5, 5),
                    strides=(2, 2),
                    dilation=(1, 1),
                    groups=4,
                    cin=4,
                    cout=4,
                    padding="SAME",
                    spatial=(7, 9),
                    K=4,
                    bias=True,
                    batch=2,
                ),
            )
        )
        cases.append(
            (
                kind,
                dict(
                    rank=2,
                    kernel=(1, 1),
                    strides=(1, 1),
                    dilation=(1, 1),
                    groups=1,
                    cin=3,
                    cout=5,
                    padding="VALID",
                    spatial=(5, 3),
                    K=1,
                    bias=False,
                    batch=1,
                ),
            )
        )
        cases.append(
            (
                kind,
                dict(
                    rank=1,
                    kernel=(3,),
                    strides=(2,),
                    dilation=(2,),
                    groups=2,
                    cin=4,
                    cout=6,
                    padding=((2, 1),),
                    spatial=(9,),
                    K=4,
                    bias=True,
                    batch=3,
                ),
            )
        )
        cases.append(
            (
                kind,
                dict(
                    rank=3,
                    kernel=(3, 1, 3),
                    strides=(1, 2, 1),
                    dilation=(1, 1, 2),
                    groups=2,
                    cin=2,
                    cout=4,
                    padding="VALID",
                    spatial=(3, 4, 5),
                    K=4,
                    bias=False,
                    batch=2,
                ),
            )
        )
        for rank in (1, 2, 3):
            random_cases.append((kind, random_config(rng, rank)))
    return cases, random_cases


CORNERS, RANDOM_CASES = config_grid()


def _grid_id(case):
    kind, c = case
    return f"{kind}-{c['rank']}d-k{c['kernel']}-s{c['strides']}-d{c['dilation']}-g{c['groups']}-K{c['K']}-B{c['batch']}"


@pytest.mark.parametrize(
    "case",
    # The hand-picked corners in the fast loop, the random configurations with the slow tests.
    [pytest.param(c, id=_grid_id(c)) for c in CORNERS]
    + [pytest.param(c, id=_grid_id(c), marks=pytest.mark.slow) for c in RANDOM_CASES],
)
def test_layer_equals_naive_per_sample_loop_float64(case, float64):
    kind, cfg = case
    layer = make_layer(kind, cfg, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (cfg["batch"], *cfg["spatial"], cfg["cin"]), jnp.float64)
    variables = randomize(layer.init(jax.random.key(0), x), seed=2)
    temperature = 1.7
    y = layer.apply(variables, x, temperature=temperature)
    assert y.dtype == jnp.float64
    ref = naive_layer(kind, variables, x, cfg, temperature)
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= 1e-12
    if kind == "odconv" and cfg["batch"] > 1:  # training: batch statistics + unbiased running-var update
        y_train, state = layer.apply(variables, x, train=True, temperature=temperature, mutable=["batch_stats"])
        assert rel_err(y_train, naive_layer(kind, variables, x, cfg, temperature, train=True)) <= 1e-12
        z = jnp.stack([x[b].mean(axis=tuple(range(cfg["rank"]))) for b in range(x.shape[0])])
        z = z @ variables["params"]["attention"]["fc"]["kernel"]
        old = variables["batch_stats"]["attention"]["bn"]
        new = state["batch_stats"]["attention"]["bn"]
        n = cfg["batch"]
        assert rel_err(new["mean"], 0.9 * old["mean"] + 0.1 * z.mean(0)) <= 1e-14
        assert rel_err(new["var"], 0.9 * old["var"] + 0.1 * z.var(0) * n / (n - 1)) <= 1e-14


# --------------------------------------------------------------------------- gradients
TINY = dict(
    rank=2,
    kernel=(3, 3),
    strides=(1, 1),
    dilation=(1, 1),
    groups=1,
    cin=2,
    cout=3,
    padding="SAME",
    spatial=(4, 3),
    K=2,
    bias=True,
    batch=2,
)


@pytest.mark.parametrize("kind,train", [("condconv", False), ("dynamic", False), ("odconv", False), ("odconv", True)])
@pytest.mark.parametrize(
    "strategy,modes", [("map", ("rev",)), pytest.param("patches", ("fwd", "rev"), marks=pytest.mark.slow)]
)
def test_gradients_match_finite_differences_float64(kind, train, strategy, modes, float64):
    """'map' (what 'auto' runs on CPU) has a custom VJP: reverse mode only; the others also forward mode."""
    layer = make_layer(kind, TINY, param_dtype=jnp.float64, strategy=strategy)
    x = jax.random.normal(jax.random.key(3), (2, 4, 3, 2), jnp.float64)
    variables = randomize(layer.init(jax.random.key(0), x), seed=4)
    stats = {k: v for k, v in variables.items() if k != "params"}

    def f(params, x, temperature):
        y = layer.apply(
            {"params": params, **stats},
            x,
            train=train,
            temperature=temperature,
            mutable=["batch_stats"] if train else False,
        )
        return y[0] if train else y

    check_grads(f, (variables["params"], x, jnp.float64(1.3)), order=1, modes=modes)


# --------------------------------------------------------------------------- K=1, neutral attention == nn.Conv
NEUTRAL = [
    dict(
        rank=2,
        kernel=(3, 3),
        strides=(2, 1),
        dilation=(1, 2),
        groups=2,
        cin=4,
        cout=6,
        padding=((1, 0), (2, 1)),
        spatial=(7, 8),
        K=1,
        bias=True,
        batch=3,
    ),
    dict(
        rank=3,
        kernel=(1, 1, 1),
        strides=(1, 1, 1),
        dilation=(1, 1, 1),
        groups=1,
        cin=3,
        cout=2,
        padding="SAME",
        spatial=(3, 2, 3),
        K=1,
        bias=False,
        batch=2,
    ),
    dict(
        rank=1,
        kernel=(5,),
        strides=(1,),
        dilation=(1,),
        groups=4,
        cin=4,
        cout=4,
        padding="VALID",
        spatial=(9,),
        K=1,
        bias=True,
        batch=2,
    ),
]


def neutral_variables(kind, variables, weight, bias):
    """Exactly neutral attention for K = 1, compensated by power-of-two expert scaling (exact in floating point).

    CondConv: routing_fn = 0 -> r = sigmoid(0) = 1/2; experts 2W, bias 2b.
    DynamicConv: softmax over one expert = 1 whatever the logits; experts W, bias b.
    ODConv (eval, BN scale 0 / bias 0 -> h = 0): channel, filter, spatial heads zero -> 1/2 each
    (filter skipped for depthwise, spatial for 1x1); experts 2^(number of active heads) W.
    """
    params = jax.tree.map(lambda v: v, variables["params"])
    if kind == "condconv":
        params["routing_fn"] = jax.tree.map(jnp.zeros_like, params["routing_fn"])
        factor = 2.0
    elif kind == "dynamic":
        factor = 1.0
    else:
        att = params["attention"]
        att["bn"] = {"scale": jnp.zeros_like(att["bn"]["scale"]), "bias": jnp.zeros_like(att["bn"]["bias"])}
        heads = [n for n in ("channel_fc", "filter_fc", "spatial_fc") if n in att]
        assert "kernel_fc" not in att
        for n in heads:
            att[n] = jax.tree.map(jnp.zeros_like, att[n])
        factor = 2.0 ** len(heads)
    params["kernel"] = factor * weight[None]
    if bias is not None:
        params["bias"] = factor * bias[None]
    return {**variables, "params": params}


@pytest.mark.xla_default_bits
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("cfg", NEUTRAL, ids=["2d-grouped", "3d-pointwise", "1d-depthwise"])
def test_k1_neutral_attention_equals_flax_conv(kind, cfg, float64):
    conv = nn.Conv(
        cfg["cout"],
        cfg["kernel"],
        strides=cfg["strides"],
        padding=cfg["padding"],
        kernel_dilation=cfg["dilation"],
        feature_group_count=cfg["groups"],
        use_bias=cfg["bias"] and kind != "odconv",
        param_dtype=jnp.float64,
    )
    x = jax.random.normal(jax.random.key(5), (cfg["batch"], *cfg["spatial"], cfg["cin"]), jnp.float64)
    conv_vars = randomize(conv.init(jax.random.key(6), x), seed=7)
    expected = conv.apply(conv_vars, x)
    for strategy in ("vmap", "auto"):
        layer = make_layer(kind, cfg, param_dtype=jnp.float64, strategy=strategy)
        variables = randomize(layer.init(jax.random.key(0), x), seed=8)
        variables = neutral_variables(kind, variables, conv_vars["params"]["kernel"], conv_vars["params"].get("bias"))
        y, state = layer.apply(variables, x, temperature=3.0, mutable=["intermediates"])
        if strategy == "vmap" and not quick_compile():  # the same single convolution per sample: bit-identical
            np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
        else:  # other exact strategies sum in another order (as the suite's quick XLA options do for vmap's)
            assert rel_err(y, expected) <= 1e-14
        for name, value in state["intermediates"].items():
            if name != "kernel_attention" or kind == "condconv":
                assert np.all(np.asarray(value[0]) == (0.5 if kind != "dynamic" else 1.0)), name


# --------------------------------------------------------------------------- jit, temperature, grad, bfloat16
SMALL = dict(
    rank=2,
    kernel=(3, 3),
    strides=(1, 1),
    dilation=(1, 1),
    groups=1,
    cin=4,
    cout=4,
    padding="SAME",
    spatial=(5, 5),
    K=4,
    bias=True,
    batch=2,
)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_jit_compiles_once_for_several_temperatures(kind):
    layer = make_layer(kind, SMALL)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
    variables = randomize(layer.init(jax.random.key(1), x), seed=3, dtype=jnp.float32)
    traces = []

    @jax.jit
    def apply(variables, x, temperature):
        traces.append(1)
        return layer.apply(variables, x, temperature=temperature, mutable=["intermediates"])

    outputs = [apply(variables, x, jnp.float32(t)) for t in (30.0, 10.0, 1.0, 0.5)]
    assert len(traces) == 1
    attn = [np.asarray(o[1]["intermediates"]["kernel_attention"][0]) for o in outputs]
    # annealing sharpens the attention: the entropy over experts falls as T falls (DynamicConv/ODConv
    # softmax); CondConv's sigmoids move away from 1/2
    spread = [np.abs(a - (0.5 if kind == "condconv" else 0.25)).mean() for a in attn]
    assert spread == sorted(spread) and spread[0] < spread[-1]
    eager = layer.apply(variables, x, temperature=10.0)
    assert rel_err(outputs[1][0], eager) <= 1e-6


@pytest.mark.parametrize("kind", list(LAYERS))
def test_grad_under_jit_reaches_every_parameter(kind):
    layer = make_layer(kind, SMALL)
    x = jax.random.normal(jax.random.key(0), (3, 5, 5, 4))
    variables = randomize(layer.init(jax.random.key(1), x), seed=3, dtype=jnp.float32)
    if kind == "dynamic":  # keep every fc1 unit active so that each bias has a gradient
        fc1 = variables["params"]["attention"]["fc1"]
        fc1["bias"] = jnp.abs(fc1["bias"]) + 1.0
    train = kind == "odconv"

    @jax.jit
    def grads(params, x):
        def loss(params):
            y = layer.apply(
                {**variables, "params": params}, x, train=train, mutable=["batch_stats"] if train else False
            )
            y = y[0] if train else y
            return jnp.sum(y**2)

        return jax.grad(loss)(params)

    g = grads(variables["params"], x)
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        assert np.all(np.isfinite(leaf)), path
        assert np.abs(leaf).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("kind", list(LAYERS))
def test_bfloat16_dtype(kind):
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
    ref_layer = make_layer(kind, SMALL)
    variables = randomize(ref_layer.init(jax.random.key(1), x), seed=3, dtype=jnp.float32)
    expected = ref_layer.apply(variables, x)
    layer = make_layer(kind, SMALL, dtype=jnp.bfloat16)
    y, state = jax.jit(lambda v, x: layer.apply(v, x, mutable=["intermediates"]))(variables, x)
    assert y.dtype == jnp.bfloat16
    for value in jax.tree.leaves(state["intermediates"]):
        assert value.dtype == jnp.float32  # the attention branch runs in float32
    # bfloat16 has an 8-bit mantissa (2^-8 = 3.9e-3 relative rounding)
    assert rel_err(y, expected) <= 3e-2
    params16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), variables)
    y16 = make_layer(kind, SMALL, param_dtype=jnp.bfloat16).apply(params16, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16 and rel_err(y16, expected) <= 3e-2


# --------------------------------------------------------------------------- intermediates, routing, dropout
@pytest.mark.parametrize(
    "kind,cfg,expected",
    [
        ("condconv", SMALL, {"kernel_attention": (2, 4)}),
        ("dynamic", SMALL, {"kernel_attention": (2, 4)}),
        (
            "odconv",
            SMALL,
            {
                "kernel_attention": (2, 4),
                "channel_attention": (2, 4),
                "filter_attention": (2, 4),
                "spatial_attention": (2, 3, 3),
            },
        ),
        (
            "odconv",
            dict(SMALL, rank=3, kernel=(3, 1, 2), strides=1, dilation=1, cin=3, cout=5, groups=1, spatial=(3, 3, 4)),
            {
                "kernel_attention": (2, 4),
                "channel_attention": (2, 3),
                "filter_attention": (2, 5),
                "spatial_attention": (2, 3, 1, 2),
            },
        ),
        (
            "odconv",
            dict(SMALL, groups=4, K=1),
            {"kernel_attention": (2, 1), "channel_attention": (2, 4), "spatial_attention": (2, 3, 3)},
        ),  # depthwise: no filter attention
        (
            "odconv",
            dict(SMALL, kernel=(1, 1)),
            {"kernel_attention": (2, 4), "channel_attention": (2, 4), "filter_attention": (2, 4)},
        ),  # 1x1: no spatial attention
    ],
)
def test_sown_intermediates(kind, cfg, expected):
    layer = make_layer(kind, cfg)
    x = jax.random.normal(jax.random.key(0), (2, *cfg["spatial"], cfg["cin"]))
    variables = layer.init(jax.random.key(1), x)
    _, state = layer.apply(variables, x, mutable=["intermediates"])
    got = {name: value[0].shape for name, value in state["intermediates"].items()}
    assert got == expected
    a = np.asarray(state["intermediates"]["kernel_attention"][0])
    if kind == "condconv":
        assert np.all((a > 0) & (a < 1)) and not np.allclose(a.sum(-1), 1.0)  # independent sigmoids
    else:
        np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-6)  # softmax over experts
    if kind == "odconv" and "kernel_fc" not in variables["params"]["attention"]:
        assert np.all(a == 1.0)  # ODConv K == 1: skipped, constant 1
    skipped = {"filter_attention": "filter_fc", "spatial_attention": "spatial_fc"}
    if kind == "odconv":
        for name, fc in skipped.items():
            assert (name in got) == (fc in variables["params"]["attention"])


def test_param_tree_names_and_shapes():
    x = jnp.zeros((2, 5, 5, 8))
    shapes = lambda m: jax.tree.map(jnp.shape, m.init(jax.random.key(0), x))  # noqa: E731
    assert shapes(CondConv(6, (3, 3), feature_group_count=2, use_bias=True)) == {
        "params": {"kernel": (4, 3, 3, 4, 6), "bias": (4, 6), "routing_fn": {"kernel": (8, 4), "bias": (4,)}}
    }
    ext = CondConv(6, (3, 3), external_routing=True).init(jax.random.key(0), x, routing_weights=jnp.ones((2, 4)))
    assert jax.tree.map(jnp.shape, ext) == {"params": {"kernel": (4, 3, 3, 8, 6)}}
    assert shapes(DynamicConv(6, (3, 3), num_experts=3)) == {
        "params": {
            "kernel": (3, 3, 3, 8, 6),
            "bias": (3, 6),
            "attention": {"fc1": {"kernel": (8, 4), "bias": (4,)}, "fc2": {"kernel": (4, 3), "bias": (3,)}},
        }
    }
    a = 16  # max(int(8 / 16), 16)
    assert shapes(ODConv(6, (3, 3))) == {
        "params": {
            "kernel": (4, 3, 3, 8, 6),
            "attention": {
                "fc": {"kernel": (8, a)},
                "bn": {"scale": (a,), "bias": (a,)},
                "channel_fc": {"kernel": (a, 8), "bias": (8,)},
                "filter_fc": {"kernel": (a, 6), "bias": (6,)},
                "spatial_fc": {"kernel": (a, 9), "bias": (9,)},
                "kernel_fc": {"kernel": (a, 4), "bias": (4,)},
            },
        },
        "batch_stats": {"attention": {"bn": {"mean": (a,), "var": (a,)}}},
    }


def test_default_initializers_match_the_pytorch_references():
    """Statistics of the default initialisation (large layers so that sample moments are tight)."""
    x = jnp.zeros((2, 3, 3, 64))
    cond = CondConv(128, (3, 3), use_bias=True).init(jax.random.key(0), x)["params"]
    bound = 1 / math.sqrt(64 * 9)  # kaiming_uniform(a=sqrt(5)) and the bias: U(+-1/sqrt(fan_in))
    for leaf in (cond["kernel"], cond["bias"]):
        assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.95 * bound
    assert np.abs(cond["routing_fn"]["kernel"]).max() <= 1 / 8  # nn.Linear(64, K): U(+-1/sqrt(64))
    od = ODConv(128, (3, 3)).init(jax.random.key(0), x)["params"]
    # kaiming_normal(fan_out, relu): std = sqrt(2 / (128 * 9)) per expert; fc: sqrt(2 / A), A = 16
    np.testing.assert_allclose(np.std(od["kernel"]), math.sqrt(2 / (128 * 9)), rtol=0.02)
    np.testing.assert_allclose(np.std(od["attention"]["fc"]["kernel"]), math.sqrt(2 / 16), rtol=0.05)
    assert np.all(od["attention"]["channel_fc"]["bias"] == 0)
    assert np.all(od["attention"]["bn"]["scale"] == np.float32(0.1)) and np.all(od["attention"]["bn"]["bias"] == 0)
    official = ODConv(128, (3, 3), attention_bn_init=1.0).init(jax.random.key(0), x)["params"]
    assert np.all(official["attention"]["bn"]["scale"] == 1)  # the official BN init, every other leaf as the default
    official["attention"]["bn"]["scale"] = od["attention"]["bn"]["scale"]
    jax.tree.map(np.testing.assert_array_equal, official, od)
    custom = DynamicConv(4, (3, 3), kernel_init=nn.initializers.zeros, bias_init=nn.initializers.ones)
    p = custom.init(jax.random.key(0), x)["params"]
    assert np.all(p["kernel"] == 0) and np.all(p["bias"] == 1)


def test_condconv_routing_dropout_and_external_routing():
    layer = CondConv(4, (3, 3), routing_dropout=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 6))
    variables = layer.init(jax.random.key(1), x)
    y_eval = layer.apply(variables, x)
    assert np.array_equal(
        layer.apply(variables, x, train=True, rngs={"dropout": jax.random.key(9)}),
        layer.apply(variables, x, train=True, rngs={"dropout": jax.random.key(9)}),
    )
    y_a = layer.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    y_b = layer.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(y_a, y_eval) and not np.allclose(y_a, y_b)
    with pytest.raises(Exception, match="dropout"):
        layer.apply(variables, x, train=True)  # no rng given
    no_dropout = CondConv(4, (3, 3))
    np.testing.assert_array_equal(no_dropout.apply(variables, x, train=True), no_dropout.apply(variables, x))

    ext = CondConv(4, (3, 3), external_routing=True, use_bias=True)
    weights = jax.nn.sigmoid(jax.random.normal(jax.random.key(4), (4, 4)))
    ev = ext.init(jax.random.key(1), x, routing_weights=weights)
    y, state = ext.apply(ev, x, routing_weights=weights, mutable=["intermediates"])
    np.testing.assert_array_equal(state["intermediates"]["kernel_attention"][0], weights)
    w = [sum(weights[b, k] * ev["params"]["kernel"][k] for k in range(4)) for b in range(4)]
    ref = jnp.stack(
        [
            lax.conv_general_dilated(x[b : b + 1], w[b], (1, 1), "SAME", dimension_numbers=DIMENSION_NUMBERS[2])[0]
            + weights[b] @ ev["params"]["bias"]
            for b in range(4)
        ]
    )
    assert rel_err(y, ref) <= 1e-5


# --------------------------------------------------------------------------- BatchNorm (PyTorch semantics)
def test_batchnorm_matches_torch_batchnorm_float64(float64):
    torch = pytest.importorskip("torch")
    bn = BatchNorm(param_dtype=jnp.float64)
    x0 = np.random.default_rng(0).normal(size=(3, 4, 5, 6))
    variables = bn.init(jax.random.key(0), jnp.asarray(x0), use_running_average=False)
    scale, bias = np.linspace(0.5, 1.5, 6), np.linspace(-1, 1, 6)
    variables = {
        "params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
        "batch_stats": variables["batch_stats"],
    }
    tbn = torch.nn.BatchNorm2d(6).double()
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(scale))
        tbn.bias.copy_(torch.from_numpy(bias))
    for step in range(3):  # training steps update the running statistics
        x = np.random.default_rng(step + 1).normal(loc=step, size=(3, 4, 5, 6))
        y, state = bn.apply(variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
        variables = {**variables, **state}
        ty = tbn.train()(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
        assert rel_err(y, ty) <= 1e-14
    stats = variables["batch_stats"]
    assert rel_err(stats["mean"], tbn.running_mean.numpy()) <= 1e-14
    assert rel_err(stats["var"], tbn.running_var.numpy()) <= 1e-14
    x = np.random.default_rng(9).normal(size=(2, 3, 3, 6))
    y = BatchNorm(use_running_average=True, param_dtype=jnp.float64).apply(variables, jnp.asarray(x))
    ty = tbn.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    assert rel_err(y, ty) <= 1e-14


def test_batchnorm_one_value_per_channel_raises():
    bn = BatchNorm()
    x = jnp.ones((1, 5))
    variables = bn.init(jax.random.key(0), x, use_running_average=False)  # init does not raise
    with pytest.raises(ValueError, match=r"BatchNorm .*more than one value per channel.*\(1, 5\)"):
        bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    bn.apply(variables, x, use_running_average=True)  # eval is fine
    bn.apply(variables, jnp.ones((1, 2, 5)), use_running_average=False, mutable=["batch_stats"])  # 2 values


def test_batchnorm_refuses_momentum_and_torch_momentum_is_one_minus_flax_momentum():
    """``momentum`` means the decay in flax and the new batch's weight in PyTorch: both front ends refuse it,
    naming ``torch_momentum``; ``torch_momentum=1 - m`` gives flax's ``momentum=m`` running mean."""
    from flax import linen, nnx

    from dynconv_jax import nnx as dnnx

    for build in (lambda: BatchNorm(momentum=0.9), lambda: dnnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))):
        with pytest.raises(TypeError, match=r"momentum=0.9 is not an argument.*decay.*torch_momentum=1 - m"):
            build()
    with pytest.raises(ValueError, match=r"torch_momentum=1.5 must be a number in \[0, 1\]"):
        BatchNorm(torch_momentum=1.5)
    x = jnp.asarray(np.random.default_rng(0).normal(loc=5.0, size=(8, 3)), jnp.float32)
    ours = BatchNorm(use_running_average=False, torch_momentum=0.1)
    flax_bn = linen.BatchNorm(use_running_average=False, momentum=0.9)
    means = [
        bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])[1]["batch_stats"]["mean"]
        for bn in (ours, flax_bn)
    ]
    np.testing.assert_allclose(means[0], means[1], rtol=1e-6)
    nnx_bn = dnnx.BatchNorm(3, torch_momentum=0.1, rngs=nnx.Rngs(0))
    nnx_bn(x)
    np.testing.assert_allclose(nnx_bn.mean[...], means[1], rtol=1e-6)


def test_odconv_training_with_a_batch_of_one_raises():
    layer = ODConv(4, (3, 3), min_channels=4)
    x = jnp.ones((1, 5, 5, 4))
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"ODConv .*batch of 1.*attention BatchNorm"):
        layer.apply(variables, x, train=True, mutable=["batch_stats"])
    layer.apply(variables, x)  # eval with a batch of one is fine


# --------------------------------------------------------------------------- error paths
class _Block(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x):
        return LAYERS[self.kind](4, (3, 3), name="conv")(x)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_errors_name_the_layer_and_the_shapes(kind):
    cls = LAYERS[kind]
    x = jnp.ones((2, 5, 5, 4))
    layer = cls(4, (3, 3))
    variables = layer.init(jax.random.key(0), x)
    name = cls.__name__
    with pytest.raises(ValueError, match=rf"{name} .*rank 3, expected 4"):
        layer.apply(variables, jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match=rf"{name} .*\(2, 5, 5, 6\).*\(4, 3, 3, 4, 4\)"):
        layer.apply(variables, jnp.ones((2, 5, 5, 6)))  # channel mismatch with the initialised params
    with pytest.raises(ValueError, match=rf"{name} .*feature_group_count=3 does not divide the 4 input"):
        cls(6, (3, 3), feature_group_count=3).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=rf"{name} .*feature_group_count=2 does not divide features=3"):
        cls(3, (3, 3), feature_group_count=2).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=rf"{name} .*num_experts=0"):
        cls(4, (3, 3), num_experts=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=rf"{name} .*bad padding.*CIRCULAR"):
        cls(4, (3, 3), padding="CIRCULAR").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=rf"{name} .*bad padding.*3 entries, expected 2"):
        cls(4, (3, 3), padding=(1, 1, 1)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=rf"{name} .*strides=\(0, 1\) must be >= 1"):
        cls(4, (3, 3), strides=(0, 1)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=rf"{name} .*kernel_dilation=\(1, 1, 1\) has 3 entries"):
        cls(4, (3, 3), kernel_dilation=(1, 1, 1)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=rf"{name} .*spatial size \(2, 5\).*extent \(5, 5\)"):
        cls(4, (3, 3), padding="VALID", kernel_dilation=2).init(jax.random.key(0), jnp.ones((2, 2, 5, 4)))
    with pytest.raises(ValueError, match=rf"{name} .*strategy='fast'"):
        cls(4, (3, 3), strategy="fast").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=rf"{name} .*floating point"):
        layer.apply(variables, jnp.ones((2, 5, 5, 4), jnp.int32))
    with pytest.raises(ValueError, match=rf"{name} .*temperature must be a scalar"):
        layer.apply(variables, x, temperature=jnp.ones(2))
    with pytest.raises(ValueError, match=rf"{name} .*temperature=0"):
        layer.apply(variables, x, temperature=0)
    if kind != "condconv":
        with pytest.raises(ValueError, match=rf"{name} .*reduction=0"):
            cls(4, (3, 3), reduction=0).init(jax.random.key(0), x)
    # the path of a nested layer is in the message
    block = _Block(kind)
    bv = block.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=rf"{name} 'conv'.*\(2, 5, 5, 6\)"):
        block.apply(bv, jnp.ones((2, 5, 5, 6)))


def test_condconv_routing_argument_errors():
    x = jnp.ones((2, 5, 5, 4))
    ext = CondConv(4, (3, 3), external_routing=True)
    with pytest.raises(ValueError, match=r"CondConv .*external_routing=True needs routing_weights"):
        ext.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"CondConv .*routing_weights shape \(2, 3\) != .*\(2, 4\)"):
        ext.init(jax.random.key(0), x, routing_weights=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"CondConv .*routing_weights given but external_routing=False"):
        CondConv(4, (3, 3)).init(jax.random.key(0), x, routing_weights=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"CondConv .*routing_dropout=1.0"):
        CondConv(4, (3, 3), routing_dropout=1.0).init(jax.random.key(0), x)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match=r"ODConv .*attention_bn_init=.* must be a finite number > 0"):
            ODConv(4, (3, 3), attention_bn_init=bad).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"ODConv .*attention_norm='group': expected one of"):
        ODConv(4, (3, 3), attention_norm="group").init(jax.random.key(0), x)


def test_strategy_field_reaches_ops():
    """The layer's strategy field reaches ops: 'pointwise' refuses a 3x3 kernel; 'mix' equals 'vmap'."""
    x = jnp.ones((2, 5, 5, 4))
    with pytest.raises(ValueError, match="pointwise"):
        ODConv(4, (3, 3), strategy="pointwise").init(jax.random.key(0), x)
    y_mix = DynamicConv(4, (3, 3), strategy="mix")
    v = y_mix.init(jax.random.key(0), x)
    assert rel_err(y_mix.apply(v, x), DynamicConv(4, (3, 3), strategy="vmap").apply(v, x)) <= 1e-5


# --------------------------------------------------------------------------- issue 35: checks that held only eagerly
BAD_CONFIGS = [  # (layer arguments, the message after the layer's name); refused before any parameter is drawn
    (dict(param_dtype=jnp.int32), r"param_dtype='int32' must be a real floating-point dtype"),
    (dict(param_dtype=jnp.complex64), r"param_dtype='complex64' must be a real floating-point dtype"),
    (dict(dtype=jnp.int8), r"dtype='int8' must be a real floating-point dtype"),
    (dict(dtype="nope"), r"dtype='nope' must be a real floating-point dtype"),
    (dict(num_experts=True), r"num_experts=True must be an int >= 1"),
    (dict(feature_group_count=True), r"feature_group_count=True must be a positive int"),
    (
        dict(num_experts=10**9),
        r"the expert bank \[1000000000, 3, 3, 4, 4\] \(num_experts=1000000000\) would hold "
        r"1.44e\+11 parameters, 536 GiB in float32; one layer may hold at most 2\*\*31 - 1",
    ),
]


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("kwargs,match", BAD_CONFIGS, ids=[str(k) for k, _ in BAD_CONFIGS])
def test_bad_dtypes_bools_and_sizes_name_the_layer(kind, kwargs, match):
    """Errors from inside jax.random (an int or complex param_dtype), an int8 dtype, a bool taken as 1 and
    an out-of-memory error from XLA (num_experts=10**9): each is now a ValueError naming the layer."""
    cls = LAYERS[kind]
    with pytest.raises(ValueError, match=rf"^{cls.__name__} '<top level>': {match}"):
        jax.eval_shape(cls(4, (3, 3), **kwargs).init, jax.random.key(0), jnp.ones((2, 5, 5, 4)))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_concrete_temperature_is_checked_inside_a_trace(kind):
    """A Python or NumPy temperature is concrete even under jit (a closure constant, a static argument):
    it is checked as in eager mode. Only a traced T is clamped (tests/test_layer_checks.py)."""
    layer = LAYERS[kind](4, (3, 3))
    x = jnp.ones((2, 5, 5, 4))
    shapes = jax.eval_shape(layer.init, jax.random.key(0), x)
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"^{name} .*temperature=-2.0 must be finite and > 0"):
        jax.jit(lambda v, x: layer.apply(v, x, temperature=-2.0)).lower(shapes, x)
    static = jax.jit(lambda v, x, t: layer.apply(v, x, temperature=t), static_argnums=2)
    with pytest.raises(ValueError, match=rf"^{name} .*temperature=0.0 must be finite and > 0"):
        static.lower(shapes, x, 0.0)
    with pytest.raises(ValueError, match=rf"^{name} .*temperature=np.float32\(nan\) must be finite"):
        static.lower(shapes, x, np.float32("nan"))
    for bad, match in (
        (True, r"temperature=True is a bool"),
        (np.bool_(True), r"is a bool"),
        (1j, r"positive number"),
        (1e-300, r"temperature=1e-300 is below 1e-06, the smallest temperature the layers support"),
    ):
        with pytest.raises(ValueError, match=rf"^{name} .*{match}"):
            jax.eval_shape(lambda v: layer.apply(v, x, temperature=bad), shapes)  # noqa: B023
    with pytest.raises(ValueError, match=rf"^{name} .*traced temperature of dtype bool"):
        jax.jit(lambda v, x, t: layer.apply(v, x, temperature=t)).lower(shapes, x, jnp.bool_(True))
    for floor in (1e-6, np.float32(1e-6), ml_dtypes.bfloat16(1e-6)):  # the floor itself is fine, rounded too ...
        static.lower(shapes, x, floor)
    # ... and so is a huge T (the uniform limit)
    out = jax.eval_shape(lambda v: layer.apply(v, x, temperature=1e39, mutable=["intermediates"]), shapes)
    assert out[0].shape == (2, 5, 5, 4)
