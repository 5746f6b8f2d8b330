"""Helpers shared by the three dynamic-convolution layers.

Routing/attention pieces (global average pooling, attention width, temperature-scaled
sigmoid/softmax heads), the default initializers of the PyTorch references, and the
configuration/input validation every layer runs before touching its parameters, so
that bad input fails with a message that names the layer and the shapes involved.

Papers: CondConv (Yang et al., NeurIPS 2019), DynamicConv / DY-CNN (Chen et al.,
CVPR 2020), ODConv (Li et al., ICLR 2022).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from dynconv_jax import ops

# --------------------------------------------------------------------------- initializers
Initializer = Any

# PyTorch's nn.Conv2d / nn.Linear default: kaiming_uniform_(a=sqrt(5)) = U(±1/sqrt(fan_in)),
# i.e. variance_scaling(1/3, fan_in, uniform). ``batch_axis=(0,)`` makes each expert of an
# ``[K, *k, I/g, O]`` bank its own convolution kernel (fan_in = I/g * prod(k)), as timm's
# CondConv initializer does expert by expert.
torch_default_expert_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", batch_axis=(0,))
torch_default_dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# ODConv official: kaiming_normal_(mode='fan_out', nonlinearity='relu') for experts and the
# 1x1 attention convs: N(0, 2 / fan_out), fan_out = O * prod(k) (experts) or the output width.
kaiming_fan_out_expert_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal", batch_axis=(0,))
kaiming_fan_out_dense_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int):
    """PyTorch's default bias init for a layer with ``fan_in`` inputs: U(±1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --------------------------------------------------------------------------- attention
def attention_width(in_channels: int, reduction: float, min_channels: int, layer: str = "") -> int:
    """Hidden width of an attention branch: ``max(int(in * reduction), min_channels)``.

    ODConv's attention width A (reduction 1/16, min 16) and DynamicConv's hidden width H
    (reduction 1/4, min 4) both follow this rule.
    """
    if not (reduction > 0 and isinstance(min_channels, int) and min_channels >= 1):
        raise ValueError(f"{layer}: reduction={reduction} must be > 0 and min_channels={min_channels} an int >= 1")
    return max(int(in_channels * reduction), min_channels)


def attention_dtype(dtype) -> jnp.dtype:
    """The attention branch runs in at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def global_avg_pool(x, dtype) -> jax.Array:
    """Mean over the spatial axes: ``[B, *S, C] -> [B, C]``, accumulated in ``dtype``."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), dtype=dtype)


#: The smallest temperature a traced T is used with (docs/reliability.md). A concrete T must be
#: finite and > 0 (ValueError otherwise); a traced one cannot be checked without a host round
#: trip, so a value below the floor, or NaN, is replaced by the floor: the attention then
#: saturates (hard routing) instead of turning every output into NaN.
TEMPERATURE_FLOOR = 1e-6


def temperature_scalar(temperature, layer: str, dtype) -> jax.Array:
    """``temperature`` (None = 1) as a scalar array; stays traced under jit, so changing it never recompiles.

    Concrete values must be finite and > 0; traced ones are clamped to :data:`TEMPERATURE_FLOOR`
    (NaN included), so a bad schedule value under ``jit`` cannot silently produce NaN outputs.
    """
    if temperature is None:
        temperature = 1.0
    try:
        value = jnp.asarray(temperature, dtype)
    except (TypeError, ValueError):
        raise ValueError(f"{layer}: temperature={temperature!r} must be a positive number "
                         f"(a Python, NumPy or JAX scalar)") from None
    if value.ndim != 0:
        raise ValueError(f"{layer}: temperature must be a scalar, got shape {value.shape}")
    if not isinstance(value, jax.core.Tracer) and not (math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{layer}: temperature={temperature!r} must be finite and > 0")
    return jnp.where(value >= TEMPERATURE_FLOOR, value, jnp.asarray(TEMPERATURE_FLOOR, dtype))


def sigmoid_attention(logits, temperature):
    """``sigmoid(logits / T)`` (CondConv routing; ODConv channel/filter/spatial attention)."""
    return jax.nn.sigmoid(logits / temperature)


def softmax_attention(logits, temperature):
    """``softmax(logits / T)`` over the last (expert) axis (DynamicConv; ODConv kernel attention)."""
    return jax.nn.softmax(logits / temperature, axis=-1)


# The attention heads of the three methods. Both front ends (``flax.linen`` and ``flax.nnx``) call
# these with their own submodules passed as callables (``pooled [B, I] -> [B, n]``), so the maths
# exists once.
Head = Callable[[jax.Array], jax.Array]


def condconv_routing(pooled, routing_fn: Head, dropout: Head, temperature) -> jax.Array:
    """CondConv routing weights ``sigmoid(routing_fn(dropout(pooled)) / T)``: ``[B, I] -> [B, K]``."""
    return sigmoid_attention(routing_fn(dropout(pooled)), temperature)


def dynamic_attention(pooled, fc1: Head, fc2: Head, temperature) -> jax.Array:
    """DynamicConv attention ``softmax(fc2(relu(fc1(pooled))) / T)``: ``[B, I] -> [B, K]``."""
    return softmax_attention(fc2(jax.nn.relu(fc1(pooled))), temperature)


@dataclasses.dataclass(frozen=True)
class ODConvHeads:
    """Which of ODConv's four attentions exist (the official skips); the channel one always does."""

    filter: bool  # not depthwise (in == groups == out)
    spatial: bool  # kernel larger than 1x1
    kernel: bool  # more than one expert


def odconv_heads(in_channels: int, out_channels: int, groups: int, kernel_size: Sequence[int],
                 num_experts: int) -> ODConvHeads:
    """The official ODConv skips: no filter attention for depthwise convs, no spatial one for 1x1
    kernels, no kernel one for K == 1."""
    return ODConvHeads(filter=not (in_channels == groups == out_channels), spatial=math.prod(kernel_size) > 1,
                       kernel=num_experts > 1)


def odconv_attention(pooled, fc: Head, bn: Head, channel_fc: Head, filter_fc: Optional[Head],
                     spatial_fc: Optional[Head], kernel_fc: Optional[Head], kernel_size: Sequence[int], temperature):
    """ODConv's four attentions from ``pooled [B, I]``, with ``h = relu(bn(fc(pooled)))`` ``[B, A]``.

    Returns ``(channel [B, I], filter [B, O] | None, spatial [B, *k] | None, kernel [B, K])``;
    a head given as None (skipped, see :func:`odconv_heads`) gives None, the kernel one ones ``[B, 1]``.
    """
    batch = pooled.shape[0]
    h = jax.nn.relu(bn(fc(pooled)))  # [B, A]
    channel = sigmoid_attention(channel_fc(h), temperature)
    filter_ = None if filter_fc is None else sigmoid_attention(filter_fc(h), temperature)
    spatial = None
    if spatial_fc is not None:
        spatial = sigmoid_attention(spatial_fc(h), temperature).reshape((batch, *kernel_size))
    if kernel_fc is not None:
        kernel = softmax_attention(kernel_fc(h), temperature)
    else:
        kernel = jnp.ones((batch, 1), h.dtype)
    return channel, filter_, spatial, kernel


# --------------------------------------------------------------------------- validation
def layer_name(module: nn.Module) -> str:
    """``ClassName 'path/to/layer'`` for error messages."""
    scope = module.scope
    path = "/".join(scope.path) if scope is not None and scope.path else (module.name or "<top level>")
    return f"{type(module).__name__} '{path}'"


def _positive_tuple(value, rank: int, what: str, layer: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        value = (value,) * rank
    try:  # operator.index: ints (NumPy ints too) only, never a silently truncated float
        if any(isinstance(v, bool) for v in value):
            raise TypeError
        value = tuple(operator.index(v) for v in value)
    except TypeError:
        raise ValueError(f"{layer}: {what}={value!r} must be an int or a sequence of {rank} ints") from None
    if len(value) != rank:
        raise ValueError(
            f"{layer}: {what}={value} has {len(value)} entries, expected {rank} "
            f"(one per spatial dimension; the spatial rank is len(kernel_size))"
        )
    if any(v < 1 for v in value):
        raise ValueError(f"{layer}: {what}={value} must be >= 1 in every dimension")
    return value


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """A validated convolution configuration (spatial rank = ``len(kernel_size)``)."""

    features: int
    kernel_size: Tuple[int, ...]
    strides: Tuple[int, ...]
    padding: Union[str, Tuple[Tuple[int, int], ...]]
    dilation: Tuple[int, ...]
    groups: int
    num_experts: int

    @property
    def rank(self) -> int:
        return len(self.kernel_size)

    def expert_shape(self, in_channels: int) -> Tuple[int, ...]:
        """``[K, *k, I/g, O]``."""
        return (self.num_experts, *self.kernel_size, in_channels // self.groups, self.features)

    def fan_in(self, in_channels: int) -> int:
        """Inputs per output unit of one expert: ``I/g * prod(k)`` (PyTorch's fan_in)."""
        return in_channels // self.groups * math.prod(self.kernel_size)


def validate_conv_config(layer: str, *, features, kernel_size, strides, padding, kernel_dilation,
                         feature_group_count, num_experts, strategy, features_arg: str = "features") -> ConvGeometry:
    """Validate the flax Conv-style fields shared by the three layers (both front ends).

    ``layer`` names the layer in error messages; ``features_arg`` is the name of the output
    width argument (``features`` in Linen, ``out_features`` in NNX).
    """
    if isinstance(kernel_size, int):  # as flax.linen.Conv: an int is a 1-D kernel
        kernel_size = (kernel_size,)
    if not isinstance(kernel_size, Sequence) or not 1 <= len(kernel_size) <= 3:
        raise ValueError(f"{layer}: kernel_size={kernel_size!r} must be an int or a sequence of 1, 2 or 3 "
                         f"ints (1-D, 2-D, 3-D)")
    rank = len(kernel_size)
    kernel_size = _positive_tuple(kernel_size, rank, "kernel_size", layer)
    strides = _positive_tuple(strides, rank, "strides", layer)
    dilation = _positive_tuple(kernel_dilation, rank, "kernel_dilation", layer)
    try:
        padding = ops.normalize_padding(padding, rank)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{layer}: bad padding: {err}") from None
    if not (isinstance(features, int) and features >= 1):
        raise ValueError(f"{layer}: {features_arg}={features!r} must be a positive int")
    groups = feature_group_count
    if not (isinstance(groups, int) and groups >= 1):
        raise ValueError(f"{layer}: feature_group_count={groups!r} must be a positive int")
    if features % groups:
        raise ValueError(f"{layer}: feature_group_count={groups} does not divide {features_arg}={features}")
    if not (isinstance(num_experts, int) and num_experts >= 1):
        raise ValueError(f"{layer}: num_experts={num_experts!r} must be an int >= 1")
    if strategy != "auto" and strategy not in ops.STRATEGIES:
        raise ValueError(f"{layer}: strategy={strategy!r}: expected 'auto' or one of {ops.STRATEGIES}")
    return ConvGeometry(features, kernel_size, strides, padding, dilation, groups, num_experts)


def conv_geometry(module: nn.Module) -> ConvGeometry:
    """:func:`validate_conv_config` of a Linen layer's fields."""
    return validate_conv_config(
        layer_name(module), features=module.features, kernel_size=module.kernel_size, strides=module.strides,
        padding=module.padding, kernel_dilation=module.kernel_dilation,
        feature_group_count=module.feature_group_count, num_experts=module.num_experts, strategy=module.strategy)


def check_input(layer: str, x, geometry: ConvGeometry) -> int:
    """Check ``x`` is ``[B, *S, C]`` for the layer named ``layer``; return ``C`` (input channels)."""
    rank = geometry.rank
    if x.ndim != rank + 2:
        raise ValueError(
            f"{layer}: input shape {tuple(x.shape)} has rank {x.ndim}, expected {rank + 2} "
            f"([batch, {rank} spatial dims, channels] for kernel_size={geometry.kernel_size})"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{layer}: input dtype {x.dtype} must be floating point")
    if x.shape[0] == 0:  # as the PyTorch layers
        raise ValueError(f"{layer}: got an empty batch (input shape {tuple(x.shape)})")
    in_channels = x.shape[-1]
    if in_channels % geometry.groups:
        raise ValueError(
            f"{layer}: feature_group_count={geometry.groups} does not divide the {in_channels} input channels "
            f"(input shape {tuple(x.shape)})"
        )
    spatial = x.shape[1:-1]
    if isinstance(geometry.padding, str):  # 'SAME' / 'VALID'
        padded = spatial
    else:
        padded = tuple(s + lo + hi for s, (lo, hi) in zip(spatial, geometry.padding))
    extent = tuple((k - 1) * d + 1 for k, d in zip(geometry.kernel_size, geometry.dilation))
    if any(s < 1 for s in spatial) or (
        geometry.padding != "SAME" and any(p < e for p, e in zip(padded, extent))
    ):
        raise ValueError(
            f"{layer}: input spatial size {spatial} (padded {padded}) is smaller than the dilated kernel "
            f"extent {extent}; the output would be empty"
        )
    return in_channels


def check_existing_param(module: nn.Module, name: str, expected_shape: Tuple[int, ...], x_shape) -> None:
    """Raise a clear error if param ``name`` exists with a shape that does not fit this input."""
    if module.has_variable("params", name):
        shape = tuple(module.get_variable("params", name).shape)
        if shape != tuple(expected_shape):
            raise ValueError(
                f"{layer_name(module)}: input shape {tuple(x_shape)} needs '{name}' of shape {tuple(expected_shape)} "
                f"([K, *kernel_size, in_channels/groups, features]), but the initialised parameter has shape {shape} "
                f"(channel count or configuration differs from the one the layer was initialised with)"
            )


def check_routing_dropout(layer: str, rate: float) -> None:
    """CondConv's ``routing_dropout`` must be in [0, 1)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{layer}: routing_dropout={rate} must be in [0, 1)")


def external_routing_weights(layer: str, external_routing: bool, routing_weights, batch: int, num_experts: int,
                             dtype) -> Optional[jax.Array]:
    """CondConv's ``routing_weights`` argument: ``[B, K]`` in ``dtype`` iff ``external_routing``, else None."""
    if external_routing:
        if routing_weights is None:
            raise ValueError(f"{layer}: external_routing=True needs routing_weights of shape [B, K]")
        if tuple(routing_weights.shape) != (batch, num_experts):
            raise ValueError(
                f"{layer}: routing_weights shape {tuple(routing_weights.shape)} != "
                f"(batch, num_experts) = {(batch, num_experts)}"
            )
        return routing_weights.astype(dtype)
    if routing_weights is not None:
        raise ValueError(f"{layer}: routing_weights given but external_routing=False")
    return None


def check_odconv_train_batch(layer: str, batch: int) -> None:
    """ODConv's attention BatchNorm needs a batch of at least 2 in training, as PyTorch's."""
    if batch < 2:
        raise ValueError(
            f"{layer}: training with a batch of {batch}: ODConv's attention BatchNorm normalises the pooled "
            f"[B, A] vector over the batch, so it needs B >= 2 in training (PyTorch raises 'Expected more than "
            f"1 value per channel when training'). Use a larger batch or train=False."
        )


def check_attention_bn_init(layer: str, value) -> None:
    """ODConv's ``attention_bn_init`` (initial attention-BatchNorm scale) must be a finite number > 0."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise ValueError(f"{layer}: attention_bn_init={value!r} must be a finite number > 0 "
                         "(the initial BatchNorm scale; 0 blocks every gradient through the relu)")


def expert_bias_init(bias_init: Optional[Initializer], geometry: ConvGeometry, in_channels: int) -> Initializer:
    """The ``[K, O]`` expert bias initializer; None means PyTorch's conv default U(±1/sqrt(fan_in))."""
    return bias_init or torch_default_bias_init(geometry.fan_in(in_channels))


def compute_dtype(x, experts, dtype) -> Any:
    """The dtype the convolution runs in: ``dtype``, else promoted from the input and the experts (flax's rule)."""
    return nn.dtypes.canonicalize_dtype(x, experts, dtype=dtype)


def convolve(x, experts, geometry: ConvGeometry, dtype, kernel_attention, *, expert_bias=None,
             spatial_attention=None, channel_attention=None, filter_attention=None, strategy: str = "auto",
             precision=None):
    """``y_b = f_b * conv(c_b * x_b, sum_k a[b,k] s_b W_k) + sum_k a[b,k] bias_k`` in ``dtype``.

    The one place both front ends run the dynamic convolution (:func:`dynconv_jax.ops.dynamic_conv`).
    Attentions (computed in :func:`attention_dtype`) are cast to ``dtype`` here.
    """
    x, experts, expert_bias = nn.dtypes.promote_dtype(x, experts, expert_bias, dtype=dtype)

    def cast(a):
        return None if a is None else a.astype(dtype)

    return ops.dynamic_conv(
        x, experts, cast(kernel_attention),
        spatial_attention=cast(spatial_attention),
        channel_attention=cast(channel_attention),
        filter_attention=cast(filter_attention),
        expert_bias=expert_bias,
        strides=geometry.strides, padding=geometry.padding, dilation=geometry.dilation,
        groups=geometry.groups, strategy=strategy, precision=precision,
    )



# --------------------------------------------------------------------------- the shared layer base


class DynamicConvBase(nn.Module):
    """Fields and plumbing shared by :class:`CondConv`, :class:`DynamicConv` and :class:`ODConv`.

    Fields mirror ``flax.linen.Conv``; the spatial rank is ``len(kernel_size)`` (an int
    kernel_size is a 1-D kernel, as in flax). Subclasses compute their attentions and call
    :meth:`_convolve`, which runs everything through :func:`dynconv_jax.ops.dynamic_conv`.
    """

    features: int
    kernel_size: Union[int, Sequence[int]]
    strides: Union[int, Sequence[int]] = 1
    padding: ops.PaddingLike = "SAME"
    kernel_dilation: Union[int, Sequence[int]] = 1
    feature_group_count: int = 1
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = torch_default_expert_init
    num_experts: int = 4
    strategy: str = "auto"

    def _experts(self, x):
        """Validate config and input; create the expert bank ``[K, *k, I/g, O]``.

        Returns ``(geometry, in_channels, experts, compute_dtype)``.
        """
        geometry = conv_geometry(self)
        in_channels = check_input(layer_name(self), x, geometry)
        shape = geometry.expert_shape(in_channels)
        check_existing_param(self, "kernel", shape, x.shape)
        experts = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        return geometry, in_channels, experts, compute_dtype(x, experts, self.dtype)

    def _expert_bias(self, geometry: ConvGeometry, in_channels: int):
        """The ``[K, O]`` expert bias of layers with ``use_bias``/``bias_init`` fields, or None."""
        if not self.use_bias:
            return None
        init = expert_bias_init(self.bias_init, geometry, in_channels)
        return self.param("bias", init, (self.num_experts, self.features), self.param_dtype)

    def _convolve(self, x, experts, geometry, dtype, kernel_attention, **attentions):
        """:func:`convolve` with this layer's ``strategy`` and ``precision``."""
        return convolve(x, experts, geometry, dtype, kernel_attention, strategy=self.strategy,
                        precision=self.precision, **attentions)
