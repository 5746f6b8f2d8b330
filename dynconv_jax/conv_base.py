"""The convolution every dynamic layer shares: argument and input validation, the call of
:func:`dynconv_jax.ops.dynamic_conv`, and the Linen base class of the three layers.

Validation runs before a layer touches its parameters, so bad input fails with a message that
names the layer and the shapes involved. The NNX layers (:mod:`dynconv_jax.nnx.layers`) call the
same functions; their own base class holds the NNX constructor.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Optional, Sequence, Tuple, Union

import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype, Initializer, PrecisionLike

from dynconv_jax import ops
from dynconv_jax.initializers import expert_bias_init, torch_default_expert_init
from dynconv_jax.plan import Plan
from dynconv_spec import check_expert_bank


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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_dtypes(layer: str, dtype, param_dtype) -> None:
    """``dtype`` (None: inferred) and ``param_dtype`` must be real floating-point dtypes: the layers draw
    their parameters from random uniform/normal initialisers and compute softmax/sigmoid attentions."""
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is None and name == "dtype":
            continue
        try:
            real_float = jnp.issubdtype(jnp.dtype(value), jnp.floating)
        except TypeError:
            real_float = False
        if not real_float:
            raise ValueError(
                f"{layer}: {name}={getattr(value, '__name__', value)!r} must be a real floating-point "
                f"dtype (float32, bfloat16, float16 or float64)"
            )


def validate_conv_config(
    layer: str,
    *,
    features,
    kernel_size,
    strides,
    padding,
    kernel_dilation,
    feature_group_count,
    num_experts,
    strategy,
    dtype=None,
    param_dtype=jnp.float32,
    features_arg: str = "features",
) -> ConvGeometry:
    """Validate the flax Conv-style fields shared by the three layers (both front ends).

    ``layer`` names the layer in error messages; ``features_arg`` is the name of the output
    width argument (``features`` in Linen, ``out_features`` in NNX). Ints are ints, never bools.
    """
    if isinstance(kernel_size, int):  # as flax.linen.Conv: an int is a 1-D kernel
        kernel_size = (kernel_size,)
    if not isinstance(kernel_size, Sequence) or not 1 <= len(kernel_size) <= 3:
        raise ValueError(
            f"{layer}: kernel_size={kernel_size!r} must be an int or a sequence of 1, 2 or 3 ints (1-D, 2-D, 3-D)"
        )
    rank = len(kernel_size)
    kernel_size = _positive_tuple(kernel_size, rank, "kernel_size", layer)
    strides = _positive_tuple(strides, rank, "strides", layer)
    dilation = _positive_tuple(kernel_dilation, rank, "kernel_dilation", layer)
    try:
        padding = ops.normalize_padding(padding, rank)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{layer}: bad padding: {err}") from None
    if not (_is_int(features) and features >= 1):
        raise ValueError(f"{layer}: {features_arg}={features!r} must be a positive int")
    groups = feature_group_count
    if not (_is_int(groups) and groups >= 1):
        raise ValueError(f"{layer}: feature_group_count={groups!r} must be a positive int")
    if features % groups:
        raise ValueError(f"{layer}: feature_group_count={groups} does not divide {features_arg}={features}")
    if not (_is_int(num_experts) and num_experts >= 1):
        raise ValueError(f"{layer}: num_experts={num_experts!r} must be an int >= 1")
    if not ops.is_strategy(strategy):
        raise ValueError(f"{layer}: strategy={strategy!r}: expected {ops.STRATEGY_CHOICES}")
    check_dtypes(layer, dtype, param_dtype)
    return ConvGeometry(features, kernel_size, strides, padding, dilation, groups, num_experts)


def conv_geometry(module: nn.Module) -> ConvGeometry:
    """:func:`validate_conv_config` of a Linen layer's fields."""
    return validate_conv_config(
        layer_name(module),
        features=module.features,
        kernel_size=module.kernel_size,
        strides=module.strides,
        padding=module.padding,
        kernel_dilation=module.kernel_dilation,
        feature_group_count=module.feature_group_count,
        num_experts=module.num_experts,
        strategy=module.strategy,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
    )


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
    if any(s < 1 for s in spatial) or (geometry.padding != "SAME" and any(p < e for p, e in zip(padded, extent))):
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


def compute_dtype(x, experts, dtype: Optional[Dtype]) -> Dtype:
    """The dtype the convolution runs in: ``dtype``, else promoted from the input and the experts (flax's rule)."""
    return nn.dtypes.canonicalize_dtype(x, experts, dtype=dtype)


def convolve(
    x,
    experts,
    geometry: ConvGeometry,
    dtype,
    kernel_attention,
    *,
    expert_bias=None,
    spatial_attention=None,
    channel_attention=None,
    filter_attention=None,
    strategy: Union[str, Plan] = "auto",
    precision=None,
):
    """``y_b = f_b * conv(c_b * x_b, sum_k a[b,k] s_b W_k) + sum_k a[b,k] bias_k`` in ``dtype``.

    The one place both front ends run the dynamic convolution (:func:`dynconv_jax.ops.dynamic_conv`).
    Attentions (computed in :func:`attention_dtype`) are cast to ``dtype`` here.
    """
    x, experts, expert_bias = nn.dtypes.promote_dtype(x, experts, expert_bias, dtype=dtype)

    def cast(a):
        return None if a is None else a.astype(dtype)

    return ops.dynamic_conv(
        x,
        experts,
        cast(kernel_attention),
        spatial_attention=cast(spatial_attention),
        channel_attention=cast(channel_attention),
        filter_attention=cast(filter_attention),
        expert_bias=expert_bias,
        strides=geometry.strides,
        padding=geometry.padding,
        dilation=geometry.dilation,
        groups=geometry.groups,
        strategy=strategy,
        precision=precision,
    )


# --------------------------------------------------------------------------- the Linen base class
class DynamicConvBase(nn.Module):
    """Fields and plumbing shared by :class:`~dynconv_jax.CondConv`, :class:`~dynconv_jax.DynamicConv`
    and :class:`~dynconv_jax.ODConv` (Linen).

    Subclasses compute their attentions and call :meth:`convolve_experts`, which runs everything
    through :func:`dynconv_jax.ops.dynamic_conv`.

    Attributes:
      features: number of output channels O.
      kernel_size: shape of the kernel; the spatial rank is ``len(kernel_size)`` (an int is a 1-D
        kernel, as in ``flax.linen.Conv``).
      strides: an int or a sequence of ``rank`` ints.
      padding: 'SAME', 'VALID', an int, ``rank`` ints or ``rank`` ``(low, high)`` pairs.
      kernel_dilation: an int or a sequence of ``rank`` ints (atrous convolution).
      feature_group_count: groups g of a grouped convolution (divides I and O).
      dtype: the dtype of the computation (default: inferred from input and params); the attention
        branch runs in at least float32.
      param_dtype: the dtype of every parameter.
      precision: numerical precision of the convolution and the attention's dense layers.
      kernel_init: initializer of the expert bank ``[K, *k, I/g, O]`` (each expert is one kernel).
      num_experts: experts K per layer.
      strategy: how the per-sample convolution runs (:func:`dynconv_jax.ops.dynamic_conv`): 'auto' (fixed
        per-backend rules, nothing measured), a strategy name, or a :class:`~dynconv_jax.plan.Plan` made
        by :func:`dynconv_jax.autotune.tune`.
    """

    features: int
    kernel_size: Union[int, Sequence[int]]
    strides: Union[int, Sequence[int]] = 1
    padding: ops.PaddingLike = "SAME"
    kernel_dilation: Union[int, Sequence[int]] = 1
    feature_group_count: int = 1
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = torch_default_expert_init
    num_experts: int = 4
    strategy: Union[str, Plan] = "auto"

    def experts(self, x):
        """Validate the configuration and the input ``x``; create the expert bank ``[K, *k, I/g, O]``.

        Returns ``(geometry, in_channels, experts, compute_dtype)``.
        """
        geometry = conv_geometry(self)
        in_channels = check_input(layer_name(self), x, geometry)
        shape = geometry.expert_shape(in_channels)
        check_expert_bank(layer_name(self), shape)
        check_existing_param(self, "kernel", shape, x.shape)
        experts = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        return geometry, in_channels, experts, compute_dtype(x, experts, self.dtype)

    def expert_bias(self, geometry: ConvGeometry, in_channels: int, bias_init: Optional[Initializer]):
        """The ``[K, O]`` expert bias param (``bias_init`` None: PyTorch's conv default)."""
        init = expert_bias_init(bias_init, geometry.fan_in(in_channels))
        return self.param("bias", init, (self.num_experts, self.features), self.param_dtype)

    def convolve_experts(self, x, experts, geometry, dtype, kernel_attention, **attentions):
        """:func:`convolve` with this layer's ``strategy`` and ``precision``."""
        return convolve(
            x,
            experts,
            geometry,
            dtype,
            kernel_attention,
            strategy=self.strategy,
            precision=self.precision,
            **attentions,
        )
