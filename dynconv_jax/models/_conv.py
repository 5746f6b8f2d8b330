"""The conv-type factory shared by the Flax models (twin of ``dynconv_torch.models._conv``).

Models build the convolutions of their blocks through :class:`ConvConfig`, so one switch
``conv='static'|'condconv'|'dynamic'|'odconv'`` gives the CondConv (Yang et al., NeurIPS
2019), DynamicConv (Chen et al., CVPR 2020) or ODConv (Li et al., ICLR 2022) version of a
network. Stems, downsample shortcuts and classifiers use :meth:`ConvConfig.static_conv`.
All padding is explicit and symmetric (``(k - 1) // 2``), as PyTorch pads, so outputs and
checkpoints carry over (flax's 'SAME' pads stride-2 convolutions asymmetrically).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import jax.numpy as jnp
from flax import linen as nn

from dynconv_jax import CondConv, DynamicConv, ODConv
from dynconv_jax.norm import BatchNorm

CONV_TYPES = ("static", "condconv", "dynamic", "odconv")
_REDUCTION_TYPES = ("dynamic", "odconv")
_RESERVED_OPTIONS = ("features", "kernel_size", "strides", "padding", "feature_group_count", "num_experts",
                     "reduction", "strategy", "dtype", "param_dtype", "precision", "name")

# torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / (O * kh * kw)),
# the init of every static conv in torchvision's and the official ODConv models.
kaiming_fan_out_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # untruncated in jax
# The official models' classifier: N(0, 0.01²) weights, zero bias.
classifier_init = nn.initializers.normal(0.01)


def check_num_classes(num_classes: int, where: str) -> None:
    """The classifier width must be a positive int (these models have no headless mode)."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{where}: num_classes={num_classes!r} must be an int >= 1")


def check_conv_args(conv: str, num_experts: int, reduction: Optional[float], conv_options: Optional[Mapping[str, Any]],
                    where: str) -> Tuple[Tuple[str, Any], ...]:
    """Validate the conv-type arguments of a model; returns ``conv_options`` as sorted items."""
    if conv not in CONV_TYPES:
        raise ValueError(f"{where}: conv={conv!r} is not a conv type; expected one of {CONV_TYPES}")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"{where}: num_experts={num_experts!r} must be a positive int")
    if reduction is not None and conv not in _REDUCTION_TYPES:
        raise ValueError(f"{where}: reduction={reduction!r} applies to conv in {_REDUCTION_TYPES}, not conv={conv!r}")
    options = dict(conv_options or {})
    if options and conv == "static":
        raise ValueError(f"{where}: conv_options={options} given with conv='static' (they are dynamic-layer options)")
    reserved = sorted(set(_RESERVED_OPTIONS) & set(options))
    if reserved:
        raise ValueError(f"{where}: conv_options may not set {reserved}; the model sets them "
                         "(use num_experts=, reduction=, strategy=, dtype=, param_dtype=, precision=)")
    return tuple(sorted(options.items()))


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    """How a model builds its convolutions and norms; call its methods inside a compact ``__call__``.

    The created submodules get the given ``name`` in the calling module's scope, so the
    parameter paths follow the PyTorch attribute names (DESIGN.md naming rule).
    """

    conv: str = "static"
    num_experts: int = 4
    reduction: Optional[float] = None
    strategy: str = "auto"
    conv_options: Tuple[Tuple[str, Any], ...] = ()
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def static_conv(self, x, name: str, features: int, kernel_size: int, stride: int = 1, groups: int = 1):
        """A bias-free static conv with symmetric padding ``(k - 1) // 2``: ``[B, H, W, C] -> [B, H', W', features]``."""
        pad = (kernel_size - 1) // 2
        return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                       feature_group_count=groups, use_bias=False, kernel_init=kaiming_fan_out_normal,
                       dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name=name)(x)

    def conv_layer(self, x, name: str, features: int, kernel_size: int, stride: int = 1, groups: int = 1, *,
                   train: bool, temperature=None):
        """A convolution of the configured type (static, or a dynamic layer given ``train`` and ``temperature``)."""
        if self.conv == "static":
            return self.static_conv(x, name, features, kernel_size, stride, groups)
        layer_cls = {"condconv": CondConv, "dynamic": DynamicConv, "odconv": ODConv}[self.conv]
        options = dict(self.conv_options)
        if self.reduction is not None:
            options["reduction"] = self.reduction
        pad = (kernel_size - 1) // 2
        layer = layer_cls(features=features, kernel_size=(kernel_size, kernel_size), strides=(stride, stride),
                          padding=((pad, pad), (pad, pad)), feature_group_count=groups, num_experts=self.num_experts,
                          strategy=self.strategy, dtype=self.dtype, param_dtype=self.param_dtype,
                          precision=self.precision, name=name, **options)
        return layer(x, train=train, temperature=temperature)

    def batch_norm(self, x, name: str, train: bool):
        """PyTorch-semantics BatchNorm (:class:`dynconv_jax.norm.BatchNorm`): batch statistics when training."""
        return BatchNorm(use_running_average=not train, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)

    def dense(self, x, name: str, features: int):
        """The classifier: ``Dense`` with the official models' N(0, 0.01²) init and zero bias."""
        return nn.Dense(features, kernel_init=classifier_init, dtype=self.dtype, param_dtype=self.param_dtype,
                        precision=self.precision, name=name)(x)


def check_input(x, in_channels: int, where: str) -> None:
    """``x`` must be ``[B, H, W, in_channels]`` floating point (channels-last)."""
    if x.ndim != 4 or x.shape[-1] != in_channels:
        raise ValueError(f"{where}: input shape {tuple(x.shape)} must be [batch, height, width, {in_channels}] "
                         f"(channels-last, in_channels={in_channels})")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{where}: input dtype {x.dtype} must be floating point")


STEMS = ("imagenet", "cifar")


def check_model_args(where: str, conv: str, num_experts: int, reduction: Optional[float],
                     conv_options: Optional[Mapping[str, Any]], stem: str, dropout: float,
                     num_classes: int) -> Tuple[Tuple[str, Any], ...]:
    """Validate the arguments every model shares (both Flax APIs); returns ``conv_options`` as sorted items."""
    options = check_conv_args(conv, num_experts, reduction, conv_options, where)
    check_num_classes(num_classes, where)
    if stem not in STEMS:
        raise ValueError(f"{where}: stem={stem!r}; expected one of {STEMS}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: dropout={dropout!r} must be in [0, 1)")
    return options


class DynamicNet(nn.Module):
    """The fields and checks shared by the Flax models (ResNet, MobileNetV2): which convolution the
    blocks use, the classifier, the stem, and how every layer computes. Subclasses add their
    architecture fields and ``dropout``; see :class:`dynconv_jax.models.ResNet` for the meaning."""

    conv: str = "static"
    num_experts: int = 4
    num_classes: int = 1000
    stem: str = "imagenet"
    reduction: Optional[float] = None
    in_channels: int = 3
    conv_options: Optional[Mapping[str, Any]] = None
    strategy: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def __post_init__(self):
        check_model_args(type(self).__name__, self.conv, self.num_experts, self.reduction, self.conv_options,
                         self.stem, self.dropout, self.num_classes)
        super().__post_init__()

    def conv_config(self, x) -> ConvConfig:
        """Checks the input ``x`` and returns the :class:`ConvConfig` every layer is built with."""
        where = type(self).__name__
        check_input(x, self.in_channels, where)
        options = check_conv_args(self.conv, self.num_experts, self.reduction, self.conv_options, where)
        return ConvConfig(self.conv, self.num_experts, self.reduction, self.strategy, options, self.dtype,
                          self.param_dtype, self.precision)
