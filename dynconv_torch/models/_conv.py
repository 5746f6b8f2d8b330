"""The conv-type factory shared by the PyTorch models.

Every model takes ``conv='static'|'condconv'|'dynamic'|'odconv'`` and builds the
convolutions of its blocks through :func:`make_conv`, so one switch turns a ResNet or
MobileNetV2 into its CondConv (Yang et al., NeurIPS 2019), DynamicConv (Chen et al.,
CVPR 2020) or ODConv (Li et al., ICLR 2022) version. The stem, the downsample
shortcut and the classifier stay static (:func:`static_conv`), as in the official
OSVAI/ODConv models.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

from dynconv_torch import CondConv2d, DynamicConv2d, ODConv2d

CONV_TYPES = ("static", "condconv", "dynamic", "odconv")
# Layer options a model forwards under its own name, per conv type.
_REDUCTION_TYPES = ("dynamic", "odconv")


def check_num_classes(num_classes: int, where: str) -> None:
    """The classifier width must be a positive int (these models have no headless mode)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{where}: num_classes={num_classes!r} must be an int >= 1")


def check_conv_args(conv: str, num_experts: int, reduction: Optional[float], conv_options: Optional[Mapping[str, Any]],
                    where: str) -> dict:
    """Validate the conv-type arguments of a model; returns ``conv_options`` as a dict."""
    if conv not in CONV_TYPES:
        raise ValueError(f"{where}: conv={conv!r} is not a conv type; expected one of {CONV_TYPES}")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"{where}: num_experts={num_experts!r} must be a positive int")
    if reduction is not None and conv not in _REDUCTION_TYPES:
        raise ValueError(f"{where}: reduction={reduction!r} applies to conv in {_REDUCTION_TYPES}, not conv={conv!r}")
    options = dict(conv_options or {})
    if options and conv == "static":
        raise ValueError(f"{where}: conv_options={options} given with conv='static' (they are dynamic-layer options)")
    reserved = {"num_experts", "kernel_num", "reduction", "kernel_size", "stride", "padding", "groups"} & set(options)
    if reserved:
        raise ValueError(f"{where}: conv_options may not set {sorted(reserved)}; the model sets them "
                         "(use num_experts= and reduction=)")
    return options


def static_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                groups: int = 1) -> nn.Conv2d:
    """A bias-free ``nn.Conv2d`` with the He (fan-out) normal init of torchvision and the official models."""
    layer = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    return layer


def make_conv(conv: str, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
              groups: int = 1, *, num_experts: int = 4, reduction: Optional[float] = None,
              conv_options: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """One convolution of the requested type (no bias unless the layer's default or ``conv_options`` adds one).

    ``conv_options`` are extra keyword arguments of the dynamic layer (e.g. ``routing_dropout``
    for CondConv, ``bias`` / ``min_channels`` for DynamicConv); ``reduction=None`` keeps the
    layer's default (1/16 for ODConv, 1/4 for DynamicConv).
    """
    options = dict(conv_options or {})
    if reduction is not None:
        options["reduction"] = reduction
    if conv == "static":
        return static_conv(in_channels, out_channels, kernel_size, stride, padding, groups)
    if conv == "condconv":
        return CondConv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                          num_experts=num_experts, **options)
    if conv == "dynamic":
        return DynamicConv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                             num_experts=num_experts, **options)
    if conv == "odconv":
        return ODConv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                        kernel_num=num_experts, **options)
    raise ValueError(f"conv={conv!r} is not a conv type; expected one of {CONV_TYPES}")
