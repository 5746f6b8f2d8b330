"""EfficientNet-CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for
Efficient Inference", NeurIPS 2019, arXiv:1904.04971) on EfficientNet-B0/B1 (Tan & Le, ICML 2019).

The architecture, attribute names and ``state_dict`` are timm's
(``timm/models/efficientnet.py``: ``_gen_efficientnet_condconv`` and the ``tf_efficientnet_cc_*`` /
``efficientnet_cc_*`` entries), key for key and shape for shape, so timm's public checkpoints
(``tf_efficientnet_cc_b0_4e``, ``tf_efficientnet_cc_b0_8e``, ``tf_efficientnet_cc_b1_8e``, ported
from the TensorFlow release) load with ``strict=True``::

    model = tf_efficientnet_cc_b0_4e()
    model.load_state_dict(torch.load("pytorch_model.bin", map_location="cpu"))

Layout (B0): stem 3x3/2 conv + BN + swish; 7 stages of MBConv blocks (a depthwise-separable block,
then inverted residuals with static squeeze-excitation); the inverted residuals of the last three
stages are CondConv blocks: one routing function per block, ``r = sigmoid(routing_fn(GAP(x)) / T)``
computed once from the block input and shared by the block's pointwise expansion, depthwise and
projection :class:`~dynconv_torch.condconv.CondConv2d` (``external_routing=True``); 1x1 head conv +
BN + swish, global average pool, dropout, linear classifier.

``tf_*`` variants reproduce the TensorFlow original: BatchNorm eps 1e-3 and TF 'SAME' padding (for a
strided conv the odd pixel of padding goes to the bottom/right, computed from the input size);
the others use eps 1e-5 and symmetric PyTorch padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..condconv import CondConv2d
from ..functional import check_temperature, global_avg_pool
from .mobilenetv2 import make_divisible

__all__ = [
    "EfficientNetCondConv", "efficientnet_cc", "block_specs", "VARIANTS",
    "tf_efficientnet_cc_b0_4e", "tf_efficientnet_cc_b0_8e", "tf_efficientnet_cc_b1_8e",
    "efficientnet_cc_b0_4e", "efficientnet_cc_b0_8e", "efficientnet_cc_b1_8e",
]

BN_EPS_TF = 1e-3  # TensorFlow's BatchNormalization default, kept by the tf_* ports
BN_EPS_TORCH = 1e-5


@dataclass(frozen=True)
class StageSpec:
    """One stage of the EfficientNet-B0 table: ``repeats`` blocks of one kind."""

    block: str  # 'ds' (depthwise-separable) or 'ir' (inverted residual)
    repeats: int
    kernel_size: int  # depthwise kernel
    stride: int  # of the first block of the stage
    exp_ratio: float
    out_chs: int
    se_ratio: float  # squeeze ratio relative to the block input channels
    num_experts: int  # 0: static convs; > 0: CondConv block (before the experts multiplier)


#: EfficientNet-B0 with CondConv in the last three stages (timm ``_gen_efficientnet_condconv``).
CONDCONV_B0_STAGES: Tuple[StageSpec, ...] = (
    StageSpec("ds", 1, 3, 1, 1.0, 16, 0.25, 0),
    StageSpec("ir", 2, 3, 2, 6.0, 24, 0.25, 0),
    StageSpec("ir", 2, 5, 2, 6.0, 40, 0.25, 0),
    StageSpec("ir", 3, 3, 2, 6.0, 80, 0.25, 0),
    StageSpec("ir", 3, 5, 1, 6.0, 112, 0.25, 4),
    StageSpec("ir", 4, 5, 2, 6.0, 192, 0.25, 4),
    StageSpec("ir", 1, 3, 1, 6.0, 320, 0.25, 4),
)


@dataclass(frozen=True)
class BlockSpec:
    """One block, fully resolved (channels rounded, stride/experts/drop-path set)."""

    block: str
    in_chs: int
    out_chs: int
    kernel_size: int
    stride: int
    exp_ratio: float
    se_ratio: float
    num_experts: int
    drop_path_rate: float

    @property
    def mid_chs(self) -> int:
        """Expanded width of an inverted residual (the input width for 'ds')."""
        return make_divisible(self.in_chs * self.exp_ratio) if self.block == "ir" else self.in_chs

    @property
    def se_chs(self) -> int:
        """Squeeze width ``round(mid * (se_ratio / exp_ratio))``: the ratio is relative to the block input (timm)."""
        return round(self.mid_chs * (self.se_ratio / (self.exp_ratio if self.block == "ir" else 1.0)))

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_chs == self.out_chs


#: name -> (depth multiplier, experts multiplier, TF port). Channel multiplier is 1.0 for all.
VARIANTS: Dict[str, Tuple[float, int, bool]] = {
    "tf_efficientnet_cc_b0_4e": (1.0, 1, True),
    "tf_efficientnet_cc_b0_8e": (1.0, 2, True),
    "tf_efficientnet_cc_b1_8e": (1.1, 2, True),
    "efficientnet_cc_b0_4e": (1.0, 1, False),
    "efficientnet_cc_b0_8e": (1.0, 2, False),
    "efficientnet_cc_b1_8e": (1.1, 2, False),
}


def block_specs(stem_chs: int = 32, depth_multiplier: float = 1.0, channel_multiplier: float = 1.0,
                experts_multiplier: int = 1, drop_path_rate: float = 0.0,
                stages: Tuple[StageSpec, ...] = CONDCONV_B0_STAGES) -> List[List[BlockSpec]]:
    """Resolve the stage table into per-block specs, stage by stage.

    Depth scaling is EfficientNet's: ``ceil(repeats * depth_multiplier)`` blocks per stage; only
    the first block of a stage is strided. Block ``i`` of ``n`` gets drop-path rate
    ``drop_path_rate * i / n`` (stochastic depth grows linearly with depth).
    """
    if not (isinstance(experts_multiplier, int) and experts_multiplier >= 1):
        raise ValueError(f"block_specs: experts_multiplier={experts_multiplier!r} must be an int >= 1")
    counts = [int(math.ceil(s.repeats * depth_multiplier)) for s in stages]
    total = sum(counts)
    in_chs, index, out = stem_chs, 0, []
    for stage, count in zip(stages, counts):
        out_chs = make_divisible(stage.out_chs * channel_multiplier)
        blocks = []
        for j in range(count):
            blocks.append(BlockSpec(stage.block, in_chs, out_chs, stage.kernel_size, stage.stride if j == 0 else 1,
                                    stage.exp_ratio, stage.se_ratio, stage.num_experts * experts_multiplier,
                                    drop_path_rate * index / total))
            in_chs, index = out_chs, index + 1
        out.append(blocks)
    return out


# --------------------------------------------------------------------------- padding
def tf_same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """TensorFlow 'SAME' padding ``(before, after)`` of one spatial axis; the odd pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _static_padding(kernel_size: int, stride: int, tf_same: bool) -> Tuple[int, bool]:
    """``(symmetric padding, needs dynamic TF 'SAME' padding)`` as timm resolves its pad types.

    PyTorch style: ``((stride - 1) + (k - 1)) // 2``. TF 'SAME' is static (``(k - 1) // 2``) only
    for stride 1 and odd k; otherwise it depends on the input size and is applied in forward.
    """
    if not tf_same:
        return ((stride - 1) + (kernel_size - 1)) // 2, False
    if stride == 1 and (kernel_size - 1) % 2 == 0:
        return (kernel_size - 1) // 2, False
    return 0, True


def _pad_tf_same(x: Tensor, kernel_size: int, stride: int) -> Tensor:
    """Zero-pad ``x [B, C, H, W]`` for a TF 'SAME' convolution."""
    top, bottom = tf_same_padding(x.shape[-2], kernel_size, stride)
    left, right = tf_same_padding(x.shape[-1], kernel_size, stride)
    return F.pad(x, (left, right, top, bottom))


class Conv2dPad(nn.Conv2d):
    """Bias-free ``nn.Conv2d`` with timm's padding: PyTorch symmetric, or TF 'SAME' (``tf_same``)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False, tf_same: bool = False):
        padding, self.dynamic_pad = _static_padding(kernel_size, stride, tf_same)
        super().__init__(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic_pad:
            x = _pad_tf_same(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


class CondConv2dPad(CondConv2d):
    """:class:`CondConv2d` with external routing and timm's padding (see :class:`Conv2dPad`)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 num_experts: int = 4, tf_same: bool = False):
        padding, self.dynamic_pad = _static_padding(kernel_size, stride, tf_same)
        super().__init__(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False,
                         num_experts=num_experts, external_routing=True)

    def forward(self, x: Tensor, routing_weights: Tensor) -> Tensor:
        if self.dynamic_pad:
            x = _pad_tf_same(x, self.kernel_size[0], self.stride[0])
        return super().forward(x, routing_weights)


# --------------------------------------------------------------------------- blocks
def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples with probability ``rate``, scale the rest by ``1 / (1 - rate)``."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class SqueezeExcite(nn.Module):
    """Static squeeze-excitation: ``x * sigmoid(conv_expand(swish(conv_reduce(GAP(x)))))``."""

    def __init__(self, channels: int, se_chs: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, se_chs, 1, bias=True)
        self.conv_expand = nn.Conv2d(se_chs, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)  # [B, C, 1, 1]
        return x * torch.sigmoid(self.conv_expand(F.silu(self.conv_reduce(s))))


class DepthwiseSeparable(nn.Module):
    """dw conv + BN + swish, SE, 1x1 conv + BN (timm ``DepthwiseSeparableConv``)."""

    def __init__(self, spec: BlockSpec, bn_eps: float, tf_same: bool):
        super().__init__()
        self.spec = spec
        c = spec.in_chs
        self.conv_dw = Conv2dPad(c, c, spec.kernel_size, spec.stride, groups=c, tf_same=tf_same)
        self.bn1 = nn.BatchNorm2d(c, eps=bn_eps)
        self.se = SqueezeExcite(c, spec.se_chs)
        self.conv_pw = Conv2dPad(c, spec.out_chs, 1, tf_same=tf_same)
        self.bn2 = nn.BatchNorm2d(spec.out_chs, eps=bn_eps)

    def forward(self, x: Tensor) -> Tensor:
        y = F.silu(self.bn1(self.conv_dw(x)))
        y = self.bn2(self.conv_pw(self.se(y)))
        return drop_path(y, self.spec.drop_path_rate, self.training) + x if self.spec.has_skip else y


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expansion + BN + swish, dw conv + BN + swish, SE, 1x1 projection + BN.

    With ``spec.num_experts > 0`` the three convolutions are CondConv layers sharing one routing
    vector ``sigmoid(routing_fn(GAP(x)) / T)`` of the block input (timm ``CondConvResidual``).
    """

    def __init__(self, spec: BlockSpec, bn_eps: float, tf_same: bool):
        super().__init__()
        self.spec = spec
        mid, experts = spec.mid_chs, spec.num_experts
        conv = (partial(CondConv2dPad, num_experts=experts, tf_same=tf_same) if experts
                else partial(Conv2dPad, tf_same=tf_same))
        self.conv_pw = conv(spec.in_chs, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid, eps=bn_eps)
        self.conv_dw = conv(mid, mid, spec.kernel_size, spec.stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid, eps=bn_eps)
        self.se = SqueezeExcite(mid, spec.se_chs)
        self.conv_pwl = conv(mid, spec.out_chs, 1)
        self.bn3 = nn.BatchNorm2d(spec.out_chs, eps=bn_eps)
        # Registered last, as in timm, so the state_dict keys come in timm's order.
        self.routing_fn = nn.Linear(spec.in_chs, experts) if experts else None
        self.temperature = 1.0

    def update_temperature(self, temperature: float) -> None:
        """Routing temperature T (1 = timm / the paper); a plain attribute, not in the state_dict."""
        self.temperature = check_temperature(temperature, type(self).__name__)

    def routing(self, x: Tensor) -> Tensor:
        """``[B, K]`` routing weights of the block input ``x [B, C, H, W]``."""
        return torch.sigmoid(self.routing_fn(global_avg_pool(x)) / self.temperature)

    def forward(self, x: Tensor) -> Tensor:
        if self.routing_fn is not None:
            r = self.routing(x)
            y = F.silu(self.bn1(self.conv_pw(x, r)))
            y = self.se(F.silu(self.bn2(self.conv_dw(y, r))))
            y = self.bn3(self.conv_pwl(y, r))
        else:
            y = F.silu(self.bn1(self.conv_pw(x)))
            y = self.se(F.silu(self.bn2(self.conv_dw(y))))
            y = self.bn3(self.conv_pwl(y))
        return drop_path(y, self.spec.drop_path_rate, self.training) + x if self.spec.has_skip else y


# --------------------------------------------------------------------------- model
class EfficientNetCondConv(nn.Module):
    """EfficientNet with CondConv blocks (Yang et al., NeurIPS 2019), timm's module tree and state_dict.

    Args:
        depth_multiplier: EfficientNet depth scaling (B0: 1.0, B1: 1.1).
        experts_multiplier: multiplies the 4 experts of each CondConv stage (8e models: 2).
        tf_port: TensorFlow-compatible variant: BN eps 1e-3 and TF 'SAME' padding.
        num_classes: classifier width; 0 drops the classifier (``forward`` returns pooled features).
        drop_rate: dropout before the classifier (training only).
        drop_path_rate: stochastic depth of the last block (linear in depth before it).
        in_chans: input channels.
        channel_multiplier: EfficientNet width scaling (1.0 for all CondConv models).
        bn_eps: override the BatchNorm eps of the variant.
    """

    def __init__(self, depth_multiplier: float = 1.0, experts_multiplier: int = 1, tf_port: bool = False,
                 num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0, in_chans: int = 3,
                 channel_multiplier: float = 1.0, bn_eps: float = None):
        super().__init__()
        where = type(self).__name__
        if not (isinstance(num_classes, int) and num_classes >= 0):
            raise ValueError(f"{where}: num_classes={num_classes!r} must be an int >= 0")
        for name, rate in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{where}: {name}={rate!r} must be in [0, 1)")
        bn_eps = (BN_EPS_TF if tf_port else BN_EPS_TORCH) if bn_eps is None else bn_eps
        self.num_classes, self.drop_rate = num_classes, drop_rate
        stem_chs = make_divisible(32 * channel_multiplier)
        self.conv_stem = Conv2dPad(in_chans, stem_chs, 3, 2, tf_same=tf_port)
        self.bn1 = nn.BatchNorm2d(stem_chs, eps=bn_eps)
        self.specs = block_specs(stem_chs, depth_multiplier, channel_multiplier, experts_multiplier, drop_path_rate)
        block_cls = {"ds": DepthwiseSeparable, "ir": InvertedResidual}
        self.blocks = nn.Sequential(*[nn.Sequential(*[block_cls[s.block](s, bn_eps, tf_port) for s in stage])
                                      for stage in self.specs])
        self.num_features = make_divisible(1280 * channel_multiplier)
        self.conv_head = Conv2dPad(self.specs[-1][-1].out_chs, self.num_features, 1, tf_same=tf_port)
        self.bn2 = nn.BatchNorm2d(self.num_features, eps=bn_eps)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        init_weights_tf(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> head features ``[B, num_features, H/32, W/32]`` (after BN + swish)."""
        x = F.silu(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        return F.silu(self.bn2(self.conv_head(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = F.dropout(x.mean((2, 3)), self.drop_rate, self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def init_weights_tf(model: nn.Module) -> None:
    """The TensorFlow EfficientNet initialisation, as timm applies it (``_init_weight_goog``).

    Convs and CondConv experts: N(0, 2 / fan_out) with fan_out = kh * kw * out / groups; BN: 1, 0;
    Linear: U(+-1 / sqrt(fan_out)) (routing functions: U(+-1 / sqrt(fan_in + fan_out))), zero bias.
    """
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, CondConv2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            fan_out, fan_in = m.weight.shape
            bound = 1.0 / math.sqrt(fan_out + (fan_in if name.endswith("routing_fn") else 0))
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


def efficientnet_cc(name: str, **kwargs) -> EfficientNetCondConv:
    """Build a variant by name (one of :data:`VARIANTS`); ``kwargs`` go to :class:`EfficientNetCondConv`."""
    if name not in VARIANTS:
        raise ValueError(f"efficientnet_cc: unknown variant {name!r}; expected one of {sorted(VARIANTS)}")
    depth, experts, tf_port = VARIANTS[name]
    return EfficientNetCondConv(depth_multiplier=depth, experts_multiplier=experts, tf_port=tf_port, **kwargs)


#: name -> what its entry point's docstring adds to size, experts and port.
_NOTES: Dict[str, str] = {
    "tf_efficientnet_cc_b0_4e": "timm weights: 77.3% ImageNet top-1; 13,314,116 params",
    "tf_efficientnet_cc_b0_8e": "timm weights: 78.0% top-1; 24,013,284 params",
    "tf_efficientnet_cc_b1_8e": "timm weights: 79.3% top-1 at 240px; 39,715,968 params",
    "efficientnet_cc_b0_4e": "untrained; timm trains it with drop_rate=drop_path_rate=0.2",
    "efficientnet_cc_b0_8e": "untrained",
    "efficientnet_cc_b1_8e": "untrained",
}


def _variant(name: str):
    """The entry point of variant ``name`` (a key of :data:`VARIANTS`), documented from its name and ``_NOTES``."""
    *_, size, experts = name.split("_")  # e.g. 'b0', '4e'
    port = "TF port" if VARIANTS[name][2] else "PyTorch padding/eps"

    def entry_point(num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                    **kwargs) -> EfficientNetCondConv:
        return efficientnet_cc(name, num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                               **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (f"EfficientNet-CondConv-{size.upper()}, {experts[:-1]} experts, {port} "
                           f"({_NOTES[name]}).\n\n    ``kwargs``: further :class:`EfficientNetCondConv` arguments.")
    return entry_point


tf_efficientnet_cc_b0_4e = _variant("tf_efficientnet_cc_b0_4e")
tf_efficientnet_cc_b0_8e = _variant("tf_efficientnet_cc_b0_8e")
tf_efficientnet_cc_b1_8e = _variant("tf_efficientnet_cc_b1_8e")
efficientnet_cc_b0_4e = _variant("efficientnet_cc_b0_4e")
efficientnet_cc_b0_8e = _variant("efficientnet_cc_b0_8e")
efficientnet_cc_b1_8e = _variant("efficientnet_cc_b1_8e")
