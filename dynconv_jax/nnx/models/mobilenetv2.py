"""MobileNetV2 as an NNX Module with static or dynamic convolutions, channels-last.

Twin of :mod:`dynconv_jax.models.mobilenetv2` (Linen): same arguments, architecture and
parameter paths (``features_0_0``, ``features_1/conv_0_0``, ``classifier_1``), so Linen variables,
PyTorch and the official OSVAI/ODConv ``od_mobilenetv2_*`` checkpoints load into it.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax.numpy as jnp
from flax import nnx

from dynconv_jax.models._conv import check_args, check_input
from dynconv_jax.nnx.models._conv import ConvConfig, apply_conv
from dynconv_jax.nnx.models._registry import register_model
from dynconv_spec import check_width_mult, stage_settings
from dynconv_spec.registry import odconv_model_args


def _conv_bn_relu6(module: nnx.Module, prefix: str, x, temperature):
    """PyTorch's ``ConvBNReLU`` Sequential: conv ``{prefix}_0``, BatchNorm ``{prefix}_1`` (the Linen paths), ReLU6."""
    conv, bn = getattr(module, f"{prefix}_0"), getattr(module, f"{prefix}_1")
    return nnx.relu6(bn(apply_conv(conv, x, temperature)))


def _add_conv_bn(module: nnx.Module, prefix: str, conv: nnx.Module, bn: nnx.Module) -> None:
    """Attach a ``ConvBNReLU``'s conv and BatchNorm as ``{prefix}_0`` and ``{prefix}_1``."""
    setattr(module, f"{prefix}_0", conv)
    setattr(module, f"{prefix}_1", bn)


class InvertedResidual(nnx.Module):
    """Expansion 1×1 (absent when t = 1) → depthwise 3×3 → linear projection 1×1, residual if shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, config: ConvConfig, *, rngs: nnx.Rngs):
        c = config
        hidden = int(round(inp * expand_ratio))
        i = 0  # index in PyTorch's ``self.conv`` Sequential
        self.expand = expand_ratio != 1
        if self.expand:
            _add_conv_bn(self, "conv_0", c.conv_layer(inp, hidden, 1, rngs=rngs), c.batch_norm(hidden, rngs=rngs))
            i = 1
        self.depthwise = f"conv_{i}"
        _add_conv_bn(self, self.depthwise, c.conv_layer(hidden, hidden, 3, stride, groups=hidden, rngs=rngs),
                     c.batch_norm(hidden, rngs=rngs))
        self.project, self.project_bn = f"conv_{i + 1}", f"conv_{i + 2}"
        setattr(self, self.project, c.conv_layer(hidden, oup, 1, rngs=rngs))
        setattr(self, self.project_bn, c.batch_norm(oup, rngs=rngs))
        self.residual = stride == 1 and inp == oup

    def __call__(self, x, temperature=None):
        h = _conv_bn_relu6(self, "conv_0", x, temperature) if self.expand else x
        h = _conv_bn_relu6(self, self.depthwise, h, temperature)
        h = getattr(self, self.project_bn)(apply_conv(getattr(self, self.project), h, temperature))
        return x + h if self.residual else h


class MobileNetV2(nnx.Module):
    """MobileNetV2 with a selectable convolution type after the stem (arguments as the Linen
    :class:`dynconv_jax.models.MobileNetV2`), plus ``rngs``."""

    def __init__(self, width_mult: float = 1.0, *, conv: str = "static", num_experts: int = 4,
                 num_classes: int = 1000, stem: str = "imagenet", dropout: float = 0.2,
                 reduction: Optional[float] = None, in_channels: int = 3,
                 conv_options: Optional[Mapping[str, Any]] = None, strategy: str = "auto", dtype: Any = None,
                 param_dtype: Any = jnp.float32, precision: Any = None, rngs: nnx.Rngs):
        check_width_mult(width_mult)
        options = check_args("MobileNetV2", conv, num_experts, reduction, conv_options, stem, dropout, num_classes)
        c = ConvConfig(conv, num_experts, reduction, strategy, options, dtype, param_dtype, precision)
        self.in_channels = in_channels
        channels, stem_stride, stages, last_channel = stage_settings(width_mult, stem)
        _add_conv_bn(self, "features_0", c.static_conv(in_channels, channels, 3, stem_stride, rngs=rngs),
                     c.batch_norm(channels, rngs=rngs))
        index = 1
        for t, out, n, s in stages:
            for j in range(n):
                setattr(self, f"features_{index}",
                        InvertedResidual(channels, out, s if j == 0 else 1, t, c, rngs=rngs))
                channels = out
                index += 1
        self.num_blocks = index - 1
        _add_conv_bn(self, f"features_{index}", c.conv_layer(channels, last_channel, 1, rngs=rngs),
                     c.batch_norm(last_channel, rngs=rngs))
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        self.classifier_1 = c.dense(last_channel, num_classes, rngs=rngs)

    def __call__(self, x, temperature=None):
        """``x [B, H, W, in_channels]`` → logits ``[B, num_classes]``; ``temperature`` goes to every dynamic layer."""
        check_input(x, self.in_channels, "MobileNetV2")
        x = _conv_bn_relu6(self, "features_0", x, temperature)
        for index in range(1, self.num_blocks + 1):
            x = getattr(self, f"features_{index}")(x, temperature)
        x = _conv_bn_relu6(self, f"features_{self.num_blocks + 1}", x, temperature)
        x = jnp.mean(x, axis=(1, 2))
        return self.classifier_1(self.dropout(x))


@register_model
def mobilenet_v2(width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """MobileNetV2; keyword arguments as :class:`MobileNetV2` (``rngs`` required)."""
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
