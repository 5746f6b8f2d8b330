"""Tests of dynconv_jax.convert on synthetic PyTorch modules and hand-built Flax templates.

The layouts are checked functionally (a torch layer and the Flax layer built from converted
weights compute the same output), not only by round trips, so a wrong-but-invertible
layout would fail.
"""

import os
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _helpers import random_variables

from dynconv_jax.convert import (
    ConversionError,
    flax_module_to_torch,
    flax_to_torch,
    load_state_dict,
    save_safetensors,
    torch_module_to_flax,
    torch_to_flax,
)

# ----------------------------------------------------------------------------- fixtures


class TorchNet(torch.nn.Module):
    """Every plain layout: conv 1-D/2-D/3-D, BatchNorm, Linear, 1x1 conv, lists, nested lists."""

    def __init__(self):
        super().__init__()
        self.conv1d = torch.nn.Conv1d(3, 4, 3, bias=False)
        self.conv = torch.nn.Conv2d(3, 5, (3, 2), groups=1)
        self.conv3d = torch.nn.Conv3d(2, 3, (1, 2, 3))
        self.bn = torch.nn.BatchNorm2d(5)
        self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(5, 5, 1) for _ in range(2)])
        self.nested = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6)))
        self.fc = torch.nn.Linear(6, 7)


class FlaxNet(nn.Module):
    """The Flax mirror of TorchNet: 1x1 convs as Dense, lists named the flax way."""

    @nn.compact
    def __call__(self, x1, x2, x3):
        nn.Conv(4, (3,), use_bias=False, name="conv1d")(x1)
        nn.Conv(3, (1, 2, 3), name="conv3d")(x3)
        x = nn.Conv(5, (3, 2), name="conv")(x2)
        x = nn.BatchNorm(use_running_average=True, name="bn")(x)
        for i in range(2):
            x = nn.Dense(5, name=f"blocks_{i}")(x)
        x = nn.Dense(6, name="nested_0_0")(x.mean((1, 2)))
        x = nn.BatchNorm(use_running_average=True, name="nested_0_1")(x)
        return nn.Dense(7, name="fc")(x)


class Experts(nn.Module):
    """A CondConv-shaped Flax module: an expert stack [K, *k, I, O], [K, O] bias, routing Dense."""

    features: int
    kernel_size: tuple
    in_features: int
    num_experts: int = 3
    routing: bool = True

    @nn.compact
    def __call__(self, x):
        k = self.param(
            "kernel", nn.initializers.normal(), (self.num_experts, *self.kernel_size, self.in_features, self.features)
        )
        if self.routing:
            self.param("bias", nn.initializers.normal(), (self.num_experts, self.features))
            nn.Dense(self.num_experts, name="routing_fn")(x.mean(tuple(range(1, x.ndim - 1))))
        return k


def _randomize(module: torch.nn.Module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)
            else:
                t.fill_(7)
    return module


def _inputs(dtype=np.float32):
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(2, 3, 9)).astype(dtype),
        rng.normal(size=(2, 3, 8, 6)).astype(dtype),
        rng.normal(size=(2, 2, 3, 4, 5)).astype(dtype),
    )


def _template(dtype=jnp.float32):
    x1, x2, x3 = _inputs()
    args = (np.moveaxis(x1, 1, -1), np.moveaxis(x2, 1, -1), np.moveaxis(x3, 1, -1))
    return jax.eval_shape(lambda: FlaxNet().init(jax.random.PRNGKey(0), *args))


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "torch_key,flax_path",
    [
        ("layer1.0.conv1", ("layer1_0", "conv1")),
        ("downsample.1", ("downsample_1",)),
        ("features.3.conv.0.0", ("features_3", "conv_0_0")),
        ("attention.kernel_fc", ("attention", "kernel_fc")),
        ("", ()),
    ],
)
def test_names_both_ways(torch_key, flax_path):
    assert torch_module_to_flax(torch_key) == flax_path
    assert flax_module_to_torch(flax_path) == torch_key


# ----------------------------------------------------------------------------- layouts


def test_layouts_compute_the_same_function():
    """Converted weights make the Flax layers compute what the torch layers compute."""
    tnet = _randomize(TorchNet()).eval()
    v = torch_to_flax(tnet.state_dict(), _template())
    x1, x2, x3 = _inputs()
    p = v["params"]
    with torch.no_grad():
        y1 = tnet.conv1d(torch.from_numpy(x1)).numpy()
        y2 = tnet.conv(torch.from_numpy(x2)).numpy()
        y3 = tnet.conv3d(torch.from_numpy(x3)).numpy()
        h = np.moveaxis(y2, 1, -1)
        yb = tnet.bn(torch.from_numpy(y2)).numpy()
        xn = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
        yn = tnet.nested(xn).numpy()
    f1 = nn.Conv(4, (3,), use_bias=False, padding="VALID").apply({"params": p["conv1d"]}, np.moveaxis(x1, 1, -1))
    f2 = nn.Conv(5, (3, 2), padding="VALID").apply({"params": p["conv"]}, np.moveaxis(x2, 1, -1))
    f3 = nn.Conv(3, (1, 2, 3), padding="VALID").apply({"params": p["conv3d"]}, np.moveaxis(x3, 1, -1))
    fb = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(
        {"params": p["bn"], "batch_stats": v["batch_stats"]["bn"]}, h
    )
    np.testing.assert_allclose(np.moveaxis(np.asarray(f1), -1, 1), y1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.moveaxis(np.asarray(f2), -1, 1), y2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.moveaxis(np.asarray(f3), -1, 1), y3, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.moveaxis(np.asarray(fb), -1, 1), yb, rtol=1e-5, atol=1e-5)
    # 1x1 conv -> Dense and Linear -> Dense
    xin = torch.randn(2, 5, 1, 1)
    with torch.no_grad():
        yc = tnet.blocks[1](xin).reshape(2, 5).numpy()
    fc = nn.Dense(5).apply({"params": p["blocks_1"]}, xin.reshape(2, 5).numpy())
    np.testing.assert_allclose(np.asarray(fc), yc, rtol=1e-5, atol=1e-6)
    xl = torch.randn(3, 6)
    with torch.no_grad():
        yl = tnet.fc(xl).numpy()
    np.testing.assert_allclose(np.asarray(nn.Dense(7).apply({"params": p["fc"]}, xl.numpy())), yl, rtol=1e-5, atol=1e-6)
    # nested Sequential: Linear then BatchNorm1d
    hn = nn.Dense(6).apply({"params": p["nested_0_0"]}, xn.numpy())
    fn = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(
        {"params": p["nested_0_1"], "batch_stats": v["batch_stats"]["nested_0_1"]}, hn
    )
    np.testing.assert_allclose(np.asarray(fn), yn, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [(3,), (3, 2), (1, 2, 2), (1, 1)])
def test_expert_stacks_and_timm_flattened(kernel_size):
    """[K,O,I,*k] and timm's flattened [K, O*I*prod(k)] both land as [K,*k,I,O], and back."""
    K, O, I = 3, 4, 2
    w = torch.randn(K, O, I, *kernel_size, dtype=torch.float64)
    bias = torch.randn(K, O, dtype=torch.float64)
    rw, rb = torch.randn(K, I, dtype=torch.float64), torch.randn(K, dtype=torch.float64)
    module = Experts(O, kernel_size, I, K)
    x = jnp.zeros((1,) + (5,) * len(kernel_size) + (I,))
    template = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float64), template)
    sd = {"weight": w, "bias": bias, "routing_fn.weight": rw, "routing_fn.bias": rb}
    v = torch_to_flax(sd, template)
    expected = np.transpose(w.numpy(), (0, *range(3, 3 + len(kernel_size)), 2, 1))
    np.testing.assert_array_equal(v["params"]["kernel"], expected)
    np.testing.assert_array_equal(v["params"]["routing_fn"]["kernel"], rw.numpy().T)
    flat = dict(sd, weight=w.reshape(K, -1))
    v_flat = torch_to_flax(flat, template)
    np.testing.assert_array_equal(v_flat["params"]["kernel"], expected)
    # Per-expert semantics: expert k of the flax stack is torch's expert k as a flax conv kernel.
    for k in range(K):
        np.testing.assert_array_equal(v["params"]["kernel"][k], np.moveaxis(w[k].numpy(), (0, 1), (-1, -2)))
    # back: default export is the unflattened [K,O,I,*k]; like= gives timm's flattened layout
    back = flax_to_torch(v)
    assert torch.equal(back["weight"], w)
    back_flat = flax_to_torch(v, like=flat)
    assert torch.equal(back_flat["weight"], flat["weight"]) and list(back_flat) == list(flat)


def test_ambiguous_expert_shapes_use_module_evidence():
    """K == O == I with a 2-D kernel: [K,O,I,h,w] fits both a 3-D conv and a 2-D expert stack.
    With a routing sub-module (or [K,O] bias) it is an expert stack; without evidence the
    2-D reading wins too; a [O,I,h,w] 4-D tensor stays a 2-D conv."""
    n = 3
    w = torch.randn(n, n, n, 2, 3, dtype=torch.float64)
    expected = np.transpose(w.numpy(), (0, 3, 4, 2, 1))
    for routing in (True, False):
        module = Experts(n, (2, 3), n, n, routing=routing)
        template = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, n)))
        template = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float64), template)
        sd = {"weight": w}
        if routing:
            sd.update(
                {
                    "bias": torch.zeros(n, n, dtype=torch.float64),
                    "routing_fn.weight": torch.zeros(n, n, dtype=torch.float64),
                    "routing_fn.bias": torch.zeros(n, dtype=torch.float64),
                }
            )
        v = torch_to_flax(sd, template)
        np.testing.assert_array_equal(v["params"]["kernel"], expected)
        assert torch.equal(flax_to_torch(v)["weight"], w)


# ----------------------------------------------------------------------------- round trips


def test_torch_flax_torch_is_bit_exact():
    tnet = _randomize(TorchNet())
    tnet.bn.num_batches_tracked.fill_(12)
    sd = tnet.state_dict()
    v = torch_to_flax(sd, _template())
    back = flax_to_torch(v, like=sd)
    assert list(back) == list(sd)
    for k, t in sd.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    # without like: the counters are 0; the 1x1 convs come back as Linear [O, I]; the rest is exact
    plain = flax_to_torch(v)
    assert set(plain) == set(sd)
    assert int(plain["bn.num_batches_tracked"]) == 0 and plain["bn.num_batches_tracked"].dtype == torch.int64
    assert tuple(plain["blocks.0.weight"].shape) == (5, 5)
    # A 5-D kernel without expert evidence reads as a 2-D expert stack [K,*k,I,O] -> [K,O,I,*k]
    # (this is a 2-D library); a 3-D conv needs like= to come back as [O,I,d,h,w].
    assert tuple(plain["conv3d.weight"].shape) == (1, 3, 2, 2, 3)
    for k, t in sd.items():
        if "num_batches" not in k and "blocks" not in k and "conv3d" not in k:
            assert torch.equal(plain[k], t), k
    # the module itself works as `like`, and a {key: shape} dict too
    assert torch.equal(flax_to_torch(v, like=tnet)["blocks.1.weight"], sd["blocks.1.weight"])
    shapes = {k: tuple(t.shape) for k, t in sd.items()}
    by_shape = flax_to_torch(v, like=shapes)
    assert int(by_shape["bn.num_batches_tracked"]) == 0 and torch.equal(
        by_shape["blocks.1.weight"], sd["blocks.1.weight"]
    )


def test_flax_torch_flax_is_bit_exact():
    rng = np.random.default_rng(3)
    v = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), _template())  # random BN stats too
    sd = flax_to_torch(v)
    tnet = TorchNet()
    # 1x1 convs: the default export gives Linear [O,I]; the torch model wants [O,I,1,1] -> use like=
    with pytest.raises(RuntimeError):
        tnet.load_state_dict(sd)
    tnet.load_state_dict(flax_to_torch(v, like=tnet))
    for sd_ in (sd, tnet.state_dict()):
        again = torch_to_flax(sd_, v)
        assert jax.tree.structure(again) == jax.tree.structure(dict(v))
        for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(v)):
            assert a.dtype == b.dtype and np.array_equal(a, np.asarray(b))


def test_outputs_never_alias_the_inputs():
    sd = TorchNet().state_dict()
    v = torch_to_flax(sd, _template())
    v["params"]["fc"]["bias"][0] += 1.0
    assert not np.array_equal(v["params"]["fc"]["bias"], sd["fc.bias"].numpy())
    back = flax_to_torch(v)
    back["fc.bias"][0] += 1.0
    assert back["fc.bias"][0] != v["params"]["fc"]["bias"][0]


def test_dtype_follows_template():
    tnet = _randomize(TorchNet()).double()
    sd = tnet.state_dict()
    t32 = _template()
    v32 = torch_to_flax(sd, t32)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(v32))
    np.testing.assert_array_equal(v32["params"]["fc"]["bias"], sd["fc.bias"].numpy().astype(np.float32))
    t64 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float64), t32)
    v64 = torch_to_flax({k: t.float() for k, t in sd.items()}, t64)
    assert all(a.dtype == np.float64 for a in jax.tree.leaves(v64))
    np.testing.assert_array_equal(v64["params"]["fc"]["bias"], sd["fc.bias"].float().numpy().astype(np.float64))
    # flax -> torch: dtypes follow `like`
    back = flax_to_torch(v32, like=sd)
    assert back["fc.weight"].dtype == torch.float64


def test_bfloat16_is_bit_exact():
    w = torch.randn(4, 3).to(torch.bfloat16)
    template = {"params": {"fc": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.bfloat16)}}}
    v = torch_to_flax({"fc.weight": w}, template)
    assert v["params"]["fc"]["kernel"].dtype == jnp.bfloat16
    assert torch.equal(flax_to_torch(v)["fc.weight"], w)


# ----------------------------------------------------------------------------- errors


def test_every_problem_is_reported_at_once():
    sd = dict(TorchNet().state_dict())
    sd.pop("fc.bias")  # missing
    sd["extra.weight"] = torch.zeros(3)  # unexpected
    sd["conv.weight"] = torch.zeros(5, 3, 2, 2)  # wrong shape
    sd["bn.weight"] = torch.zeros(5, dtype=torch.int64)  # wrong dtype
    with pytest.raises(ConversionError) as info:
        torch_to_flax(sd, _template())
    msg = str(info.value)
    assert "1 missing, 1 unexpected, 1 wrong shape, 1 wrong dtype" in msg
    assert "params:fc/bias [7]" in msg and "'fc.bias'" in msg
    assert "'extra.weight'" in msg
    assert (
        "[5, 3, 2, 2]" in msg and "[3, 2, 3, 5]" in msg and "[5, 3, 3, 2]" in msg
    )  # both shapes + expected torch shape
    assert "int64 cannot become float32" in msg
    assert len(info.value.problems) == 4


def test_odconv_attention_norm_layer_converts_and_refuses_an_official_checkpoint():
    """``attention_norm='layer'``: its own state dict converts both ways; an official (BatchNorm) one is refused."""
    from dynconv_jax import ODConv
    from dynconv_torch import ODConv2d

    template = jax.eval_shape(
        lambda: ODConv(6, (3, 3), num_experts=2, attention_norm="layer").init(
            jax.random.key(0), jnp.zeros((2, 5, 5, 4))
        )
    )
    layer_sd = ODConv2d(4, 6, 3, kernel_num=2, attention_norm="layer").state_dict()
    flax_vars = torch_to_flax(layer_sd, template)
    np.testing.assert_array_equal(flax_vars["params"]["attention"]["ln"]["scale"], layer_sd["attention.ln.weight"])
    with pytest.raises(ConversionError) as info:
        torch_to_flax(ODConv2d(4, 6, 3, kernel_num=2).state_dict(), template)
    msg = str(info.value)
    assert "params:attention/ln/scale" in msg and "'attention.bn.running_mean'" in msg


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "dtype"])
def test_each_error_alone(case):
    sd = dict(TorchNet().state_dict())
    if case == "missing":
        del sd["nested.0.1.running_var"]
        word = "missing: flax batch_stats:nested_0_1/var"
    elif case == "unexpected":
        sd["blocks.2.weight"] = torch.zeros(5, 5, 1, 1)
        word = "unexpected: torch 'blocks.2.weight'"
    elif case == "shape":
        sd["fc.weight"] = torch.zeros(6, 7)
        word = "wrong shape: torch 'fc.weight' [6, 7] vs flax params:fc/kernel [6, 7]"
    else:
        sd["nested.0.1.running_mean"] = torch.zeros(6, dtype=torch.int32)
        word = "wrong dtype: torch 'nested.0.1.running_mean'"
    with pytest.raises(ConversionError, match="does not match") as info:
        torch_to_flax(sd, _template())
    assert word in str(info.value) and len(info.value.problems) == 1


def test_flax_to_torch_reports_mismatches_with_like():
    v = torch_to_flax(TorchNet().state_dict(), _template())
    like = dict(TorchNet().state_dict())
    like["fc.weight"] = torch.zeros(7, 4)
    del like["conv.bias"]
    with pytest.raises(ConversionError) as info:
        flax_to_torch(v, like=like)
    assert "wrong shape: torch 'fc.weight' [7, 4]" in str(info.value)
    assert "missing: flax params:conv/bias" in str(info.value)


def test_bad_template():
    with pytest.raises(ConversionError, match="'params' collection"):
        torch_to_flax({"w": torch.zeros(1)}, {"fc": {"kernel": np.zeros(1)}})


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "model_state_dict", "module_prefix", "nested"])
@pytest.mark.parametrize("ext", [".pt", ".pth"])
def test_checkpoint_files(tmp_path, wrap, ext):
    sd = _randomize(TorchNet()).state_dict()
    obj = {
        "raw": sd,
        "state_dict": {"epoch": 3, "arch": "net", "state_dict": sd, "best_acc1": 0.5},
        "model": {"model": sd, "optimizer": {"lr": 0.1}},
        "model_state_dict": {"model_state_dict": sd},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "nested": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }[wrap]
    path = tmp_path / f"ckpt{ext}"
    torch.save(obj, path)
    v = torch_to_flax(str(path), _template())
    np.testing.assert_array_equal(v["params"]["conv"]["kernel"], sd["conv.weight"].numpy().transpose(2, 3, 1, 0))
    v2 = torch_to_flax(path, _template())  # pathlib too
    np.testing.assert_array_equal(v2["batch_stats"]["bn"]["var"], sd["bn.running_var"].numpy())


def test_safetensors_roundtrip_loads_strictly_into_torch(tmp_path):
    tnet = _randomize(TorchNet())
    v = torch_to_flax(tnet.state_dict(), _template())
    path = tmp_path / "model.safetensors"
    save_safetensors(v, path, like=tnet)
    from safetensors.torch import load_file

    fresh = TorchNet()
    fresh.load_state_dict(load_file(str(path)), strict=True)
    for k, t in tnet.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], t), k
    again = torch_to_flax(str(path), _template())  # read back without torch (safetensors.numpy)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(v)):
        np.testing.assert_array_equal(a, b)


def test_truncated_safetensors_is_refused(tmp_path):
    v = torch_to_flax(TorchNet().state_dict(), _template())
    path = tmp_path / "model.safetensors"
    save_safetensors(v, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"is a truncated safetensors file: its header declares"):
        torch_to_flax(str(path), _template())


class _Evil:
    """Unpickling this would create a file (the payload a malicious checkpoint would carry)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_code_is_refused_not_executed(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": _Evil(marker)}, path)
    assert not os.path.exists(marker)
    with pytest.raises(ConversionError, match="refused to load"):
        torch_to_flax(str(path), _template())
    assert not os.path.exists(marker)
    # the same payload as a legacy (non-zip) pickle
    legacy = tmp_path / "evil_legacy.pth"
    with open(legacy, "wb") as f:
        pickle.dump({"payload": _Evil(marker)}, f)
    with pytest.raises(ConversionError, match="refused to load|cannot read"):
        torch_to_flax(str(legacy), _template())
    assert not os.path.exists(marker)
    # sanity check that the payload does run under plain unpickling, so the test can fail
    pickle.loads(pickle.dumps(_Evil(marker))).close()
    assert os.path.exists(marker)


def test_missing_file_and_non_tensor_entries(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        torch_to_flax(str(tmp_path / "nope.pt"), _template())
    with pytest.raises(ConversionError, match="not tensors"):
        load_state_dict({"a.weight": torch.zeros(1), "b": 3})
    with pytest.raises(ConversionError, match="no tensors at the top level"):
        load_state_dict({"epoch": 1, "opt": {"lr": 0.1}})


# ----------------------------------------------------------------------------- issue 35: wrappers, odd files, writing


def _wrapped(sd, form):
    """``sd`` the way a training script or a wrapper saves it."""
    return {
        "DataParallel of DataParallel": {f"module.module.{k}": v for k, v in sd.items()},
        "torch.compile of DataParallel": {f"_orig_mod.module.{k}": v for k, v in sd.items()},
        "tensor epoch beside the state_dict": {"state_dict": sd, "epoch": torch.tensor(3), "best": torch.tensor(0.5)},
        "timm EMA only": {"state_dict_ema": sd, "epoch": 3},
        "torchvision model and EMA": {"model": sd, "model_ema": {k: v + 1 for k, v in sd.items()}, "epoch": 3},
    }[form]


@pytest.mark.parametrize(
    "form",
    [
        "DataParallel of DataParallel",
        "torch.compile of DataParallel",
        "tensor epoch beside the state_dict",
        "timm EMA only",
        "torchvision model and EMA",
    ],
)
def test_common_wrappers_are_unwrapped(form):
    """Nested wrapper prefixes (310 missing + 310 unexpected before) and a tensor beside the state_dict
    ('state_dict entries that are not tensors' before); the EMA copy is used only when it is the only one."""
    sd = _randomize(TorchNet()).state_dict()
    v = torch_to_flax(_wrapped(sd, form), _template())
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["fc.weight"].numpy().T)


def test_an_unknown_common_prefix_is_named_in_the_error():
    sd = _randomize(TorchNet()).state_dict()
    with pytest.raises(
        ConversionError,
        match=r"21 missing, 21 unexpected; every checkpoint key starts with 'model\.', "
        r"which is no module of the Flax model",
    ):
        torch_to_flax({f"model.{k}": v for k, v in sd.items()}, _template())


def test_meta_tensors_are_refused_as_a_source_and_serve_as_like():
    with torch.device("meta"):
        meta = TorchNet()
    with pytest.raises(ConversionError, match=r"23 of 23 checkpoint entries are meta-device tensors"):
        torch_to_flax(meta.state_dict(), _template())
    variables = torch_to_flax(_randomize(TorchNet()).state_dict(), _template())
    state = flax_to_torch(variables, like=meta)  # like needs shapes and dtypes only
    assert list(state) == list(meta.state_dict()) and int(state["bn.num_batches_tracked"]) == 0


def _odd_file(path, kind, sd):
    """Write ``kind`` to ``path``."""
    if kind == "text":
        path.write_text("hello world\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "npz":
        np.savez(path, **{k: v.numpy() for k, v in sd.items()})
    elif kind in ("safetensors", "truncated safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(path))
        data = path.read_bytes()
        assert data[0] == 0x80  # the header length's first byte is a pickle's first byte
        path.write_bytes(data if kind == "safetensors" else data[:100])
    elif kind == "npz with objects":
        with open(path, "wb") as f:
            np.savez(f, a=np.array([object()], dtype=object))


@pytest.mark.parametrize(
    "kind,name,match",
    [
        (
            "text",
            "model.pt",
            r"'.*model.pt' is not a checkpoint file: neither a PyTorch file \(zip or pickle\), a "
            r"safetensors file nor an .npz; it starts with b'hello world\\n'",
        ),
        ("empty", "model.pt", r"model.pt' is empty \(0 bytes\)"),
        (
            "truncated safetensors",
            "pytorch_model.bin",
            r"is a truncated safetensors file: its header declares \d+ bytes "
            r"of JSON, the file holds 92 after the 8-byte length",
        ),
        ("npz with objects", "weights.npz", r"cannot read the .npz file .*arrays only, no pickled objects"),
        ("npz", "weights.npz", None),  # an .npz of arrays converts
        ("safetensors", "pytorch_model.bin", None),  # was read as a pickle: 1 in 256 header lengths start with 0x80
    ],
)
def test_files_that_are_not_checkpoints(tmp_path, kind, name, match):
    """A text file named .pt was 'KeyError: 101', a truncated safetensors header named .bin 'refused ... objects
    other than tensors', an .npz a torch zip error."""
    sd = _randomize(TorchNet()).state_dict()
    path = tmp_path / name
    _odd_file(path, kind, sd)
    if match is None:
        np.testing.assert_array_equal(torch_to_flax(path, _template())["params"]["fc"]["kernel"], sd["fc.weight"].T)
    else:
        with pytest.raises(ConversionError, match=match):
            torch_to_flax(path, _template())


@pytest.mark.parametrize(
    "target,metadata,match",
    [
        ("dir", None, r"save_safetensors: path='.*' is a directory"),
        ("missing/model.safetensors", None, r"cannot be written: the folder '.*missing' does not exist"),
        ("file/model.safetensors", None, r"cannot be written: '.*file' is a file, not a folder"),
        ("model.safetensors", {"epoch": 3}, r"metadata keys and values must be strings .*'epoch': 3"),
        ("model.safetensors", {3: "x"}, r"metadata keys and values must be strings .*3: 'x'"),
        ("model.safetensors", "epoch=3", r"metadata must be a mapping of str to str, got str"),
    ],
)
def test_save_safetensors_checks_path_and_metadata_before_converting(tmp_path, target, metadata, match):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    shape_only = _template()  # would fail later, in the conversion: the checks come first
    with pytest.raises(ValueError, match=match):
        save_safetensors(shape_only, tmp_path / target, metadata=metadata)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]


def test_nonfinite_weights_are_refused_both_ways(tmp_path):
    """flax_to_torch / save_safetensors wrote NaN weights that torch_to_flax then refused; both directions
    now refuse by default and take allow_nonfinite=True, and what they write converts back."""
    variables = jax.tree.map(np.array, torch_to_flax(_randomize(TorchNet()).state_dict(), _template()))
    variables["params"]["fc"]["kernel"][0, 0] = np.nan
    variables["batch_stats"]["bn"]["var"][1] = np.inf
    path = tmp_path / "model.safetensors"
    for write in (lambda: flax_to_torch(variables), lambda: save_safetensors(variables, path)):
        with pytest.raises(
            ConversionError,
            match=r"the Flax variables hold NaN/Inf \(2 of 21; .*\n  - "
            r"params:fc/kernel \[6, 7\]\n  - batch_stats:bn/var \[5\]",
        ):
            write()
    assert not path.exists()
    save_safetensors(variables, path, allow_nonfinite=True)
    with pytest.raises(ConversionError, match=r"checkpoint entries hold NaN/Inf \(2 of 23"):
        torch_to_flax(path, _template())
    back = torch_to_flax(path, _template(), allow_nonfinite=True)
    assert np.isnan(back["params"]["fc"]["kernel"][0, 0]) and np.isinf(back["batch_stats"]["bn"]["var"][1])
    assert torch.isnan(flax_to_torch(variables, allow_nonfinite=True)["fc.weight"][0, 0])


# Bad checkpoints: renamed files, NaN/Inf weights, templates without values.

_X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 3)), jnp.float32)


def _dynamic_variables():
    """Random variables of a 3x3 DynamicConv with 4 features for ``_X`` (NumPy draws, no init compiled)."""
    from dynconv_jax import DynamicConv

    return random_variables(DynamicConv(features=4, kernel_size=(3, 3)), _X)


def test_safetensors_renamed_bin_loads(tmp_path):
    from dynconv_jax.convert import save_safetensors, torch_to_flax

    variables = _dynamic_variables()
    save_safetensors(variables, tmp_path / "m.safetensors")
    os.rename(tmp_path / "m.safetensors", tmp_path / "pytorch_model.bin")
    out = torch_to_flax(str(tmp_path / "pytorch_model.bin"), variables)
    np.testing.assert_array_equal(out["params"]["kernel"], variables["params"]["kernel"])


def test_nonfinite_weights_are_refused_with_their_keys(tmp_path):
    from dynconv_jax.convert import ConversionError, flax_to_torch, save_safetensors, torch_to_flax

    variables = _dynamic_variables()
    state = flax_to_torch(variables)
    state["weight"][0, 0, 0, 0, 0] = float("nan")
    state["attention.fc1.bias"][1] = float("-inf")
    with pytest.raises(ConversionError, match=r"hold NaN/Inf \(2 of 6.*allow_nonfinite=True") as info:
        torch_to_flax(state, variables)
    assert sorted(info.value.problems) == ["attention.fc1.bias [4]", "weight [4, 4, 3, 3, 3]"]
    assert np.isnan(torch_to_flax(state, variables, allow_nonfinite=True)["params"]["kernel"]).any()
    # A .safetensors overwritten in place with the same size: the header still parses, the data is garbage.
    path = tmp_path / "m.safetensors"
    save_safetensors(variables, path)
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    raw[data_start:] = b"\xff" * (len(raw) - data_start)  # 0xffffffff is a float32 NaN
    path.write_bytes(bytes(raw))
    with pytest.raises(ConversionError, match=r"hold NaN/Inf \(6 of 6"):
        torch_to_flax(str(path), variables)


def test_flax_to_torch_on_a_shape_only_template():
    from dynconv_jax import DynamicConv
    from dynconv_jax.convert import ConversionError, flax_to_torch

    template = jax.eval_shape(lambda: DynamicConv(4, (3, 3)).init(jax.random.key(0), _X))
    with pytest.raises(ConversionError, match=r"6 leaves without values(.|\n)*params:kernel"):
        flax_to_torch(template)
