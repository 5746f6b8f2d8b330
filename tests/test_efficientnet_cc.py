"""EfficientNet-CondConv (Yang et al., NeurIPS 2019): timm-identical PyTorch model, Flax twin,
conversion, parity and the evaluation entry point."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dynconv_jax.models import efficientnet_cc as J
from dynconv_torch.models import efficientnet_cc as T

MANIFEST_PATH = os.path.join(os.path.dirname(__file__), "data", "timm_efficientnet_cc_manifest.json")
with open(MANIFEST_PATH) as _f:
    MANIFEST = json.load(_f)  # measured from timm 1.0.31 (see its "source")

# Measured from timm's definitions (timm.create_model(name), 1000 classes, timm 1.0.31).
TIMM_PARAMS = {
    "tf_efficientnet_cc_b0_4e": 13_314_116,
    "tf_efficientnet_cc_b0_8e": 24_013_284,
    "tf_efficientnet_cc_b1_8e": 39_715_968,
    "efficientnet_cc_b0_4e": 13_314_116,
    "efficientnet_cc_b0_8e": 24_013_284,
    "efficientnet_cc_b1_8e": 39_715_968,
}


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every float tensor (weights and BN statistics) so eval mode is not trivial."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            v = v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype)
            if k.endswith("running_var"):
                v = v.abs() + 0.5
        sd[k] = v
    model.load_state_dict(sd)
    return model.eval()


@pytest.mark.parametrize("name", sorted(T.VARIANTS))
def test_state_dict_and_param_count_match_timm(name):
    model = getattr(T, name)()
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == MANIFEST["models"][name]["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == TIMM_PARAMS[name] == MANIFEST["models"][name]["num_params"]
    eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert sorted(eps) == MANIFEST["models"][name]["bn_eps"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(J.VARIANTS))
def test_flax_param_count_and_cfg(name):
    model = getattr(J, name)()
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"])) == TIMM_PARAMS[name]
    timm_cfg = MANIFEST["models"][name]["pretrained_cfg"]
    cfg = J.DEFAULT_CFGS[name]
    assert [cfg["input_size"]] * 2 == timm_cfg["input_size"][1:]
    assert (cfg["crop_pct"], cfg["interpolation"]) == (timm_cfg["crop_pct"], timm_cfg["interpolation"])
    assert list(cfg["mean"]) == timm_cfg["mean"] and list(cfg["std"]) == timm_cfg["std"]


def test_block_specs_agree_between_frameworks():
    for depth, experts in ((1.0, 1), (1.1, 2), (0.5, 3)):
        for chan in (1.0, 0.25):
            a = T.block_specs(
                depth_multiplier=depth, channel_multiplier=chan, experts_multiplier=experts, drop_path_rate=0.2
            )
            b = J.block_specs(
                depth_multiplier=depth, channel_multiplier=chan, experts_multiplier=experts, drop_path_rate=0.2
            )
            assert [[dataclasses.astuple(s) for s in st] for st in a] == [
                [dataclasses.astuple(s) for s in st] for st in b
            ]


def test_tf_same_padding_puts_the_odd_pixel_bottom_right():
    assert T.tf_same_padding(7, 3, 2) == (1, 1)
    assert T.tf_same_padding(8, 3, 2) == (0, 1)
    assert T.tf_same_padding(8, 5, 2) == (1, 2)
    assert T.tf_same_padding(9, 5, 1) == (2, 2)


def _parity(name, dtype, shape=(2, 3, 67, 61)):
    torch.manual_seed(0)
    tm = _randomized(getattr(T, name)()).to(getattr(torch, dtype))
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    jm = getattr(J, name)(
        param_dtype=getattr(jnp, dtype), dtype=getattr(jnp, dtype), precision=jax.lax.Precision.HIGHEST
    )
    variables = J.convert_torch_checkpoint(jm, tm.state_dict())
    out = np.asarray(jax.jit(jm.apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1))))
    assert out.dtype == np.dtype(dtype) and out.shape == ref.shape
    return np.abs(out - ref).max() / np.abs(ref).max()


@pytest.mark.slow
def test_parity_float64_tf_port_odd_input(float64):
    # Measured 1.8e-15 (67x61 input: TF 'SAME' pads stride-2 convs asymmetrically).
    assert _parity("tf_efficientnet_cc_b0_4e", "float64") <= 1e-10


@pytest.mark.slow
def test_parity_float64_pytorch_padding_8_experts(float64):
    # Measured 1.8e-13: the randomized 8-expert network amplifies rounding more than the 4-expert one.
    assert _parity("efficientnet_cc_b0_8e", "float64", shape=(2, 3, 64, 64)) <= 1e-10


@pytest.mark.slow
def test_parity_float32():
    # Measured 6.0e-7 relative (max|a-b| / max|b|); bound 1e-5. (The randomized 8-expert models
    # measure 7e-5..1.7e-4 in float32 on these weights: conditioning, float64 agrees to 1.8e-13.)
    assert _parity("efficientnet_cc_b0_4e", "float32", shape=(2, 3, 64, 64)) <= 1e-5


@pytest.mark.slow
def test_routing_is_shared_and_temperature_applies():
    tm = _randomized(T.EfficientNetCondConv(num_classes=10, channel_multiplier=0.25, depth_multiplier=0.5))
    block = tm.blocks[5][0]
    x = torch.randn(2, block.spec.in_chs, 8, 8)
    r1 = block.routing(x)
    block.update_temperature(2.0)
    r2 = block.routing(x)
    logits = block.routing_fn(x.mean((2, 3)))
    torch.testing.assert_close(r1, torch.sigmoid(logits))
    torch.testing.assert_close(r2, torch.sigmoid(logits / 2.0))
    jm = J.EfficientNetCondConv(num_classes=10, channel_multiplier=0.25, depth_multiplier=0.5)
    v = J.convert_torch_checkpoint(jm, tm.state_dict(), image_size=32)
    xi = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
    _, state = jm.apply(v, xi, temperature=2.0, mutable=["intermediates"])
    inter = state["intermediates"]
    assert {k for k in inter if "routing_weights" in inter[k]} == {
        f"blocks_{i}_{j}"
        for i, st in enumerate(T.block_specs(T.make_divisible(8), 0.5, 0.25))
        for j, s in enumerate(st)
        if s.num_experts
    }


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown variant"):
        T.efficientnet_cc("efficientnet_cc_b7")
    with pytest.raises(ValueError, match="unknown variant"):
        J.efficientnet_cc("efficientnet_cc_b7")
    with pytest.raises(ValueError, match="drop_rate"):
        T.efficientnet_cc_b0_4e(drop_rate=1.5)
    with pytest.raises(ValueError, match="channels-last"):
        J.efficientnet_cc_b0_4e().init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 32, 32), jnp.int32))


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed (optional)")
@pytest.mark.parametrize("name", ["tf_efficientnet_cc_b0_4e", "efficientnet_cc_b1_8e"])
def test_timm_checkpoint_loads_strictly_with_equal_logits(name):
    import timm

    ref = _randomized(timm.create_model(name, pretrained=False)).double()
    mine = getattr(T, name)().double().eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 67, 61, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_evaluate_on_mock_imagenet(tmp_path):
    import tensorflow_datasets as tfds

    from train import evaluate as ev

    torch.manual_seed(0)
    tm = _randomized(T.tf_efficientnet_cc_b0_4e())
    path = str(tmp_path / "pytorch_model.pth")
    torch.save({"state_dict": tm.state_dict()}, path)
    with tfds.testing.mock_data(num_examples=6):
        result = ev.evaluate(
            "tf_efficientnet_cc_b0_4e", path, "imagenet2012", "validation", batch_size=4, input_size=48, workers=2
        )
        src = tfds.data_source("imagenet2012", split="validation")
        records = [src[i] for i in range(6)]
        assert (
            ev.main(
                [
                    "--model",
                    "tf_efficientnet_cc_b0_4e",
                    "--checkpoint",
                    path,
                    "--input_size",
                    "48",
                    "--batch_size",
                    "6",
                    "--num_examples",
                    "3",
                ]
            )
            == 0
        )
    cfg = J.DEFAULT_CFGS["tf_efficientnet_cc_b0_4e"]
    x = np.stack([ev.preprocess(r["image"], 48, cfg["crop_pct"], cfg["mean"], cfg["std"]) for r in records])
    assert x.shape == (6, 48, 48, 3)
    with torch.no_grad():  # the reference: the PyTorch model on the same preprocessed images
        logits = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    labels = np.array([int(r["label"]) for r in records])
    top5 = np.argsort(-logits, -1)[:, :5]
    assert result["num_examples"] == 6
    assert result["top1"] == np.mean(top5[:, 0] == labels)
    assert result["top5"] == np.mean(np.any(top5 == labels[:, None], -1))


def test_preprocess_center_crop_and_normalization():
    from train.evaluate import preprocess

    img = np.full((40, 80, 3), 255, np.uint8)
    img[:, :40] = 0  # left half black
    out = preprocess(img, 32, 0.5, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # resize to 64x128, crop the middle 32
    assert out.shape == (32, 32, 3)
    np.testing.assert_allclose(out[:, :8], -1.0, atol=1e-6)
    np.testing.assert_allclose(out[:, -8:], 1.0, atol=1e-6)
