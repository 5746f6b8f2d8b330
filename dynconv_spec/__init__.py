"""The facts PyTorch and JAX models must agree on, in plain Python (no jax, no torch).

``dynconv_torch`` and ``dynconv_jax`` both import this package and never each other: conv types
and stems (:mod:`.args`, with the argument checks), the architecture tables (:mod:`.resnet`,
:mod:`.mobilenetv2`, :mod:`.efficientnet_cc`), KernelWarehouse's warehouse plan and official configs
(:mod:`.kernelwarehouse`) and the model names of both registries (:mod:`.registry`).
"""
from .args import (ATTENTION_NORMS, CONV_TYPES, REDUCTION_TYPES, RESERVED_CONV_OPTIONS, STEMS, check_attention_norm, check_conv_args, check_model_args,
                   check_num_classes, check_rate, check_resnet_args, check_width_mult)
from .mobilenetv2 import INVERTED_RESIDUAL_SETTING, make_divisible, stage_settings
from .kernelwarehouse import KW_CONV
from .registry import (CONV_MODELS, EFFICIENTNET_CC_MODELS, KW_MODELS, MODEL_NAMES, ODCONV_MODELS, ModelRegistry,
                       kw_model_args, odconv_model_args)
from .resnet import BLOCK_EXPANSION, RESNET_ARCHS, stage_blocks

__all__ = ["ATTENTION_NORMS", "CONV_TYPES", "REDUCTION_TYPES", "RESERVED_CONV_OPTIONS", "STEMS", "check_attention_norm", "check_conv_args", "check_model_args",
           "check_num_classes", "check_rate", "check_resnet_args", "check_width_mult", "INVERTED_RESIDUAL_SETTING",
           "make_divisible", "stage_settings", "CONV_MODELS", "EFFICIENTNET_CC_MODELS", "KW_CONV", "KW_MODELS",
           "MODEL_NAMES", "ODCONV_MODELS", "ModelRegistry", "kw_model_args", "odconv_model_args", "BLOCK_EXPANSION", "RESNET_ARCHS", "stage_blocks"]
