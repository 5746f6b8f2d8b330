"""Argument validation shared by the models of both frameworks.

Every check raises ``ValueError`` naming the model (``where``) and the argument, before any
layer is built, so a bad ``conv=`` or ``conv_options=`` fails the same way in PyTorch and JAX.
"""
from __future__ import annotations

import math
from typing import Any, Collection, Dict, Mapping, Optional, Sequence

#: The convolution a model's blocks use: ``conv='static'|'condconv'|'dynamic'|'odconv'|'kernelwarehouse'``.
CONV_TYPES = ("static", "condconv", "dynamic", "odconv", "kernelwarehouse")
#: Conv types with an attention reduction ratio (``reduction=``).
REDUCTION_TYPES = ("dynamic", "odconv", "kernelwarehouse")
#: ``stem='imagenet'`` (stride-4 stem of the ImageNet nets) or ``'cifar'`` (stride 1, for 32×32 inputs).
STEMS = ("imagenet", "cifar")
#: Layer arguments a model sets itself, in either framework's spelling: ``conv_options`` may not
#: set them (shapes, the expert count, the reduction, how the layer computes; ``external_routing``
#: because a ResNet or MobileNetV2 block has no routing to feed the layer).
RESERVED_CONV_OPTIONS = frozenset({
    "in_channels", "out_channels", "in_planes", "out_planes", "features", "in_features", "out_features",
    "kernel_size", "stride", "strides", "padding", "dilation", "kernel_dilation", "groups", "feature_group_count",
    "num_experts", "kernel_num", "reduction", "external_routing", "strategy", "dtype", "param_dtype", "precision",
    "name", "parent", "rngs",
})
#: ODConv's attention normalisation (``attention_norm``): ``'batch'`` is the official BatchNorm
#: (normalised over the batch: a training batch needs >= 2 samples); ``'layer'`` a LayerNorm over the
#: attention width A (per sample: batch-1 training works); ``'none'`` no normalisation. Only
#: ``'batch'`` has the official parameters (docs/training.md).
ATTENTION_NORMS = ("batch", "layer", "none")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_num_classes(num_classes: int, where: str, *, allow_zero: bool = False) -> None:
    """The classifier width: an int >= 1 (>= 0 with ``allow_zero``: 0 drops the classifier)."""
    low = 0 if allow_zero else 1
    if not _is_int(num_classes) or num_classes < low:
        raise ValueError(f"{where}: num_classes={num_classes!r} must be an int >= {low}")


def check_rate(value: float, name: str, where: str) -> None:
    """A dropout-like probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{where}: {name}={value!r} must be in [0, 1)")


def check_conv_args(conv: str, num_experts: int, reduction: Optional[float],
                    conv_options: Optional[Mapping[str, Any]], where: str,
                    accepted: Optional[Mapping[str, Collection[str]]] = None) -> Dict[str, Any]:
    """Validate the conv-type arguments of a model; returns ``conv_options`` as a new dict.

    Args:
      conv: one of :data:`CONV_TYPES`.
      num_experts: experts per dynamic layer, an int >= 1.
      reduction: attention reduction ratio in (0, 1], only for :data:`REDUCTION_TYPES`; None keeps
        the layer's default.
      conv_options: further keyword arguments of every dynamic layer; none with ``conv='static'``
        and none of :data:`RESERVED_CONV_OPTIONS`.
      where: the model's name, for the messages.
      accepted: the option names each dynamic conv type's layer takes in the calling framework
        (``{'condconv': {...}, ...}``); an option outside them is rejected here, by name, instead
        of as a ``TypeError`` from the first layer built.
    """
    if conv not in CONV_TYPES:
        raise ValueError(f"{where}: conv={conv!r} is not a conv type; expected one of {CONV_TYPES}")
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"{where}: num_experts={num_experts!r} must be a positive int")
    if reduction is not None:
        if conv not in REDUCTION_TYPES:
            raise ValueError(f"{where}: reduction={reduction!r} applies to conv in {REDUCTION_TYPES}, not conv={conv!r}")
        if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not 0.0 < reduction <= 1.0:
            raise ValueError(f"{where}: reduction={reduction!r} must be a number in (0, 1]")
    if conv_options is not None and not isinstance(conv_options, Mapping):
        raise ValueError(f"{where}: conv_options={conv_options!r} must be a mapping of layer options")
    options = dict(conv_options or {})
    if options and conv == "static":
        raise ValueError(f"{where}: conv_options={options} given with conv='static' (they are dynamic-layer options)")
    reserved = sorted(RESERVED_CONV_OPTIONS & set(options))
    if reserved:
        raise ValueError(f"{where}: conv_options may not set {reserved}; the model sets them "
                         "(use num_experts=, reduction= and the model's own arguments)")
    if accepted is not None and conv != "static":
        unknown = sorted(set(options) - set(accepted[conv]))
        if unknown:
            allowed = sorted(set(accepted[conv]) - RESERVED_CONV_OPTIONS)
            raise ValueError(f"{where}: conv_options {unknown} are not options of the conv={conv!r} layer; "
                             f"expected some of {allowed}")
    return options


def check_model_args(where: str, conv: str, num_experts: int, reduction: Optional[float],
                     conv_options: Optional[Mapping[str, Any]], stem: str, dropout: float, num_classes: int,
                     accepted: Optional[Mapping[str, Collection[str]]] = None) -> Dict[str, Any]:
    """Validate the arguments every conv-selectable model (ResNet, MobileNetV2) shares; returns ``conv_options``."""
    options = check_conv_args(conv, num_experts, reduction, conv_options, where, accepted)
    check_num_classes(num_classes, where)
    if stem not in STEMS:
        raise ValueError(f"{where}: stem={stem!r}; expected one of {STEMS}")
    check_rate(dropout, "dropout", where)
    return options


def check_resnet_args(block: str, layers: Sequence[int], base_width: int) -> None:
    """Validate the ResNet architecture arguments (see :mod:`dynconv_spec.resnet`)."""
    from .resnet import BLOCK_EXPANSION

    if block not in BLOCK_EXPANSION:
        raise ValueError(f"ResNet: block={block!r}; expected one of {tuple(BLOCK_EXPANSION)}")
    if len(layers) != 4 or not all(_is_int(n) and n >= 1 for n in layers):
        raise ValueError(f"ResNet: layers={tuple(layers)} must give the blocks (ints >= 1) of 4 stages")
    if not _is_int(base_width) or base_width < 1:
        raise ValueError(f"ResNet: base_width={base_width!r} must be a positive int")


def check_width_mult(width_mult: float) -> None:
    """MobileNetV2's ``width_mult`` must be a positive number."""
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
        raise ValueError(f"MobileNetV2: width_mult={width_mult!r} must be positive")


def check_attention_norm(where: str, norm: str, bn_init: float) -> None:
    """ODConv's ``attention_norm`` must be one of :data:`ATTENTION_NORMS`; ``attention_bn_init`` (the
    initial scale of that normalisation) a finite number > 0."""
    if norm not in ATTENTION_NORMS:
        raise ValueError(f"{where}: attention_norm={norm!r}: expected one of {ATTENTION_NORMS}")
    if isinstance(bn_init, bool) or not (isinstance(bn_init, (int, float)) and 0 < bn_init < math.inf):
        raise ValueError(f"{where}: attention_bn_init={bn_init!r} must be a finite number > 0 "
                         "(the initial normalisation scale; 0 blocks every gradient through the relu)")
