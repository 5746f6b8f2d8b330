"""ResNet-18/34/50/101 (He et al., CVPR 2016) with static or dynamic convolutions, NCHW.

``conv='odconv'`` with the ImageNet stem is the official OSVAI/ODConv ``od_resnet*``
(Li et al., ICLR 2022): ODConv replaces the 3×3 and 1×1 convolutions inside the blocks;
the stem, the downsample shortcut and the classifier stay static; dropout sits before
``fc``. Its state_dict is key-for-key and shape-for-shape the official one, so the
released checkpoints load strictly. ``conv='static'`` has torchvision's keys.
CondConv and DynamicConv take the same places. The Flax twin in
``dynconv_jax.models.resnet`` uses the same attribute names (``layer1.0.conv1`` ↔
``layer1_0/conv1``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ._conv import check_conv_args, check_num_classes, make_conv, static_conv

STEMS = ("imagenet", "cifar")


class BasicBlock(nn.Module):
    """Two 3×3 convolutions (``conv1`` carries the stride) and an identity or 1×1 shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 conv_layer=partial(make_conv, "static")):
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

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 conv_layer=partial(make_conv, "static")):
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
      conv: 'static', 'condconv', 'dynamic' or 'odconv' — the blocks' convolutions.
      num_experts: experts per dynamic layer (ODConv's ``kernel_num``).
      num_classes: outputs of ``fc``.
      stem: 'imagenet' (7×7/2 conv + 3×3/2 max-pool) or 'cifar' (3×3/1 conv, no max-pool).
      base_width: channels of the first stage; later stages ×2, ×4, ×8 (64 = the standard nets).
      dropout: dropout on the pooled features before ``fc`` (official ODConv default 0.1).
      reduction: attention reduction ratio of DynamicConv / ODConv (None: the layer's default).
      in_channels: input channels (3 for RGB).
      conv_options: further keyword arguments for every dynamic layer.
    """

    def __init__(self, block: str, layers: Sequence[int], conv: str = "static", num_experts: int = 4,
                 num_classes: int = 1000, stem: str = "imagenet", base_width: int = 64, dropout: float = 0.1,
                 reduction: Optional[float] = None, in_channels: int = 3,
                 conv_options: Optional[Mapping[str, Any]] = None):
        super().__init__()
        options = check_conv_args(conv, num_experts, reduction, conv_options, "ResNet")
        check_num_classes(num_classes, "ResNet")
        if block not in BLOCKS:
            raise ValueError(f"ResNet: block={block!r}; expected one of {tuple(BLOCKS)}")
        if stem not in STEMS:
            raise ValueError(f"ResNet: stem={stem!r}; expected one of {STEMS}")
        if not isinstance(base_width, int) or base_width < 1:
            raise ValueError(f"ResNet: base_width={base_width!r} must be a positive int")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ResNet: dropout={dropout!r} must be in [0, 1)")
        if len(layers) != 4:
            raise ValueError(f"ResNet: layers={tuple(layers)} must give the blocks of 4 stages")
        block_cls = BLOCKS[block]
        self.conv_type, self.stem = conv, stem
        conv_layer = partial(make_conv, conv, num_experts=num_experts, reduction=reduction, conv_options=options)

        self.inplanes = base_width
        if stem == "imagenet":
            self.conv1 = static_conv(in_channels, base_width, 7, 2, 3)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = static_conv(in_channels, base_width, 3, 1, 1)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        for i, num_blocks in enumerate(layers):
            stage = self._make_layer(block_cls, base_width * 2 ** i, num_blocks, 1 if i == 0 else 2, conv_layer)
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(self.inplanes, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def _make_layer(self, block_cls, planes: int, num_blocks: int, stride: int, conv_layer) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block_cls.expansion:
            downsample = nn.Sequential(
                static_conv(self.inplanes, planes * block_cls.expansion, 1, stride, 0),
                nn.BatchNorm2d(planes * block_cls.expansion),
            )
        blocks = [block_cls(self.inplanes, planes, stride, downsample, conv_layer)]
        self.inplanes = planes * block_cls.expansion
        blocks += [block_cls(self.inplanes, planes, 1, None, conv_layer) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in_channels, H, W]`` → logits ``[B, num_classes]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


def resnet18(**kwargs) -> ResNet:
    """ResNet-18; keyword arguments as :class:`ResNet` (conv, num_experts, num_classes, stem, base_width, ...)."""
    return ResNet("basic", (2, 2, 2, 2), **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34; keyword arguments as :class:`ResNet`."""
    return ResNet("basic", (3, 4, 6, 3), **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50; keyword arguments as :class:`ResNet`."""
    return ResNet("bottleneck", (3, 4, 6, 3), **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101; keyword arguments as :class:`ResNet`."""
    return ResNet("bottleneck", (3, 4, 23, 3), **kwargs)
