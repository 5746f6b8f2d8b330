"""KernelWarehouse (Li & Yao, ICML 2024) against the official OSVAI/KernelWarehouse code.

``tests/data/official_kw_models.json.gz`` was measured by running the official code (commit in its
``source``; ``tests/data/make_official_kw.py`` wrote it): the state_dict manifests and parameter
counts of every official config, and the float64 logits and BatchNorm statistics of small
official models filled by a seeded procedure. These tests build the same models from
``dynconv_torch`` (and the warehouse plan of ``dynconv_spec``), fill them by the same procedure and
compare, so the official code is never vendored.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import sys

import numpy as np
import pytest
import torch
from _helpers import flax_leaf_counts, torch_to_flax_names, weight_names

from dynconv_spec import kernelwarehouse as kw
from dynconv_torch import KWConv1d, KWConv2d, KWConv3d, KWLinear, WarehouseManager, set_temperature
from dynconv_torch import models as tm

sys.path.insert(0, str(pathlib.Path(__file__).parent / "data"))
from make_official_kw import TAUS, relative_error, run_golden  # noqa: E402  (the generating script's procedure)

DATA = json.loads(gzip.decompress((pathlib.Path(__file__).parent / "data" / "official_kw_models.json.gz").read_bytes()))
MANIFESTS = DATA["manifests"]
GOLDEN = DATA["golden"]


def _torch_golden_model(spec: dict) -> torch.nn.Module:
    """The golden model of the official code, built from dynconv_torch's generic models."""
    options = dict(spec["kw"])
    reduction = options.pop("reduction", 0.0625)
    common = dict(
        conv="kernelwarehouse",
        num_classes=DATA["golden_procedure"]["num_classes"],
        dropout=0.0,
        reduction=reduction,
        conv_options=options,
    )
    if spec["arch"] == "resnet":
        return tm.ResNet(block=spec["block"], layers=tuple(spec["layers"]), **common)
    return tm.MobileNetV2(width_mult=spec["width_mult"], **common)


# --------------------------------------------------------------------------- the official configs
@pytest.mark.parametrize("config", sorted(MANIFESTS))
def test_official_config_state_dict_and_plan(config):
    """Key for key and shape for shape the official state_dict (strict loading), the official parameter
    count, and a plan whose warehouses are the official ``weights.{i}``."""
    entry = MANIFESTS[config]
    name, args = kw.config_model_args(config)
    recorded = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["args"].items()}  # JSON lists
    assert (name, args) == (entry["model"], recorded)
    with torch.device("meta"):
        model = tm.create_model(name, **args)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == entry["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"] == kw.OFFICIAL_PARAMS[config]
    plan = model.warehouse_manager.plan
    assert [[w.num_cells, *w.cell_shape] for w in plan.warehouses] == [
        entry["state_dict"][f"warehouse_manager.weights.{i}"] for i in range(len(plan.warehouses))
    ]


# --------------------------------------------------------------------------- outputs against the official code
@pytest.fixture
def one_torch_thread():
    """Single-threaded torch (float64 CPU convolutions oversubscribe a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Golden models that repeat the code paths of smaller ones at a larger size (ResNet 1× and 4× take the
#: same warm-up path as the MobileNetV2 1× and 4× models): with the slow tests only.
SLOW_GOLDEN = ("resnet_basic_2111_1x", "resnet_basic_1111_4x")


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_GOLDEN else n for n in sorted(GOLDEN)]
)
def test_outputs_equal_official_code_in_float64(name):
    """Logits in eval and train mode at tau = 1, 0.5, 0, and every BatchNorm's running statistics after
    those forwards, equal the official model's (same state_dict, float64): within 1e-12 relative, or ten
    times the value's reproducibility floor where the official code run with another thread count
    differs from itself by more (a randomly filled deep network in train mode amplifies rounding)."""
    golden = GOLDEN[name]
    torch.manual_seed(0)
    ours = run_golden(_torch_golden_model(golden["spec"]).double(), set_temperature)
    floors = golden["floors"]
    assert (
        sorted(ours["logits"])
        == sorted(golden["logits"])
        == sorted(f"{m}_tau{t:g}" for t in TAUS for m in ("eval", "train"))
    )
    for key, ref in golden["logits"].items():
        assert relative_error(ours["logits"][key], ref) <= max(1e-12, 10 * floors[key]), key
        ref = torch.tensor(ref, dtype=torch.float64)
        assert (ref - ref.mean(0)).abs().max() > 1e-3 * ref.abs().max(), f"{key}: logits do not depend on the input"
    assert sorted(ours["running_stat_sums"]) == sorted(golden["running_stat_sums"])
    keys = sorted(golden["running_stat_sums"])  # the JSON file keeps its keys sorted, the model its own order
    error = relative_error([ours["running_stat_sums"][k] for k in keys], [golden["running_stat_sums"][k] for k in keys])
    assert error <= max(1e-12, 10 * floors["running_stat_sums"])


def test_warmup_schedule_is_official():
    """tau falls linearly from 1 to 0 over temp_epoch epochs, counted from the step's 1-based iteration."""
    assert kw.warmup_temperature(0, 0, 100) == 1.0
    assert kw.warmup_temperature(1, 0, 100) == pytest.approx(1 - 1 / 2000)
    assert kw.warmup_temperature(50, 10, 100) == pytest.approx(0.475)
    assert kw.warmup_temperature(0, 20, 100) == 0.0 == kw.warmup_temperature(7, 30, 100)


# --------------------------------------------------------------------------- the layers
@pytest.mark.parametrize(
    "layer_cls,shape", [(KWConv1d, (2, 6, 9)), (KWConv2d, (2, 6, 7, 5)), (KWConv3d, (2, 6, 4, 5, 3))]
)
def test_standalone_layer_equals_its_per_sample_kernels(layer_cls, shape):
    """A stand-alone layer (own warehouse) is the static convolution of each sample's assembled kernel."""
    torch.manual_seed(0)
    layer = layer_cls(6, 8, 3, stride=2, padding=1, groups=2, bias=True, cell_num_ratio=2.0).double().eval()
    layer.update_temperature(0.3)
    x = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    kernels = layer.assemble(layer._attention(x), x.shape[0]).reshape(x.shape[0], 8, 3, *layer.kernel_size)
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[len(shape) - 3]
    expected = torch.cat([conv(x[b : b + 1], kernels[b], layer.bias, 2, 1, 1, 2) for b in range(x.shape[0])])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    assert sorted(layer.state_dict()) == [
        "attention.fc1.weight",
        "attention.fc2.bias",
        "attention.fc2.weight",
        "attention.norm1.bias",
        "attention.norm1.num_batches_tracked",
        "attention.norm1.running_mean",
        "attention.norm1.running_var",
        "attention.norm1.weight",
        "bias",
        "warehouse_manager.weights.0",
    ]


def test_cell_attention_is_normalized_signed_and_warms_up_to_one_hot():
    torch.manual_seed(0)
    layer = KWConv2d(8, 8, 3, padding=1).double().eval()
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    a = layer.cell_attention(x)  # [B, M, N], tau = 0
    assert a.shape == (3, 9, layer.layer.num_cells) and (a < 0).any()
    full = layer.attention.fc2(torch.relu(layer.attention.norm1(layer.attention.fc1(x.mean((2, 3))))))
    assert torch.all(a.abs().sum(-1) < 1.0) and torch.allclose(
        a.abs().sum(-1) + full.reshape(3, 9, -1)[..., -1].abs() / (full.reshape(3, 9, -1).abs().sum(-1) + 1e-3),
        (full.reshape(3, 9, -1).abs().sum(-1)) / (full.reshape(3, 9, -1).abs().sum(-1) + 1e-3),
    )
    layer.update_temperature(1.0)
    onehot = layer.cell_attention(x)
    assert torch.equal(onehot, torch.eye(9, dtype=torch.float64).expand(3, 9, 9))  # 1x: mixture m -> cell m


@pytest.mark.parametrize("basis_ratio", [1.0, 0.5])
def test_assignment_bias_init_points_the_attention_at_the_warm_up_cells(basis_ratio):
    """``assignment_bias_init``: zero (the official init) by default; set, fc2's bias (with a basis,
    ``basis_bias``) starts at it times the warm-up one-hots in PyTorch, Linen and NNX alike, and at tau = 0
    each mixture's largest weight is then its warm-up cell's."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dynconv_jax import KWConv
    from dynconv_jax.nnx import KWConv as NNXKWConv

    def initial_bias(params):
        return np.asarray(params["basis_bias"] if basis_ratio < 1 else params["fc2"]["bias"])

    options = dict(cell_num_ratio=2.0, nonlocal_basis_ratio=basis_ratio)
    torch.manual_seed(0)
    official = KWConv2d(4, 8, 3, padding=1, **options).attention
    official_bias = official.basis_bias if basis_ratio < 1 else official.fc2.bias
    assert not official_bias.detach().numpy().any()
    layer = KWConv2d(4, 8, 3, padding=1, assignment_bias_init=10.0, **options).double().eval()
    expected = 10.0 * np.asarray(layer.layer.temp_bias())
    torch_bias = layer.attention.basis_bias if basis_ratio < 1 else layer.attention.fc2.bias
    np.testing.assert_array_equal(torch_bias.detach().numpy(), expected)
    x = jnp.ones((2, 6, 6, 4))
    linen = KWConv(8, (3, 3), padding=1, assignment_bias_init=10.0, **options).init(jax.random.key(0), x)
    np.testing.assert_array_equal(initial_bias(linen["params"]["attention"]), expected)
    nnx_layer = NNXKWConv(4, 8, (3, 3), padding=1, assignment_bias_init=10.0, **options, rngs=nnx.Rngs(0))
    nnx_params = nnx.state(nnx_layer.attention, nnx.Param).to_pure_dict()
    np.testing.assert_array_equal(initial_bias(nnx_params), expected)
    a = layer.cell_attention(torch.randn(3, 4, 6, 6, dtype=torch.float64))  # tau = 0
    assert torch.equal(a.abs().argmax(-1), torch.tensor(layer.layer.assigned).expand(3, -1))


def test_manager_reserve_store_allocate_as_official():
    """The official flow: reserve (names fused by sharing_range; enabled=False gives nn.Conv2d), store, allocate."""
    manager = WarehouseManager(sharing_range=("layer", "conv"))
    net = torch.nn.Sequential(
        manager.reserve(4, 8, 3, padding=1, warehouse_name="stage0_layer0_conv0"),
        manager.reserve(8, 8, 3, padding=1, warehouse_name="stage0_layer1_conv1"),
        manager.reserve(8, 8, 1, warehouse_name="stage1_layer0_conv0", enabled=False),
        manager.reserve(8, 16, 1, warehouse_name="stage1_layer0_conv0", layer_type="conv2d"),
    )
    manager.store()
    manager.allocate(net)
    assert type(net[2]) is torch.nn.Conv2d and [net[i].warehouse_id for i in (0, 1, 3)] == [0, 0, 1]
    assert [w.name for w in manager.plan.warehouses] == ["stage0_layer_conv", "stage1_layer_conv"]
    assert [tuple(w.shape) for w in manager.weights] == [(9 + 18, 8, 4, 1, 1), (1, 16, 8, 1, 1)]
    assert net(torch.randn(2, 4, 5, 5)).shape == (2, 16, 5, 5)
    linear = KWLinear(12, 5, cell_num_ratio=1.0)
    assert linear(torch.randn(2, 3, 12)).shape == (2, 3, 5)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: KWConv2d(4, 8, 3, cell_num_ratio=0), r"cell_num_ratio=0 must be a number > 0"),
        (lambda: KWConv2d(4, 8, 3, assignment_bias_init=-1.0), r"assignment_bias_init=-1.0 must be a number >= 0"),
        (lambda: KWConv2d(4, 8, 3, sharing_range=3), r"sharing_range=3 must be a sequence"),
        (lambda: KWConv2d(4, 6, 3, groups=4), r"groups=4 must divide"),
        (lambda: KWConv2d(4, 8, (3, 3, 3)), r"kernel_size must be an int or a pair"),
        (lambda: KWConv2d(4, 8, 3, temperature=2.0), r"warm-up weight tau\) must be in \[0, 1\]"),
        (lambda: KWConv2d(6, 8, 3, cell_inplane_ratio=0.75), r"do not tile the kernel"),
        (lambda: tm.kw_resnet18(drop_path_rate=0.1), r"drop_path_rate=0.1: stochastic depth is not implemented"),
        (
            lambda: tm.resnet18(conv="kernelwarehouse", conv_options={"num_cells": 3}),
            r"\['num_cells'\] are not options",
        ),
        (
            lambda: tm.kw_resnet18(cell_num_ratio=(1.0, 2.0)),
            r"cell_num_ratio=\(1.0, 2.0\) gives 2 values for 4 warehouses",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_training_batch_of_one_and_wrong_input_are_clear_errors():
    layer = KWConv2d(4, 8, 3)
    with pytest.raises(ValueError, match=r"batch of one sample in training mode"):
        layer(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"expected 4 input channels \(dim 1 of NCHW\)"):
        layer.eval()(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"expected a 3-D NCL input \[B, C, L\]"):
        KWConv1d(4, 8, 3)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        set_temperature(tm.kw_mobilenetv2_050(), 30.0)


# --------------------------------------------------------------------------- the Flax layers (Linen and NNX)
def _flax_twins(torch_layer, **flax_kwargs):
    """The Linen and NNX KWConv of a stand-alone torch layer, with its weights (float64)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import dynconv_jax as dj
    from dynconv_jax import nnx as dn
    from dynconv_jax.convert import torch_to_flax

    rank = torch_layer.dimension
    fields = dict(
        kernel_size=tuple(torch_layer.kernel_size),
        strides=tuple(torch_layer.stride),
        padding=torch_layer.padding,
        feature_group_count=torch_layer.groups,
        use_bias=torch_layer.bias is not None,
        param_dtype=jnp.float64,
        **flax_kwargs,
    )
    linen = dj.KWConv(torch_layer.out_planes, **fields)
    x_shape = (2, *(5,) * rank, torch_layer.in_planes)
    variables = torch_to_flax(torch_layer, jax.eval_shape(linen.init, jax.random.key(0), jnp.zeros(x_shape)))
    twin = dn.KWConv(torch_layer.in_planes, torch_layer.out_planes, rngs=nnx.Rngs(0), **fields)
    dn.load_linen_variables(twin, variables)
    return linen, variables, twin


@pytest.mark.parametrize(
    "layer_cls,shape,options",
    [
        (KWConv1d, (3, 6, 9), dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5)),
        (KWConv2d, (3, 6, 7, 5), dict(cell_num_ratio=4.0)),
        (KWConv3d, (3, 6, 4, 5, 3), dict(cell_num_ratio=1.0, spatial_partition=False)),
    ],
)
def test_flax_layers_equal_torch_reference(layer_cls, shape, options):
    """Linen and NNX KWConv (weights converted from the torch layer) equal it in float64: eval at tau 0.5,
    and train mode (batch statistics, updated running statistics) at tau 1."""
    import jax
    import numpy as np

    torch.manual_seed(0)
    layer = layer_cls(6, 8, 3, stride=2, padding=1, groups=2, bias=True, **options).double()
    with jax.enable_x64(True):
        linen, variables, twin = _flax_twins(layer, **options)
        x = np.random.default_rng(0).standard_normal(shape)
        x_last = np.moveaxis(x, 1, -1)
        layer.eval().update_temperature(0.5)
        with torch.no_grad():
            expected = np.moveaxis(layer(torch.from_numpy(x)).numpy(), 1, -1)
        np.testing.assert_allclose(linen.apply(variables, x_last, temperature=0.5), expected, rtol=1e-12, atol=1e-12)
        twin.eval()
        np.testing.assert_allclose(twin(x_last, temperature=0.5), expected, rtol=1e-12, atol=1e-12)
        layer.train().update_temperature(1.0)
        with torch.no_grad():
            expected = np.moveaxis(layer(torch.from_numpy(x)).numpy(), 1, -1)
        y, state = linen.apply(variables, x_last, train=True, temperature=1.0, mutable=["batch_stats"])
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
        stats = state["batch_stats"]["attention"]["norm1"]
        np.testing.assert_allclose(stats["mean"], layer.attention.norm1.running_mean.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(stats["var"], layer.attention.norm1.running_var.numpy(), rtol=1e-12)


@pytest.mark.slow
def test_every_strategy_is_exact_and_traced_temperature_jit_grad_vmap():
    """vmap/shifted/patches/map/mix give the same outputs; tau stays traced under jit (no recompilation),
    gradients reach the warehouse, and the layer vmaps."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dynconv_jax as dj

    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 6, 6, 4)), jnp.float32)
    layer = dj.KWConv(8, (3, 3), padding=1, cell_num_ratio=2.0, strategy="vmap")
    variables = layer.init(jax.random.key(0), x)
    reference = layer.apply(variables, x, temperature=0.3)
    for strategy in ("shifted", "patches", "map", "mix"):
        got = layer.clone(strategy=strategy).apply(variables, x, temperature=0.3)
        np.testing.assert_allclose(got, reference, rtol=2e-5, atol=2e-5, err_msg=strategy)
    traces = []

    @jax.jit
    def loss(params, tau):
        traces.append(1)
        return jnp.sum(layer.apply({**variables, "params": params}, x, temperature=tau) ** 2)

    loss(variables["params"], 0.2)
    loss(variables["params"], 0.7)
    assert len(traces) == 1  # one trace whatever tau
    grads = jax.grad(loss)(variables["params"], 0.2)
    assert float(jnp.abs(grads["warehouse_manager"]["weights"]["0"]).max()) > 0
    per_sample = jax.vmap(lambda xb: layer.apply(variables, xb[None], temperature=0.3)[0])(x)
    np.testing.assert_allclose(per_sample, reference, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match=r"temperature=1.5 \(the warm-up weight tau\) must be in \[0, 1\]"):
        layer.apply(variables, x, temperature=1.5)


# --------------------------------------------------------------------------- models: trees, conversion
@pytest.mark.slow
@pytest.mark.parametrize(
    "name,kwargs",
    [
        (
            "kw_resnet50",
            dict(
                base_width=8,
                cell_num_ratio=0.5,
                cell_inplane_ratio=0.5,
                cell_outplane_ratio=0.5,
                nonlocal_basis_ratio=0.0625,
            ),
        ),
        ("kw_mobilenetv2_050", dict(stem="cifar", cell_num_ratio=4.0, sharing_range=("layer",))),
    ],
)
def test_models_have_one_tree_in_torch_linen_nnx_and_convert_strictly(name, kwargs):
    """Linen and NNX models hold exactly the converted names and sizes of the torch state_dict, a torch
    checkpoint converts into both (and back) strictly, and one of another configuration is refused with
    every mismatch named."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dynconv_jax import models as jm
    from dynconv_jax import nnx as dn
    from dynconv_jax.convert import ConversionError, flax_to_torch, torch_to_flax
    from dynconv_jax.nnx import models as nm

    torch_model = tm.create_model(name, num_classes=5, **kwargs)
    linen = jm.create_model(name, num_classes=5, **kwargs)
    template = jax.eval_shape(linen.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    assert weight_names(flax_leaf_counts(template)) == torch_to_flax_names(
        {k: v.shape for k, v in torch_model.state_dict().items()}
    )
    nnx_model = nnx.eval_shape(lambda: nm.create_model(name, num_classes=5, rngs=nnx.Rngs(0), **kwargs))
    assert jax.tree_util.tree_map(jnp.shape, dn.linen_variables(nnx_model)) == jax.tree_util.tree_map(
        jnp.shape, {"params": template["params"], "batch_stats": template["batch_stats"]}
    )
    state_dict = torch_model.state_dict()
    for target in (template, nnx_model):
        back = flax_to_torch(torch_to_flax(state_dict, target), like=state_dict)
        assert all(torch.equal(back[k], v) for k, v in state_dict.items())
    other = tm.create_model(
        name, num_classes=5, **{**kwargs, "cell_num_ratio": 1.0, "cell_inplane_ratio": 1.0, "cell_outplane_ratio": 1.0}
    )
    with pytest.raises(ConversionError, match=r"wrong shape") as error:
        torch_to_flax(other.state_dict(), template)
    assert any("warehouse_manager/weights/0" in p for p in error.value.problems)
    assert sum("wrong shape" in p for p in error.value.problems) > 10


# --------------------------------------------------------------------------- training flags, exports
def test_train_flags_warmup_schedule_and_preset():
    """``python -m train --conv=kernelwarehouse``: the --kw_* flags become the models' warehouse options,
    tau follows the official warm-up step for step, and the flags of the other family are refused."""
    from train import steps
    from train.config import UsageError, parse_args

    config = parse_args(
        [
            "--conv=kernelwarehouse",
            "--kw_ratio=0.5",
            "--kw_inplane_ratio=0.5",
            "--kw_sharing_range=layer,conv",
            "--kw_temp_epochs=2",
        ]
    )
    kwargs = steps.model_kwargs(config, 10, (8, 8, 1))
    assert kwargs["conv_options"] == dict(
        cell_num_ratio=0.5,
        cell_inplane_ratio=0.5,
        cell_outplane_ratio=1.0,
        nonlocal_basis_ratio=1.0,
        assignment_bias_init=10.0,
        sharing_range=("layer", "conv"),
    )
    tau = steps.temperature_schedule(config, 10)
    assert [float(tau(s)) for s in range(25)] == pytest.approx(
        [kw.warmup_temperature(s % 10 + 1, s // 10, 10, 2) for s in range(25)], abs=1e-7
    )
    official = parse_args(["--config=kw_resnet18_imagenet"])
    assert (official.kw_ratio, official.kw_temp_epochs, official.optimizer, official.num_epochs) == (
        4.0,
        20.0,
        "adamw",
        300,
    )
    official_options = steps.model_kwargs(official, 1000, (224, 224, 3))["conv_options"]
    assert official_options["sharing_range"] == "layer_conv" and official_options["assignment_bias_init"] == 0.0
    for argv, match in [
        (["--kw_ratio=2"], "applies to --conv=kernelwarehouse only"),
        (["--conv=kernelwarehouse", "--temp_init=10"], "has no softmax temperature"),
        (["--conv=kernelwarehouse", "--kw_temp_init=2"], r"tau must be in \[0, 1\]"),
        (["--conv=kernelwarehouse", "--kw_ratio=0"], "--kw_ratio=0.0: must be > 0"),
        (["--conv=kernelwarehouse", "--kw_assignment_bias_init=-1"], "--kw_assignment_bias_init=-1.0: must be >= 0"),
    ]:
        with pytest.raises(UsageError, match=match):
            parse_args(argv)


@pytest.mark.slow  # three small compiles (a layer, a two-layer net, its StableHLO)
def test_exports_are_exact_or_refused_with_the_reason(tmp_path):
    """Static export of a stand-alone layer (its assembled kernel) and StableHLO of a model at any batch are
    exact; BatchNorm folding leaves the KernelWarehouse layers' BatchNorms (shared cells) and folds the rest;
    the ONNX export refuses KernelWarehouse by name."""
    import jax
    from flax import linen as nn

    from dynconv_jax import KWConv
    from dynconv_jax import WarehouseManager as JWarehouseManager
    from dynconv_jax.export import export_static, load_stablehlo, to_stablehlo

    plan = kw.plan_warehouses(
        [
            kw.ConvSpec("conv1", 4, 6, (3, 3), 1, "stage0_layer0"),
            kw.ConvSpec("conv2", 6, 6, (3, 3), 1, "stage0_layer1"),
        ],
        kw.KWOptions(sharing_range=("layer",)),
    )
    from dynconv_torch.export import conv_batchnorm_pairs, fuse_bn, to_onnx

    x = jax.random.normal(jax.random.key(1), (1, 6, 6, 4))
    layer = KWConv(6, (3, 3), padding=1, feature_group_count=2, cell_num_ratio=2.0, use_bias=True)
    variables = layer.init(jax.random.key(0), x)
    conv, conv_variables = export_static(layer, variables, x, temperature=0.3)
    np.testing.assert_allclose(
        conv.apply(conv_variables, x), layer.apply(variables, x, temperature=0.3), rtol=1e-5, atol=1e-6
    )

    class Net(nn.Module):  # two layers sharing one warehouse, as in a model
        @nn.compact
        def __call__(self, x, train=False, temperature=None):
            manager = JWarehouseManager(plan, name="warehouse_manager")
            x = KWConv(6, (3, 3), padding=1, warehouse_manager=manager, name="conv1")(x, train, temperature)
            return KWConv(6, (3, 3), padding=1, warehouse_manager=manager, name="conv2")(x, train, temperature)

    model = Net()
    images = jax.random.normal(jax.random.key(2), (3, 6, 6, 4))
    model_variables = model.init(jax.random.key(0), images[:1])
    run = load_stablehlo(to_stablehlo(model, model_variables, (None, 6, 6, 4), 0.3))
    expected = model.apply(model_variables, images, temperature=0.3)
    for batch in (1, 3):
        np.testing.assert_allclose(run(images[:batch]), expected[:batch], rtol=1e-5, atol=1e-5)

    torch_model = tm.resnet18(conv="kernelwarehouse", base_width=2, stem="cifar", num_classes=3).double().eval()
    assert conv_batchnorm_pairs(torch_model) == (("conv1", "bn1"),)  # the static stem; every KW layer stays
    t = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert (fuse_bn(torch_model)(t) - torch_model(t)).abs().max() <= 1e-12 * torch_model(t).abs().max()
    with pytest.raises(ValueError, match="KernelWarehouse layers .*to_stablehlo"):
        to_onnx(torch_model.float(), tmp_path / "model.onnx", (None, 3, 8, 8))


# --------------------------------------------------------------------------- python -m train.evaluate
@pytest.mark.slow  # compiles two small ResNet-18s (KernelWarehouse, ODConv): ~15 s on 2 cores
def test_evaluate_official_checkpoints_on_an_image_folder_and_mock_imagenet(tmp_path):
    """``python -m train.evaluate`` converts an official-layout KW checkpoint (an official config name, its
    arguments narrowed by --model_args) strictly and scores the Flax model on an image folder with the
    official preprocessing (Resize 256 bilinear / CenterCrop 224 scaled to --input_size, ImageNet mean/std):
    top-1 and top-5 equal the PyTorch model's on the same images; an ODConv entry point on mock ImageNet."""
    import tensorflow_datasets as tfds

    from train import evaluate as ev
    from train.make_imagefolder import write_image_folder

    write_image_folder(str(tmp_path / "folder"), {"val": 6}, num_classes=3, min_size=20, max_size=40)
    torch.manual_seed(0)
    name, args = kw.config_model_args("kw1d2x_resnet18")
    torch_model = tm.create_model(name, **args, base_width=4, num_classes=3).eval()
    torch.save(torch_model.state_dict(), tmp_path / "kw1d2x_resnet18.pth")
    argv = [
        "--model",
        "kw1d2x_resnet18",
        "--model_args",
        '{"base_width": 4}',
        "--checkpoint",
        str(tmp_path / "kw1d2x_resnet18.pth"),
        "--dataset",
        "imagefolder",
        "--data_dir",
        str(tmp_path / "folder"),
        "--split",
        "val",
        "--input_size",
        "32",
        "--batch_size",
        "4",
        "--workers",
        "1",
    ]
    result = ev._run(ev._parser().parse_args(argv))
    source, _ = ev.open_split("imagefolder", "val", str(tmp_path / "folder"))
    cfg = dict(ev.IMAGENET_EVAL, input_size=32)
    x = np.stack(
        [ev.preprocess(source[i]["image"], 32, cfg["crop_pct"], cfg["mean"], cfg["std"], "bilinear") for i in range(6)]
    )
    with torch.no_grad():
        top5 = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).argsort(-1, descending=True)[:, :5]
    top5, labels = top5.numpy(), source.labels
    assert result == {
        "top1": np.mean(top5[:, 0] == labels),
        "top5": np.mean(np.any(top5 == labels[:, None], -1)),
        "num_examples": 6,
    }

    od_model = tm.od_resnet18(kernel_num=2, base_width=4)
    torch.save({"state_dict": od_model.state_dict()}, tmp_path / "od_resnet18_2x.pth")
    with tfds.testing.mock_data(num_examples=2):
        assert (
            ev.main(
                [
                    "--model",
                    "od_resnet18",
                    "--model_args",
                    '{"kernel_num": 2, "base_width": 4}',
                    "--checkpoint",
                    str(tmp_path / "od_resnet18_2x.pth"),
                    "--input_size",
                    "32",
                ]
            )
            == 0
        )
    assert ev.main(["--model", "kw_resnet18", "--model_args", "[4]", "--checkpoint", "x.pth"]) == 2
    assert ev.main(["--run", str(tmp_path), "--model", "kw_resnet18"]) == 2


@pytest.mark.slow  # trains 2 steps of a tiny static ResNet first
def test_evaluate_a_train_run_directory(tmp_path, capsys):
    """``--run DIR`` scores the run's newest checkpoint with the run's own preprocessing: the accuracy the
    run reported at its end."""
    from train import evaluate as ev
    from train.config import parse_args
    from train.loop import train_and_evaluate

    result = train_and_evaluate(
        parse_args(
            [
                "--conv=static",
                "--base_width=2",
                "--num_steps=2",
                "--export=false",
                "--tensorboard=false",
                "--progress=false",
                f"--workdir={tmp_path}",
            ]
        )
    )
    assert ev.main(["--run", str(tmp_path), "--batch_size", "100"]) == 0
    assert f"top-1 {100 * result['eval_accuracy']:.2f}%" in capsys.readouterr().out
    assert ev.main(["--run", str(tmp_path), "--split", "train"]) == 2  # the digits have one fixed test split
