"""ResNet, MobileNetV2 (and timm's EfficientNet-CondConv) with static, CondConv, DynamicConv, ODConv or
KernelWarehouse convolutions (PyTorch, NCHW).

``create_model(name, **kwargs)`` builds any registered model, ``list_models()`` names them (the
same names as ``dynconv_jax.models``, :data:`dynconv_spec.MODEL_NAMES`), e.g.
``create_model('od_resnet18', kernel_num=4)``. ``conv='odconv'`` models with the ImageNet stem have
the official OSVAI/ODConv state_dicts, so the released checkpoints load with
``load_state_dict(..., strict=True)``; so have the official OSVAI/KernelWarehouse ``kw_*`` models.
``set_temperature(model, t)`` sets the attention
temperature of every dynamic layer.
"""

from dynconv_spec import CONV_TYPES
from dynconv_torch import set_temperature

from ._conv import make_conv, static_conv
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
    "create_model",
    "list_models",
    "register_model",
    "make_conv",
    "static_conv",
    "set_temperature",
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
