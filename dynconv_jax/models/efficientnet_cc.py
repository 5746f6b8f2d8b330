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

import functools
import math
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike

from dynconv_jax import CondConv, attention
from dynconv_jax.conv_base import layer_name
from dynconv_jax.initializers import uniform_init
from dynconv_jax.norm import BatchNorm
from dynconv_spec.efficientnet_cc import (
    BN_EPS_TF,
    BN_EPS_TORCH,
    DEFAULT_CFGS,
    VARIANTS,
    BlockSpec,
    block_specs,
    check_efficientnet_args,
    resolve_variant,
    variant_entry_point,
)
from dynconv_spec.mobilenetv2 import make_divisible

from ._conv import ModuleDef
from ._registry import register_model

__all__ = [
    "EfficientNetCondConv",
    "efficientnet_cc",
    "block_specs",
    "convert_torch_checkpoint",
    "VARIANTS",
    "DEFAULT_CFGS",
    "tf_efficientnet_cc_b0_4e",
    "tf_efficientnet_cc_b0_8e",
    "tf_efficientnet_cc_b1_8e",
    "efficientnet_cc_b0_4e",
    "efficientnet_cc_b0_8e",
    "efficientnet_cc_b1_8e",
]


# --------------------------------------------------------------------------- layers
def _padding(kernel_size: int, stride: int, tf_padding: bool) -> PaddingLike:
    """TF 'SAME' (flax's 'SAME') or PyTorch's symmetric ``((stride - 1) + (k - 1)) // 2`` (timm's default)."""
    if tf_padding:
        return "SAME"
    pad = ((stride - 1) + (kernel_size - 1)) // 2
    return ((pad, pad), (pad, pad))


def _conv_init(kernel_size: int, features: int, groups: int) -> Initializer:
    """TF EfficientNet init (timm ``_init_weight_goog``): N(0, 2 / fan_out), fan_out = k * k * out / groups."""
    return nn.initializers.normal(math.sqrt(2.0 / (kernel_size * kernel_size * features // groups)))


def conv_args(features: int, kernel_size: int, stride: int = 1, groups: int = 1, *, tf_padding: bool) -> Dict[str, Any]:
    """The keyword arguments of one of timm's ``create_conv2d`` convolutions (static or CondConv): its
    shape, TF or PyTorch padding and the TF init."""
    return dict(
        features=features,
        kernel_size=(kernel_size, kernel_size),
        strides=stride,
        padding=_padding(kernel_size, stride, tf_padding),
        feature_group_count=groups,
        kernel_init=_conv_init(kernel_size, features, groups),
    )


class SqueezeExcite(nn.Module):
    """Static squeeze-excitation: ``x * sigmoid(conv_expand(swish(conv_reduce(GAP(x)))))``.

    Attributes:
      se_chs: width of the squeezed vector.
      dtype: the dtype of the computation.
      param_dtype: the dtype of the parameters.
      precision: numerical precision of the two 1×1 convolutions.
    """

    se_chs: int
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(
            nn.Conv, kernel_size=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision
        )
        s = jnp.mean(x, axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
        s = nn.silu(conv(self.se_chs, kernel_init=_conv_init(1, self.se_chs, 1), name="conv_reduce")(s))
        expand = conv(x.shape[-1], kernel_init=_conv_init(1, x.shape[-1], 1), name="conv_expand")
        return x * nn.sigmoid(expand(s))


def drop_path(rate: float, train: bool) -> nn.Dropout:
    """Stochastic depth: a Dropout of whole samples (broadcast over H, W, C; needs the 'dropout' rng in training)."""
    return nn.Dropout(rate, broadcast_dims=(1, 2, 3), deterministic=not train)


# --------------------------------------------------------------------------- blocks
class DepthwiseSeparable(nn.Module):
    """dw conv + BN + swish, SE, 1x1 conv + BN (timm ``DepthwiseSeparableConv``).

    Attributes:
      spec: the block's shape (:class:`dynconv_spec.efficientnet_cc.BlockSpec`).
      conv: module definition of the static convolutions (completed with :func:`conv_args`).
      norm: module definition of the BatchNorms.
      se: module definition of the squeeze-excitation.
      tf_padding: TF 'SAME' padding (else PyTorch's symmetric padding).
    """

    spec: BlockSpec
    conv: ModuleDef
    norm: ModuleDef
    se: ModuleDef
    tf_padding: bool

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.spec
        dw_args = conv_args(s.in_chs, s.kernel_size, s.stride, groups=s.in_chs, tf_padding=self.tf_padding)
        y = nn.silu(self.norm(name="bn1")(self.conv(**dw_args, name="conv_dw")(x)))
        y = self.se(se_chs=s.se_chs, name="se")(y)
        y = self.norm(name="bn2")(self.conv(**conv_args(s.out_chs, 1, tf_padding=self.tf_padding), name="conv_pw")(y))
        return drop_path(s.drop_path_rate, train)(y) + x if s.has_skip else y


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expansion + BN + swish, dw conv + BN + swish, SE, 1x1 projection + BN.

    With ``spec.num_experts > 0`` the three convolutions are CondConv layers sharing one routing
    vector ``sigmoid(routing_fn(GAP(x)) / T)`` of the block input (timm ``CondConvResidual``),
    sown as ``intermediates/routing_weights [B, K]``.

    Attributes:
      spec: the block's shape and experts (:class:`dynconv_spec.efficientnet_cc.BlockSpec`).
      conv: module definition of the static convolutions (blocks without experts).
      condconv: module definition of the CondConv layers (``external_routing=True``).
      norm: module definition of the BatchNorms.
      se: module definition of the squeeze-excitation.
      tf_padding: TF 'SAME' padding (else PyTorch's symmetric padding).
      dtype: the dtype of the computation (the routing runs in at least float32).
      param_dtype: the dtype of ``routing_fn``'s parameters.
      precision: numerical precision of ``routing_fn``.
    """

    spec: BlockSpec
    conv: ModuleDef
    condconv: ModuleDef
    norm: ModuleDef
    se: ModuleDef
    tf_padding: bool
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        s = self.spec
        routing_weights = None
        if s.num_experts:
            routing_dtype = attention.attention_dtype(nn.dtypes.canonicalize_dtype(x, dtype=self.dtype))
            routing_fn = nn.Dense(
                s.num_experts,
                dtype=routing_dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=uniform_init(1.0 / math.sqrt(s.in_chs + s.num_experts)),
                name="routing_fn",
            )
            temperature = attention.temperature_scalar(temperature, layer_name(self), routing_dtype)
            routing_weights = attention.sigmoid_attention(
                routing_fn(attention.global_avg_pool(x, routing_dtype)), temperature
            )  # [B, K]
            self.sow("intermediates", "routing_weights", routing_weights)

        def conv(h, name: str, features: int, kernel_size: int, stride: int = 1, groups: int = 1):
            args = conv_args(features, kernel_size, stride, groups, tf_padding=self.tf_padding)
            if s.num_experts:
                return self.condconv(**args, num_experts=s.num_experts, name=name)(h, routing_weights=routing_weights)
            return self.conv(**args, name=name)(h)

        y = nn.silu(self.norm(name="bn1")(conv(x, "conv_pw", s.mid_chs, 1)))
        y = conv(y, "conv_dw", s.mid_chs, s.kernel_size, s.stride, groups=s.mid_chs)
        y = self.se(se_chs=s.se_chs, name="se")(nn.silu(self.norm(name="bn2")(y)))
        y = self.norm(name="bn3")(conv(y, "conv_pwl", s.out_chs, 1))
        return drop_path(s.drop_path_rate, train)(y) + x if s.has_skip else y


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
      dtype: the dtype of the computation (default: inferred from input and params).
      param_dtype: the dtype of every parameter.
      precision: numerical precision of every convolution and dense layer.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax.models import EfficientNetCondConv
      >>> model = EfficientNetCondConv(tf_port=True, num_classes=10)          # B0, 4 experts, as timm's tf_ port
      >>> x = jnp.zeros((2, 64, 64, 3))
      >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)        # shapes only
      >>> variables['params']['blocks_5_0']['conv_pw']['kernel'].shape        # [K, 1, 1, I, O]
      (4, 1, 1, 112, 672)
      >>> jax.eval_shape(model.apply, variables, x).shape
      (2, 10)
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
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        where = type(self).__name__
        check_efficientnet_args(where, self.num_classes, self.drop_rate, self.drop_path_rate)
        if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{where}: input must be a floating-point [batch, height, width, channels] array "
                f"(channels-last), got shape {tuple(x.shape)} dtype {x.dtype}"
            )
        numerics = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        bn_eps = (BN_EPS_TF if self.tf_port else BN_EPS_TORCH) if self.bn_eps is None else self.bn_eps
        conv = functools.partial(nn.Conv, use_bias=False, **numerics)
        condconv = functools.partial(CondConv, external_routing=True, strategy=self.strategy, **numerics)
        norm = functools.partial(
            BatchNorm, use_running_average=not train, epsilon=bn_eps, dtype=self.dtype, param_dtype=self.param_dtype
        )
        se = functools.partial(SqueezeExcite, **numerics)
        tf_padding = self.tf_port

        stem_chs = make_divisible(32 * self.channel_multiplier)
        x = conv(**conv_args(stem_chs, 3, 2, tf_padding=tf_padding), name="conv_stem")(x)
        x = nn.silu(norm(name="bn1")(x))
        specs = block_specs(
            stem_chs, self.depth_multiplier, self.channel_multiplier, self.experts_multiplier, self.drop_path_rate
        )
        for i, stage in enumerate(specs):
            for j, spec in enumerate(stage):
                if spec.block == "ds":
                    x = DepthwiseSeparable(
                        spec=spec, conv=conv, norm=norm, se=se, tf_padding=tf_padding, name=f"blocks_{i}_{j}"
                    )(x, train=train)
                else:
                    x = InvertedResidual(
                        spec=spec,
                        conv=conv,
                        condconv=condconv,
                        norm=norm,
                        se=se,
                        tf_padding=tf_padding,
                        **numerics,
                        name=f"blocks_{i}_{j}",
                    )(x, train=train, temperature=temperature)
        head_chs = make_divisible(1280 * self.channel_multiplier)
        x = conv(**conv_args(head_chs, 1, tf_padding=tf_padding), name="conv_head")(x)
        x = nn.silu(norm(name="bn2")(x))
        x = jnp.mean(x, axis=(1, 2))  # [B, num_features]
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        if not self.num_classes:
            return x
        return nn.Dense(
            self.num_classes, kernel_init=uniform_init(1.0 / math.sqrt(self.num_classes)), **numerics, name="classifier"
        )(x)


def efficientnet_cc(name: str, **kwargs) -> EfficientNetCondConv:
    """Build a variant by name (one of :data:`VARIANTS`); ``kwargs`` are :class:`EfficientNetCondConv` fields."""
    return EfficientNetCondConv(**resolve_variant(name), **kwargs)


tf_efficientnet_cc_b0_4e = register_model(variant_entry_point("tf_efficientnet_cc_b0_4e", EfficientNetCondConv))
tf_efficientnet_cc_b0_8e = register_model(variant_entry_point("tf_efficientnet_cc_b0_8e", EfficientNetCondConv))
tf_efficientnet_cc_b1_8e = register_model(variant_entry_point("tf_efficientnet_cc_b1_8e", EfficientNetCondConv))
efficientnet_cc_b0_4e = register_model(variant_entry_point("efficientnet_cc_b0_4e", EfficientNetCondConv))
efficientnet_cc_b0_8e = register_model(variant_entry_point("efficientnet_cc_b0_8e", EfficientNetCondConv))
efficientnet_cc_b1_8e = register_model(variant_entry_point("efficientnet_cc_b1_8e", EfficientNetCondConv))


def convert_torch_checkpoint(
    model: EfficientNetCondConv, source, image_size: int = 64, allow_nonfinite: bool = False
) -> Dict[str, Any]:
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
