"""Tests of the user tools: exact static export, average-routing export, attention plots, ablation runner."""

from __future__ import annotations

import csv
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from dynconv_jax import CondConv, DynamicConv, ODConv
from dynconv_jax import export as jexport
from dynconv_jax import inspect as jinspect
from dynconv_torch import CondConv2d, DynamicConv2d, ODConv2d
from dynconv_torch import export as texport
from dynconv_torch import inspect as tinspect

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rel_err(a, b) -> float:
    """max|a - b| / max|b| (the project's definition of relative error)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# Geometries: (in, out, kernel_size, strides, groups, dilation, padding). Covers strides, groups
# (incl. depthwise: ODConv's filter attention skipped), dilation, explicit asymmetric padding,
# a 1x1 kernel (spatial attention skipped) and a non-square kernel.
GEOMETRIES = [
    (8, 12, (3, 3), 1, 1, 1, "SAME"),
    (8, 12, (3, 3), 2, 2, 1, ((1, 0), (2, 1))),
    (8, 12, (3, 3), 1, 4, 2, "VALID"),
    (8, 8, (3, 3), 2, 8, 1, 1),
    (8, 12, (1, 1), 2, 2, 1, 0),
    (6, 9, (3, 1), 1, 3, (2, 1), ((2, 2), (0, 0))),
]
JAX_LAYERS = {
    "condconv": lambda **kw: CondConv(use_bias=True, **kw),
    "dynamic": lambda **kw: DynamicConv(**kw),
    "odconv": lambda **kw: ODConv(min_channels=4, **kw),
}


def randomize(variables, key, scale=0.5):
    """Perturb every parameter (attention heads start at zero bias) so that every attention varies.

    Drawn with NumPy (seeded by ``key``): an eager ``jax.random`` draw compiles one XLA program per
    leaf shape, which cost the suite minutes of compilation for nothing the tests check."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())

    def draw(leaf, sample):
        return jnp.asarray(sample(np.shape(leaf)), dtype=leaf.dtype)

    params = variables["params"]
    out = {"params": jax.tree_util.tree_map(lambda leaf: leaf + scale * draw(leaf, rng.standard_normal), params)}
    if "batch_stats" in variables:
        out["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda path, v: (
                draw(v, lambda shape: rng.uniform(0.5, 2.0, shape))
                if "var" in str(path[-1])
                else 0.3 * draw(v, rng.standard_normal)
            ),
            variables["batch_stats"],
        )
    return out


def make_jax_layer(kind, geometry, num_experts=4, **extra):
    cin, cout, k, s, g, d, p = geometry
    module = JAX_LAYERS[kind](
        features=cout,
        kernel_size=k,
        strides=s,
        feature_group_count=g,
        kernel_dilation=d,
        padding=p,
        num_experts=num_experts,
        param_dtype=jnp.float64,
        **extra,
    )
    x = jax.random.normal(jax.random.key(0), (4, 7, 6, cin), jnp.float64)
    variables = randomize(module.init(jax.random.key(1), x), jax.random.key(2))
    return module, variables, x


pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("kind", list(JAX_LAYERS))
@pytest.mark.parametrize(  # the first geometry in the fast loop, the other three with the slow tests
    "geometry",
    [pytest.param(GEOMETRIES[i], marks=[pytest.mark.slow] if i != 1 else []) for i in (1, 2, 3, 5)],
    ids=lambda g: f"{g[0]}-{g[1]}-k{g[2]}-s{g[3]}-g{g[4]}-d{g[5]}",
)
def test_jax_static_export_exact(kind, geometry):
    module, variables, x = make_jax_layer(kind, geometry)
    export = jexport.export_static(module, variables, x[1])
    assert isinstance(export.module, nn.Conv)
    y_dynamic = module.apply(variables, x[1:2])
    y_static = export.module.apply(export.variables, x[1:2])
    assert y_static.dtype == jnp.float64 and y_static.shape == y_dynamic.shape
    assert rel_err(y_static, y_dynamic) <= 1e-12
    # The fold is specific to its input: another sample routes differently.
    assert rel_err(export.module.apply(export.variables, x[2:3]), module.apply(variables, x[2:3])) > 1e-6


@pytest.mark.slow
def test_jax_static_export_temperature_single_expert_1d_and_external_routing():
    # Temperature is part of the folded routing.
    module, variables, x = make_jax_layer("odconv", GEOMETRIES[1])
    export = jexport.export_static(module, variables, x[:1], temperature=3.0)
    assert (
        rel_err(export.module.apply(export.variables, x[:1]), module.apply(variables, x[:1], temperature=3.0)) <= 1e-12
    )
    assert rel_err(export.module.apply(export.variables, x[:1]), module.apply(variables, x[:1])) > 1e-6
    # ODConv with K == 1 and a 1x1 kernel (the official fast path): kernel and spatial attention skipped.
    module, variables, x = make_jax_layer("odconv", GEOMETRIES[4], num_experts=1)
    export = jexport.export_static(module, variables, x[:1])
    assert rel_err(export.module.apply(export.variables, x[:1]), module.apply(variables, x[:1])) <= 1e-12
    # A 1-D layer.
    module = DynamicConv(features=5, kernel_size=(3,), strides=2, padding=1, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(3), (2, 9, 4), jnp.float64)
    variables = randomize(module.init(jax.random.key(4), x), jax.random.key(5))
    export = jexport.export_static(module, variables, x[0])
    assert rel_err(export.module.apply(export.variables, x[:1]), module.apply(variables, x[:1])) <= 1e-12
    # CondConv with routing weights from outside.
    module = CondConv(features=6, kernel_size=(3, 3), use_bias=True, external_routing=True, param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(6), (1, 5, 5, 4), jnp.float64)
    routing = jnp.array([[0.2, 0.9, 0.1, 0.5]], jnp.float64)
    variables = randomize(module.init(jax.random.key(7), x, routing_weights=routing), jax.random.key(8))
    export = jexport.export_static(module, variables, x, routing_weights=routing)
    assert (
        rel_err(export.module.apply(export.variables, x), module.apply(variables, x, routing_weights=routing)) <= 1e-12
    )


def test_jax_export_errors():
    module, variables, x = make_jax_layer("dynamic", GEOMETRIES[0])
    with pytest.raises(ValueError, match="one sample"):
        jexport.export_static(module, variables, x)
    with pytest.raises(TypeError, match="CondConv, DynamicConv or ODConv"):
        jexport.export_static(nn.Conv(4, (3, 3)), variables, x[:1])
    with pytest.raises(ValueError, match="reduce="):
        jexport.export_average(module, variables, x, reduce="median")


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(JAX_LAYERS))
def test_jax_average_export_error_is_measured(kind):
    module, variables, x = make_jax_layer(kind, GEOMETRIES[1])
    calibration = jax.random.normal(jax.random.key(9), (7, 7, 6, 8), jnp.float64)
    by_attention = jexport.export_average(module, variables, calibration, batch_size=3)
    # The reported error, recomputed in one full batch.
    recomputed = rel_err(
        by_attention.module.apply(by_attention.variables, calibration), module.apply(variables, calibration)
    )
    assert by_attention.relative_error == pytest.approx(recomputed, rel=1e-12)
    assert by_attention.relative_error > 1e-6  # an approximation, not exact
    # The folded attentions are the means of what the layer sowed.
    _, state = module.apply(variables, calibration, mutable=["intermediates"])
    for name, value in by_attention.attentions.items():
        np.testing.assert_allclose(value, state["intermediates"][name][0].mean(axis=0), rtol=1e-12, atol=1e-15)
    by_kernel = jexport.export_average(module, variables, calibration, reduce="kernel", batch_size=4)
    if kind == "odconv":  # the attentions multiply: averaging them is not averaging the kernels
        assert rel_err(by_kernel.variables["params"]["kernel"], by_attention.variables["params"]["kernel"]) > 1e-6
    else:  # linear in the kernel attention: both reductions agree
        np.testing.assert_allclose(
            by_kernel.variables["params"]["kernel"], by_attention.variables["params"]["kernel"], rtol=1e-10, atol=1e-14
        )
    # With a single calibration sample the average export is the exact export.
    one = jexport.export_average(module, variables, calibration[:1])
    assert one.relative_error <= 1e-12


# ---------------------------------------------------------------------------------------------- torch
TORCH_LAYERS = {
    "condconv": lambda *a, **kw: CondConv2d(*a, bias=True, **kw),
    "dynamic": lambda *a, **kw: DynamicConv2d(*a, **kw),
    "odconv": lambda *a, **kw: ODConv2d(*a, min_channel=4, **kw),
}
# (in, out, kernel, stride, groups, dilation, padding)
TORCH_GEOMETRIES = [
    (8, 12, 3, 1, 1, 1, 1),
    (8, 12, 3, 2, 2, 1, (1, 0)),
    (8, 12, 3, 1, 4, 2, 0),
    (8, 8, 3, 2, 8, 1, 1),
    (8, 12, 1, 2, 2, 1, 0),
    (6, 9, (3, 1), 1, 3, (2, 1), "same"),
]


def make_torch_layer(kind, geometry, num_experts=4):
    cin, cout, k, s, g, d, p = geometry
    torch.manual_seed(0)
    layer = TORCH_LAYERS[kind](
        cin, cout, k, stride=s, groups=g, dilation=d, padding=p, num_experts=num_experts
    ).double()
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(0.5 * torch.randn_like(param))
        for name, buf in layer.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.3)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return layer.eval(), torch.randn(4, cin, 7, 6, dtype=torch.float64)


@pytest.mark.parametrize("kind", list(TORCH_LAYERS))
@pytest.mark.parametrize("geometry", TORCH_GEOMETRIES, ids=lambda g: f"{g[0]}-{g[1]}-k{g[2]}-s{g[3]}-g{g[4]}-d{g[5]}")
def test_torch_static_export_exact(kind, geometry):
    layer, x = make_torch_layer(kind, geometry)
    conv = texport.export_static(layer, x[1])
    assert type(conv) is torch.nn.Conv2d and conv.weight.dtype == torch.float64
    with torch.no_grad():
        assert rel_err(conv(x[1:2]), layer(x[1:2])) <= 1e-12
        assert rel_err(conv(x[2:3]), layer(x[2:3])) > 1e-6


def test_torch_export_single_expert_external_routing_and_errors():
    layer, x = make_torch_layer("odconv", TORCH_GEOMETRIES[4], num_experts=1)
    conv = texport.export_static(layer, x[:1])
    with torch.no_grad():
        assert rel_err(conv(x[:1]), layer(x[:1])) <= 1e-12
    layer = CondConv2d(4, 6, 3, padding=1, bias=True, external_routing=True).double().eval()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    routing = torch.tensor([[0.2, 0.9, 0.1, 0.5]], dtype=torch.float64)
    conv = texport.export_static(layer, x, routing_weights=routing)
    with torch.no_grad():
        assert rel_err(conv(x), layer(x, routing)) <= 1e-12
    with pytest.raises(ValueError, match="routing_weights"):
        texport.export_static(layer, x)
    with pytest.raises(ValueError, match="training mode"):
        texport.export_static(layer.train(), x, routing_weights=routing)
    with pytest.raises(ValueError, match="one sample"):
        texport.export_static(layer.eval(), torch.randn(2, 4, 5, 5, dtype=torch.float64), routing_weights=routing)


@pytest.mark.parametrize("kind", list(TORCH_LAYERS))
def test_torch_average_export_error_is_measured(kind):
    layer, _ = make_torch_layer(kind, TORCH_GEOMETRIES[1])
    calibration = torch.randn(7, 8, 7, 6, dtype=torch.float64)
    result = texport.export_average(layer, calibration, batch_size=3)
    with torch.no_grad():
        recomputed = rel_err(result.module(calibration), layer(calibration))
    assert result.relative_error == pytest.approx(recomputed, rel=1e-12)
    assert result.relative_error > 1e-6
    by_kernel = texport.export_average(layer, calibration, reduce="kernel", batch_size=4)
    if kind != "odconv":
        torch.testing.assert_close(by_kernel.module.weight, result.module.weight, rtol=1e-10, atol=1e-14)
    assert texport.export_average(layer, calibration[:1]).relative_error <= 1e-12


def test_jax_and_torch_exports_agree():
    """The same ODConv weights exported in both frameworks give the same static kernel."""
    layer, x = make_torch_layer("odconv", TORCH_GEOMETRIES[1])
    conv = texport.export_static(layer, x[0])
    module = ODConv(
        features=12,
        kernel_size=(3, 3),
        strides=2,
        feature_group_count=2,
        padding=((1, 1), (0, 0)),
        min_channels=4,
        param_dtype=jnp.float64,
    )
    sd = {k: v.detach().numpy() for k, v in layer.state_dict().items()}

    def dense(name):
        return {"kernel": sd[f"attention.{name}.weight"][:, :, 0, 0].T, "bias": sd[f"attention.{name}.bias"]}

    variables = {
        "params": {
            "kernel": sd["weight"].transpose(0, 3, 4, 2, 1),
            "attention": {
                "fc": {"kernel": sd["attention.fc.weight"][:, :, 0, 0].T},
                "bn": {"scale": sd["attention.bn.weight"], "bias": sd["attention.bn.bias"]},
                **{n: dense(n) for n in ("channel_fc", "filter_fc", "spatial_fc", "kernel_fc")},
            },
        },
        "batch_stats": {
            "attention": {"bn": {"mean": sd["attention.bn.running_mean"], "var": sd["attention.bn.running_var"]}}
        },
    }
    export = jexport.export_static(module, variables, jnp.asarray(x[0].numpy().transpose(1, 2, 0)))
    np.testing.assert_allclose(
        export.variables["params"]["kernel"], conv.weight.detach().numpy().transpose(2, 3, 1, 0), rtol=1e-12, atol=1e-14
    )


# ---------------------------------------------------------------------------------------------- inspection
class TwoLayers(nn.Module):
    """A tiny model with an ODConv and a CondConv: every plot has something to draw."""

    @nn.compact
    def __call__(self, x, train=False, temperature=None):
        x = ODConv(6, (3, 3), num_experts=3, min_channels=4, name="od")(x, train, temperature)
        x = nn.relu(x)
        return CondConv(5, (3, 3), strides=2, num_experts=4, name="cc")(x, train, temperature)


@pytest.mark.slow
def test_collect_and_plot_attentions(tmp_path):
    model = TwoLayers()
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3), jnp.float32)
    variables = randomize(model.init(jax.random.key(1), x), jax.random.key(2), scale=0.3)
    attentions = jinspect.collect_attentions(model, variables, x)
    assert list(attentions) == ["od", "cc"]
    od = attentions["od"]
    assert {k: v.shape for k, v in od.items()} == {
        "kernel_attention": (6, 3),
        "channel_attention": (6, 3),
        "filter_attention": (6, 6),
        "spatial_attention": (6, 3, 3),
    }
    np.testing.assert_allclose(od["kernel_attention"].sum(axis=1), 1.0, rtol=1e-6)
    assert attentions["cc"]["kernel_attention"].shape == (6, 4)
    # Entropy: 1 for uniform routing, 0 for one expert.
    np.testing.assert_allclose(jinspect.routing_entropy(np.array([[0.25] * 4, [1.0, 0, 0, 0]])), [1.0, 0.0], atol=1e-12)
    paths = jinspect.plot_all(attentions, str(tmp_path / "plots"))
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["kernel_attention.png", "odconv_od.png", "routing_entropy.png"]
    for path in paths:
        data = open(path, "rb").read()
        assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_torch_hooks_collect_what_the_layers_use():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        ODConv2d(3, 6, 3, padding=1, kernel_num=3, min_channel=4), torch.nn.ReLU(), DynamicConv2d(6, 5, 3, stride=2)
    ).eval()
    x = torch.randn(5, 3, 8, 8)
    attentions = tinspect.collect_attentions(model, x)
    assert list(attentions) == ["0", "2"]
    assert attentions["0"]["spatial_attention"].shape == (5, 3, 3)
    with torch.no_grad():
        expected = model[2].attentions(model[1](model[0](x)))["kernel_attention"].numpy()
    np.testing.assert_allclose(attentions["2"]["kernel_attention"], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="training mode"):
        tinspect.collect_attentions(model.train(), x)


# ---------------------------------------------------------------------------------------------- ablation
@pytest.mark.slow
def test_ablation_runner_tiny_digits(tmp_path):
    from train import ablate

    out = tmp_path / "ablate"
    argv = [
        "--dataset",
        "digits",
        "--ks",
        "1,2",
        "--out",
        str(out),
        "--conv=dynamic",
        "--num_steps=2",
        "--batch_size=16",
        "--base_width=4",
        "--progress=false",
        "--tensorboard=false",
        "--export=false",
    ]
    assert ablate.main(argv) == 0
    with open(out / "ablation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["num_experts"]) for r in rows] == [1, 2]
    params = [int(r["params"]) for r in rows]
    macs = [int(r["macs"]) for r in rows]
    assert params[1] > params[0] and macs[1] > macs[0]  # a second expert bank costs parameters and aggregation
    assert all(0.0 <= float(r["eval_accuracy"]) <= 1.0 for r in rows)
    assert (out / "K1" / "checkpoints").is_dir() and (out / "K2" / "checkpoints").is_dir()
    assert "| 2 |" in (out / "ablation.md").read_text()
    assert (out / "ablation.png").read_bytes()[:8] == PNG_MAGIC
    # --resume over the finished sweep: each run is complete (its saved summary; nothing trained), same rows.
    assert ablate.main(argv + ["--resume"]) == 0
    with open(out / "ablation.csv") as f:
        again = list(csv.DictReader(f))
    assert [{k: r[k] for k in ("eval_accuracy", "params", "macs")} for r in again] == [
        {k: r[k] for k in ("eval_accuracy", "params", "macs")} for r in rows
    ]
    assert ablate.main(["--ks", "1,x"]) == 2


@pytest.mark.slow
def test_ablation_grid_of_conv_types_and_seeds(tmp_path):
    """``--vary``/``--seeds`` make the product of settings (validated up front) and the per-seed table."""
    from train import ablate
    from train.config import parse_args

    grid, out, rest = ablate._split_args(
        ["--vary", "conv=static,odconv", "--seeds", "0,1", "--out", str(tmp_path), "--num_epochs", "3"]
    )
    assert grid == [("conv", ["static", "odconv"]), ("seed", [0, 1])] and rest == ["--num_epochs=3"]
    base = parse_args(rest)
    runs = ablate.grid_configs(grid, base, out)
    assert [(c.conv, c.seed, c.num_epochs, os.path.basename(c.workdir)) for _, c in runs] == [
        ("static", 0, 3, "conv-static_seed-0"),
        ("static", 1, 3, "conv-static_seed-1"),
        ("odconv", 0, 3, "conv-odconv_seed-0"),
        ("odconv", 1, 3, "conv-odconv_seed-1"),
    ]
    rows = [
        {**setting, "eval_accuracy": acc, "eval_loss": 0.1, "params": 10, "macs": 20, "train_seconds": 1.0}
        for (setting, _), acc in zip(runs, (0.99, 0.98, 0.97))
    ]  # the last run not finished yet
    ablate.write_outputs(rows, grid, base, out)
    table = (tmp_path / "ablation.md").read_text()
    assert "| static | 99.0 % | 98.0 % | 98.5 % | 98.0 % |" in table
    assert "| odconv | 97.0 % | – | 97.0 % | 97.0 % |" in table
    assert (tmp_path / "ablation.png").read_bytes()[:8] == PNG_MAGIC
    for bad in (
        ["--vary", "colour=red"],
        ["--vary", "conv"],
        ["--vary", "seed=1,1"],
        ["--seeds", "x"],
        ["--vary", "conv=static", "--attention_bn_init=1.0"],
        ["--vary", "workdir=a,b"],
    ):
        assert ablate.main(bad + ["--out", str(tmp_path / "bad")]) == 2, bad
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------- command lines
CLI_USAGE_ERRORS = [  # (module, argv; {tmp}: an empty folder, {file}: a file in it), the one line on stderr
    ("train.export", ["--format", "onnx", "--out", "{tmp}/m.onnx", "--batch", "0"], r"error: --batch 0: must be >= 1"),
    ("train.export", ["--format", "onnx", "--out", "{tmp}"], r"error: --out='.*' is a directory"),
    (
        "train.export",
        ["--format", "stablehlo", "--out", "{file}/m.bin"],
        r"error: --out='.*file/m.bin' cannot be written: '.*file' is a file, not a folder",
    ),
    (
        "train.export",
        ["--format", "stablehlo", "--out", "{tmp}/missing/m.bin"],
        r"error: --out='.*' cannot be written: the folder '.*missing' does not exist",
    ),
    ("train.plot_attention", ["--out", "{tmp}/plots", "--num_samples", "0"], r"error: --num_samples=0: need at least"),
    ("train.plot_attention", ["--out", "{file}/plots"], r"error: --out='.*' cannot be created: '.*file' is a file"),
    ("train.ablate", ["--out", "{file}", "--num_steps=1"], r"error: --out='.*file' is a file, not a folder"),
    (
        "parity",
        ["--layers", "condconv", "--models", "none", "--quick", "--report", "{file}/report"],
        r"error: --report='.*report' cannot be created: '.*file' is a file",
    ),
    (
        "train.evaluate",
        ["--model", "tf_efficientnet_cc_b0_4e", "--checkpoint", "{tmp}/nope.bin"],
        r"error: checkpoint file '.*nope.bin' does not exist",
    ),
    ("dynconv_jax.summary", ["--num-experts", "0"], r"error: --num-experts 0: must be >= 1"),
    ("benchmarks", ["serving", "--models", "bogus"], r"error: --models: unknown \['bogus'\]; choose from resnet18"),
    ("benchmarks", ["layers", "--repeats", "0"], r"error: --repeats 0: must be >= 1"),
    ("benchmarks", ["models", "--threads", "0"], r"error: --threads 0: must be >= 1"),
]


@pytest.mark.parametrize(
    "module,argv,match", CLI_USAGE_ERRORS, ids=[f"{m} {' '.join(a[-2:])}" for m, a, _ in CLI_USAGE_ERRORS]
)
def test_cli_usage_errors_exit_2_before_any_work(tmp_path, monkeypatch, capsys, module, argv, match):
    """Issue 35: each usage error exits 2 with one line naming the flag (not 1, not a traceback, a given value
    never replaced by the default), before the work starts (output paths were checked only after it) and
    without creating anything."""
    import importlib

    def work(*args, **kwargs):
        raise AssertionError("the work started before the arguments were checked")

    for target in (
        "train.plot_attention.load_run",
        "train.ablate.run_grid",
        "parity.__main__.run_units",
        "benchmarks.layers.run",
        "benchmarks.models.run",
        "benchmarks.serving.run",
        "dynconv_jax.summary.measure",
        "train.evaluate.preprocess",
    ):
        monkeypatch.setattr(target, work)
    (tmp_path / "file").write_text("not a folder")
    argv = [a.format(tmp=tmp_path, file=tmp_path / "file") for a in argv]
    if module.startswith("train.") and module not in ("train.ablate", "train.evaluate"):
        argv = ["--workdir", str(tmp_path / "run")] + argv
    main = importlib.import_module(module + (".__main__" if module in ("parity", "benchmarks") else "")).main
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's parser.error
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert re.search(match, err.strip().splitlines()[-1]), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
