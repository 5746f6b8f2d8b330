"""EfficientNet-CondConv (Yang et al., "CondConv: Conditionally Parameterized Convolutions for
Efficient Inference", NeurIPS 2019, arXiv:1904.04971) on EfficientNet-B0/B1 (Tan & Le, ICML 2019),
channels-last Flax.

Twin of ``dynconv_torch.models.efficientnet_cc``, whose ``state_dict`` is timm's key for key, so
timm's public checkpoints (``tf_efficientnet_cc_b0_4e``, ``tf_efficientnet_cc_b0_8e``,
``tf_efficientnet_cc_b1_8e``) convert with :func:`dynconv_jax.convert.torch_to_flax`; see
:func:`convert_torch_checkpoint`. Parameter paths follow the converter's naming rule: timm's
``blocks.5.0.conv_pw.weight`` (stage 5, block 0 of the ``nn.Sequential`` of stages) is
``params/blocks_5_0/conv_pw/kernel`` here.

Every CondConv block computes one routing vector ``r = sigmoid(routing_fn(GAP(x)) / T)`` from its
input and feeds it to its three :class:`~dynconv_jax.CondConv` layers (``external_routing=True``):
pointwise expansion, depthwise and projection. ``tf_*`` variants use TF 'SAME' padding (flax
'SAME' is TensorFlow's: for stride 2 the odd pixel goes to the bottom/right) and BatchNorm eps
1e-3; the others symmetric PyTorch padding and eps 1e-5.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from dynconv_jax import CondConv, routing
from dynconv_jax.norm import BatchNorm
from dynconv_spec.efficientnet_cc import (BN_EPS_TF, BN_EPS_TORCH, DEFAULT_CFGS, VARIANTS, BlockSpec, block_specs,
                                          check_efficientnet_args, resolve_variant, variant_entry_point)
from dynconv_spec.mobilenetv2 import make_divisible

from ._registry import register_model

__all__ = [
    "EfficientNetCondConv", "efficientnet_cc", "block_specs", "convert_torch_checkpoint", "VARIANTS", "DEFAULT_CFGS",
    "tf_efficientnet_cc_b0_4e", "tf_efficientnet_cc_b0_8e", "tf_efficientnet_cc_b1_8e",
    "efficientnet_cc_b0_4e", "efficientnet_cc_b0_8e", "efficientnet_cc_b1_8e",
]


# --------------------------------------------------------------------------- layers
def _padding(kernel_size: int, stride: int, tf_same: bool):
    """TF 'SAME' (flax's 'SAME') or PyTorch's symmetric ``((stride - 1) + (k - 1)) // 2`` (timm's default)."""
    if tf_same:
        return "SAME"
    pad = ((stride - 1) + (kernel_size - 1)) // 2
    return ((pad, pad), (pad, pad))


def _conv_init(kernel_size: int, features: int, groups: int):
    """TF EfficientNet init (timm ``_init_weight_goog``): N(0, 2 / fan_out), fan_out = k * k * out / groups."""
    return nn.initializers.normal(math.sqrt(2.0 / (kernel_size * kernel_size * features // groups)))


def _uniform_init(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class SqueezeExcite(nn.Module):
    """Static squeeze-excitation: ``x * sigmoid(conv_expand(swish(conv_reduce(GAP(x)))))``."""

    se_chs: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        def conv1x1(h, features, name):
            return nn.Conv(features, (1, 1), kernel_init=_conv_init(1, features, 1), dtype=self.dtype,
                           param_dtype=self.param_dtype, precision=self.precision, name=name)(h)

        s = jnp.mean(x, axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
        s = nn.silu(conv1x1(s, self.se_chs, "conv_reduce"))
        return x * nn.sigmoid(conv1x1(s, x.shape[-1], "conv_expand"))


@dataclasses.dataclass(frozen=True)
class _Config:
    """Settings every block shares."""

    bn_eps: float
    tf_same: bool
    strategy: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def conv(self, x, name: str, features: int, kernel_size: int, stride: int = 1, groups: int = 1,
             num_experts: int = 0, routing_weights=None):
        """Bias-free static conv, or a CondConv fed ``routing_weights [B, K]`` when ``num_experts``."""
        common = dict(strides=(stride, stride), padding=_padding(kernel_size, stride, self.tf_same),
                      feature_group_count=groups, kernel_init=_conv_init(kernel_size, features, groups),
                      dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name=name)
        if num_experts:
            layer = CondConv(features, (kernel_size, kernel_size), num_experts=num_experts, external_routing=True,
                             strategy=self.strategy, **common)
            return layer(x, routing_weights=routing_weights)
        return nn.Conv(features, (kernel_size, kernel_size), use_bias=False, **common)(x)

    def bn(self, x, name: str, train: bool):
        return BatchNorm(use_running_average=not train, epsilon=self.bn_eps, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)(x)

    def se(self, x, se_chs: int):
        return SqueezeExcite(se_chs, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                             name="se")(x)

    def drop_path(self, module: nn.Module, y, rate: float, train: bool):
        """Stochastic depth: drop whole samples with probability ``rate`` (needs the 'dropout' rng in training)."""
        if rate == 0.0 or not train:
            return y
        keep = 1.0 - rate
        mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
        return y * (mask.astype(y.dtype) / keep)


# --------------------------------------------------------------------------- blocks
class DepthwiseSeparable(nn.Module):
    """dw conv + BN + swish, SE, 1x1 conv + BN (timm ``DepthwiseSeparableConv``)."""

    spec: BlockSpec
    config: _Config

    @nn.compact
    def __call__(self, x, train: bool = False):
        c, s = self.config, self.spec
        y = nn.silu(c.bn(c.conv(x, "conv_dw", s.in_chs, s.kernel_size, s.stride, groups=s.in_chs), "bn1", train))
        y = c.bn(c.conv(c.se(y, s.se_chs), "conv_pw", s.out_chs, 1), "bn2", train)
        return c.drop_path(self, y, s.drop_path_rate, train) + x if s.has_skip else y


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expansion + BN + swish, dw conv + BN + swish, SE, 1x1 projection + BN.

    With ``spec.num_experts > 0`` the three convolutions are CondConv layers sharing one routing
    vector ``sigmoid(routing_fn(GAP(x)) / T)`` of the block input (timm ``CondConvResidual``),
    sown as ``intermediates/routing_weights [B, K]``.
    """

    spec: BlockSpec
    config: _Config

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        c, s = self.config, self.spec
        r = None
        if s.num_experts:
            layer = routing.layer_name(self)
            dtype = routing.attention_dtype(nn.dtypes.canonicalize_dtype(x, dtype=c.dtype))
            logits = nn.Dense(s.num_experts, dtype=dtype, param_dtype=c.param_dtype, precision=c.precision,
                              kernel_init=_uniform_init(1.0 / math.sqrt(s.in_chs + s.num_experts)),
                              name="routing_fn")(routing.global_avg_pool(x, dtype))  # [B, K]
            r = routing.sigmoid_attention(logits, routing.temperature_scalar(temperature, layer, dtype))
            self.sow("intermediates", "routing_weights", r)
        k = s.num_experts
        y = nn.silu(c.bn(c.conv(x, "conv_pw", s.mid_chs, 1, num_experts=k, routing_weights=r), "bn1", train))
        y = c.conv(y, "conv_dw", s.mid_chs, s.kernel_size, s.stride, groups=s.mid_chs, num_experts=k,
                   routing_weights=r)
        y = c.se(nn.silu(c.bn(y, "bn2", train)), s.se_chs)
        y = c.bn(c.conv(y, "conv_pwl", s.out_chs, 1, num_experts=k, routing_weights=r), "bn3", train)
        return c.drop_path(self, y, s.drop_path_rate, train) + x if s.has_skip else y


# --------------------------------------------------------------------------- model
class EfficientNetCondConv(nn.Module):
    """EfficientNet with CondConv blocks (Yang et al., NeurIPS 2019); parameter tree = timm's names.

    ``model.apply(variables, x [B, H, W, C], train=False, temperature=None)`` -> logits
    ``[B, num_classes]`` (pooled features ``[B, 1280]`` when ``num_classes=0``). Training needs
    ``mutable=['batch_stats']`` and, with ``drop_rate`` or ``drop_path_rate`` > 0,
    ``rngs={'dropout': key}``.

    Attributes:
      depth_multiplier: EfficientNet depth scaling (B0: 1.0, B1: 1.1).
      experts_multiplier: multiplies the 4 experts of each CondConv stage (8e models: 2).
      tf_port: TensorFlow-compatible variant: BN eps 1e-3 and TF 'SAME' padding.
      num_classes: classifier width; 0 drops the classifier.
      drop_rate: dropout before the classifier (training only).
      drop_path_rate: stochastic depth of the last block (linear in depth before it).
      channel_multiplier: EfficientNet width scaling (1.0 for all CondConv models).
      bn_eps: override the BatchNorm eps of the variant.
      strategy: per-sample conv strategy of the CondConv layers (:func:`dynconv_jax.ops.dynamic_conv`).
      dtype, param_dtype, precision: as in ``flax.linen.Conv``.
    """

    depth_multiplier: float = 1.0
    experts_multiplier: int = 1
    tf_port: bool = False
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    channel_multiplier: float = 1.0
    bn_eps: Optional[float] = None
    strategy: str = "auto"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        where = type(self).__name__
        check_efficientnet_args(where, self.num_classes, self.drop_rate, self.drop_path_rate)
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{where}: input must be a floating-point [batch, height, width, channels] array "
                             f"(channels-last), got shape {tuple(x.shape)} dtype {x.dtype}")
        bn_eps = (BN_EPS_TF if self.tf_port else BN_EPS_TORCH) if self.bn_eps is None else self.bn_eps
        c = _Config(bn_eps, self.tf_port, self.strategy, self.dtype, self.param_dtype, self.precision)
        stem_chs = make_divisible(32 * self.channel_multiplier)
        x = nn.silu(c.bn(c.conv(x, "conv_stem", stem_chs, 3, 2), "bn1", train))
        specs = block_specs(stem_chs, self.depth_multiplier, self.channel_multiplier, self.experts_multiplier,
                            self.drop_path_rate)
        for i, stage in enumerate(specs):
            for j, spec in enumerate(stage):
                if spec.block == "ds":
                    x = DepthwiseSeparable(spec, c, name=f"blocks_{i}_{j}")(x, train)
                else:
                    x = InvertedResidual(spec, c, name=f"blocks_{i}_{j}")(x, train, temperature)
        x = nn.silu(c.bn(c.conv(x, "conv_head", make_divisible(1280 * self.channel_multiplier), 1), "bn2", train))
        x = jnp.mean(x, axis=(1, 2))  # [B, num_features]
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        if not self.num_classes:
            return x
        bound = 1.0 / math.sqrt(self.num_classes)
        return nn.Dense(self.num_classes, kernel_init=_uniform_init(bound), dtype=self.dtype,
                        param_dtype=self.param_dtype, precision=self.precision, name="classifier")(x)


def efficientnet_cc(name: str, **kwargs) -> EfficientNetCondConv:
    """Build a variant by name (one of :data:`VARIANTS`); ``kwargs`` are :class:`EfficientNetCondConv` fields."""
    return EfficientNetCondConv(**resolve_variant(name), **kwargs)


tf_efficientnet_cc_b0_4e = register_model(variant_entry_point("tf_efficientnet_cc_b0_4e", EfficientNetCondConv))
tf_efficientnet_cc_b0_8e = register_model(variant_entry_point("tf_efficientnet_cc_b0_8e", EfficientNetCondConv))
tf_efficientnet_cc_b1_8e = register_model(variant_entry_point("tf_efficientnet_cc_b1_8e", EfficientNetCondConv))
efficientnet_cc_b0_4e = register_model(variant_entry_point("efficientnet_cc_b0_4e", EfficientNetCondConv))
efficientnet_cc_b0_8e = register_model(variant_entry_point("efficientnet_cc_b0_8e", EfficientNetCondConv))
efficientnet_cc_b1_8e = register_model(variant_entry_point("efficientnet_cc_b1_8e", EfficientNetCondConv))


def convert_torch_checkpoint(model: EfficientNetCondConv, source, image_size: int = 64,
                             allow_nonfinite: bool = False) -> Dict[str, Any]:
    """Flax variables ``{'params', 'batch_stats'}`` for ``model`` from a PyTorch checkpoint of its timm twin.

    ``source``: a path to timm's ``pytorch_model.bin`` / ``.pth`` / ``.safetensors`` (also wrapped in
    ``{'state_dict': ...}`` etc., see :func:`dynconv_jax.convert.load_state_dict`), a state_dict or a
    ``dynconv_torch`` / timm module. The template is built shape-only (``jax.eval_shape``, no
    compute); leaves take ``model.param_dtype``. Raises ``ConversionError`` on any mismatch and on
    NaN/Inf entries unless ``allow_nonfinite``.
    """
    from dynconv_jax.convert import torch_to_flax

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), model.param_dtype)
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    return torch_to_flax(source, template, allow_nonfinite=allow_nonfinite)
