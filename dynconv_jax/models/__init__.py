"""ResNet, MobileNetV2 (and timm's EfficientNet-CondConv) with static, CondConv, DynamicConv, ODConv or
KernelWarehouse convolutions (Flax, channels-last).

``create_model(name, **kwargs)`` builds any registered model, ``list_models()`` names them: the
names, arguments and parameter names of ``dynconv_torch.models`` (:data:`dynconv_spec.MODEL_NAMES`),
so whole-model PyTorch checkpoints (including the official OSVAI/ODConv and OSVAI/KernelWarehouse ones) convert with
:func:`dynconv_jax.convert.torch_to_flax`. Temperature: ``model.apply(..., temperature=t)``.
"""

from dynconv_spec import CONV_TYPES

from ._conv import DynamicNet, ModuleDefs, apply_conv
from ._registry import create_model, list_models, register_model
from .efficientnet_cc import (
    EfficientNetCondConv,
    efficientnet_cc_b0_4e,
    efficientnet_cc_b0_8e,
    efficientnet_cc_b1_8e,
    tf_efficientnet_cc_b0_4e,
    tf_efficientnet_cc_b0_8e,
    tf_efficientnet_cc_b1_8e,
)
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
    "CONV_TYPES",
    "DynamicNet",
    "ModuleDefs",
    "apply_conv",
    "create_model",
    "list_models",
    "register_model",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "od_resnet18",
    "od_resnet34",
    "od_resnet50",
    "od_resnet101",
    "MobileNetV2",
    "mobilenet_v2",
    "od_mobilenetv2_050",
    "od_mobilenetv2_075",
    "od_mobilenetv2_100",
    "kw_resnet18",
    "kw_resnet50",
    "kw_mobilenetv2_050",
    "kw_mobilenetv2_100",
    "EfficientNetCondConv",
    "tf_efficientnet_cc_b0_4e",
    "tf_efficientnet_cc_b0_8e",
    "tf_efficientnet_cc_b1_8e",
    "efficientnet_cc_b0_4e",
    "efficientnet_cc_b0_8e",
    "efficientnet_cc_b1_8e",
]
