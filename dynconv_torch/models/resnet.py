"""ResNet-18/34/50/101 (He et al., CVPR 2016) with static or dynamic convolutions, NCHW.

``conv='odconv'`` with the ImageNet stem is the official OSVAI/ODConv ``od_resnet*``
(Li et al., ICLR 2022): ODConv replaces the 3×3 and 1×1 convolutions inside the blocks;
the stem, the downsample shortcut and the classifier stay static; dropout sits before
``fc``. Its state_dict is key-for-key and shape-for-shape the official one, so the
released checkpoints load strictly. ``conv='static'`` has torchvision's keys.
CondConv and DynamicConv take the same places. ``conv='kernelwarehouse'`` is the official
OSVAI/KernelWarehouse ``kw_resnet*`` (Li & Yao, ICML 2024): the blocks' convolutions and the
strided downsample shortcuts are KernelWarehouse layers (ResNet-50's first ``conv1`` and the
stride-1 shortcut stay static), sharing the warehouses of ``warehouse_manager``. The Flax twin in
``dynconv_jax.models.resnet`` uses the same attribute names (``layer1.0.conv1`` ↔
``layer1_0/conv1``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from dynconv_spec import KW_CONV, RESNET_ARCHS, check_resnet_args, stage_blocks
from dynconv_spec.kernelwarehouse import resnet_plan
from dynconv_spec.registry import kw_model_args, odconv_model_args

from ._conv import KWBuilder, check_args, make_conv, static_conv
from ._registry import register_model


class BasicBlock(nn.Module):
    """Two 3×3 convolutions (``conv1`` carries the stride) and an identity or 1×1 shortcut."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        conv_layer=partial(make_conv, "static"),
    ):
        super().__init__()
        self.conv1 = conv_layer(inplanes, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv_layer(planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carries the stride, as torchvision's "ResNet v1.5"), 1×1 expand ×4."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        conv_layer=partial(make_conv, "static"),
    ):
        super().__init__()
        self.conv1 = conv_layer(inplanes, planes, 1, 1, 0)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv_layer(planes, planes, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv_layer(planes, planes * self.expansion, 1, 1, 0)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet with a selectable convolution type in its blocks.

    Args:
      block: 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50/101).
      layers: blocks per stage, e.g. ``(2, 2, 2, 2)``.
      conv: 'static', 'condconv', 'dynamic', 'odconv' or 'kernelwarehouse' — the blocks' convolutions.
      num_experts: experts per dynamic layer (ODConv's ``kernel_num``).
      num_classes: outputs of ``fc``.
      stem: 'imagenet' (7×7/2 conv + 3×3/2 max-pool) or 'cifar' (3×3/1 conv, no max-pool).
      base_width: channels of the first stage; later stages ×2, ×4, ×8 (64 = the standard nets).
      dropout: dropout on the pooled features before ``fc`` (official ODConv default 0.1).
      reduction: attention reduction ratio of DynamicConv / ODConv / KernelWarehouse (None: the default).
      in_channels: input channels (3 for RGB).
      conv_options: further keyword arguments for every dynamic layer (KernelWarehouse: the warehouse
        options ``cell_num_ratio``, ``sharing_range``, ..., of ``dynconv_spec.kernelwarehouse.KWOptions``).

    Examples:
      >>> import torch
      >>> from dynconv_torch.models import ResNet
      >>> model = ResNet(block="basic", layers=(1, 1, 1, 1), base_width=8, stem="cifar", conv="condconv", num_classes=10)
      >>> model(torch.zeros(2, 3, 32, 32)).shape
      torch.Size([2, 10])
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        conv: str = "static",
        num_experts: int = 4,
        num_classes: int = 1000,
        stem: str = "imagenet",
        base_width: int = 64,
        dropout: float = 0.1,
        reduction: Optional[float] = None,
        in_channels: int = 3,
        conv_options: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        check_resnet_args(block, layers, base_width)
        options = check_args("ResNet", conv, num_experts, reduction, conv_options, stem, dropout, num_classes)
        block_cls = BLOCKS[block]
        self.conv_type, self.stem = conv, stem
        conv_layer = partial(make_conv, conv, num_experts=num_experts, reduction=reduction, conv_options=options)
        stem_conv = shortcut_conv = static_conv
        builder = None
        if conv == KW_CONV:  # every convolution as the warehouse plan says, reserved in the official order
            builder = KWBuilder(resnet_plan(block, layers, base_width, in_channels, stem, reduction, options), "ResNet")
            self.warehouse_manager = builder.manager
            conv_layer = stem_conv = shortcut_conv = builder.conv

        if stem == "imagenet":
            self.conv1 = stem_conv(in_channels, base_width, 7, 2, 3)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = stem_conv(in_channels, base_width, 3, 1, 1)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        stages = [[] for _ in layers]
        for stage, _, inplanes, planes, stride, downsample in stage_blocks(layers, base_width, block_cls.expansion):
            shortcut = None
            if downsample:
                shortcut = nn.Sequential(
                    shortcut_conv(inplanes, planes * block_cls.expansion, 1, stride, 0),
                    nn.BatchNorm2d(planes * block_cls.expansion),
                )
            stages[stage].append(block_cls(inplanes, planes, stride, shortcut, conv_layer))
        for i, blocks in enumerate(stages):
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(base_width * 2 ** (len(layers) - 1) * block_cls.expansion, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)
        if builder is not None:
            builder.finish(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in_channels, H, W]`` → logits ``[B, num_classes]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18; keyword arguments as :class:`ResNet` (conv, num_experts, num_classes, stem, base_width, ...).

    Examples:
      >>> from dynconv_torch.models import resnet18
      >>> model = resnet18()                                   # conv='static': torchvision's network
      >>> sum(p.numel() for p in model.parameters())
      11689512
    """
    return ResNet(**RESNET_ARCHS["resnet18"], **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    """ResNet-34; keyword arguments as :class:`ResNet`.

    Examples:
      >>> from dynconv_torch.models import resnet34
      >>> model = resnet34()                                   # conv='static': torchvision's network
      >>> sum(p.numel() for p in model.parameters())
      21797672
    """
    return ResNet(**RESNET_ARCHS["resnet34"], **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50; keyword arguments as :class:`ResNet`.

    Examples:
      >>> from dynconv_torch.models import resnet50
      >>> model = resnet50()                                   # conv='static': torchvision's network
      >>> sum(p.numel() for p in model.parameters())
      25557032
    """
    return ResNet(**RESNET_ARCHS["resnet50"], **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    """ResNet-101; keyword arguments as :class:`ResNet`.

    Examples:
      >>> from dynconv_torch.models import resnet101
      >>> model = resnet101()                                   # conv='static': torchvision's network
      >>> sum(p.numel() for p in model.parameters())
      44549160
    """
    return ResNet(**RESNET_ARCHS["resnet101"], **kwargs)


@register_model
def od_resnet18(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet18(kernel_num=1, reduction=0.0625, **kwargs)``: ResNet-18 with ODConv
    (:func:`dynconv_spec.registry.odconv_model_args`: ``num_experts=`` in place of the official ``kernel_num=``
    works too; ``kwargs`` as :class:`ResNet`).

    Examples:
      >>> from dynconv_torch.models import od_resnet18
      >>> model = od_resnet18()                                   # kernel_num=1, reduction=1/16: the official 1x model
      >>> sum(p.numel() for p in model.parameters())         # the official definition's count
      11943944
    """
    return resnet18(**odconv_model_args("od_resnet18", **kwargs))


@register_model
def od_resnet34(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet34``: ResNet-34 with ODConv (arguments as :func:`od_resnet18`).

    Examples:
      >>> from dynconv_torch.models import od_resnet34
      >>> model = od_resnet34()                                   # kernel_num=1, reduction=1/16: the official 1x model
      >>> sum(p.numel() for p in model.parameters())         # the official definition's count
      22290168
    """
    return resnet34(**odconv_model_args("od_resnet34", **kwargs))


@register_model
def od_resnet50(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet50``: ResNet-50 with ODConv (arguments as :func:`od_resnet18`).

    Examples:
      >>> from dynconv_torch.models import od_resnet50
      >>> model = od_resnet50()                                   # kernel_num=1, reduction=1/16: the official 1x model
      >>> sum(p.numel() for p in model.parameters())         # the official definition's count
      28635112
    """
    return resnet50(**odconv_model_args("od_resnet50", **kwargs))


@register_model
def od_resnet101(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet101``: ResNet-101 with ODConv (arguments as :func:`od_resnet18`).

    Examples:
      >>> from dynconv_torch.models import od_resnet101
      >>> model = od_resnet101()                                   # kernel_num=1, reduction=1/16: the official 1x model
      >>> sum(p.numel() for p in model.parameters())         # the official definition's count
      50818769
    """
    return resnet101(**odconv_model_args("od_resnet101", **kwargs))


@register_model
def kw_resnet18(**kwargs) -> ResNet:
    """OSVAI/KernelWarehouse ``kw_resnet18(reduction=0.0625, cell_num_ratio=1, cell_inplane_ratio=1,
    cell_outplane_ratio=1, sharing_range=('layer', 'conv'), nonlocal_basis_ratio=1, **kwargs)``: ResNet-18
    with KernelWarehouse (:func:`dynconv_spec.registry.kw_model_args`; ``kwargs`` as :class:`ResNet`).
    The official configs' arguments: :data:`dynconv_spec.kernelwarehouse.OFFICIAL_CONFIGS`.

    Examples:
      >>> from dynconv_torch.models import kw_resnet18
      >>> sum(p.numel() for p in kw_resnet18().parameters())         # the official KW 1x count (11.93 M)
      11932148
    """
    return resnet18(**kw_model_args("kw_resnet18", **kwargs))


@register_model
def kw_resnet50(**kwargs) -> ResNet:
    """OSVAI/KernelWarehouse ``kw_resnet50``: ResNet-50 with KernelWarehouse (arguments as :func:`kw_resnet18`).

    Examples:
      >>> from dynconv_torch.models import kw_resnet50
      >>> model = kw_resnet50(base_width=8, num_classes=10)                 # a narrow one
      >>> model.warehouse_manager.weights[0].shape
      torch.Size([87, 8, 8, 1, 1])
    """
    return resnet50(**kw_model_args("kw_resnet50", **kwargs))
