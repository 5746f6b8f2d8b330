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
from dynconv_spec import check_model_args

DYNAMIC_LAYERS = {"condconv": CondConv, "dynamic": DynamicConv, "odconv": ODConv}
#: The fields each dynamic layer takes (what ``conv_options`` may name, less the reserved ones).
LAYER_OPTIONS = {conv: frozenset(f.name for f in dataclasses.fields(layer) if f.init)
                 for conv, layer in DYNAMIC_LAYERS.items()}

# torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / (O * kh * kw)),
# the init of every static conv in torchvision's and the official ODConv models.
kaiming_fan_out_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # untruncated in jax
# The official models' classifier: N(0, 0.01²) weights, zero bias.
classifier_init = nn.initializers.normal(0.01)


def check_args(where: str, conv: str, num_experts: int, reduction: Optional[float],
               conv_options: Optional[Mapping[str, Any]], stem: str, dropout: float,
               num_classes: int) -> Tuple[Tuple[str, Any], ...]:
    """:func:`dynconv_spec.check_model_args` against the Flax layers' fields (both Flax APIs);
    returns ``conv_options`` as sorted items (hashable, for the frozen :class:`ConvConfig`)."""
    options = check_model_args(where, conv, num_experts, reduction, conv_options, stem, dropout, num_classes,
                               LAYER_OPTIONS)
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
        layer_cls = DYNAMIC_LAYERS[self.conv]
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
        check_args(type(self).__name__, self.conv, self.num_experts, self.reduction, self.conv_options, self.stem,
                   self.dropout, self.num_classes)
        super().__post_init__()

    def conv_config(self, x) -> ConvConfig:
        """Checks the input ``x`` and returns the :class:`ConvConfig` every layer is built with."""
        where = type(self).__name__
        check_input(x, self.in_channels, where)
        options = check_args(where, self.conv, self.num_experts, self.reduction, self.conv_options, self.stem,
                             self.dropout, self.num_classes)
        return ConvConfig(self.conv, self.num_experts, self.reduction, self.strategy, options, self.dtype,
                          self.param_dtype, self.precision)
