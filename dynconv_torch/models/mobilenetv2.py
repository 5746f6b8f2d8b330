"""MobileNetV2 (Sandler et al., CVPR 2018) with static or dynamic convolutions, NCHW.

``conv='odconv'`` is the official OSVAI/ODConv ``od_mobilenetv2_*`` (Li et al., ICLR
2022): every convolution after the stem — expansion 1×1, depthwise 3×3, projection 1×1
and the final 1×1 to 1280 channels — is dynamic; the stem conv and the classifier stay
static. Its state_dict equals the official one key for key (``conv='static'`` has
torchvision's keys), so the released checkpoints load strictly. The Flax twin in
``dynconv_jax.models.mobilenetv2`` uses the same names (``features.1.conv.0.0`` ↔
``features_1/conv_0_0``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ._conv import check_conv_args, check_num_classes, make_conv, static_conv

STEMS = ("imagenet", "cifar")
# (expansion t, channels c, repeats n, first stride s) per stage, as in the paper's Table 2.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of ``divisor`` (at least ``divisor``),
    going up one step when rounding would lose more than 10 % (the TF-slim MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def stage_settings(width_mult: float, stem: str):
    """Channels of the stem, the stages and the head, and the stage strides, for both frameworks' models."""
    strides = [s for _, _, _, s in INVERTED_RESIDUAL_SETTING]
    stem_stride = 2
    if stem == "cifar":  # 32×32 inputs: stem and the 24-channel stage at stride 1 (total stride 8)
        stem_stride, strides[1] = 1, 1
    stages = [(t, make_divisible(c * width_mult), n, s) for (t, c, n, _), s in zip(INVERTED_RESIDUAL_SETTING, strides)]
    return make_divisible(32 * width_mult), stem_stride, stages, make_divisible(1280 * max(1.0, width_mult))


class ConvBNReLU(nn.Sequential):
    """``conv → BatchNorm → ReLU6`` (children ``0``, ``1``, ``2``), padding ``(k - 1) // 2``."""

    def __init__(self, conv_layer, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1):
        super().__init__(conv_layer(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                                    groups=groups),
                         nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expansion 1×1 (absent when t = 1) → depthwise 3×3 → linear projection 1×1, residual if shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, conv_layer):
        super().__init__()
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [ConvBNReLU(conv_layer, inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU(conv_layer, hidden, hidden, 3, stride, groups=hidden),
                   conv_layer(hidden, oup, 1, 1, 0), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with a selectable convolution type after the stem.

    Args:
      width_mult: channel multiplier (0.5, 0.75, 1.0, ...; channels rounded to multiples of 8).
      conv: 'static', 'condconv', 'dynamic' or 'odconv'.
      num_experts: experts per dynamic layer (ODConv's ``kernel_num``).
      num_classes: outputs of the classifier.
      stem: 'imagenet' (stride-2 stem, total stride 32) or 'cifar' (stem and second stage at
        stride 1, total stride 8, for 32×32 inputs).
      dropout: dropout before the classifier (0.2 as torchvision and the official models).
      reduction: attention reduction ratio of DynamicConv / ODConv (None: the layer's default).
      in_channels: input channels.
      conv_options: further keyword arguments for every dynamic layer.
    """

    def __init__(self, width_mult: float = 1.0, conv: str = "static", num_experts: int = 4, num_classes: int = 1000,
                 stem: str = "imagenet", dropout: float = 0.2, reduction: Optional[float] = None,
                 in_channels: int = 3, conv_options: Optional[Mapping[str, Any]] = None):
        super().__init__()
        options = check_conv_args(conv, num_experts, reduction, conv_options, "MobileNetV2")
        check_num_classes(num_classes, "MobileNetV2")
        if stem not in STEMS:
            raise ValueError(f"MobileNetV2: stem={stem!r}; expected one of {STEMS}")
        if not width_mult > 0:
            raise ValueError(f"MobileNetV2: width_mult={width_mult!r} must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MobileNetV2: dropout={dropout!r} must be in [0, 1)")
        self.conv_type, self.stem = conv, stem
        conv_layer = partial(make_conv, conv, num_experts=num_experts, reduction=reduction, conv_options=options)
        channels, stem_stride, stages, self.last_channel = stage_settings(width_mult, stem)

        features = [ConvBNReLU(static_conv, in_channels, channels, 3, stem_stride)]
        for t, c, n, s in stages:
            for i in range(n):
                features.append(InvertedResidual(channels, c, s if i == 0 else 1, t, conv_layer))
                channels = c
        features.append(ConvBNReLU(conv_layer, channels, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        nn.init.normal_(self.classifier[1].weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in_channels, H, W]`` → logits ``[B, num_classes]``."""
        x = self.features(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def mobilenet_v2(width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """MobileNetV2; keyword arguments as :class:`MobileNetV2` (conv, num_experts, num_classes, stem, ...)."""
    return MobileNetV2(width_mult=width_mult, **kwargs)
