"""Tests of the Flax NNX front end (``dynconv_jax.nnx``): the NNX layers and models equal the Linen ones.

Given the same variables (Linen ``init``, randomised, loaded into the NNX module), the NNX module
must give the Linen module's outputs in float64 to 1e-12 relative (``max|a - b| / max|b|``):
forward in eval and train mode, the updated running statistics, gradients w.r.t. the input and
every parameter. Both front ends call the same core functions, so the measured differences are 0.
Also: same parameter tree, the same errors, nnx.jit / nnx.grad / value_and_grad, sowing under
``nnx.capture``, train()/eval(), bfloat16, conversion to and from PyTorch, the official ODConv
checkpoints' keys, and the NNX training example on the digits.
"""

from __future__ import annotations

import gzip
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_jax_layers import CORNERS, randomize, rel_err

import dynconv_jax as linen_layers
from dynconv_jax import models as linen_models
from dynconv_jax import nnx as dnnx
from dynconv_jax.convert import ConversionError, flax_to_torch, torch_to_flax
from dynconv_jax.nnx import models as nnx_models
from parity.nnx_api import compare_with_linen

# float64 throughout (the conftest fixture: switched on and off around each test, not for the worker process).
pytestmark = pytest.mark.usefixtures("float64")


KINDS = ("condconv", "dynamic", "odconv")
LINEN = {"condconv": linen_layers.CondConv, "dynamic": linen_layers.DynamicConv, "odconv": linen_layers.ODConv}
NNX = {"condconv": dnnx.CondConv, "dynamic": dnnx.DynamicConv, "odconv": dnnx.ODConv}


def layer_pair(kind, cfg, param_dtype=jnp.float64, **extra):
    """The Linen layer and the NNX layer of one config of the Linen test grid."""
    common = dict(
        kernel_size=cfg["kernel"],
        strides=cfg["strides"],
        padding=cfg["padding"],
        kernel_dilation=cfg["dilation"],
        feature_group_count=cfg["groups"],
        num_experts=cfg["K"],
        param_dtype=param_dtype,
        **extra,
    )
    if kind != "odconv":
        common["use_bias"] = cfg["bias"]
    else:
        common["min_channels"] = 3
    linen = LINEN[kind](features=cfg["cout"], **common)
    return linen, NNX[kind](cfg["cin"], cfg["cout"], rngs=nnx.Rngs(0), **common)


def shared_variables(linen, x, seed=3):
    variables = randomize(jax.eval_shape(linen.init, jax.random.key(1), x), seed=seed, dtype=x.dtype)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


# --------------------------------------------------------------------------- layers: NNX == Linen
# corners of the Linen grid: CondConv depthwise 5x5/2, DynamicConv 1-D dilated with explicit padding,
# ODConv 3-D grouped and 1x1 with K = 1 (its skips); `python -m parity.nnx_api` runs every parity case
# and `python -m parity --api nnx` the torch <-> NNX checks.
PARITY_CASES = [CORNERS[0], CORNERS[4 + 2], CORNERS[8 + 3], CORNERS[8 + 1]]


@pytest.mark.parametrize("case", PARITY_CASES, ids=[f"{k}-{c['rank']}d" for k, c in PARITY_CASES])
def test_nnx_layer_equals_linen_float64(case):
    kind, cfg = case
    linen, _ = layer_pair(kind, cfg)
    batch = max(cfg["batch"], 2)  # train mode through ODConv's attention BatchNorm needs B >= 2
    x = jax.random.normal(jax.random.key(0), (batch, *cfg["spatial"], cfg["cin"]), jnp.float64)
    errs = compare_with_linen(linen, shared_variables(linen, x), x, temperature=3.0)
    assert set(errs) == {"tree", "forward_eval", "forward_train", "running_stats", "grad_input", "grad_params"}
    assert max(errs.values()) <= 1e-12, errs


@pytest.mark.parametrize("norm", ["none"])
def test_nnx_odconv_attention_norm_equals_linen_on_a_batch_of_one(norm):
    """ODConv without attention normalisation: same tree, forward and gradients, training on one sample
    (the LayerNorm: ``python -m parity.nnx_api``; measured equal to 1e-12 when written)."""
    linen = linen_layers.ODConv(6, (3, 3), num_experts=2, min_channels=3, attention_norm=norm, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, 4), jnp.float64)
    variables = shared_variables(linen, x)
    assert ("ln" in variables["params"]["attention"]) == (norm == "layer") and not variables["batch_stats"]
    errs = compare_with_linen(linen, variables, x, temperature=1.0)
    assert max(errs.values()) <= 1e-12, errs


def test_nnx_parameter_tree_and_defaults_match_linen():
    x = jnp.zeros((2, 5, 5, 8))
    for kind, extra in [
        ("condconv", dict(use_bias=True, feature_group_count=2)),
        ("dynamic", {}),
        ("odconv", {}),
        ("odconv", dict(feature_group_count=8, num_experts=1)),
        ("condconv", dict(external_routing=True)),
    ]:
        linen_kw = {k: v for k, v in extra.items()}
        linen = LINEN[kind](8, (3, 3), **linen_kw)
        args = {"routing_weights": jnp.ones((2, extra.get("num_experts", 4)))} if extra.get("external_routing") else {}
        variables = jax.eval_shape(lambda: linen.init(jax.random.key(0), x, **args))
        layer = NNX[kind](8, 8, (3, 3), rngs=nnx.Rngs(0), **extra)
        expected = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
        got = dnnx.linen_variables(layer)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), got) == jax.tree.map(lambda a: (a.shape, a.dtype), expected)
    # the NNX convention: a new layer is in training mode; the default init is the Linen one's
    od = dnnx.ODConv(64, 128, (3, 3), rngs=nnx.Rngs(0))
    assert od.attention.bn.use_running_average is False
    np.testing.assert_allclose(np.std(od.kernel[...]), np.sqrt(2 / (128 * 9)), rtol=0.02)
    cond = dnnx.CondConv(64, 128, (3, 3), use_bias=True, rngs=nnx.Rngs(0))
    bound = 1 / np.sqrt(64 * 9)
    assert 0.95 * bound < np.abs(cond.kernel[...]).max() <= bound and np.abs(cond.bias[...]).max() <= bound


def test_nnx_errors_match_linen():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"ODConv\(in_features=4.*kernel_size=\(3, 3, 3, 3\).*sequence of 1, 2 or 3"):
        dnnx.ODConv(4, 4, (3, 3, 3, 3), rngs=rngs)
    with pytest.raises(ValueError, match="feature_group_count=3 does not divide out_features=4"):
        dnnx.DynamicConv(6, 4, (3, 3), feature_group_count=3, rngs=rngs)
    with pytest.raises(ValueError, match="num_experts=0"):
        dnnx.CondConv(4, 4, (3, 3), num_experts=0, rngs=rngs)
    with pytest.raises(ValueError, match="strategy='fast'"):
        dnnx.CondConv(4, 4, (3, 3), strategy="fast", rngs=rngs)
    with pytest.raises(ValueError, match=r"routing_dropout=1.0 must be in \[0, 1\)"):
        dnnx.CondConv(4, 4, (3, 3), routing_dropout=1.0, rngs=rngs)
    layer = dnnx.DynamicConv(4, 6, (3, 3), rngs=rngs)
    with pytest.raises(ValueError, match=r"input shape \(2, 5, 5, 3\) has 3 channels.*in_features=4"):
        layer(jnp.zeros((2, 5, 5, 3)))
    with pytest.raises(ValueError, match="has rank 3, expected 4"):
        layer(jnp.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match="temperature=0.0 must be"):
        layer(jnp.zeros((2, 5, 5, 4)), temperature=0.0)
    od = dnnx.ODConv(4, 4, (3, 3), rngs=rngs)
    with pytest.raises(ValueError, match="training with a batch of 1"):
        od(jnp.zeros((1, 5, 5, 4)))
    od.eval()
    assert od(jnp.zeros((1, 5, 5, 4))).shape == (1, 5, 5, 4)
    ext = dnnx.CondConv(4, 4, (3, 3), external_routing=True, rngs=rngs)
    with pytest.raises(ValueError, match="external_routing=True needs routing_weights"):
        ext(jnp.zeros((2, 5, 5, 4)))
    with pytest.raises(ValueError, match=r"routing_weights shape \(2, 3\)"):
        ext(jnp.zeros((2, 5, 5, 4)), routing_weights=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="wrong shape: params:kernel"):
        dnnx.load_linen_variables(
            dnnx.CondConv(4, 4, (3, 3), rngs=rngs),
            {"params": {"kernel": jnp.zeros((4, 3, 3, 4, 5)), "routing_fn": dnnx.linen_variables(ext)["params"]}},
        )


@pytest.mark.parametrize("kind", list(NNX))
def test_nnx_refuses_bad_dtypes_bools_sizes_and_temperatures_as_linen(kind):
    """Issue 35, as tests/test_jax_layers.py for Linen: the constructor refuses before drawing a parameter
    (no error from inside jax.random, no XLA out-of-memory); a concrete temperature is checked under nnx.jit."""
    from test_jax_layers import BAD_CONFIGS

    cls = NNX[kind]
    for kwargs, match in BAD_CONFIGS:
        where = rf"{cls.__name__}\(in_features=4, out_features=4, kernel_size=\(3, 3\)\)"
        with pytest.raises(ValueError, match=rf"^{where}: {match}"):
            cls(4, 4, (3, 3), rngs=nnx.Rngs(0), **kwargs)
    with pytest.raises(ValueError, match=r"in_features=True must be a positive int"):
        cls(True, 4, (3, 3), rngs=nnx.Rngs(0))
    layer = cls(4, 4, (3, 3), rngs=nnx.Rngs(0))
    x = jnp.ones((2, 5, 5, 4))
    with pytest.raises(ValueError, match=r"temperature=-2.0 must be finite and > 0"):
        nnx.jit(lambda m, x: m(x, temperature=-2.0))(layer, x)
    for bad, match in ((True, "is a bool"), (1e-300, "is below 1e-06")):
        with pytest.raises(ValueError, match=rf"temperature={bad!r} {match}"):
            layer(x, temperature=bad)


def test_nnx_sow_capture_train_eval_and_dropout():
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 6), jnp.float32)
    od = dnnx.ODConv(6, 6, (3, 3), feature_group_count=6, num_experts=1, rngs=nnx.Rngs(0))  # depthwise, K = 1
    before = jax.tree.map(jnp.shape, nnx.state(od))
    od(x)
    assert jax.tree.map(jnp.shape, nnx.state(od)) == before  # a plain call records nothing
    _, inter = nnx.capture(od, nnx.Intermediate)(x)
    got = {name: value[0].shape for name, value in nnx.to_pure_dict(inter).items()}
    assert got == {"kernel_attention": (4, 1), "channel_attention": (4, 6), "spatial_attention": (4, 3, 3)}

    cond = dnnx.CondConv(6, 4, (3, 3), routing_dropout=0.5, rngs=nnx.Rngs(0, dropout=1))
    cond.eval()
    y_eval = cond(x)
    assert np.array_equal(cond(x), y_eval)
    cond.train()
    y_a, y_b = cond(x), cond(x)  # the dropout stream advances
    assert not np.allclose(y_a, y_eval) and not np.allclose(y_a, y_b)
    eval_view = nnx.view(cond, deterministic=True)
    assert np.array_equal(eval_view(x), y_eval)


def test_nnx_jit_grad_value_and_grad_and_optimizer():
    model = dnnx.ODConv(4, 4, (3, 3), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 5, 5, 4), jnp.float32)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer, x, temperature):
        traces.append(1)

        def loss(model):
            return jnp.mean(model(x, temperature=temperature) ** 2)

        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value, grads

    kernel0 = np.array(model.kernel[...])
    mean0 = np.array(model.attention.bn.mean[...])
    losses = [float(step(model, optimizer, x, jnp.float32(t))[0]) for t in (30.0, 10.0, 1.0)]
    assert len(traces) == 1  # the temperature is traced
    assert not np.allclose(model.kernel[...], kernel0) and not np.allclose(model.attention.bn.mean[...], mean0)
    _, grads = step(model, optimizer, x, jnp.float32(1.0))
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
        assert np.all(np.isfinite(leaf)) and np.abs(leaf).max() > 0, jax.tree_util.keystr(path)
    assert all(np.isfinite(losses))


@pytest.mark.parametrize("kind", KINDS)
def test_nnx_bfloat16(kind):
    cfg = dict(kernel=(3, 3), strides=(1, 1), padding="SAME", dilation=(1, 1), groups=1, K=4, cin=4, cout=4, bias=True)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4), jnp.float32)
    linen16, layer16 = layer_pair(kind, cfg, param_dtype=jnp.float32, dtype=jnp.bfloat16)
    variables = shared_variables(linen16, x)
    dnnx.load_linen_variables(layer16, variables)
    layer16.eval()
    y, inter = nnx.capture(layer16, nnx.Intermediate)(x)
    assert y.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.to_pure_dict(inter)))  # attention in float32
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(linen16.apply(variables, x), np.float32))


# --------------------------------------------------------------------------- conversion
def test_torch_to_flax_and_back_with_an_nnx_template():
    torch = pytest.importorskip("torch")
    from dynconv_torch import ODConv2d

    torch.manual_seed(0)
    ref = ODConv2d(6, 8, 3, padding=1, kernel_num=4).double().eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    ref.attention.bn.running_var.uniform_(0.5, 1.5)
    layer = dnnx.ODConv(6, 8, (3, 3), padding=1, min_channels=16, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert set(flax_to_torch(nnx.state(layer))) == set(ref.state_dict())  # NNX state -> torch keys
    dnnx.load_torch(layer, ref)  # torch_to_flax(source, template=the NNX module)
    layer.eval()
    x = np.random.default_rng(0).normal(size=(3, 6, 7, 7))
    expected = ref(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
    assert rel_err(layer(jnp.asarray(x.transpose(0, 2, 3, 1))), expected) <= 1e-12
    back = flax_to_torch(layer, like=ref)
    for key, value in ref.state_dict().items():
        assert torch.equal(back[key], value), key
    with pytest.raises(ConversionError, match="missing"):
        torch_to_flax({"weight": ref.weight}, nnx.state(layer))


MANIFEST = json.loads(
    gzip.decompress((pathlib.Path(__file__).parent / "data" / "official_odconv_models.json.gz").read_bytes())
)["models"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,build",
    [
        ("od_resnet18_k4", lambda rngs: nnx_models.create_model("od_resnet18", kernel_num=4, rngs=rngs)),
        ("od_resnet50_k1", lambda rngs: nnx_models.create_model("od_resnet50", kernel_num=1, rngs=rngs)),
        ("od_mobilenetv2_050_k4", lambda rngs: nnx_models.create_model("od_mobilenetv2_050", kernel_num=4, rngs=rngs)),
    ],
)
def test_official_odconv_checkpoint_keys_convert_into_nnx_models(name, build):
    """Every key of an official checkpoint (shapes from the manifest) converts into the NNX model."""
    model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))  # abstract: shapes only, no parameters allocated
    state_dict = {
        k: np.zeros(shape, np.int64 if k.endswith("num_batches_tracked") else np.float32)
        for k, shape in MANIFEST[name]["state_dict"].items()
    }
    converted = torch_to_flax(state_dict, model)
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    assert shapes(converted) == shapes(dnnx.linen_variables(model))


# --------------------------------------------------------------------------- models: NNX == Linen
ARCHS = {
    "resnet18": dict(base_width=4),
    "resnet34": dict(base_width=2),
    "resnet50": dict(base_width=2),
    "resnet101": dict(base_width=2),
    "mobilenet_v2": dict(width_mult=0.1),
    # ResNets of one block per stage: the resnet18..101 code with the shortest depths.
    "basic": dict(block="basic", layers=(1, 1, 1, 1), base_width=4),
    "bottleneck": dict(block="bottleneck", layers=(1, 1, 1, 1), base_width=2),
}
CONVS = ("static", "condconv", "dynamic", "odconv", "kernelwarehouse")


def model_pair(arch, conv):
    kwargs = dict(conv=conv, num_classes=5, stem="cifar", dropout=0.0, param_dtype=jnp.float64, **ARCHS[arch])
    name = "ResNet" if arch in ("basic", "bottleneck") else arch
    return getattr(linen_models, name)(**kwargs), lambda rngs: getattr(nnx_models, name)(rngs=rngs, **kwargs)


@pytest.mark.slow
def test_every_nnx_model_has_the_linen_parameter_tree():
    """Every conv type of each block kind (basic, bottleneck, inverted residual): ResNets of one block per stage
    (resnet18..101 are the same code with other depths from the spec table; building an NNX model under
    ``nnx.eval_shape`` costs time quadratic in its layers, and ``python -m parity.nnx_api`` compares the trees of
    every registered model)."""
    x = jnp.zeros((2, 8, 8, 3), jnp.float64)
    shapes = lambda tree: jax.tree.map(lambda a: (tuple(a.shape), a.dtype), tree)  # noqa: E731
    for arch in ("basic", "bottleneck", "mobilenet_v2"):
        for conv in CONVS:
            linen, build = model_pair(arch, conv)
            variables = jax.eval_shape(linen.init, jax.random.key(0), x)
            model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
            assert shapes(dnnx.linen_variables(model)) == shapes(
                {"params": variables["params"], "batch_stats": variables["batch_stats"]}
            ), (arch, conv)


@pytest.mark.slow
@pytest.mark.parametrize("block,conv", [("basic", "odconv"), ("bottleneck", "condconv"), ("mobilenet_v2", "static")])
def test_nnx_model_equals_linen_float64(block, conv):
    """Loss, running statistics, gradients, eval logits, for each block kind: ResNets of one block per stage
    (the resnet18..101 code with the shortest depths) and MobileNetV2's wiring with static convs (with dynamic
    ones its float64 training step was the file's slowest compilation, docs/performance.md; the NNX layers are
    compared above, and ``python -m parity.nnx_api`` runs every registered model x conv type)."""
    linen, _ = model_pair(block, conv)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3), jnp.float64)
    errs = compare_with_linen(linen, shared_variables(linen, x), x, temperature=2.0)
    assert max(errs.values()) <= 1e-12, errs


# --------------------------------------------------------------------------- the training example
@pytest.mark.slow
def test_nnx_training_example_learns_the_digits():
    from train.nnx_example import ExampleConfig, run

    accuracy = run(ExampleConfig(conv="dynamic", epochs=4, base_width=8), log=lambda _: None)
    assert accuracy >= 0.90


# --------------------------------------------------------------------------- parity against torch
@pytest.mark.slow
def test_parity_cli_runs_torch_against_nnx(capsys):
    pytest.importorskip("torch")
    from parity.__main__ import main

    assert (
        main(
            [
                "--api",
                "nnx",
                "--layers",
                "dynamic",
                "--models",
                "none",
                "--quick",
                "--dtypes",
                "float64",
                "--checks",
                "forward_eval,forward_train,grad_params",
                "--match",
                "g8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "dynamic/i8o8k3s1p1d1g8K4" in out and "0 failed" in out
