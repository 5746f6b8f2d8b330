"""MobileNetV2 (Sandler et al., CVPR 2018) with static or dynamic convolutions, channels-last.

Flax twin of ``dynconv_torch.models.mobilenetv2`` with the same names: PyTorch's
``features.1.conv.0.0`` (an ``nn.Sequential`` inside an ``nn.Sequential``) is
``features_1/conv_0_0`` here, ``features.0.1`` (stem BatchNorm) is ``features_0_1`` and
``classifier.1`` is ``classifier_1``. ``conv='odconv'`` is the official OSVAI/ODConv
``od_mobilenetv2_*`` (Li et al., ICLR 2022): every convolution after the stem is dynamic.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from dynconv_spec import check_width_mult, stage_settings
from dynconv_spec.registry import odconv_model_args

from ._conv import ConvConfig, DynamicNet
from ._registry import register_model


def conv_bn_relu6(c: ConvConfig, x, prefix: str, features: int, kernel_size: int, stride: int = 1, groups: int = 1, *,
                  train: bool, temperature=None, static: bool = False):
    """PyTorch's ``ConvBNReLU`` Sequential: conv ``{prefix}_0``, BatchNorm ``{prefix}_1``, ReLU6."""
    if static:
        x = c.static_conv(x, f"{prefix}_0", features, kernel_size, stride, groups)
    else:
        x = c.conv_layer(x, f"{prefix}_0", features, kernel_size, stride, groups, train=train, temperature=temperature)
    return nn.relu6(c.batch_norm(x, f"{prefix}_1", train))


class InvertedResidual(nn.Module):
    """Expansion 1×1 (absent when t = 1) → depthwise 3×3 → linear projection 1×1, residual if shapes allow."""

    inp: int
    oup: int
    stride: int
    expand_ratio: int
    config: ConvConfig = ConvConfig()

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        c = self.config
        hidden = int(round(self.inp * self.expand_ratio))
        i = 0  # index in PyTorch's ``self.conv`` Sequential
        h = x
        if self.expand_ratio != 1:
            h = conv_bn_relu6(c, h, "conv_0", hidden, 1, train=train, temperature=temperature)
            i = 1
        h = conv_bn_relu6(c, h, f"conv_{i}", hidden, 3, self.stride, groups=hidden, train=train,
                          temperature=temperature)
        h = c.conv_layer(h, f"conv_{i + 1}", self.oup, 1, train=train, temperature=temperature)
        h = c.batch_norm(h, f"conv_{i + 2}", train)
        return x + h if self.stride == 1 and self.inp == self.oup else h


class MobileNetV2(DynamicNet):
    """MobileNetV2 with a selectable convolution type after the stem (arguments as the torch twin).

    Attributes:
      width_mult: channel multiplier (channels rounded to multiples of 8).
      conv, num_experts, num_classes, reduction, in_channels, conv_options, strategy, dtype,
        param_dtype, precision: as :class:`dynconv_jax.models.ResNet`.
      stem: 'imagenet' (total stride 32) or 'cifar' (stem and second stage at stride 1, total stride 8).
      dropout: dropout before the classifier (0.2 as torchvision and the official models).
    """

    width_mult: float = 1.0
    dropout: float = 0.2

    def __post_init__(self):
        check_width_mult(self.width_mult)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        """``x [B, H, W, in_channels]`` → logits ``[B, num_classes]``; ``temperature`` goes to every dynamic layer."""
        c = self.conv_config(x)
        channels, stem_stride, stages, last_channel = stage_settings(self.width_mult, self.stem)
        x = conv_bn_relu6(c, x, "features_0", channels, 3, stem_stride, train=train, static=True)
        index = 1
        for t, out, n, s in stages:
            for j in range(n):
                x = InvertedResidual(channels, out, s if j == 0 else 1, t, c, name=f"features_{index}")(
                    x, train, temperature)
                channels = out
                index += 1
        x = conv_bn_relu6(c, x, f"features_{index}", last_channel, 1, train=train, temperature=temperature)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return c.dense(x, "classifier_1", self.num_classes)


@register_model
def mobilenet_v2(width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """MobileNetV2; keyword arguments as :class:`MobileNetV2` (conv, num_experts, num_classes, stem, ...)."""
    return MobileNetV2(width_mult=width_mult, **kwargs)


@register_model
def od_mobilenetv2_050(**kwargs) -> MobileNetV2:
    """OSVAI/ODConv ``od_mobilenetv2_050(kernel_num=1, reduction=0.0625, **kwargs)``: MobileNetV2 ×0.5 with
    ODConv (:func:`dynconv_spec.registry.odconv_model_args`; ``kwargs`` as :class:`MobileNetV2`)."""
    return mobilenet_v2(**odconv_model_args("od_mobilenetv2_050", **kwargs))


@register_model
def od_mobilenetv2_075(**kwargs) -> MobileNetV2:
    """OSVAI/ODConv ``od_mobilenetv2_075``: MobileNetV2 ×0.75 with ODConv (arguments as :func:`od_mobilenetv2_050`)."""
    return mobilenet_v2(**odconv_model_args("od_mobilenetv2_075", **kwargs))


@register_model
def od_mobilenetv2_100(**kwargs) -> MobileNetV2:
    """OSVAI/ODConv ``od_mobilenetv2_100``: MobileNetV2 ×1.0 with ODConv (arguments as :func:`od_mobilenetv2_050`)."""
    return mobilenet_v2(**odconv_model_args("od_mobilenetv2_100", **kwargs))
