"""MobileNetV2 (Sandler et al., CVPR 2018) with static or dynamic convolutions, NCHW.

``conv='odconv'`` is the official OSVAI/ODConv ``od_mobilenetv2_*`` (Li et al., ICLR
2022): every convolution after the stem — expansion 1×1, depthwise 3×3, projection 1×1
and the final 1×1 to 1280 channels — is dynamic; the stem conv and the classifier stay
static. Its state_dict equals the official one key for key (``conv='static'`` has
torchvision's keys), so the released checkpoints load strictly. The Flax twin in
``dynconv_jax.models.mobilenetv2`` uses the same names (``features.1.conv.0.0`` ↔
``features_1/conv_0_0``). ``conv='kernelwarehouse'`` is the official OSVAI/KernelWarehouse
``kw_mobilenetv2_*`` (Li & Yao, ICML 2024): every convolution, the stem's too, is a KernelWarehouse
layer of ``warehouse_manager``, and the classifier is a bare ``Linear`` ``classifier`` after
``dropout`` (the official layout).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Optional

import torch
from torch import nn

from dynconv_spec import KW_CONV, check_width_mult, stage_settings
from dynconv_spec.kernelwarehouse import mobilenetv2_plan
from dynconv_spec.registry import kw_model_args, odconv_model_args

from ._conv import KWBuilder, check_args, make_conv, static_conv
from ._registry import register_model


class ConvBNReLU(nn.Sequential):
    """``conv → BatchNorm → ReLU6`` (children ``0``, ``1``, ``2``), padding ``(k - 1) // 2``."""

    def __init__(
        self, conv_layer, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ):
        super().__init__(
            conv_layer(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expansion 1×1 (absent when t = 1) → depthwise 3×3 → linear projection 1×1, residual if shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, conv_layer):
        super().__init__()
        self.stride = stride
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [ConvBNReLU(conv_layer, inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [
            ConvBNReLU(conv_layer, hidden, hidden, 3, stride, groups=hidden),
            conv_layer(hidden, oup, 1, 1, 0),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with a selectable convolution type after the stem.

    Args:
      width_mult: channel multiplier (0.5, 0.75, 1.0, ...; channels rounded to multiples of 8).
      conv: 'static', 'condconv', 'dynamic', 'odconv' or 'kernelwarehouse'.
      num_experts: experts per dynamic layer (ODConv's ``kernel_num``).
      num_classes: outputs of the classifier.
      stem: 'imagenet' (stride-2 stem, total stride 32) or 'cifar' (stem and second stage at
        stride 1, total stride 8, for 32×32 inputs).
      dropout: dropout before the classifier (0.2 as torchvision and the official models).
      reduction: attention reduction ratio of DynamicConv / ODConv / KernelWarehouse (None: the default).
      in_channels: input channels.
      conv_options: further keyword arguments for every dynamic layer (KernelWarehouse: the warehouse
        options, as :class:`~dynconv_torch.models.ResNet`).

    Examples:
      >>> import torch
      >>> from dynconv_torch.models import MobileNetV2
      >>> model = MobileNetV2(width_mult=0.25, conv="dynamic", stem="cifar", num_classes=10)
      >>> model(torch.zeros(2, 3, 32, 32)).shape
      torch.Size([2, 10])
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        conv: str = "static",
        num_experts: int = 4,
        num_classes: int = 1000,
        stem: str = "imagenet",
        dropout: float = 0.2,
        reduction: Optional[float] = None,
        in_channels: int = 3,
        conv_options: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        check_width_mult(width_mult)
        options = check_args("MobileNetV2", conv, num_experts, reduction, conv_options, stem, dropout, num_classes)
        self.conv_type, self.stem = conv, stem
        conv_layer = partial(make_conv, conv, num_experts=num_experts, reduction=reduction, conv_options=options)
        stem_conv, builder = static_conv, None
        if conv == KW_CONV:  # every convolution as the warehouse plan says
            builder = KWBuilder(mobilenetv2_plan(width_mult, stem, in_channels, reduction, options), "MobileNetV2")
            self.warehouse_manager = builder.manager
            conv_layer = stem_conv = builder.conv
        channels, stem_stride, stages, self.last_channel = stage_settings(width_mult, stem)

        features = [ConvBNReLU(stem_conv, in_channels, channels, 3, stem_stride)]
        for t, c, n, s in stages:
            for i in range(n):
                features.append(InvertedResidual(channels, c, s if i == 0 else 1, t, conv_layer))
                channels = c
        features.append(ConvBNReLU(conv_layer, channels, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        if builder is None:
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
            head = self.classifier[1]
        else:  # the official KW_MobileNetV2's head
            self.dropout = nn.Dropout(dropout)
            self.classifier = head = nn.Linear(self.last_channel, num_classes)
        nn.init.normal_(head.weight, 0.0, 0.01)
        nn.init.zeros_(head.bias)
        if builder is not None:
            builder.finish(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in_channels, H, W]`` → logits ``[B, num_classes]``."""
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(self.dropout(x) if self.conv_type == KW_CONV else x)


@register_model
def mobilenet_v2(width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """MobileNetV2; keyword arguments as :class:`MobileNetV2` (conv, num_experts, num_classes, stem, ...).

    Examples:
      >>> from dynconv_torch.models import mobilenet_v2
      >>> sum(p.numel() for p in mobilenet_v2().parameters())      # torchvision's MobileNetV2
      3504872
    """
    return MobileNetV2(width_mult=width_mult, **kwargs)


@register_model
def od_mobilenetv2_050(**kwargs) -> MobileNetV2:
    """OSVAI/ODConv ``od_mobilenetv2_050(kernel_num=1, reduction=0.0625, **kwargs)``: MobileNetV2 ×0.5 with
    ODConv (:func:`dynconv_spec.registry.odconv_model_args`: ``num_experts=`` in place of the official ``kernel_num=``
    works too; ``kwargs`` as :class:`MobileNetV2`).

    Examples:
      >>> from dynconv_torch.models import od_mobilenetv2_050
      >>> sum(p.numel() for p in od_mobilenetv2_050().parameters())            # kernel_num=1, as the official model
      2425537
    """
    return mobilenet_v2(**odconv_model_args("od_mobilenetv2_050", **kwargs))


@register_model
def od_mobilenetv2_075(**kwargs) -> MobileNetV2:
    """OSVAI/ODConv ``od_mobilenetv2_075``: MobileNetV2 ×0.75 with ODConv (arguments as :func:`od_mobilenetv2_050`).

    Examples:
      >>> from dynconv_torch.models import od_mobilenetv2_075
      >>> sum(p.numel() for p in od_mobilenetv2_075().parameters())            # kernel_num=1, as the official model
      3507113
    """
    return mobilenet_v2(**odconv_model_args("od_mobilenetv2_075", **kwargs))


@register_model
def od_mobilenetv2_100(**kwargs) -> MobileNetV2:
    """OSVAI/ODConv ``od_mobilenetv2_100``: MobileNetV2 ×1.0 with ODConv (arguments as :func:`od_mobilenetv2_050`).

    Examples:
      >>> from dynconv_torch.models import od_mobilenetv2_100
      >>> sum(p.numel() for p in od_mobilenetv2_100().parameters())            # kernel_num=1, as the official model
      4940185
    """
    return mobilenet_v2(**odconv_model_args("od_mobilenetv2_100", **kwargs))


@register_model
def kw_mobilenetv2_050(**kwargs) -> MobileNetV2:
    """OSVAI/KernelWarehouse ``kw_mobilenetv2_050(reduction=0.0625, cell_num_ratio=1, cell_inplane_ratio=1,
    cell_outplane_ratio=1, sharing_range=('layer', 'pwconv'), nonlocal_basis_ratio=1, dropout=0.0, **kwargs)``:
    MobileNetV2 ×0.5 with KernelWarehouse (:func:`dynconv_spec.registry.kw_model_args`; ``kwargs`` as
    :class:`MobileNetV2`). The official 4× config uses ``sharing_range=('layer',)``
    (:data:`dynconv_spec.kernelwarehouse.OFFICIAL_CONFIGS`).

    Examples:
      >>> from dynconv_torch.models import kw_mobilenetv2_050
      >>> sum(p.numel() for p in kw_mobilenetv2_050().parameters())         # the official KW 1x count
      2854522
    """
    return mobilenet_v2(**kw_model_args("kw_mobilenetv2_050", **kwargs))


@register_model
def kw_mobilenetv2_100(**kwargs) -> MobileNetV2:
    """OSVAI/KernelWarehouse ``kw_mobilenetv2_100``: MobileNetV2 ×1.0 with KernelWarehouse (arguments as
    :func:`kw_mobilenetv2_050`).

    Examples:
      >>> from dynconv_torch.models import kw_mobilenetv2_100
      >>> sum(p.numel() for p in kw_mobilenetv2_100().parameters())         # the official KW 1x count
      5168146
    """
    return mobilenet_v2(**kw_model_args("kw_mobilenetv2_100", **kwargs))
