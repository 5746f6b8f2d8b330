"""ResNet, MobileNetV2 (and timm's EfficientNet-CondConv) with static, CondConv, DynamicConv or ODConv convolutions (PyTorch, NCHW).

``conv='odconv'`` models with the ImageNet stem have the official OSVAI/ODConv state_dicts, so
the released checkpoints load with ``load_state_dict(..., strict=True)``. The Flax twins live in
``dynconv_jax.models`` under the same names. ``set_temperature(model, t)`` sets the attention
temperature of every dynamic layer.
"""
from dynconv_torch import set_temperature

from ._conv import CONV_TYPES, make_conv, static_conv
from .efficientnet_cc import (
    EfficientNetCondConv,
    tf_efficientnet_cc_b0_4e, tf_efficientnet_cc_b0_8e, tf_efficientnet_cc_b1_8e,
    efficientnet_cc_b0_4e, efficientnet_cc_b0_8e, efficientnet_cc_b1_8e,
)
from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101

__all__ = ["CONV_TYPES", "make_conv", "static_conv", "set_temperature", "ResNet", "resnet18", "resnet34",
           "resnet50", "resnet101", "MobileNetV2", "mobilenet_v2",
           "EfficientNetCondConv", "tf_efficientnet_cc_b0_4e", "tf_efficientnet_cc_b0_8e", "tf_efficientnet_cc_b1_8e", "efficientnet_cc_b0_4e", "efficientnet_cc_b0_8e", "efficientnet_cc_b1_8e"]
