"""The conv-type factory of the NNX models (twin of :mod:`dynconv_jax.models._conv`).

:class:`ConvConfig` builds each layer with its input width (NNX creates parameters eagerly):
static convolutions (``nnx.Conv``, bias-free, symmetric padding ``(k - 1) // 2`` as PyTorch),
the configured dynamic layer of :mod:`dynconv_jax.nnx`, the PyTorch-semantics BatchNorm and the
classifier, with the Linen models' initializers, so the parameter paths and shapes are the Linen
models' and whole-model checkpoints convert the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import jax.numpy as jnp
from flax import nnx

from dynconv_jax.models._conv import classifier_init, kaiming_fan_out_normal
from dynconv_jax.nnx.layers import BatchNorm, CondConv, DynamicConv, ODConv

DYNAMIC_LAYERS = {"condconv": CondConv, "dynamic": DynamicConv, "odconv": ODConv}


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    """How an NNX model builds its convolutions, norms and classifier (fields as the Linen ConvConfig)."""

    conv: str = "static"
    num_experts: int = 4
    reduction: Optional[float] = None
    strategy: str = "auto"
    conv_options: Tuple[Tuple[str, Any], ...] = ()
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def static_conv(self, in_features: int, features: int, kernel_size: int, stride: int = 1, groups: int = 1, *,
                    rngs: nnx.Rngs) -> nnx.Conv:
        """A bias-free static conv with symmetric padding ``(k - 1) // 2``."""
        pad = (kernel_size - 1) // 2
        return nnx.Conv(in_features, features, (kernel_size, kernel_size), strides=(stride, stride),
                        padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=False,
                        kernel_init=kaiming_fan_out_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                        precision=self.precision, rngs=rngs)

    def conv_layer(self, in_features: int, features: int, kernel_size: int, stride: int = 1, groups: int = 1, *,
                   rngs: nnx.Rngs) -> nnx.Module:
        """A convolution of the configured type; call it with :func:`apply_conv`."""
        if self.conv == "static":
            return self.static_conv(in_features, features, kernel_size, stride, groups, rngs=rngs)
        options = dict(self.conv_options)
        if self.reduction is not None:
            options["reduction"] = self.reduction
        pad = (kernel_size - 1) // 2
        return DYNAMIC_LAYERS[self.conv](
            in_features, features, (kernel_size, kernel_size), (stride, stride), padding=((pad, pad), (pad, pad)),
            feature_group_count=groups, num_experts=self.num_experts, strategy=self.strategy, dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision, rngs=rngs, **options)

    def batch_norm(self, features: int, *, rngs: nnx.Rngs) -> BatchNorm:
        """PyTorch-semantics BatchNorm (:class:`dynconv_jax.nnx.BatchNorm`)."""
        return BatchNorm(features, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

    def dense(self, in_features: int, features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
        """The classifier: N(0, 0.01²) weights, zero bias (the official models)."""
        return nnx.Linear(in_features, features, kernel_init=classifier_init, dtype=self.dtype,
                          param_dtype=self.param_dtype, precision=self.precision, rngs=rngs)


def apply_conv(layer: nnx.Module, x, temperature):
    """Call a layer made by :meth:`ConvConfig.conv_layer`: dynamic layers get the ``temperature``."""
    return layer(x) if isinstance(layer, nnx.Conv) else layer(x, temperature=temperature)
