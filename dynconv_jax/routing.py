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
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from dynconv_jax import ops

# --------------------------------------------------------------------------- initializers
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


def conv_geometry(module: nn.Module) -> ConvGeometry:
    """Validate the flax.linen.Conv-style fields shared by the three layers."""
    layer = layer_name(module)
    kernel_size = module.kernel_size
    if isinstance(kernel_size, int):  # as flax.linen.Conv: an int is a 1-D kernel
        kernel_size = (kernel_size,)
    if not isinstance(kernel_size, Sequence) or not 1 <= len(kernel_size) <= 3:
        raise ValueError(f"{layer}: kernel_size={module.kernel_size!r} must be an int or a sequence of 1, 2 or 3 "
                         f"ints (1-D, 2-D, 3-D)")
    rank = len(kernel_size)
    kernel_size = _positive_tuple(kernel_size, rank, "kernel_size", layer)
    strides = _positive_tuple(module.strides, rank, "strides", layer)
    dilation = _positive_tuple(module.kernel_dilation, rank, "kernel_dilation", layer)
    try:
        padding = ops.normalize_padding(module.padding, rank)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{layer}: bad padding: {err}") from None
    if not (isinstance(module.features, int) and module.features >= 1):
        raise ValueError(f"{layer}: features={module.features!r} must be a positive int")
    groups = module.feature_group_count
    if not (isinstance(groups, int) and groups >= 1):
        raise ValueError(f"{layer}: feature_group_count={groups!r} must be a positive int")
    if module.features % groups:
        raise ValueError(f"{layer}: feature_group_count={groups} does not divide features={module.features}")
    if not (isinstance(module.num_experts, int) and module.num_experts >= 1):
        raise ValueError(f"{layer}: num_experts={module.num_experts!r} must be an int >= 1")
    if module.strategy != "auto" and module.strategy not in ops.STRATEGIES:
        raise ValueError(f"{layer}: strategy={module.strategy!r}: expected 'auto' or one of {ops.STRATEGIES}")
    return ConvGeometry(module.features, kernel_size, strides, padding, dilation, groups, module.num_experts)


def check_input(module: nn.Module, x, geometry: ConvGeometry) -> int:
    """Check ``x`` is ``[B, *S, C]`` for this layer; return ``C`` (input channels)."""
    layer = layer_name(module)
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



# --------------------------------------------------------------------------- the shared layer base
Initializer = Any


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
        in_channels = check_input(self, x, geometry)
        shape = geometry.expert_shape(in_channels)
        check_existing_param(self, "kernel", shape, x.shape)
        experts = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        return geometry, in_channels, experts, nn.dtypes.canonicalize_dtype(x, experts, dtype=self.dtype)

    def _expert_bias(self, geometry: ConvGeometry, in_channels: int):
        """The ``[K, O]`` expert bias of layers with ``use_bias``/``bias_init`` fields, or None.

        ``bias_init=None`` means PyTorch's conv default U(±1/sqrt(fan_in)).
        """
        if not self.use_bias:
            return None
        init = self.bias_init or torch_default_bias_init(geometry.fan_in(in_channels))
        return self.param("bias", init, (self.num_experts, self.features), self.param_dtype)

    def _convolve(self, x, experts, geometry, compute_dtype, kernel_attention, *, expert_bias=None,
                  spatial_attention=None, channel_attention=None, filter_attention=None):
        """``y_b = f_b * conv(c_b * x_b, sum_k a[b,k] s_b W_k) + sum_k a[b,k] bias_k`` in ``compute_dtype``.

        Attentions (computed in :func:`attention_dtype`) are cast to ``compute_dtype`` here.
        """
        x, experts, expert_bias = nn.dtypes.promote_dtype(x, experts, expert_bias, dtype=compute_dtype)

        def cast(a):
            return None if a is None else a.astype(compute_dtype)

        return ops.dynamic_conv(
            x, experts, cast(kernel_attention),
            spatial_attention=cast(spatial_attention),
            channel_attention=cast(channel_attention),
            filter_attention=cast(filter_attention),
            expert_bias=expert_bias,
            strides=geometry.strides, padding=geometry.padding, dilation=geometry.dilation,
            groups=geometry.groups, strategy=self.strategy, precision=self.precision,
        )
