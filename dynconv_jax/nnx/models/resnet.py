"""ResNet-18/34/50/101 as NNX Modules with static or dynamic convolutions, channels-last.

Twin of :mod:`dynconv_jax.models.resnet` (Linen): same arguments, architecture and parameter
paths (``layer1_0/conv1``, ``downsample_0``, ``fc``), so Linen variables, PyTorch and the official
OSVAI/ODConv checkpoints load into it. ``model(x [B, H, W, C], temperature=None)``; training vs
inference by ``model.train()`` / ``model.eval()`` (a new model is in training mode, as NNX's).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
from flax import nnx

from dynconv_jax.models._conv import check_args, check_input
from dynconv_jax.nnx.models._conv import ConvConfig, apply_conv
from dynconv_jax.nnx.models._registry import register_model
from dynconv_spec import RESNET_ARCHS, check_resnet_args, stage_blocks
from dynconv_spec.registry import odconv_model_args


class BasicBlock(nnx.Module):
    """Two 3×3 convolutions (``conv1`` carries the stride) and an identity or 1×1 shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: bool, config: ConvConfig, *,
                 rngs: nnx.Rngs):
        c = config
        self.conv1 = c.conv_layer(inplanes, planes, 3, stride, rngs=rngs)
        self.bn1 = c.batch_norm(planes, rngs=rngs)
        self.conv2 = c.conv_layer(planes, planes, 3, rngs=rngs)
        self.bn2 = c.batch_norm(planes, rngs=rngs)
        _add_shortcut(self, c, inplanes, planes * self.expansion, stride, downsample, rngs)

    def __call__(self, x, temperature=None):
        out = nnx.relu(self.bn1(apply_conv(self.conv1, x, temperature)))
        out = self.bn2(apply_conv(self.conv2, out, temperature))
        return nnx.relu(out + _shortcut(self, x))


class Bottleneck(nnx.Module):
    """1×1 reduce, 3×3 (carries the stride, torchvision's "ResNet v1.5"), 1×1 expand ×4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: bool, config: ConvConfig, *,
                 rngs: nnx.Rngs):
        c = config
        self.conv1 = c.conv_layer(inplanes, planes, 1, rngs=rngs)
        self.bn1 = c.batch_norm(planes, rngs=rngs)
        self.conv2 = c.conv_layer(planes, planes, 3, stride, rngs=rngs)
        self.bn2 = c.batch_norm(planes, rngs=rngs)
        self.conv3 = c.conv_layer(planes, planes * self.expansion, 1, rngs=rngs)
        self.bn3 = c.batch_norm(planes * self.expansion, rngs=rngs)
        _add_shortcut(self, c, inplanes, planes * self.expansion, stride, downsample, rngs)

    def __call__(self, x, temperature=None):
        out = nnx.relu(self.bn1(apply_conv(self.conv1, x, temperature)))
        out = nnx.relu(self.bn2(apply_conv(self.conv2, out, temperature)))
        out = self.bn3(apply_conv(self.conv3, out, temperature))
        return nnx.relu(out + _shortcut(self, x))


def _add_shortcut(block: nnx.Module, c: ConvConfig, inplanes: int, features: int, stride: int, downsample: bool,
                  rngs: nnx.Rngs) -> None:
    """The static ``downsample_0`` 1×1 conv + ``downsample_1`` BatchNorm, if the block downsamples."""
    block.has_downsample = downsample
    if downsample:
        block.downsample_0 = c.static_conv(inplanes, features, 1, stride, rngs=rngs)
        block.downsample_1 = c.batch_norm(features, rngs=rngs)


def _shortcut(block: nnx.Module, x):
    return block.downsample_1(block.downsample_0(x)) if block.has_downsample else x


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nnx.Module):
    """ResNet with a selectable convolution type in its blocks (arguments as the Linen
    :class:`dynconv_jax.models.ResNet`; see it for their meaning), plus ``rngs``."""

    def __init__(self, block: str = "basic", layers: Sequence[int] = (2, 2, 2, 2), *, conv: str = "static",
                 num_experts: int = 4, num_classes: int = 1000, stem: str = "imagenet", base_width: int = 64,
                 dropout: float = 0.1, reduction: Optional[float] = None, in_channels: int = 3,
                 conv_options: Optional[Mapping[str, Any]] = None, strategy: str = "auto", dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None, rngs: nnx.Rngs):
        check_resnet_args(block, layers, base_width)
        options = check_args("ResNet", conv, num_experts, reduction, conv_options, stem, dropout, num_classes)
        c = ConvConfig(conv, num_experts, reduction, strategy, options, dtype, param_dtype, precision)
        self.in_channels = in_channels
        self.stem = stem
        self.conv1 = c.static_conv(in_channels, base_width, 7 if stem == "imagenet" else 3,
                                   2 if stem == "imagenet" else 1, rngs=rngs)
        self.bn1 = c.batch_norm(base_width, rngs=rngs)
        block_cls = BLOCKS[block]
        self.block_names = []
        for i, j, inplanes, planes, stride, downsample in stage_blocks(layers, base_width, block_cls.expansion):
            name = f"layer{i + 1}_{j}"
            setattr(self, name, block_cls(inplanes, planes, stride, downsample, c, rngs=rngs))
            self.block_names.append(name)
        self.block_names = tuple(self.block_names)
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        self.fc = c.dense(base_width * 8 * block_cls.expansion, num_classes, rngs=rngs)

    def __call__(self, x, temperature=None):
        """``x [B, H, W, in_channels]`` → logits ``[B, num_classes]``; ``temperature`` goes to every dynamic layer."""
        check_input(x, self.in_channels, "ResNet")
        x = nnx.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for name in self.block_names:
            x = getattr(self, name)(x, temperature)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(self.dropout(x))


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18; keyword arguments as :class:`ResNet` (``rngs`` required)."""
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
