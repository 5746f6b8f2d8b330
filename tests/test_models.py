"""Models in both frameworks: official ODConv compatibility, torch↔flax names, shapes, temperature, errors, counts.

The official key/shape manifests and parameter counts in ``tests/data/official_odconv_models.json.gz``
were measured by constructing OSVAI/ODConv's own ``models/od_resnet.py``, ``models/od_mobilenetv2.py``,
``models/resnet.py`` and ``models/mobilenetv2.py`` (commit recorded in the file's ``source``) with
torch 2.13.0, num_classes=1000 and reduction=0.0625 (od_resnet18 with kernel_num=4: 44,901,640
parameters).
"""

from __future__ import annotations

import gzip
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _helpers import flax_leaf_counts, torch_to_flax_names, weight_names
from flax import linen as nn
from flax.traverse_util import flatten_dict

from dynconv_jax import CondConv, DynamicConv, ODConv, summary
from dynconv_jax import models as jm
from dynconv_jax.convert import torch_to_flax
from dynconv_spec import CONV_TYPES
from dynconv_torch import CondConv2d, DynamicConv2d, KWConv2d, ODConv2d
from dynconv_torch import models as tm

CONVS = CONV_TYPES
MANIFEST = json.loads(
    gzip.decompress((pathlib.Path(__file__).parent / "data" / "official_odconv_models.json.gz").read_bytes())
)
OFFICIAL = MANIFEST["models"]


def _official_build(name: str, framework):
    """Our model built through the registry under the official name ('od_resnet18_k4' is
    ``create_model('od_resnet18', kernel_num=4)``; the static 'mobilenetv2_050' is ``mobilenet_v2``)."""
    entry = OFFICIAL[name]
    if entry["kernel_num"] is not None:
        return framework.create_model(name.split("_k")[0], kernel_num=entry["kernel_num"])
    if name.startswith("mobilenetv2"):
        return framework.create_model("mobilenet_v2", width_mult=int(name[-3:]) / 100)
    return framework.create_model(name)


def _init_shapes(model, shape=(2, 8, 8, 3)):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


# --------------------------------------------------------------------------- official ODConv compatibility
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_torch_state_dict_equals_official(name):
    """Key for key, shape for shape (num_batches_tracked included): official checkpoints load strictly."""
    with torch.device("meta"):
        model = _official_build(name, tm)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = OFFICIAL[name]["state_dict"]
    assert sorted(set(ours) - set(official)) == [] and sorted(set(official) - set(ours)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL[name]["num_params"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "od_resnet18_k4",
        "od_resnet50_k1",
        "od_mobilenetv2_050_k4",
        "od_mobilenetv2_100_k1",
        "resnet34",
        "mobilenetv2_075",
    ],
)
def test_flax_variables_match_official_checkpoint(name):
    """The Flax model holds exactly the leaves an official checkpoint converts to, with the same sizes."""
    variables = _init_shapes(_official_build(name, jm), (1, 32, 32, 3))
    assert summary.count_params(variables) == OFFICIAL[name]["num_params"]
    expected = torch_to_flax_names(OFFICIAL[name]["state_dict"])
    assert weight_names(flax_leaf_counts(variables)) == expected


# --------------------------------------------------------------------------- torch ↔ flax correspondence
SMALL = [
    ("resnet18", {"base_width": 8}),
    ("resnet34", {"base_width": 4}),
    ("resnet50", {"base_width": 4}),
    ("mobilenet_v2", {"width_mult": 0.25}),
]


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize(  # ResNet-18 in the fast loop, the other block kinds and depths with the slow tests
    "arch,extra", [pytest.param(a, e, id=a, marks=[pytest.mark.slow] if a != "resnet18" else []) for a, e in SMALL]
)
def test_torch_and_flax_names_correspond(arch, extra, conv):
    kwargs = dict(conv=conv, num_classes=7, stem="cifar", **extra)
    torch_model = getattr(tm, arch)(**kwargs)
    flax_model = getattr(jm, arch)(**kwargs)
    variables = _init_shapes(flax_model)
    torch_names = torch_to_flax_names({k: v.shape for k, v in torch_model.state_dict().items()})
    assert weight_names(flax_leaf_counts(variables)) == torch_names
    out = jax.eval_shape(lambda v: flax_model.apply(v, jnp.zeros((2, 8, 8, 3))), variables)
    assert out.shape == (2, 7)
    dynamic = sum(isinstance(m, (CondConv2d, DynamicConv2d, ODConv2d, KWConv2d)) for m in torch_model.modules())
    assert (dynamic > 0) == (conv != "static")


def _randomize_batch_norms(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode outputs exercise them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,conv,extra",
    [
        ("resnet18", "odconv", {"base_width": 8}),
        ("resnet50", "condconv", {"base_width": 4}),
        ("mobilenet_v2", "dynamic", {"width_mult": 0.25}),
    ],
)
def test_converted_model_gives_same_logits(arch, conv, extra):
    """A torch model converted with torch_to_flax gives the same eval logits, at a non-default temperature."""
    torch.manual_seed(0)
    kwargs = dict(conv=conv, num_classes=5, stem="cifar", **extra)
    torch_model = getattr(tm, arch)(**kwargs).eval()
    with torch.no_grad():
        _randomize_batch_norms(torch_model, 1)
    assert tm.set_temperature(torch_model, 3.0) > 0
    x = np.random.RandomState(0).randn(2, 3, 8, 8).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(x)).numpy()
    flax_model = getattr(jm, arch)(**kwargs)
    variables = torch_to_flax(torch_model, _init_shapes(flax_model))
    got = np.asarray(jax.jit(lambda v, x: flax_model.apply(v, x, temperature=3.0))(variables, x.transpose(0, 2, 3, 1)))
    assert got.shape == expected.shape == (2, 5)
    # float32, measured max|diff| / max|y| ≤ 1e-6 here; 1e-5 is parity's float32 forward tolerance
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


# --------------------------------------------------------------------------- shapes, training, temperature
@pytest.mark.parametrize(
    "arch,stem,size,extra,expected_hw",
    [
        ("resnet18", "imagenet", 64, {"base_width": 4}, 2),  # /32
        ("resnet18", "cifar", 16, {"base_width": 4}, 2),  # /8
        ("mobilenet_v2", "imagenet", 64, {"width_mult": 0.25}, 2),
        ("mobilenet_v2", "cifar", 16, {"width_mult": 0.25}, 2),
    ],
)
def test_stems_downsample_as_documented(arch, stem, size, extra, expected_hw):
    """ImageNet stems reduce by 32, CIFAR stems by 8; torch and flax agree on the feature-map size."""
    flax_model = getattr(jm, arch)(stem=stem, num_classes=3, **extra)
    torch_model = getattr(tm, arch)(stem=stem, num_classes=3, **extra).eval()
    features = []
    last = "layer4" if arch == "resnet18" else "features"
    getattr(torch_model, last).register_forward_hook(lambda m, i, o: features.append(tuple(o.shape[2:])))
    with torch.no_grad():
        torch_model(torch.zeros(1, 3, size, size))
    assert features == [(expected_hw, expected_hw)]
    out = jax.eval_shape(lambda: flax_model.init_with_output(jax.random.key(0), jnp.zeros((1, size, size, 3)))[0])
    assert out.shape == (1, 3)


@pytest.mark.slow
def test_flax_training_step_updates_batch_stats_and_uses_dropout():
    """The call the training loop makes: train=True, temperature, mutable batch_stats, dropout rng."""
    model = jm.resnet18(
        conv="odconv", num_experts=4, num_classes=10, stem="cifar", base_width=4, in_channels=1, dropout=0.5
    )
    x = jnp.asarray(np.random.RandomState(0).randn(4, 8, 8, 1), jnp.float32)
    variables = model.init(jax.random.key(0), x)

    @jax.jit
    def step(v, key):
        return model.apply(v, x, train=True, temperature=30.0, mutable=["batch_stats"], rngs={"dropout": key})

    y1, upd = step(variables, jax.random.key(1))
    y2, _ = step(variables, jax.random.key(2))
    assert y1.shape == (4, 10) and not np.allclose(y1, y2)  # dropout active, keyed by the rng
    old, new = flatten_dict(variables["batch_stats"]), flatten_dict(upd["batch_stats"])
    assert old.keys() == new.keys()
    assert ("layer1_0", "conv1", "attention", "bn", "mean") in new  # ODConv's attention BN is tracked too
    assert all(not np.allclose(old[k], new[k]) for k in new if k[-1] == "mean")


@pytest.mark.slow
@pytest.mark.parametrize("conv", ["condconv", "dynamic", "odconv"])
def test_flax_temperature_reaches_every_dynamic_layer(conv):
    model = jm.resnet18(conv=conv, num_classes=4, stem="cifar", base_width=4)
    x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 3), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, (CondConv, DynamicConv, ODConv)) and context.method_name == "__call__":
            seen.append(kwargs.get("temperature"))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        y_hot = jax.jit(lambda v: model.apply(v, x, temperature=7.0))(variables)  # records while tracing
    num_layers = sum(
        1 for path, leaf in flatten_dict(variables["params"]).items() if path[-1] == "kernel" and leaf.ndim == 5
    )  # expert banks [K, kh, kw, I/g, O]
    assert num_layers == 16 and seen == [7.0] * num_layers  # 8 basic blocks × 2 convs
    y_cold = jax.jit(lambda v: model.apply(v, x))(variables)
    assert not np.allclose(y_hot, y_cold, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("conv", ["condconv", "dynamic", "odconv"])
def test_torch_set_temperature_reaches_every_dynamic_layer(conv):
    torch.manual_seed(0)
    model = tm.resnet50(conv=conv, num_classes=4, stem="cifar", base_width=4).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y1 = model(x)
        assert tm.set_temperature(model, 7.0) == 16 * 3  # every block conv; stem and shortcuts are static
        y7 = model(x)
        tm.set_temperature(model, 1.0)
        assert torch.equal(model(x), y1) and not torch.allclose(y1, y7)


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("framework", [tm, jm], ids=["torch", "flax"])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"conv": "dynconv"}, "conv='dynconv' is not a conv type"),
        ({"stem": "tiny"}, "stem='tiny'"),
        ({"conv": "condconv", "reduction": 0.5}, "reduction=0.5 applies to conv in"),
        ({"conv_options": {"bias": True}}, "given with conv='static'"),
        ({"conv": "odconv", "conv_options": {"num_experts": 2}}, "may not set"),
        ({"num_experts": 0, "conv": "odconv"}, "num_experts=0"),
        ({"dropout": 1.0}, "dropout=1.0"),
    ],
)
def test_bad_arguments_raise_clear_errors(framework, kwargs, match):
    for build in (framework.resnet18, framework.mobilenet_v2):
        with pytest.raises(ValueError, match=match):
            build(**kwargs)


def test_flax_wrong_input_channels():
    model = jm.resnet18(base_width=4, in_channels=1)
    with pytest.raises(ValueError, match=r"input shape \(2, 8, 8, 3\) must be \[batch, height, width, 1\]"):
        model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))


# --------------------------------------------------------------------------- summary (params / MACs)
@pytest.mark.slow
def test_summary_analytic_macs_agree_with_xla():
    """The analytic count against XLA's cost analysis of the compiled model (flops / 2).

    Both skip kernel taps on zero padding (padded_taps=False). XLA also counts element-wise work
    (BN, ReLU, residual adds, ...); a missed or double-counted aggregation (≈ 34 % of the ODConv
    total here) would move the ratio far outside the bounds.
    """
    # measured (resnet18 cifar, base_width 16, 16²): static 1.023, odconv 0.996 (XLA counts an
    # element-wise product as 1 flop, i.e. half a MAC, so attention products pull it below 1)
    for conv, lo, hi in (("static", 1.0, 1.05), ("odconv", 0.97, 1.05)):
        model = jm.resnet18(conv=conv, num_classes=10, stem="cifar", base_width=16)
        x_shape = (1, 16, 16, 3)
        variables = model.init(jax.random.key(0), jnp.zeros(x_shape))
        analytic = summary.count_macs(model, variables, x_shape, padded_taps=False)
        ratio = summary.xla_macs(model, variables, x_shape) / analytic.total
        assert lo <= ratio <= hi, (conv, ratio)
        assert (analytic.attention > 0) == (analytic.aggregation > 0) == (conv != "static")


@pytest.mark.slow
def test_summary_cli_prints_table(capsys):
    summary.main(["--models", "resnet18", "--convs", "static", "odconv", "--no-cifar"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| resnet18")]
    assert len(rows) == 2
    static, odconv = OFFICIAL["resnet18"]["num_params"], OFFICIAL["od_resnet18_k4"]["num_params"]
    assert f"| {static / 1e6:.2f} M | 1.00 |" in rows[0]
    assert f"| {odconv / 1e6:.2f} M | {odconv / static:.2f} |" in rows[1]


def test_models_refuse_num_classes_zero():
    from dynconv_jax import models as jax_models
    from dynconv_torch import models as torch_models

    for name in ("resnet18", "mobilenet_v2"):
        for bad in (0, -1, 2.0, True):
            with pytest.raises(ValueError, match=r"num_classes=.* must be an int >= 1"):
                getattr(jax_models, name)(num_classes=bad)
            with pytest.raises(ValueError, match=r"num_classes=.* must be an int >= 1"):
                getattr(torch_models, name)(num_classes=bad)
