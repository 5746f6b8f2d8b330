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
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from dynconv_jax import CondConv, routing
from dynconv_jax.norm import BatchNorm

from .mobilenetv2 import make_divisible

__all__ = [
    "EfficientNetCondConv", "efficientnet_cc", "block_specs", "convert_torch_checkpoint", "VARIANTS", "DEFAULT_CFGS",
    "tf_efficientnet_cc_b0_4e", "tf_efficientnet_cc_b0_8e", "tf_efficientnet_cc_b1_8e",
    "efficientnet_cc_b0_4e", "efficientnet_cc_b0_8e", "efficientnet_cc_b1_8e",
]

BN_EPS_TF = 1e-3  # TensorFlow's BatchNormalization default, kept by the tf_* ports
BN_EPS_TORCH = 1e-5


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of the EfficientNet-B0 table: ``repeats`` blocks of one kind."""

    block: str  # 'ds' (depthwise-separable) or 'ir' (inverted residual)
    repeats: int
    kernel_size: int  # depthwise kernel
    stride: int  # of the first block of the stage
    exp_ratio: float
    out_chs: int
    se_ratio: float  # squeeze ratio relative to the block input channels
    num_experts: int  # 0: static convs; > 0: CondConv block (before the experts multiplier)


#: EfficientNet-B0 with CondConv in the last three stages (timm ``_gen_efficientnet_condconv``).
CONDCONV_B0_STAGES: Tuple[StageSpec, ...] = (
    StageSpec("ds", 1, 3, 1, 1.0, 16, 0.25, 0),
    StageSpec("ir", 2, 3, 2, 6.0, 24, 0.25, 0),
    StageSpec("ir", 2, 5, 2, 6.0, 40, 0.25, 0),
    StageSpec("ir", 3, 3, 2, 6.0, 80, 0.25, 0),
    StageSpec("ir", 3, 5, 1, 6.0, 112, 0.25, 4),
    StageSpec("ir", 4, 5, 2, 6.0, 192, 0.25, 4),
    StageSpec("ir", 1, 3, 1, 6.0, 320, 0.25, 4),
)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block, fully resolved (channels rounded, stride/experts/drop-path set)."""

    block: str
    in_chs: int
    out_chs: int
    kernel_size: int
    stride: int
    exp_ratio: float
    se_ratio: float
    num_experts: int
    drop_path_rate: float

    @property
    def mid_chs(self) -> int:
        """Expanded width of an inverted residual (the input width for 'ds')."""
        return make_divisible(self.in_chs * self.exp_ratio) if self.block == "ir" else self.in_chs

    @property
    def se_chs(self) -> int:
        """Squeeze width ``round(mid * (se_ratio / exp_ratio))``: the ratio is relative to the block input (timm)."""
        return round(self.mid_chs * (self.se_ratio / (self.exp_ratio if self.block == "ir" else 1.0)))

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_chs == self.out_chs


#: name -> (depth multiplier, experts multiplier, TF port). Channel multiplier is 1.0 for all.
VARIANTS: Dict[str, Tuple[float, int, bool]] = {
    "tf_efficientnet_cc_b0_4e": (1.0, 1, True),
    "tf_efficientnet_cc_b0_8e": (1.0, 2, True),
    "tf_efficientnet_cc_b1_8e": (1.1, 2, True),
    "efficientnet_cc_b0_4e": (1.0, 1, False),
    "efficientnet_cc_b0_8e": (1.0, 2, False),
    "efficientnet_cc_b1_8e": (1.1, 2, False),
}

_INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
#: Evaluation preprocessing of each variant (timm's default cfgs): resize the shorter side to
#: ``floor(input_size / crop_pct)`` (bicubic), center-crop ``input_size``, scale to [0, 1], normalise.
DEFAULT_CFGS: Dict[str, Dict[str, Any]] = {
    "tf_efficientnet_cc_b0_4e": dict(input_size=224, crop_pct=0.875, interpolation="bicubic", **_INCEPTION),
    "tf_efficientnet_cc_b0_8e": dict(input_size=224, crop_pct=0.875, interpolation="bicubic", **_INCEPTION),
    "tf_efficientnet_cc_b1_8e": dict(input_size=240, crop_pct=0.882, interpolation="bicubic", **_INCEPTION),
    "efficientnet_cc_b0_4e": dict(input_size=224, crop_pct=0.875, interpolation="bicubic", **_IMAGENET),
    "efficientnet_cc_b0_8e": dict(input_size=224, crop_pct=0.875, interpolation="bicubic", **_IMAGENET),
    "efficientnet_cc_b1_8e": dict(input_size=240, crop_pct=0.882, interpolation="bicubic", **_IMAGENET),
}


def block_specs(stem_chs: int = 32, depth_multiplier: float = 1.0, channel_multiplier: float = 1.0,
                experts_multiplier: int = 1, drop_path_rate: float = 0.0,
                stages: Tuple[StageSpec, ...] = CONDCONV_B0_STAGES) -> List[List[BlockSpec]]:
    """Resolve the stage table into per-block specs, stage by stage (same rule as the torch twin).

    Depth scaling is EfficientNet's: ``ceil(repeats * depth_multiplier)`` blocks per stage; only
    the first block of a stage is strided. Block ``i`` of ``n`` gets drop-path rate
    ``drop_path_rate * i / n`` (stochastic depth grows linearly with depth).
    """
    if not (isinstance(experts_multiplier, int) and experts_multiplier >= 1):
        raise ValueError(f"block_specs: experts_multiplier={experts_multiplier!r} must be an int >= 1")
    counts = [int(math.ceil(s.repeats * depth_multiplier)) for s in stages]
    total = sum(counts)
    in_chs, index, out = stem_chs, 0, []
    for stage, count in zip(stages, counts):
        out_chs = make_divisible(stage.out_chs * channel_multiplier)
        blocks = []
        for j in range(count):
            blocks.append(BlockSpec(stage.block, in_chs, out_chs, stage.kernel_size, stage.stride if j == 0 else 1,
                                    stage.exp_ratio, stage.se_ratio, stage.num_experts * experts_multiplier,
                                    drop_path_rate * index / total))
            in_chs, index = out_chs, index + 1
        out.append(blocks)
    return out


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
        if not (isinstance(self.num_classes, int) and self.num_classes >= 0):
            raise ValueError(f"{where}: num_classes={self.num_classes!r} must be an int >= 0")
        for name, rate in (("drop_rate", self.drop_rate), ("drop_path_rate", self.drop_path_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{where}: {name}={rate!r} must be in [0, 1)")
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
    if name not in VARIANTS:
        raise ValueError(f"efficientnet_cc: unknown variant {name!r}; expected one of {sorted(VARIANTS)}")
    depth, experts, tf_port = VARIANTS[name]
    return EfficientNetCondConv(depth_multiplier=depth, experts_multiplier=experts, tf_port=tf_port, **kwargs)


#: name -> what its entry point's docstring adds to size, experts and port.
_NOTES: Dict[str, str] = {
    "tf_efficientnet_cc_b0_4e": "timm weights: 77.3% ImageNet top-1; 13,314,116 params",
    "tf_efficientnet_cc_b0_8e": "timm weights: 78.0% top-1; 24,013,284 params",
    "tf_efficientnet_cc_b1_8e": "timm weights: 79.3% top-1 at 240px; 39,715,968 params",
    "efficientnet_cc_b0_4e": "untrained; timm trains it with drop_rate=drop_path_rate=0.2",
    "efficientnet_cc_b0_8e": "untrained",
    "efficientnet_cc_b1_8e": "untrained",
}


def _variant(name: str):
    """The entry point of variant ``name`` (a key of :data:`VARIANTS`), documented from its name and ``_NOTES``."""
    *_, size, experts = name.split("_")  # e.g. 'b0', '4e'
    port = "TF port" if VARIANTS[name][2] else "PyTorch padding/eps"

    def entry_point(num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                    **kwargs) -> EfficientNetCondConv:
        return efficientnet_cc(name, num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                               **kwargs)

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (f"EfficientNet-CondConv-{size.upper()}, {experts[:-1]} experts, {port} "
                           f"({_NOTES[name]}).\n\n    ``kwargs``: further :class:`EfficientNetCondConv` arguments.")
    return entry_point


tf_efficientnet_cc_b0_4e = _variant("tf_efficientnet_cc_b0_4e")
tf_efficientnet_cc_b0_8e = _variant("tf_efficientnet_cc_b0_8e")
tf_efficientnet_cc_b1_8e = _variant("tf_efficientnet_cc_b1_8e")
efficientnet_cc_b0_4e = _variant("efficientnet_cc_b0_4e")
efficientnet_cc_b0_8e = _variant("efficientnet_cc_b0_8e")
efficientnet_cc_b1_8e = _variant("efficientnet_cc_b1_8e")


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
