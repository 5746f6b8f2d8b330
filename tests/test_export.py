"""Tests of the serving exports: BatchNorm folding (both frameworks), StableHLO with a symbolic
batch, ONNX with a dynamic batch run in ONNX Runtime, the ``python -m train.export`` CLI, and
the errors on bad input."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from dynconv_jax import BatchNorm, CondConv, DynamicConv, ODConv
from dynconv_jax import export as jexport
from dynconv_jax.models.resnet import ResNet as JaxResNet
from dynconv_torch import CondConv2d, DynamicConv2d, ODConv2d
from dynconv_torch import export as texport
from dynconv_torch.models import mobilenet_v2, tf_efficientnet_cc_b0_4e
from dynconv_torch.models.resnet import ResNet as TorchResNet
from tests.test_tools import randomize, rel_err

ROOT = __file__.rsplit("/tests/", 1)[0]


# --------------------------------------------------------------------------- helpers
class ConvBNChain(nn.Module):
    """Convs (static or dynamic), each followed by an inference BatchNorm."""

    convs: tuple

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        for i, conv in enumerate(self.convs):
            kwargs = {} if isinstance(conv, nn.Conv) else {"train": train, "temperature": temperature}
            x = BatchNorm(use_running_average=not train, param_dtype=jnp.float64, name=f"bn{i}")(conv(x, **kwargs))
        return x


def jax_chain():
    """One of each conv type (with groups, strides, padding, biases), 8 channels throughout."""
    return ConvBNChain(
        (
            nn.Conv(8, (3, 3), feature_group_count=2, use_bias=False, param_dtype=jnp.float64),
            CondConv(8, (3, 3), strides=2, feature_group_count=2, use_bias=True, param_dtype=jnp.float64),
            DynamicConv(8, (3, 3), padding=((1, 0), (2, 1)), param_dtype=jnp.float64),
            ODConv(8, (3, 3), feature_group_count=2, min_channels=4, param_dtype=jnp.float64),
        )
    )


def randomize_torch(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Perturb every parameter (by ``scale`` N(0, 1)) and BatchNorm statistic so that attentions and BN folds
    are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=gen))
    return model.eval()


def torch_layers():
    return {
        "static": torch.nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2, bias=False),
        "condconv": CondConv2d(8, 12, 3, stride=2, padding=1, groups=2),
        "dynamic": DynamicConv2d(8, 12, (3, 1), padding="same", bias=False),
        "odconv": ODConv2d(8, 12, 3, padding=1, groups=2, min_channel=4),
        "odconv_depthwise": ODConv2d(8, 8, 3, stride=2, padding=1, groups=8, min_channel=4),
        "odconv_1x1": ODConv2d(8, 12, 1, min_channel=4),
    }


def tiny_torch_resnet(conv):
    return TorchResNet("basic", (1, 1, 1, 1), conv=conv, base_width=4, num_classes=5, stem="cifar")


# --------------------------------------------------------------------------- BatchNorm folding
def test_fuse_batchnorm_flax_layers_exact(float64):
    model = jax_chain()
    x = jax.random.normal(jax.random.key(0), (5, 7, 6, 8), jnp.float64)
    variables = randomize(jax.jit(model.init)(jax.random.key(1), x), jax.random.key(2))
    pairs = jexport.conv_batchnorm_pairs(model, variables, x.shape)
    assert [(c, b) for c, b, _ in pairs] == [((f"convs_{i}",), (f"bn{i}",)) for i in range(4)]
    fused = jexport.fuse_batchnorm(model, variables, x.shape)
    apply = jax.jit(lambda v, x: model.apply(v, x, temperature=1.7))
    assert rel_err(apply(fused, x), apply(variables, x)) <= 1e-12
    for i in range(4):
        name = f"convs_{i}"
        np.testing.assert_array_equal(fused["params"][f"bn{i}"]["scale"], 1.0)
        np.testing.assert_array_equal(fused["batch_stats"][f"bn{i}"]["mean"], 0.0)
        # the conv weights did change: the fold is not the identity
        assert rel_err(fused["params"][name]["kernel"], variables["params"][name]["kernel"]) > 1e-3


@pytest.mark.slow
def test_fuse_batchnorm_flax_model_exact(float64):
    model = JaxResNet(
        block="basic",
        layers=(1, 1, 1, 1),
        conv="odconv",
        base_width=4,
        num_classes=5,
        stem="cifar",
        param_dtype=jnp.float64,
    )
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3), jnp.float64)
    variables = randomize(jax.jit(model.init)(jax.random.key(1), x), jax.random.key(2), scale=0.2)
    pairs = jexport.conv_batchnorm_pairs(model, variables)
    # stem, 2 per block, 3 downsample shortcuts
    assert len(pairs) == 1 + 2 * 4 + 3
    fused = jexport.fuse_batchnorm(model, variables)
    apply = jax.jit(lambda v, x: model.apply(v, x))
    assert rel_err(apply(fused, x), apply(variables, x)) <= 1e-12


@pytest.mark.slow
def test_train_export_jax_logits_batches_with_a_padded_last_batch(float64):
    from train.export import jax_logits

    model = jax_chain()
    x = jax.random.normal(jax.random.key(0), (5, 8, 8, 8), jnp.float64)
    variables = randomize(jax.jit(model.init)(jax.random.key(1), x), jax.random.key(2), scale=0.2)
    whole = np.asarray(model.apply(variables, x), np.float32)
    for batch_size in (2, 5, 256):  # padded last batch, exact fit, fewer images than a batch
        logits = jax_logits(model, variables, np.asarray(x), temperature=None, batch_size=batch_size)
        assert logits.shape == whole.shape and logits.dtype == np.float32
        np.testing.assert_allclose(logits, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(torch_layers()))
def test_fuse_bn_torch_layer_exact(kind):
    torch.manual_seed(0)
    model = randomize_torch(
        torch.nn.Sequential(torch_layers()[kind], torch.nn.BatchNorm2d(12 if "depthwise" not in kind else 8))
    ).double()
    x = torch.randn(5, 8, 7, 6, dtype=torch.float64)
    fused = texport.fuse_bn(model)
    with torch.no_grad():
        assert rel_err(fused(x), model(x)) <= 1e-12
    assert isinstance(model[1], torch.nn.BatchNorm2d)  # the original is untouched
    kept = texport.ChannelBias if kind.startswith("odconv") or kind == "condconv" else torch.nn.Identity
    assert isinstance(fused[1], kept)
    if kind in ("static", "dynamic"):  # a bias was added where the layer had none
        assert fused[0].bias is not None and model[0].bias is None


@pytest.mark.slow
def test_fuse_bn_torch_models_exact():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    for model in (
        tiny_torch_resnet("condconv"),
        tiny_torch_resnet("dynamic"),
        mobilenet_v2(width_mult=0.25, conv="odconv", num_classes=5, stem="cifar"),
        tf_efficientnet_cc_b0_4e(num_classes=5),
    ):
        # Milder weights than for the layers: 0.3 made the 16-block EfficientNet amplify float64 rounding to 8e-12.
        model = randomize_torch(model, scale=0.1).double()
        fused = texport.fuse_bn(model)
        assert not any(
            isinstance(m, torch.nn.BatchNorm2d) and name.split(".")[-1] != "bn"  # ODConv attention BN
            for name, m in fused.named_modules()
        )
        with torch.no_grad():
            assert rel_err(fused(x), model(x)) <= 1e-12, type(model).__name__


def test_fuse_bn_errors():
    with pytest.raises(ValueError, match="training mode"):
        texport.fuse_bn(tiny_torch_resnet("dynamic"))
    with pytest.raises(ValueError, match="no 'params'"):
        jexport.fuse_batchnorm(jax_chain(), {"batch_stats": {}}, (1, 4, 4, 8))
    # Params without batch_stats: was flax's ScopeCollectionNotFound from inside the trace.
    chain = ConvBNChain((nn.Conv(4, (3, 3)),))
    params = chain.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))["params"]
    with pytest.raises(ValueError, match=r"fuse_batchnorm: variables hold the collections \['params'\].*batch_stats"):
        jexport.fuse_batchnorm(chain, {"params": params}, (1, 4, 4, 3))


# --------------------------------------------------------------------------- StableHLO
@pytest.mark.slow
def test_stablehlo_symbolic_batch_serves_every_batch(tmp_path):
    model = JaxResNet(block="basic", layers=(1, 1, 1, 1), conv="odconv", base_width=4, num_classes=5, stem="cifar")
    x = jax.random.normal(jax.random.key(0), (64, 8, 8, 3), jnp.float32)
    variables = randomize(jax.jit(model.init)(jax.random.key(1), x[:1]), jax.random.key(2), scale=0.2)
    blob = jexport.to_stablehlo(model, variables, (None, 8, 8, 3), temperature=2.0)
    path = tmp_path / "model.stablehlo"
    path.write_bytes(blob)
    served = jexport.load_stablehlo(str(path))
    reference = jax.jit(lambda x: model.apply(variables, x, temperature=2.0))
    for batch in (1, 3, 17, 64):
        assert rel_err(served(x[:batch]), reference(x[:batch])) <= 1e-6, batch

    # An NNX model exports through its Linen twin: the same outputs, bit for bit.
    from flax import nnx

    from dynconv_jax.nnx import load_linen_variables
    from dynconv_jax.nnx.models.resnet import ResNet as NnxResNet

    nnx_model = load_linen_variables(
        NnxResNet(
            block="basic",
            layers=(1, 1, 1, 1),
            conv="odconv",
            base_width=4,
            num_classes=5,
            stem="cifar",
            rngs=nnx.Rngs(0),
        ),
        variables,
    )
    served_nnx = jexport.load_stablehlo(jexport.to_stablehlo(model, nnx_model, (None, 8, 8, 3), temperature=2.0))
    np.testing.assert_array_equal(served_nnx(x[:3]), served(x[:3]))
    with pytest.raises(TypeError, match="Linen twin"):
        jexport.to_stablehlo(nnx_model, None, (None, 8, 8, 3))

    # Bad input: corrupted weights (checksum), another file, a wrong rank, a batch of zero.
    corrupt = bytearray(blob)
    corrupt[len(blob) // 2] ^= 0xFF
    with pytest.raises(ValueError, match="corrupted"):
        jexport.load_stablehlo(bytes(corrupt))
    with pytest.raises(ValueError, match="not a dynconv StableHLO export"):
        jexport.load_stablehlo(b"\x08\x01garbage")
    with pytest.raises(ValueError, match="input_shape"):
        jexport.to_stablehlo(model, variables, (None, 8, 3))
    with pytest.raises(ValueError, match="input_shape"):
        jexport.to_stablehlo(model, variables, (0, 8, 8, 3))


def test_stablehlo_single_layer_fixed_and_symbolic_batch():
    layer = CondConv(6, (3, 3), strides=2, use_bias=True)
    x = jax.random.normal(jax.random.key(0), (5, 9, 9, 4))
    variables = randomize(layer.init(jax.random.key(1), x), jax.random.key(2))
    served = jexport.load_stablehlo(jexport.to_stablehlo(layer, variables, (None, 9, 9, 4)))
    assert rel_err(served(x), layer.apply(variables, x)) <= 1e-6
    assert rel_err(served(x[:1]), layer.apply(variables, x[:1])) <= 1e-6
    fixed = jexport.load_stablehlo(jexport.to_stablehlo(layer, variables, (5, 9, 9, 4)))
    assert rel_err(fixed(x), layer.apply(variables, x)) <= 1e-6

    # Variables that do not fit name the parameter; an input the model cannot take names input_shape.
    with pytest.raises(
        ValueError,
        match=r"do not fit together in CondConv: params/bias has shape "
        r"\(4, 6\) in variables, \(4, 7\) for this input",
    ):
        jexport.to_stablehlo(CondConv(7, (3, 3), strides=2, use_bias=True), variables, (None, 9, 9, 4))
    params = dict(variables["params"])
    del params["bias"]
    with pytest.raises(ValueError, match="params/bias is missing from variables"):
        jexport.to_stablehlo(layer, {"params": params}, (None, 9, 9, 4))
    with pytest.raises(
        ValueError, match=r"input_shape=\(None, 9, 4\) does not fit CondConv: .* has rank 3, expected 4"
    ):
        jexport.to_stablehlo(layer, variables, (None, 9, 4))
    with pytest.raises(ValueError):
        fixed(x[:2])  # a fixed-batch export rejects another batch size


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("temperature", "hot", "temperature='hot' must be a positive number"),  # was blamed on input_shape
        ("temperature", np.ones(3), "temperature must be a scalar, got shape (3,)"),
        ("temperature", [1.0, 2.0], "temperature must be a scalar, got shape (2,)"),
        ("temperature", 0.0, "temperature=0.0 must be finite and > 0"),
        ("temperature", True, "temperature=True is a bool"),
        ("platforms", ("bogus",), "platforms=('bogus',) has unknown ['bogus']"),  # was a file that failed when called
        ("platforms", "cpu", "platforms='cpu'; expected a non-empty tuple"),
        ("platforms", (), "platforms=(); expected a non-empty tuple"),
        ("platforms", ("cpu", "cpu"), "has a name twice"),
    ],
)
def test_stablehlo_bad_options_are_named_before_tracing(monkeypatch, option, value, message):
    layer = CondConv(6, (3, 3))
    variables = layer.init(jax.random.key(1), jnp.ones((1, 9, 9, 4)))
    monkeypatch.setattr(jax, "eval_shape", None)  # nothing is traced before the options are checked
    with pytest.raises(ValueError) as info:
        jexport.to_stablehlo(layer, variables, (None, 9, 9, 4), **{option: value})
    assert str(info.value).startswith("to_stablehlo: ") and message in str(info.value), str(info.value)
    assert "input_shape" not in str(info.value)


# --------------------------------------------------------------------------- ONNX
# Skipped only where the [export] extra is absent; scripts/setup.sh (and so CI) installs it.
needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="the [export] extra (onnx, onnxruntime) is not installed",
)


def check_onnx_batches(model, path, shape, batches=(1, 2, 7, 32)):
    session = texport.onnx_session(path, threads=1)  # the other xdist worker has the other core
    gen = torch.Generator().manual_seed(1)
    return {b: texport.check_onnx(model, path, torch.randn((b,) + shape, generator=gen), session) for b in batches}


@needs_onnx
@pytest.mark.parametrize("kind", ["condconv", "dynamic", "odconv", "odconv_depthwise"])
def test_onnx_layer_dynamic_batch(kind, tmp_path):
    torch.manual_seed(0)
    layer = randomize_torch(torch_layers()[kind])
    for formulation in texport.FORMULATIONS if kind in ("condconv", "odconv") else ("matmul",):
        path = texport.to_onnx(layer, tmp_path / f"{kind}.onnx", (None, 8, 7, 6), formulation=formulation)
        errors = check_onnx_batches(layer, path, (8, 7, 6))
        assert max(errors.values()) <= 1e-5, (formulation, errors)
    import onnx

    graph = onnx.load(path).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for node in graph.node:  # no convolution whose group count depends on the batch
        if node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            assert group in (1, layer.groups)


@needs_onnx
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet_odconv", "mobilenet_condconv", "efficientnet_cc"])
def test_onnx_model_dynamic_batch(name, tmp_path):
    torch.manual_seed(0)
    model, shape = {
        "resnet_odconv": (lambda: tiny_torch_resnet("odconv"), (3, 16, 16)),
        "mobilenet_condconv": (
            lambda: mobilenet_v2(width_mult=0.25, conv="condconv", num_classes=5, stem="cifar"),
            (3, 16, 16),
        ),
        "efficientnet_cc": (lambda: tf_efficientnet_cc_b0_4e(num_classes=5), (3, 32, 32)),
    }[name]
    # Perturbations of 0.1 (not 0.3): at 0.3 the float32 MobileNetV2-CondConv is ill-conditioned, its own float32
    # output differs from float64 by ~3e-2 (docs/tools.md), so no float32 export could be judged at 1e-5.
    model = randomize_torch(model(), scale=0.1)
    path = texport.to_onnx(model, tmp_path / "model.onnx", (None,) + shape)
    errors = check_onnx_batches(model, path, shape)
    assert max(errors.values()) <= 1e-5, errors


@needs_onnx
def test_onnx_errors(tmp_path):
    layer = ODConv2d(8, 12, 3, padding=1, min_channel=4)
    with pytest.raises(ValueError, match="training mode"):
        texport.to_onnx(layer, tmp_path / "a.onnx", (None, 8, 7, 6))
    layer.eval()
    with pytest.raises(ValueError, match="input_shape"):
        texport.to_onnx(layer, tmp_path / "a.onnx", (None, 8, 7))
    with pytest.raises(ValueError, match="input_shape"):
        texport.to_onnx(layer, tmp_path / "a.onnx", (None, 5, 7, 6))  # wrong channel count
    with pytest.raises(ValueError, match="opset"):
        texport.to_onnx(layer, tmp_path / "a.onnx", (None, 8, 7, 6), opset=7)
    with pytest.raises(ValueError, match="formulation"):
        texport.to_onnx(layer, tmp_path / "a.onnx", (None, 8, 7, 6), formulation="loop")
    path = texport.to_onnx(layer, tmp_path / "a.onnx", (None, 8, 7, 6), opset=texport.ONNX_OPSETS[0])
    assert max(check_onnx_batches(layer, path, (8, 7, 6), batches=(1, 3)).values()) <= 1e-5
    data = open(path, "rb").read()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        texport.onnx_session(tmp_path / "truncated.onnx")


@pytest.mark.slow
@needs_onnx
def test_onnx_paths_and_train_mode_checks_come_first(tmp_path, monkeypatch):
    """to_onnx checks its path before the tracing (a directory, a missing folder); check_onnx refuses a model in
    training mode, which reported a false error of 0.86 on a ResNet and updated its BatchNorm running statistics."""
    from dynconv_torch.export import onnx as onnx_export

    layer = ODConv2d(8, 12, 3, padding=1, min_channel=4).eval()
    with monkeypatch.context() as patch:
        patch.setattr(onnx_export, "portable", None)  # the export's work: never reached
        for path, words in [(tmp_path, "is a directory"), (tmp_path / "nope" / "a.onnx", "does not exist")]:
            with pytest.raises(ValueError, match=f"to_onnx: path=.*{words}"):
                texport.to_onnx(layer, path, (None, 8, 7, 6))
    model = tiny_torch_resnet("dynamic").eval()
    path = texport.to_onnx(model, tmp_path / "resnet.onnx", (None, 3, 16, 16))
    model.train()
    running = {name: b.clone() for name, b in model.named_buffers()}
    with pytest.raises(ValueError, match="check_onnx: the model is in training mode"):
        texport.check_onnx(model, path, torch.randn(4, 3, 16, 16))
    assert all(torch.equal(b, running[name]) for name, b in model.named_buffers())
    assert texport.check_onnx(model.eval(), path, torch.randn(4, 3, 16, 16)) <= 1e-5


# --------------------------------------------------------------------------- CLI
@needs_onnx
@pytest.mark.slow
def test_train_export_cli(tmp_path, capsys, shared_files):
    """``train.export``'s command line on a 2-step ODConv run of the loop (the session's ``runs/digits``, which the
    docs' commands use too), in this process (each ``python -m`` costs its imports); the module entry point runs
    once, for a workdir without a run."""
    from train import export as train_export

    run = shared_files("runs/digits")
    for fmt in ("stablehlo", "onnx"):
        out = tmp_path / f"model.{fmt}"
        capsys.readouterr()
        assert train_export.main(["--workdir", str(run), "--format", fmt, "--out", str(out)]) == 0
        line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("export:")][-1]
        diff = float(line.split("max relative logit diff ")[1].split(",")[0])
        assert diff <= 1e-5, line  # (predictions of a 2-step model may tie, so agreement is not asserted)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.export",
            "--workdir",
            str(tmp_path / "nothing"),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "x.onnx"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "config.json" in done.stderr
