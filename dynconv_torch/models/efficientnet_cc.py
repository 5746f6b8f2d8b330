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
from functools import partial
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynconv_spec.efficientnet_cc import (
    BN_EPS_TF,
    BN_EPS_TORCH,
    VARIANTS,
    BlockSpec,
    block_specs,
    check_efficientnet_args,
    resolve_variant,
    tf_same_padding,
    variant_entry_point,
)
from dynconv_spec.mobilenetv2 import make_divisible

from ..condconv import CondConv2d
from ..functional import check_temperature, global_avg_pool
from ._registry import register_model

__all__ = [
    "EfficientNetCondConv",
    "efficientnet_cc",
    "block_specs",
    "VARIANTS",
    "tf_efficientnet_cc_b0_4e",
    "tf_efficientnet_cc_b0_8e",
    "tf_efficientnet_cc_b1_8e",
    "efficientnet_cc_b0_4e",
    "efficientnet_cc_b0_8e",
    "efficientnet_cc_b1_8e",
]


# --------------------------------------------------------------------------- padding
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

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        tf_same: bool = False,
    ):
        padding, self.dynamic_pad = _static_padding(kernel_size, stride, tf_same)
        super().__init__(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic_pad:
            x = _pad_tf_same(x, self.kernel_size[0], self.stride[0])
        return super().forward(x)


class CondConv2dPad(CondConv2d):
    """:class:`CondConv2d` with external routing and timm's padding (see :class:`Conv2dPad`)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_experts: int = 4,
        tf_same: bool = False,
    ):
        padding, self.dynamic_pad = _static_padding(kernel_size, stride, tf_same)
        super().__init__(
            in_chs,
            out_chs,
            kernel_size,
            stride,
            padding,
            groups=groups,
            bias=False,
            num_experts=num_experts,
            external_routing=True,
        )

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
        conv = (
            partial(CondConv2dPad, num_experts=experts, tf_same=tf_same)
            if experts
            else partial(Conv2dPad, tf_same=tf_same)
        )
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

    Examples:
      >>> import torch
      >>> from dynconv_torch.models import EfficientNetCondConv
      >>> model = EfficientNetCondConv(tf_port=True, num_classes=10).eval()  # B0, 4 experts, timm's names
      >>> tuple(model.state_dict()["blocks.5.0.conv_pw.weight"].shape)       # timm's [K, O * I]
      (4, 75264)
      >>> model(torch.zeros(2, 3, 64, 64)).shape
      torch.Size([2, 10])
    """

    def __init__(
        self,
        depth_multiplier: float = 1.0,
        experts_multiplier: int = 1,
        tf_port: bool = False,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        channel_multiplier: float = 1.0,
        bn_eps: float = None,
    ):
        super().__init__()
        check_efficientnet_args(type(self).__name__, num_classes, drop_rate, drop_path_rate)
        bn_eps = (BN_EPS_TF if tf_port else BN_EPS_TORCH) if bn_eps is None else bn_eps
        self.num_classes, self.drop_rate = num_classes, drop_rate
        stem_chs = make_divisible(32 * channel_multiplier)
        self.conv_stem = Conv2dPad(in_chans, stem_chs, 3, 2, tf_same=tf_port)
        self.bn1 = nn.BatchNorm2d(stem_chs, eps=bn_eps)
        self.specs = block_specs(stem_chs, depth_multiplier, channel_multiplier, experts_multiplier, drop_path_rate)
        block_cls = {"ds": DepthwiseSeparable, "ir": InvertedResidual}
        self.blocks = nn.Sequential(
            *[nn.Sequential(*[block_cls[s.block](s, bn_eps, tf_port) for s in stage]) for stage in self.specs]
        )
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
        """Head features -> logits (global average pool, dropout, classifier); ``pre_logits``: the pooled features."""
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
    return EfficientNetCondConv(**resolve_variant(name), **kwargs)


tf_efficientnet_cc_b0_4e = register_model(variant_entry_point("tf_efficientnet_cc_b0_4e", EfficientNetCondConv))
tf_efficientnet_cc_b0_8e = register_model(variant_entry_point("tf_efficientnet_cc_b0_8e", EfficientNetCondConv))
tf_efficientnet_cc_b1_8e = register_model(variant_entry_point("tf_efficientnet_cc_b1_8e", EfficientNetCondConv))
efficientnet_cc_b0_4e = register_model(variant_entry_point("efficientnet_cc_b0_4e", EfficientNetCondConv))
efficientnet_cc_b0_8e = register_model(variant_entry_point("efficientnet_cc_b0_8e", EfficientNetCondConv))
efficientnet_cc_b1_8e = register_model(variant_entry_point("efficientnet_cc_b1_8e", EfficientNetCondConv))
