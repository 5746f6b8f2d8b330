"""ResNet and MobileNetV2 as NNX Modules (twins of :mod:`dynconv_jax.models`, same arguments,
entry-point names and parameter paths) with static, CondConv, DynamicConv, ODConv or KernelWarehouse
convolutions.

``create_model(name, rngs=..., **kwargs)`` / ``list_models()``: the registry of the NNX models, a
subset of :data:`dynconv_spec.MODEL_NAMES` (no EfficientNet-CondConv in NNX yet).
"""

from ._registry import create_model, list_models, register_model
from .mobilenetv2 import (
    MobileNetV2,
    kw_mobilenetv2_050,
    kw_mobilenetv2_100,
    mobilenet_v2,
    od_mobilenetv2_050,
    od_mobilenetv2_075,
    od_mobilenetv2_100,
)
from .resnet import (
    ResNet,
    kw_resnet18,
    kw_resnet50,
    od_resnet18,
    od_resnet34,
    od_resnet50,
    od_resnet101,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
)

__all__ = [
    "create_model",
    "list_models",
    "register_model",
    "MobileNetV2",
    "ResNet",
    "mobilenet_v2",
    "od_mobilenetv2_050",
    "od_mobilenetv2_075",
    "od_mobilenetv2_100",
    "od_resnet18",
    "od_resnet34",
    "od_resnet50",
    "od_resnet101",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "kw_resnet18",
    "kw_resnet50",
    "kw_mobilenetv2_050",
    "kw_mobilenetv2_100",
]
