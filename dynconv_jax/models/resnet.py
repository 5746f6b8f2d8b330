"""ResNet-18/34/50/101 (He et al., CVPR 2016) with static or dynamic convolutions, channels-last.

Flax twin of ``dynconv_torch.models.resnet``: same architecture, same attribute names
(``layer1.0.conv1`` ↔ ``layer1_0/conv1``, ``downsample.0`` ↔ ``downsample_0``), so whole-model
checkpoints convert with :func:`dynconv_jax.convert.torch_to_flax`. ``conv='odconv'`` is the
official OSVAI/ODConv ``od_resnet*`` (Li et al., ICLR 2022): dynamic 3×3 and 1×1 convolutions
in the blocks; static stem, downsample shortcut and classifier; dropout before ``fc``.

``model.apply(variables, x [B, H, W, C], train=False, temperature=None)``; training needs
``mutable=['batch_stats']`` and, with dropout, ``rngs={'dropout': key}``.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from dynconv_spec import RESNET_ARCHS, check_resnet_args, stage_blocks
from dynconv_spec.registry import odconv_model_args

from ._conv import ConvConfig, DynamicNet
from ._registry import register_model


class BasicBlock(nn.Module):
    """Two 3×3 convolutions (``conv1`` carries the stride) and an identity or 1×1 shortcut."""

    planes: int
    stride: int = 1
    downsample: bool = False
    config: ConvConfig = ConvConfig()
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        c = self.config
        out = c.conv_layer(x, "conv1", self.planes, 3, self.stride, train=train, temperature=temperature)
        out = nn.relu(c.batch_norm(out, "bn1", train))
        out = c.conv_layer(out, "conv2", self.planes, 3, train=train, temperature=temperature)
        out = c.batch_norm(out, "bn2", train)
        return nn.relu(out + _shortcut(c, x, self.planes * self.expansion, self.stride, self.downsample, train))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carries the stride, torchvision's "ResNet v1.5"), 1×1 expand ×4."""

    planes: int
    stride: int = 1
    downsample: bool = False
    config: ConvConfig = ConvConfig()
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        c = self.config
        out = c.conv_layer(x, "conv1", self.planes, 1, train=train, temperature=temperature)
        out = nn.relu(c.batch_norm(out, "bn1", train))
        out = c.conv_layer(out, "conv2", self.planes, 3, self.stride, train=train, temperature=temperature)
        out = nn.relu(c.batch_norm(out, "bn2", train))
        out = c.conv_layer(out, "conv3", self.planes * self.expansion, 1, train=train, temperature=temperature)
        out = c.batch_norm(out, "bn3", train)
        return nn.relu(out + _shortcut(c, x, self.planes * self.expansion, self.stride, self.downsample, train))


def _shortcut(c: ConvConfig, x, features: int, stride: int, downsample: bool, train: bool):
    """Identity, or the static ``downsample_0`` 1×1 conv + ``downsample_1`` BatchNorm."""
    if not downsample:
        return x
    return c.batch_norm(c.static_conv(x, "downsample_0", features, 1, stride), "downsample_1", train)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(DynamicNet):
    """ResNet with a selectable convolution type in its blocks (arguments as ``dynconv_torch.models.ResNet``).

    Attributes:
      block: 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50/101).
      layers: blocks per stage, e.g. ``(2, 2, 2, 2)``.
      conv: 'static', 'condconv', 'dynamic' or 'odconv' — the blocks' convolutions.
      num_experts: experts per dynamic layer.
      num_classes: outputs of ``fc``.
      stem: 'imagenet' (7×7/2 conv + 3×3/2 max-pool) or 'cifar' (3×3/1 conv, no max-pool).
      base_width: channels of the first stage; later stages ×2, ×4, ×8 (64 = the standard nets).
      dropout: dropout on the pooled features before ``fc`` (official ODConv default 0.1).
      reduction: attention reduction ratio of DynamicConv / ODConv (None: the layer's default).
      in_channels: input channels (checked against the input).
      conv_options: further fields for every dynamic layer (e.g. ``{'routing_dropout': 0.1}``).
      strategy: per-sample conv strategy of every dynamic layer (:func:`dynconv_jax.ops.dynamic_conv`).
      dtype, param_dtype, precision: as in ``flax.linen.Conv``, for every layer.
    """

    block: str = "basic"
    layers: Sequence[int] = (2, 2, 2, 2)
    base_width: int = 64
    dropout: float = 0.1

    def __post_init__(self):
        check_resnet_args(self.block, self.layers, self.base_width)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        """``x [B, H, W, in_channels]`` → logits ``[B, num_classes]``; ``temperature`` goes to every dynamic layer."""
        c = self.conv_config(x)
        if self.stem == "imagenet":
            x = nn.relu(c.batch_norm(c.static_conv(x, "conv1", self.base_width, 7, 2), "bn1", train))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = nn.relu(c.batch_norm(c.static_conv(x, "conv1", self.base_width, 3, 1), "bn1", train))
        block_cls = BLOCKS[self.block]
        for i, j, _, planes, stride, downsample in stage_blocks(self.layers, self.base_width, block_cls.expansion):
            x = block_cls(planes, stride, downsample, c, name=f"layer{i + 1}_{j}")(x, train, temperature)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return c.dense(x, "fc", self.num_classes)


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18; keyword arguments as :class:`ResNet` (conv, num_experts, num_classes, stem, base_width, ...)."""
    return ResNet(**RESNET_ARCHS["resnet18"], **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    """ResNet-34; keyword arguments as :class:`ResNet`."""
    return ResNet(**RESNET_ARCHS["resnet34"], **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50; keyword arguments as :class:`ResNet`."""
    return ResNet(**RESNET_ARCHS["resnet50"], **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    """ResNet-101; keyword arguments as :class:`ResNet`."""
    return ResNet(**RESNET_ARCHS["resnet101"], **kwargs)


@register_model
def od_resnet18(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet18(kernel_num=1, reduction=0.0625, **kwargs)``: ResNet-18 with ODConv
    (:func:`dynconv_spec.registry.odconv_model_args`; ``kwargs`` as :class:`ResNet`)."""
    return resnet18(**odconv_model_args("od_resnet18", **kwargs))


@register_model
def od_resnet34(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet34``: ResNet-34 with ODConv (arguments as :func:`od_resnet18`)."""
    return resnet34(**odconv_model_args("od_resnet34", **kwargs))


@register_model
def od_resnet50(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet50``: ResNet-50 with ODConv (arguments as :func:`od_resnet18`)."""
    return resnet50(**odconv_model_args("od_resnet50", **kwargs))


@register_model
def od_resnet101(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet101``: ResNet-101 with ODConv (arguments as :func:`od_resnet18`)."""
    return resnet101(**odconv_model_args("od_resnet101", **kwargs))
