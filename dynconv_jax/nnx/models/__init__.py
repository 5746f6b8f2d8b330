"""ResNet and MobileNetV2 as NNX Modules (twins of :mod:`dynconv_jax.models`, same arguments and
parameter paths) with static, CondConv, DynamicConv or ODConv convolutions."""
from .mobilenetv2 import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101

__all__ = ["MobileNetV2", "ResNet", "mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101"]
