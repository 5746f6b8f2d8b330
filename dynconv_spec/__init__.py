"""The facts PyTorch and JAX models must agree on, in plain Python (no jax, no torch).

``dynconv_torch`` and ``dynconv_jax`` both import this package and never each other: conv types
and stems (:mod:`.args`, with the argument checks), the architecture tables (:mod:`.resnet`,
:mod:`.mobilenetv2`, :mod:`.efficientnet_cc`), KernelWarehouse's warehouse plan and official configs
(:mod:`.kernelwarehouse`) and the model names of both registries (:mod:`.registry`).

``__version__`` is the installed distribution's (``dynconv``), for all three packages.
"""

from importlib import metadata

from .args import (
    ATTENTION_NORMS,
    CONV_TYPES,
    MAX_EXPERT_BANK_PARAMETERS,
    OFFICIAL_ODCONV_SPELLINGS,
    REDUCTION_TYPES,
    RESERVED_CONV_OPTIONS,
    STEMS,
    TEMPERATURE_FLOOR,
    check_attention_norm,
    check_conv_args,
    check_expert_bank,
    check_model_args,
    check_num_classes,
    check_rate,
    check_resnet_args,
    check_temperature,
    check_width_mult,
    one_spelling,
)
from .kernelwarehouse import KW_CONV
from .mobilenetv2 import INVERTED_RESIDUAL_SETTING, make_divisible, stage_settings
from .registry import (
    CONV_MODELS,
    EFFICIENTNET_CC_MODELS,
    KW_MODELS,
    MODEL_NAMES,
    ODCONV_MODELS,
    ModelRegistry,
    kw_model_args,
    odconv_model_args,
)
from .resnet import BLOCK_EXPANSION, RESNET_ARCHS, stage_blocks


def _installed_version() -> str:
    try:
        return metadata.version("dynconv")
    except metadata.PackageNotFoundError:  # imported from a checkout that was never installed
        return "0+unknown"


__version__ = _installed_version()
"""The installed distribution's version (``dynconv``), the same for all three packages (``'0+unknown'`` in a
checkout that was never installed)."""

__all__ = [
    "__version__",
    "ATTENTION_NORMS",
    "CONV_TYPES",
    "MAX_EXPERT_BANK_PARAMETERS",
    "OFFICIAL_ODCONV_SPELLINGS",
    "REDUCTION_TYPES",
    "RESERVED_CONV_OPTIONS",
    "STEMS",
    "TEMPERATURE_FLOOR",
    "check_attention_norm",
    "check_conv_args",
    "check_expert_bank",
    "check_model_args",
    "check_num_classes",
    "check_rate",
    "check_resnet_args",
    "check_temperature",
    "check_width_mult",
    "one_spelling",
    "INVERTED_RESIDUAL_SETTING",
    "make_divisible",
    "stage_settings",
    "CONV_MODELS",
    "EFFICIENTNET_CC_MODELS",
    "KW_CONV",
    "KW_MODELS",
    "MODEL_NAMES",
    "ODCONV_MODELS",
    "ModelRegistry",
    "kw_model_args",
    "odconv_model_args",
    "BLOCK_EXPANSION",
    "RESNET_ARCHS",
    "stage_blocks",
]
