"""Tests of the PyTorch reference layers (dynconv_torch.CondConv2d, DynamicConv2d, ODConv2d).

The main check: each layer equals a naive per-sample loop that builds sample b's aggregated
kernel (channel and filter attentions folded into it for ODConv) and calls ``F.conv2d`` on that
one sample, in float64, to <= 1e-12 relative (max|a - b| / max|b|), over a seeded random sample of
the geometry grid in eval and train mode. The attentions of the reference are recomputed here
from the layers' parameters (not taken from the layers).
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dynconv_spec import OFFICIAL_ODCONV_SPELLINGS
from dynconv_torch import CondConv2d, DynamicConv2d, ODConv2d, set_temperature

DT = torch.float64
TOL = 1e-12  # relative, float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (element-wise relative error is meaningless near zero)."""
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize_(layer: nn.Module, seed: int) -> nn.Module:
    """Random values for every parameter and BN running statistic, so no attention is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
        for name, b in layer.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.3)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)
    return layer


# --------------------------------------------------------------------------- naive reference


def naive_conv(x, experts, a, *, stride, padding, dilation, groups, spatial=None, channel=None, filt=None, bias=None):
    """Loop over samples and experts: ``y_b = conv(x_b, W_b) + sum_k a_bk bias_k`` with
    ``W_b[o, i] = f_b[o] * c_b[in(o, i)] * s_b * sum_k a_bk W_k[o, i]``.

    experts ``[K, O, I/g, kh, kw]``, a ``[B, K]``, spatial ``[B, kh, kw]``, channel ``[B, I]``,
    filt ``[B, O]``, bias ``[K, O]``.
    """
    k_num, out_ch, in_per_group = experts.shape[:3]
    # input channel seen by kernel entry (o, i): group(o) * I/g + i
    in_index = (torch.arange(out_ch)[:, None] // (out_ch // groups)) * in_per_group + torch.arange(in_per_group)
    outs = []
    for b in range(x.shape[0]):
        w = sum(a[b, k] * experts[k] for k in range(k_num))
        if spatial is not None:
            w = w * spatial[b]
        if channel is not None:
            w = w * channel[b][in_index][:, :, None, None]
        if filt is not None:
            w = w * filt[b][:, None, None, None]
        bb = None if bias is None else sum(a[b, k] * bias[k] for k in range(k_num))
        outs.append(F.conv2d(x[b : b + 1], w, bb, stride=stride, padding=padding, dilation=dilation, groups=groups))
    return torch.cat(outs)


def pooled(x):
    return x.mean(dim=(2, 3))


def ref_condconv(layer: CondConv2d, x, dropout_seed=None):
    """CondConv routing recomputed; in training the dropout mask is replayed from ``dropout_seed``."""
    p = pooled(x)
    if layer.training and layer.routing_dropout:
        torch.manual_seed(dropout_seed)
        p = F.dropout(p, layer.routing_dropout, True)
    r = torch.sigmoid((p @ layer.routing_fn.weight.T + layer.routing_fn.bias) / layer.temperature)
    experts = layer.weight.reshape((layer.num_experts,) + layer.weight_shape)  # timm: rows are OIHW kernels
    return naive_conv(
        x,
        experts,
        r,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias,
    )


def ref_dynamic(layer: DynamicConv2d, x):
    fc1, fc2 = layer.attention.fc1, layer.attention.fc2
    z = torch.relu(pooled(x) @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias
    pi = torch.exp(z / layer.temperature)
    pi = pi / pi.sum(dim=1, keepdim=True)
    return naive_conv(
        x,
        layer.weight,
        pi,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias,
    )


def ref_odconv_attention(layer: ODConv2d, x, training: bool):
    """``h = relu(bn(fc(GAP(x))))`` and the four heads, from the parameters (BN batch stats in training)."""
    att, t = layer.attention, layer.temperature
    h = pooled(x) @ att.fc.weight[:, :, 0, 0].T  # [B, A]
    if training:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = att.bn.running_mean, att.bn.running_var
    h = torch.relu((h - mean) / torch.sqrt(var + att.bn.eps) * att.bn.weight + att.bn.bias)

    def head(fc):
        return None if fc is None else (h @ fc.weight[:, :, 0, 0].T + fc.bias) / t

    sig = lambda z: None if z is None else 1.0 / (1.0 + torch.exp(-z))  # noqa: E731
    spatial = sig(head(att.spatial_fc))
    kz = head(att.kernel_fc)
    kernel = torch.ones(x.shape[0], 1, dtype=x.dtype) if kz is None else torch.exp(kz) / torch.exp(kz).sum(1, True)
    return dict(
        channel=sig(head(att.channel_fc)),
        filt=sig(head(att.filter_fc)),
        spatial=None if spatial is None else spatial.reshape((x.shape[0],) + layer.kernel_size),
        kernel=kernel,
        h_pre_bn=pooled(x) @ att.fc.weight[:, :, 0, 0].T,
    )


def ref_odconv(layer: ODConv2d, x, training: bool):
    a = ref_odconv_attention(layer, x, training)
    return naive_conv(
        x,
        layer.weight,
        a["kernel"],
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        spatial=a["spatial"],
        channel=a["channel"],
        filt=a["filt"],
    )


# --------------------------------------------------------------------------- the randomized grid

KERNELS, STRIDES, PADDINGS, DILATIONS = (1, 3, 5), (1, 2), ("int", "same", "valid"), (1, 2)
GROUPS, BIASES, EXPERTS, BATCHES = (1, 2, "dw"), (True, False), (1, 4), (1, 3)
N_PER_LAYER = 48


def grid_sample(seed: int):
    """A seeded random sample of the full geometry product ('same' only with stride 1)."""
    full = [
        c
        for c in itertools.product(KERNELS, STRIDES, PADDINGS, DILATIONS, GROUPS, BIASES, EXPERTS, BATCHES)
        if not (c[2] == "same" and c[1] != 1)
    ]
    rng = random.Random(seed)
    out = []
    for i, (k, s, pad, d, g, bias, n_exp, batch) in enumerate(rng.sample(full, N_PER_LAYER)):
        if g == "dw":
            cin = cout = groups = 4
        else:
            cin, cout, groups = 4, 6, g
        padding = rng.choice((0, 1, 2)) if pad == "int" else pad
        extent = (k - 1) * d + 1
        h = max(rng.choice((7, 9, 11)), extent)  # mostly odd; big enough for 'valid'
        w = max(rng.choice((5, 9, 13)), extent)
        temperature = rng.choice((1.0, 3.7))
        out.append(
            dict(
                cin=cin,
                cout=cout,
                kernel_size=k,
                stride=s,
                padding=padding,
                dilation=d,
                groups=groups,
                bias=bias,
                num_experts=n_exp,
                batch=batch,
                hw=(h, w),
                temperature=temperature,
                seed=i,
            )
        )
    return out


EDGE_CASES = [  # beyond the sample: channel multiplier, pairs, asymmetric geometry, even sizes, 'same' with dilation
    dict(
        cin=4,
        cout=8,
        kernel_size=3,
        stride=1,
        padding=1,
        dilation=1,
        groups=4,
        bias=True,
        num_experts=4,
        batch=3,
        hw=(8, 6),
        temperature=1.0,
        seed=100,
    ),
    dict(
        cin=4,
        cout=6,
        kernel_size=(3, 1),
        stride=(2, 1),
        padding=(1, 0),
        dilation=(1, 2),
        groups=2,
        bias=True,
        num_experts=4,
        batch=2,
        hw=(7, 5),
        temperature=2.0,
        seed=101,
    ),
    dict(
        cin=4,
        cout=6,
        kernel_size=5,
        stride=1,
        padding="same",
        dilation=2,
        groups=1,
        bias=False,
        num_experts=4,
        batch=1,
        hw=(3, 4),
        temperature=1.0,
        seed=102,
    ),
    dict(
        cin=6,
        cout=6,
        kernel_size=1,
        stride=2,
        padding=0,
        dilation=1,
        groups=6,
        bias=True,
        num_experts=1,
        batch=3,
        hw=(9, 9),
        temperature=1.0,
        seed=103,
    ),
    dict(
        cin=4,
        cout=6,
        kernel_size=(2, 4),
        stride=1,
        padding="same",
        dilation=1,
        groups=2,
        bias=True,
        num_experts=4,
        batch=2,
        hw=(5, 7),
        temperature=1.0,
        seed=104,
    ),
]

CASES = {name: grid_sample(seed) + EDGE_CASES for name, seed in (("condconv", 1), ("dynamic", 2), ("odconv", 3))}


def build(name: str, cfg: dict, **extra) -> nn.Module:
    geo = dict(
        stride=cfg["stride"],
        padding=cfg["padding"],
        dilation=cfg["dilation"],
        groups=cfg["groups"],
        temperature=cfg["temperature"],
        dtype=DT,
    )
    if name == "condconv":
        layer = CondConv2d(
            cfg["cin"],
            cfg["cout"],
            cfg["kernel_size"],
            bias=cfg["bias"],
            num_experts=cfg["num_experts"],
            **geo,
            **extra,
        )
    elif name == "dynamic":
        layer = DynamicConv2d(
            cfg["cin"],
            cfg["cout"],
            cfg["kernel_size"],
            bias=cfg["bias"],
            num_experts=cfg["num_experts"],
            **geo,
            **extra,
        )
    else:  # ODConv has no bias
        layer = ODConv2d(cfg["cin"], cfg["cout"], cfg["kernel_size"], kernel_num=cfg["num_experts"], **geo, **extra)
    return randomize_(layer, cfg["seed"])


def make_input(cfg: dict, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + cfg["seed"])
    return torch.randn((batch, cfg["cin"]) + cfg["hw"], generator=g, dtype=DT)


def _ids(cases):
    return [
        f"k{c['kernel_size']}-s{c['stride']}-p{c['padding']}-d{c['dilation']}-g{c['groups']}-b{int(c['bias'])}"
        f"-K{c['num_experts']}-B{c['batch']}"
        for c in cases
    ]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cfg", CASES["condconv"], ids=_ids(CASES["condconv"]))
def test_condconv_matches_naive_loop(cfg, train):
    layer = build("condconv", cfg, routing_dropout=0.3).train(train)
    x = make_input(cfg, cfg["batch"])
    torch.manual_seed(7)  # the layer's dropout draws its mask from here; the reference replays it
    y = layer(x)
    assert rel_err(y, ref_condconv(layer, x, dropout_seed=7)) <= TOL


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cfg", CASES["dynamic"], ids=_ids(CASES["dynamic"]))
def test_dynamic_conv_matches_naive_loop(cfg, train):
    layer = build("dynamic", cfg).train(train)
    x = make_input(cfg, cfg["batch"])
    assert rel_err(layer(x), ref_dynamic(layer, x)) <= TOL


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cfg", CASES["odconv"], ids=_ids(CASES["odconv"]))
def test_odconv_matches_naive_loop(cfg, train):
    layer = build("odconv", cfg).train(train)
    batch = max(cfg["batch"], 2) if train else cfg["batch"]  # a training batch of one is an error (tested below)
    x = make_input(cfg, batch)
    bn = layer.attention.bn
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    expected = ref_odconv(layer, x, train)  # before the forward: eval mode uses the running stats
    assert rel_err(layer(x), expected) <= TOL
    if train:  # running stats: momentum 0.1 with the unbiased batch variance (what dynconv_jax.norm mirrors)
        h = ref_odconv_attention(layer, x, True)["h_pre_bn"]
        assert rel_err(bn.running_mean, 0.9 * mean0 + 0.1 * h.mean(0)) <= TOL
        assert rel_err(bn.running_var, 0.9 * var0 + 0.1 * h.var(0, unbiased=True)) <= TOL


def test_condconv_external_routing_matches_naive_loop():
    cfg = EDGE_CASES[1]
    layer = build("condconv", cfg, external_routing=True)
    x = make_input(cfg, 3)
    r = torch.rand(3, 4, dtype=DT)
    expected = naive_conv(
        x,
        layer.weight.reshape((4,) + layer.weight_shape),
        r,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias,
    )
    assert rel_err(layer(x, r), expected) <= TOL


def test_condconv_routing_dropout_only_in_training():
    cfg = EDGE_CASES[0]
    layer = build("condconv", cfg, routing_dropout=0.5)
    x = make_input(cfg, 3)
    layer.eval()
    torch.manual_seed(0)
    e0 = layer(x)
    torch.manual_seed(1)
    assert torch.equal(layer(x), e0)  # eval: no dropout, the seed does not matter
    layer.train()
    torch.manual_seed(0)
    t0 = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(layer(x), t0)  # train: the mask depends on the seed
    assert not torch.equal(t0, e0)


def test_channels_last_input():
    cfg = EDGE_CASES[0]
    for name in ("condconv", "dynamic", "odconv"):
        layer = build(name, cfg).eval()
        x = make_input(cfg, 3)
        assert rel_err(layer(x.contiguous(memory_format=torch.channels_last)), layer(x)) <= TOL


# --------------------------------------------------------------------------- gradients


def _gradcheck(layer: nn.Module, x: torch.Tensor, *extra_inputs):
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters()]
    x = x.detach().clone().requires_grad_(True)
    extra = [e.detach().clone().requires_grad_(True) for e in extra_inputs]

    def f(x, *rest):
        ps, ex = rest[: len(params)], rest[len(params) :]
        return functional_call(layer, dict(zip(names, ps)), (x, *ex))

    assert torch.autograd.gradcheck(f, (x, *params, *extra), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_gradcheck_condconv(train):
    layer = randomize_(
        CondConv2d(4, 4, 3, padding=1, groups=2, bias=True, num_experts=3, temperature=2.0, dtype=DT), 0
    ).train(train)
    _gradcheck(layer, torch.randn(2, 4, 5, 5, dtype=DT))  # routing_dropout=0: deterministic in training


def test_gradcheck_condconv_external_routing():
    layer = randomize_(
        CondConv2d(4, 4, 3, stride=2, padding="valid", bias=True, num_experts=3, external_routing=True, dtype=DT), 1
    )
    _gradcheck(layer, torch.randn(2, 4, 6, 5, dtype=DT), torch.rand(2, 3, dtype=DT))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_gradcheck_dynamic_conv(train):
    layer = randomize_(
        DynamicConv2d(4, 4, 3, padding="same", dilation=2, groups=2, num_experts=3, temperature=3.0, dtype=DT), 2
    ).train(train)
    _gradcheck(layer, torch.randn(2, 4, 5, 5, dtype=DT))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "shape",
    [(4, 4, 3, 1, 2, 3), (4, 4, 3, 4, 4, 2), (4, 6, 1, 1, 1, 1)],
    ids=["3x3-g1-K3", "depthwise-K2", "1x1-K1-fastpath"],
)
def test_gradcheck_odconv(shape, train):
    cin, cout, k, groups, _, n_exp = shape
    layer = randomize_(
        ODConv2d(cin, cout, k, padding=k // 2, groups=groups, kernel_num=n_exp, temperature=2.0, dtype=DT), 3
    ).train(train)
    _gradcheck(layer, torch.randn(2, cin, 4, 5, dtype=DT))


# --------------------------------------------------------------------------- K = 1 with neutral attention


GEOMETRIES = [  # (cin, cout, kernel_size, stride, padding, dilation, groups)
    (4, 6, 3, 1, 1, 1, 1),
    (4, 6, 3, 2, "valid", 1, 2),
    (4, 4, 5, 1, "same", 2, 4),
    (4, 8, 1, 2, 0, 1, 1),
    (6, 6, 1, 1, 0, 1, 6),
    (4, 6, (3, 1), 1, (1, 0), 1, 2),
]


def _static(cin, cout, k, s, p, d, g, weight, bias):
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias is not None, dtype=DT)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


@pytest.mark.parametrize("geo", GEOMETRIES)
def test_k1_neutral_reduces_to_conv2d(geo):
    cin, cout, k, s, p, d, g = geo
    x = torch.randn(3, cin, 9, 7, dtype=DT)

    # DynamicConv: softmax over one expert is exactly 1 whatever the attention MLP computes.
    dyn = randomize_(DynamicConv2d(cin, cout, k, s, p, d, g, num_experts=1, dtype=DT), 0).train()
    assert rel_err(dyn(x), _static(*geo, dyn.weight[0], dyn.bias[0])(x)) <= TOL

    # CondConv: routing weight exactly 1 — from outside, or sigmoid(40) (== 1.0 in float64) inside.
    ext = randomize_(CondConv2d(cin, cout, k, s, p, d, g, bias=True, num_experts=1, external_routing=True, dtype=DT), 1)
    ref = _static(*geo, ext.weight.view((1,) + ext.weight_shape)[0], ext.bias[0])
    assert rel_err(ext(x, torch.ones(3, 1, dtype=DT)), ref(x)) <= TOL
    cc = randomize_(CondConv2d(cin, cout, k, s, p, d, g, bias=True, num_experts=1, dtype=DT), 2).eval()
    with torch.no_grad():
        cc.routing_fn.weight.zero_()
        cc.routing_fn.bias.fill_(40.0)
    assert torch.equal(cc.attentions(x)["kernel_attention"], torch.ones(3, 1, dtype=DT))
    assert rel_err(cc(x), _static(*geo, cc.weight.view((1,) + cc.weight_shape)[0], cc.bias[0])(x)) <= TOL

    # ODConv: kernel attention is skipped for K == 1; channel, filter and spatial heads with zero
    # weights and bias 40 give sigmoid == 1.0 exactly, so y == conv(x, W_0) in train and eval.
    od = randomize_(ODConv2d(cin, cout, k, s, p, d, g, kernel_num=1, dtype=DT), 3)
    with torch.no_grad():
        for fc in (od.attention.channel_fc, od.attention.filter_fc, od.attention.spatial_fc):
            if fc is not None:
                fc.weight.zero_()
                fc.bias.fill_(40.0)
    ref = _static(*geo, od.weight[0], None)
    for mode in (od.train, od.eval):
        mode()
        att = od.attentions(x)
        assert all(torch.equal(v, torch.ones_like(v)) for v in att.values())
        assert rel_err(od(x), ref(x)) <= TOL


def test_odconv_attentions_and_skips():
    x = torch.randn(2, 4, 6, 6, dtype=DT)
    full = randomize_(ODConv2d(4, 6, 3, padding=1, kernel_num=4, dtype=DT), 0).eval()
    att = full.attentions(x)
    ref = ref_odconv_attention(full, x, False)
    assert {k: tuple(v.shape) for k, v in att.items()} == {
        "kernel_attention": (2, 4),
        "channel_attention": (2, 4),
        "filter_attention": (2, 6),
        "spatial_attention": (2, 3, 3),
    }
    for key, rkey in (
        ("kernel_attention", "kernel"),
        ("channel_attention", "channel"),
        ("filter_attention", "filt"),
        ("spatial_attention", "spatial"),
    ):
        assert rel_err(att[key], ref[rkey]) <= TOL
    assert torch.allclose(att["kernel_attention"].sum(1), torch.ones(2, dtype=DT), atol=1e-15, rtol=0)
    skipped = ODConv2d(4, 4, 1, groups=4, kernel_num=1, dtype=DT)  # depthwise, 1x1, K = 1
    assert skipped.attention.filter_fc is None and skipped.attention.spatial_fc is None
    assert skipped.attention.kernel_fc is None
    assert set(skipped.eval().attentions(x)) == {"kernel_attention", "channel_attention"}


# --------------------------------------------------------------------------- state dicts

# Measured by running the official OSVAI/ODConv modules/odconv.py (commit acb771c) with torch 2.13.0:
# ODConv2d(in_planes, out_planes, kernel_size, stride, padding, dilation, groups, reduction, kernel_num).state_dict()
# -> {key: shape}. Our layer must produce exactly these keys and shapes.
_BN = lambda a: {
    "attention.bn.weight": (a,),
    "attention.bn.bias": (a,),
    "attention.bn.running_mean": (a,),  # noqa
    "attention.bn.running_var": (a,),
    "attention.bn.num_batches_tracked": (),
}
OFFICIAL_ODCONV_STATE = {
    (64, 64, 3, 1, 1, 1, 1, 0.0625, 4): {
        "weight": (4, 64, 64, 3, 3),
        "attention.fc.weight": (16, 64, 1, 1),
        **_BN(16),
        "attention.channel_fc.weight": (64, 16, 1, 1),
        "attention.channel_fc.bias": (64,),
        "attention.filter_fc.weight": (64, 16, 1, 1),
        "attention.filter_fc.bias": (64,),
        "attention.spatial_fc.weight": (9, 16, 1, 1),
        "attention.spatial_fc.bias": (9,),
        "attention.kernel_fc.weight": (4, 16, 1, 1),
        "attention.kernel_fc.bias": (4,),
    },
    (32, 32, 3, 1, 1, 1, 32, 0.0625, 4): {  # depthwise: no filter_fc
        "weight": (4, 32, 1, 3, 3),
        "attention.fc.weight": (16, 32, 1, 1),
        **_BN(16),
        "attention.channel_fc.weight": (32, 16, 1, 1),
        "attention.channel_fc.bias": (32,),
        "attention.spatial_fc.weight": (9, 16, 1, 1),
        "attention.spatial_fc.bias": (9,),
        "attention.kernel_fc.weight": (4, 16, 1, 1),
        "attention.kernel_fc.bias": (4,),
    },
    (16, 32, 1, 1, 0, 1, 1, 0.0625, 1): {  # 1x1, K = 1: no spatial_fc, no kernel_fc
        "weight": (1, 32, 16, 1, 1),
        "attention.fc.weight": (16, 16, 1, 1),
        **_BN(16),
        "attention.channel_fc.weight": (16, 16, 1, 1),
        "attention.channel_fc.bias": (16,),
        "attention.filter_fc.weight": (32, 16, 1, 1),
        "attention.filter_fc.bias": (32,),
    },
    (24, 48, 1, 2, 0, 1, 1, 0.0625, 4): {
        "weight": (4, 48, 24, 1, 1),
        "attention.fc.weight": (16, 24, 1, 1),
        **_BN(16),
        "attention.channel_fc.weight": (24, 16, 1, 1),
        "attention.channel_fc.bias": (24,),
        "attention.filter_fc.weight": (48, 16, 1, 1),
        "attention.filter_fc.bias": (48,),
        "attention.kernel_fc.weight": (4, 16, 1, 1),
        "attention.kernel_fc.bias": (4,),
    },
    (512, 256, 3, 2, 1, 1, 1, 0.0625, 2): {  # A = int(512 / 16) = 32 > min_channel
        "weight": (2, 256, 512, 3, 3),
        "attention.fc.weight": (32, 512, 1, 1),
        **_BN(32),
        "attention.channel_fc.weight": (512, 32, 1, 1),
        "attention.channel_fc.bias": (512,),
        "attention.filter_fc.weight": (256, 32, 1, 1),
        "attention.filter_fc.bias": (256,),
        "attention.spatial_fc.weight": (9, 32, 1, 1),
        "attention.spatial_fc.bias": (9,),
        "attention.kernel_fc.weight": (2, 32, 1, 1),
        "attention.kernel_fc.bias": (2,),
    },
    (8, 8, 5, 1, 4, 2, 2, 0.25, 1): {
        "weight": (1, 8, 4, 5, 5),
        "attention.fc.weight": (16, 8, 1, 1),
        **_BN(16),
        "attention.channel_fc.weight": (8, 16, 1, 1),
        "attention.channel_fc.bias": (8,),
        "attention.filter_fc.weight": (8, 16, 1, 1),
        "attention.filter_fc.bias": (8,),
        "attention.spatial_fc.weight": (25, 16, 1, 1),
        "attention.spatial_fc.bias": (25,),
    },
    (16, 16, 1, 1, 0, 1, 16, 0.0625, 1): {  # depthwise 1x1 K = 1: only fc, bn, channel_fc
        "weight": (1, 16, 1, 1, 1),
        "attention.fc.weight": (16, 16, 1, 1),
        **_BN(16),
        "attention.channel_fc.weight": (16, 16, 1, 1),
        "attention.channel_fc.bias": (16,),
    },
}


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("args", list(OFFICIAL_ODCONV_STATE), ids=str)
def test_odconv_state_dict_equals_official(args):
    layer = ODConv2d(*args)
    assert _shapes(layer) == OFFICIAL_ODCONV_STATE[args]
    # an official-layout state dict loads with strict=True and lands where it should
    g = torch.Generator().manual_seed(0)
    sd = {
        k: (torch.tensor(5) if s == () else torch.randn(s, generator=g)) for k, s in OFFICIAL_ODCONV_STATE[args].items()
    }
    layer.load_state_dict(sd, strict=True)
    assert all(torch.equal(v, sd[k]) for k, v in layer.state_dict().items())


def test_odconv_takes_the_official_and_the_library_spellings_but_not_both():
    a = ODConv2d(in_channels=8, out_channels=16, kernel_size=3, num_experts=2, min_channels=4, reduction=0.25)
    assert (a.in_planes, a.out_planes, a.kernel_num, a.min_channel, a.attention_channels) == (8, 16, 2, 4, 4)
    assert (a.in_channels, a.out_channels, a.num_experts, a.min_channels) == (8, 16, 2, 4)
    b = ODConv2d(8, 16, 3, 1, 0, 1, 1, 0.25, 2, 4)
    assert _shapes(a) == _shapes(b)
    for official, generic in OFFICIAL_ODCONV_SPELLINGS.items():  # both given, even equal: which one was meant?
        args = {"in_planes": 8, "out_planes": 16, "kernel_size": 3, official: 4, generic: 4}
        with pytest.raises(
            ValueError,
            match=rf"ODConv2d: {official}=4 and {generic}=4 are two spellings of one "
            rf"argument \({official} is the official ODConv name",
        ):
            ODConv2d(**args)


# Measured from timm's CondConv2d (timm/layers/cond_conv2d.py, huggingface/pytorch-image-models) with
# torch 2.13.0: CondConv2d(in, out, kernel_size, stride, padding, dilation, groups, bias, num_experts).
TIMM_CONDCONV_STATE = {
    (8, 16, 3, 1, 1, 1, 1, True, 4): {"weight": (4, 1152), "bias": (4, 16)},
    (8, 8, 3, 2, 1, 1, 8, False, 4): {"weight": (4, 72)},
    (6, 9, 1, 1, 0, 1, 3, True, 1): {"weight": (1, 18), "bias": (1, 9)},
}


@pytest.mark.parametrize("args", list(TIMM_CONDCONV_STATE), ids=str)
def test_condconv_state_dict_matches_timm(args):
    in_ch, n_exp = args[0], args[-1]
    ext = CondConv2d(*args, external_routing=True)
    assert _shapes(ext) == TIMM_CONDCONV_STATE[args]
    own = CondConv2d(*args)
    assert _shapes(own) == {
        **TIMM_CONDCONV_STATE[args],
        "routing_fn.weight": (n_exp, in_ch),
        "routing_fn.bias": (n_exp,),
    }
    sd = {k: torch.randn(s) for k, s in TIMM_CONDCONV_STATE[args].items()}
    ext.load_state_dict(sd, strict=True)
    assert all(torch.equal(v, sd[k]) for k, v in ext.state_dict().items())


def test_condconv_loads_five_dim_expert_weight():
    layer = CondConv2d(4, 6, (3, 2), groups=2, bias=True, num_experts=3, dtype=DT)
    experts = torch.randn(3, 6, 2, 3, 2, dtype=DT)  # [K, O, I/g, kh, kw]
    sd = dict(layer.state_dict(), weight=experts)
    layer.load_state_dict(sd, strict=True)
    assert layer.weight.shape == (3, 6 * 2 * 3 * 2)
    assert torch.equal(layer.weight[1], experts[1].flatten())  # row k = expert k, OIHW row-major
    assert sd["weight"] is experts  # the caller's dict is not modified
    x = torch.randn(2, 4, 5, 5, dtype=DT)
    layer.eval()
    r = layer.attentions(x)["kernel_attention"]
    expected = naive_conv(x, experts, r, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=2, bias=layer.bias)
    assert rel_err(layer(x), expected) <= TOL
    # nested under a parent module (the prefix is honoured)
    parent = nn.Sequential(CondConv2d(4, 6, (3, 2), groups=2, num_experts=3, dtype=DT))
    psd = parent.state_dict()
    psd["0.weight"] = experts
    parent.load_state_dict(psd, strict=True)
    assert torch.equal(parent[0].weight, experts.reshape(3, -1))
    # a 5-D weight of the wrong shape is left to load_state_dict's own size-mismatch error
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        layer.load_state_dict(dict(layer.state_dict(), weight=torch.randn(3, 6, 2, 3, 3, dtype=DT)))


# --------------------------------------------------------------------------- init, temperature


def test_init_experts_like_conv2d():
    for layer in (CondConv2d(8, 16, 3, bias=True, num_experts=4), DynamicConv2d(8, 16, 3, num_experts=4)):
        experts = layer.weight.detach().reshape(4, 16, 8, 3, 3)
        bound = 1 / math.sqrt(8 * 9)  # kaiming_uniform(a=sqrt(5)) and the conv bias: U(-1/sqrt(fan_in), ...)
        assert experts.abs().max() <= bound and experts.abs().max() > 0.95 * bound
        assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0.8 * bound
        assert not torch.equal(experts[0], experts[1])  # experts drawn independently
        before = layer.weight.detach().clone()
        layer.reset_parameters()
        assert not torch.equal(before, layer.weight)


def test_init_odconv_official():
    """``attention_bn_init=1.0`` is the official initialisation; the default differs only in the BN weight."""
    layer = ODConv2d(64, 64, 3, kernel_num=2, attention_bn_init=1.0)
    fan_out = 64 * 9
    for k in range(2):  # kaiming_normal(fan_out, relu): std sqrt(2 / fan_out), 36864 draws per expert
        assert abs(layer.weight[k].std().item() / math.sqrt(2 / fan_out) - 1) < 0.03
    att = layer.attention
    for fc in (att.channel_fc, att.filter_fc, att.spatial_fc, att.kernel_fc):
        assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
    assert abs(att.channel_fc.weight.std().item() / math.sqrt(2 / 64) - 1) < 0.1  # fan_out = 64 outputs
    assert torch.equal(att.bn.weight, torch.ones(16)) and torch.equal(att.bn.bias, torch.zeros(16))
    layer.train()(torch.randn(2, 64, 4, 4))
    assert att.bn.num_batches_tracked.item() == 1
    layer.reset_parameters()
    assert att.bn.num_batches_tracked.item() == 0 and torch.equal(att.bn.running_mean, torch.zeros(16))
    assert torch.equal(att.bn.weight, torch.ones(16))
    torch.manual_seed(3)
    official = ODConv2d(8, 16, 3, attention_bn_init=1.0)
    torch.manual_seed(3)
    default = ODConv2d(8, 16, 3)  # same random stream; only the BN weight differs
    assert torch.equal(default.attention.bn.weight, torch.full((16,), 0.1))
    changed = [k for k, v in default.state_dict().items() if not torch.equal(v, official.state_dict()[k])]
    assert changed == ["attention.bn.weight"]
    default.attention.bn.weight.data.fill_(7.0)
    default.reset_parameters()
    assert torch.equal(default.attention.bn.weight, torch.full((16,), 0.1))
    assert "attention_bn_init=0.1" in repr(default)


def test_odconv_attention_norm_layer_and_none_train_with_a_batch_of_one():
    """``attention_norm='layer'`` / ``'none'``: their own state dict (official checkpoints refused), any batch size."""
    torch.manual_seed(0)
    official = ODConv2d(4, 6, 3, padding=1, kernel_num=2)
    for norm, keys in (("layer", {"attention.ln.weight", "attention.ln.bias"}), ("none", set())):
        torch.manual_seed(0)
        layer = ODConv2d(4, 6, 3, padding=1, kernel_num=2, attention_norm=norm, attention_bn_init=0.5)
        norm_keys = {k for k in layer.state_dict() if ".bn." in k or ".ln." in k}
        assert norm_keys == keys and f"attention_norm='{norm}'" in repr(layer)
        shared = {k: v for k, v in official.state_dict().items() if ".bn." not in k}
        assert all(torch.equal(layer.state_dict()[k], v) for k, v in shared.items())  # same random stream
        if norm == "layer":
            assert torch.equal(layer.attention.ln.weight, torch.full((16,), 0.5))
        with pytest.raises(RuntimeError, match="attention.bn"):
            layer.load_state_dict(official.state_dict())
        x = torch.randn(1, 4, 5, 5, requires_grad=True)
        layer.train()(x).square().sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"ODConv2d\(.*attention_norm='group'"):
        ODConv2d(4, 4, 3, attention_norm="group")
    with pytest.raises(ValueError, match="batch of one sample"):
        official.train()(torch.randn(1, 4, 5, 5))


def test_temperature():
    x = torch.randn(2, 4, 6, 6, dtype=DT)
    model = nn.Sequential(
        CondConv2d(4, 4, 3, padding=1, dtype=DT),
        nn.ReLU(),
        DynamicConv2d(4, 4, 3, padding=1, dtype=DT),
        ODConv2d(4, 4, 3, padding=1, dtype=DT),
    )
    model.eval()
    before = model(x)
    assert set_temperature(model, 30.0) == 3
    assert [m.temperature for m in (model[0], model[2], model[3])] == [30.0] * 3
    assert "temperature" not in " ".join(model.state_dict())
    assert rel_err(model[2](x), ref_dynamic(model[2], x)) <= TOL  # the reference reads T = 30 too
    after = model(x)
    assert not torch.allclose(before, after)
    set_temperature(model, 1e9)  # T -> infinity: the softmax becomes uniform, the sigmoids 1/2
    assert (model[2].attentions(x)["kernel_attention"] - 0.25).abs().max() < 1e-8
    assert (model[0].attentions(x)["kernel_attention"] - 0.5).abs().max() < 1e-8
    set_temperature(model, 30.0)
    assert "temperature=30.0" in repr(model[3])
    for bad in (0.0, -1.0, float("nan"), float("inf"), "hot"):
        with pytest.raises(ValueError, match="temperature"):
            model[3].update_temperature(bad)
    with pytest.raises(ValueError, match=r"^CondConv2d\(4, 4.*temperature=0.0 must be finite"):
        set_temperature(model, 0.0)


# --------------------------------------------------------------------------- errors


LAYERS = {
    "CondConv2d": lambda *a, **k: CondConv2d(*a, **k),
    "DynamicConv2d": lambda *a, **k: DynamicConv2d(*a, **k),
    "ODConv2d": lambda *a, kernel_num=None, num_experts=4, **k: ODConv2d(*a, kernel_num=num_experts, **k),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((6, 4, 3), dict(groups=4), r"in_channels=6 must be divisible by groups=4"),
        ((4, 6, 3), dict(groups=4), r"out_channels=6 must be divisible by groups=4"),
        ((4, 6, 3), dict(num_experts=0), r"number of experts K must be an int >= 1, got 0"),
        ((4, 6, 3), dict(padding="full"), r"invalid padding string 'full', should be one of"),
        ((4, 6, 3), dict(padding="SAME"), r"invalid padding string 'SAME'"),
        ((4, 6, 3), dict(padding="same", stride=2), r"padding='same' is not supported for strided convolutions"),
        ((4, 6, 3), dict(padding=-1), r"padding must be an int or a pair of ints >= 0"),
        ((4, 6, 0), {}, r"kernel_size must be an int or a pair of ints >= 1"),
        ((4, 6, (3, 3, 3)), {}, r"kernel_size must be an int or a pair"),
        ((4, 6, 3), dict(stride=0), r"stride must be"),
        ((4, 6, 3), dict(dilation=(1, 0)), r"dilation must be"),
        ((0, 6, 3), {}, r"in_channels must be an int >= 1"),
        ((4, 6, 3), dict(temperature=0.0), r"temperature=0.0 must be finite and > 0"),
        # issue 35: the Flax layers' rules (dynconv_spec), before anything is allocated
        ((4, 6, 3), dict(temperature=True), r"temperature=True is a bool"),
        ((4, 6, 3), dict(temperature=1e-300), r"temperature=1e-300 is below 1e-06, the smallest temperature"),
        ((4, 6, 3), dict(dtype=torch.int32), r"dtype=torch.int32 must be a real floating-point dtype"),
        ((4, 6, 3), dict(dtype=torch.complex64), r"dtype=torch.complex64 must be a real floating-point dtype"),
        (
            (4, 6, 3),
            dict(num_experts=10**9),
            r"expert bank \[1000000000, 6, 4, 3, 3\] \(num_experts=1000000000\) would "
            r"hold 2.16e\+11 parameters",
        ),
    ],
)
def test_constructor_errors(name, args, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        LAYERS[name](*args, **kwargs)
    assert str(info.value).startswith(name + "(")  # says where


def test_layer_specific_constructor_errors():
    with pytest.raises(ValueError, match=r"CondConv2d\(.*routing_dropout must be in \[0, 1\)"):
        CondConv2d(4, 4, 3, routing_dropout=1.0)
    with pytest.raises(ValueError, match=r"DynamicConv2d\(.*reduction must be > 0"):
        DynamicConv2d(4, 4, 3, reduction=0.0)
    with pytest.raises(ValueError, match=r"ODConv2d\(.*min_channel must be an int >= 1"):
        ODConv2d(4, 4, 3, min_channel=0)
    with pytest.raises(ValueError, match=r"in_planes=4 and in_channels=8 are two spellings of one argument"):
        ODConv2d(4, 4, 3, in_channels=8)
    with pytest.raises(ValueError, match=r"ODConv2d\(.*kernel_size is required"):
        ODConv2d(in_channels=4, out_channels=4)
    for bad in (0.0, -0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match=r"ODConv2d\(.*attention_bn_init=.* must be a finite number > 0"):
            ODConv2d(4, 4, 3, attention_bn_init=bad)


@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_input_errors(name):
    layer = LAYERS[name](4, 6, 3, padding=1)
    where = name + "(4, 6, kernel_size=(3, 3)"
    with pytest.raises(ValueError, match=r"expected a 4-D NCHW input \[B, C, H, W\], got shape \(4, 5, 5\)") as e:
        layer(torch.randn(4, 5, 5))
    assert str(e.value).startswith(where)
    with pytest.raises(
        ValueError,
        match=r"expected 4 input channels \(dim 1 of NCHW\), got input of shape "
        r"\(2, 3, 5, 5\)",
    ) as e:
        layer(torch.randn(2, 3, 5, 5))
    assert str(e.value).startswith(where)
    with pytest.raises(ValueError, match="empty batch"):
        layer(torch.randn(0, 4, 5, 5))
    with pytest.raises(TypeError, match="expected a torch.Tensor input, got list"):
        layer([[1.0]])
    with pytest.raises(ValueError, match="4-D NCHW"):
        layer.attentions(torch.randn(4, 5, 5))


def test_odconv_training_batch_of_one():
    layer = ODConv2d(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(
        ValueError,
        match=r"^ODConv2d\(4, 6, kernel_size=\(3, 3\).*batch of one sample in training "
        r"mode.*BatchNorm.*more than one sample",
    ):
        layer.train()(x)
    with pytest.raises(ValueError, match="batch of one sample"):
        layer.attentions(x)
    assert layer.eval()(x).shape == (1, 6, 5, 5)  # eval mode uses the running statistics


def test_condconv_routing_errors():
    ext = CondConv2d(4, 6, 3, num_experts=3, external_routing=True)
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(
        ValueError,
        match=r"^CondConv2d\(.*external_routing=True, so forward\(x, routing_weights\) "
        r"needs routing_weights of shape \[B, K\] = \[2, 3\]",
    ):
        ext(x)
    with pytest.raises(ValueError, match=r"routing_weights must have shape \[B, K\] = \[2, 3\], got \(2, 4\)"):
        ext(x, torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"got \(3,\)"):
        ext(x, torch.rand(3))
    with pytest.raises(ValueError, match="the routing weights come from outside"):
        ext.attentions(x)
    own = CondConv2d(4, 6, 3, num_experts=3)
    with pytest.raises(ValueError, match=r"computes its own routing from x; construct it with external_routing=True"):
        own(x, torch.rand(2, 3))
