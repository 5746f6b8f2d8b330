"""ResNet, MobileNetV2 (and timm's EfficientNet-CondConv) with static, CondConv, DynamicConv or ODConv convolutions (Flax, channels-last).

Twins of ``dynconv_torch.models`` with the same entry points, arguments and parameter names,
so whole-model PyTorch checkpoints (including the official OSVAI/ODConv ones) convert with
:func:`dynconv_jax.convert.torch_to_flax`. Temperature: ``model.apply(..., temperature=t)``.
"""
from ._conv import CONV_TYPES, ConvConfig
from .efficientnet_cc import (
    EfficientNetCondConv,
    tf_efficientnet_cc_b0_4e, tf_efficientnet_cc_b0_8e, tf_efficientnet_cc_b1_8e,
    efficientnet_cc_b0_4e, efficientnet_cc_b0_8e, efficientnet_cc_b1_8e,
)
from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101

__all__ = ["CONV_TYPES", "ConvConfig", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "MobileNetV2",
           "mobilenet_v2",
           "EfficientNetCondConv", "tf_efficientnet_cc_b0_4e", "tf_efficientnet_cc_b0_8e", "tf_efficientnet_cc_b1_8e", "efficientnet_cc_b0_4e", "efficientnet_cc_b0_8e", "efficientnet_cc_b1_8e"]
