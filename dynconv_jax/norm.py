"""Batch and layer normalization with PyTorch semantics (``torch.nn.BatchNorm{1,2,3}d``, ``torch.nn.LayerNorm``).

Differences from ``flax.linen.BatchNorm`` that matter for exact parity with PyTorch:

* running statistics update as ``running = (1 - torch_momentum) * running + torch_momentum * batch``
  with PyTorch's ``momentum = 0.1``. The field is ``torch_momentum``, never ``momentum``: flax's
  ``BatchNorm.momentum`` is the *decay* (0.99), PyTorch's the weight of the new batch (0.1), so a
  ``momentum=`` meant for either would be wrong for the other; it is refused with a ``TypeError``
  that says so (:func:`check_batch_norm_args`);
* ``running_var`` is updated with the **unbiased** batch variance ``var * n / (n - 1)``,
  while the batch itself is normalised with the biased one;
* ``epsilon = 1e-5``;
* in training, a channel normalised over a single value raises a ``ValueError`` (PyTorch
  raises "Expected more than 1 value per channel when training"; flax would silently
  return the bias);
* running statistics are stored in ``param_dtype`` (flax always uses float32), so
  float64 parity holds for them too.

Leaf names are flax's: params ``scale``, ``bias``; batch_stats ``mean``, ``var``.

:func:`layer_norm` (ODConv's ``attention_norm='layer'``) is ``torch.nn.LayerNorm`` over the last
axis: the biased variance ``mean((x - mean)^2)`` (not flax's fast ``E[x^2] - E[x]^2``) and
``epsilon = 1e-5``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from dynconv_jax.attention import attention_dtype
from dynconv_jax.conv_base import layer_name

#: PyTorch's ``BatchNorm`` momentum: the weight of the new batch statistic in the running average.
TORCH_BATCH_NORM_MOMENTUM = 0.1


def check_batch_norm_args(layer: str, torch_momentum: float, momentum: Optional[float] = None) -> None:
    """Refuse a ``momentum=`` (its meaning differs between flax and PyTorch); ``torch_momentum`` in [0, 1]."""
    if momentum is not None:
        raise TypeError(
            f"{layer}: momentum={momentum!r} is not an argument of this PyTorch-semantics BatchNorm. flax's "
            f"BatchNorm.momentum is the decay of the running average (default 0.99); PyTorch's momentum is the "
            f"weight of the new batch (default 0.1). Pass torch_momentum= with PyTorch's meaning "
            f"(flax's momentum=m is torch_momentum=1 - m)."
        )
    if isinstance(torch_momentum, bool) or not (
        isinstance(torch_momentum, (int, float)) and 0.0 <= torch_momentum <= 1.0
    ):
        raise ValueError(
            f"{layer}: torch_momentum={torch_momentum!r} must be a number in [0, 1] "
            "(PyTorch's meaning: the weight of the new batch)"
        )


def batch_norm(
    x,
    scale,
    bias,
    running_mean,
    running_var,
    *,
    use_running_average: bool,
    axis: int = -1,
    torch_momentum: float = TORCH_BATCH_NORM_MOMENTUM,
    epsilon: float = 1e-5,
    dtype=None,
    layer: str = "BatchNorm",
    check_count: bool = True,
):
    """PyTorch-semantics batch normalisation of ``x`` over all axes but ``axis`` (both front ends call this).

    ``scale``/``bias`` (``[C]`` or None) and the running statistics ``[C]`` are plain arrays.
    Returns ``(y, new_running_mean, new_running_var)``; the new statistics are None with
    ``use_running_average`` (eval), else the PyTorch update with the unbiased batch variance,
    in the running statistics' dtype. ``check_count=False`` skips the one-value-per-channel
    error (Linen's ``init``, which only builds shapes).
    """
    check_batch_norm_args(layer, torch_momentum)
    feature_axis = axis % x.ndim
    reduction_axes = tuple(i for i in range(x.ndim) if i != feature_axis)
    stat_shape = [1] * x.ndim
    stat_shape[feature_axis] = x.shape[feature_axis]

    stats_dtype = attention_dtype(x.dtype)  # at least float32
    xs = x.astype(stats_dtype)
    new_mean = new_var = None
    if use_running_average:
        mean, var = running_mean.astype(stats_dtype), running_var.astype(stats_dtype)
    else:
        count = math.prod(x.shape[a] for a in reduction_axes)
        if count < 2 and check_count:
            raise ValueError(
                f"{layer}: training-mode batch statistics need more than one value per channel, "
                f"but input shape {tuple(x.shape)} has {count} value(s) per channel (reducing axes "
                f"{reduction_axes}): the variance would be 0 and the output would just be the bias. "
                f"PyTorch raises 'Expected more than 1 value per channel when training' here. "
                f"Use a larger batch or use_running_average=True (train=False)."
            )
        mean = jnp.mean(xs, axis=reduction_axes)
        # biased variance, mean((x - mean)^2), to normalise the batch (as PyTorch)
        var = jnp.mean(jnp.square(xs - mean.reshape(stat_shape)), axis=reduction_axes)
        if count > 1:
            unbiased = var * (count / (count - 1))
            new_mean = ((1 - torch_momentum) * running_mean + torch_momentum * mean).astype(running_mean.dtype)
            new_var = ((1 - torch_momentum) * running_var + torch_momentum * unbiased).astype(running_var.dtype)

    y = (xs - mean.reshape(stat_shape)) * lax.rsqrt(var.reshape(stat_shape) + epsilon)
    if scale is not None:
        y = y * scale.astype(stats_dtype).reshape(stat_shape)
    if bias is not None:
        y = y + bias.astype(stats_dtype).reshape(stat_shape)
    return y.astype(nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=dtype)), new_mean, new_var


#: ``torch.nn.LayerNorm``'s default ``eps``.
TORCH_LAYER_NORM_EPSILON = 1e-5


def layer_norm(x, scale, bias, *, epsilon: float = TORCH_LAYER_NORM_EPSILON, dtype=None):
    """PyTorch-semantics layer normalisation of ``x`` over its last axis (both front ends call this).

    ``scale``/``bias``: ``[C]`` or None. Statistics in at least float32 (float64 stays float64).
    """
    xs = x.astype(attention_dtype(x.dtype))
    mean = jnp.mean(xs, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xs - mean), axis=-1, keepdims=True)  # biased, as PyTorch
    y = (xs - mean) * lax.rsqrt(var + epsilon)
    if scale is not None:
        y = y * scale.astype(xs.dtype)
    if bias is not None:
        y = y + bias.astype(xs.dtype)
    return y.astype(nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=dtype))


class LayerNorm(nn.Module):
    """PyTorch-semantics LayerNorm over the last axis (``torch.nn.LayerNorm(C)``; see :func:`layer_norm`).

    Attributes:
      epsilon: added to the variance.
      dtype: output dtype (default: promoted from input and params).
      param_dtype: dtype of ``scale``/``bias``.
      scale_init: initializer of ``scale`` (PyTorch: ones).
    """

    epsilon: float = TORCH_LAYER_NORM_EPSILON
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        return layer_norm(x, scale, bias, epsilon=self.epsilon, dtype=self.dtype)


class BatchNorm(nn.Module):
    """PyTorch-semantics BatchNorm over all axes but ``axis`` (channels-last by default).

    Use as flax's: ``BatchNorm(use_running_average=not train)(x)`` or
    ``BatchNorm()(x, use_running_average=not train)``; training needs
    ``mutable=['batch_stats']``. Unlike ``flax.linen.BatchNorm`` there is no ``momentum``:
    ``torch_momentum`` has PyTorch's meaning (``momentum=`` raises a ``TypeError`` explaining both).

    Attributes:
      use_running_average: normalise with the running statistics (eval) instead of the
        batch statistics (train). May instead be passed to ``__call__``.
      axis: the feature (channel) axis.
      torch_momentum: PyTorch's ``momentum``: the weight of the new batch statistic in the running
        average (0.1; flax's ``momentum=m`` is ``torch_momentum=1 - m``).
      epsilon: added to the variance.
      dtype: output dtype (default: promoted from input and params). Statistics are
        computed in at least float32 (float64 inputs stay float64).
      param_dtype: dtype of ``scale``/``bias`` and of the running statistics.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import BatchNorm
      >>> bn = BatchNorm(use_running_average=False)
      >>> x = jnp.arange(8.0).reshape(4, 2)
      >>> variables = bn.init(jax.random.key(0), x)
      >>> y, updates = bn.apply(variables, x, mutable=['batch_stats'])
      >>> updates['batch_stats']['var']          # 0.9 * 1 + 0.1 * the unbiased batch variance, as PyTorch
      Array([1.5666666, 1.5666666], dtype=float32)
      >>> updates['batch_stats']['mean']         # 0.9 * 0 + 0.1 * the batch mean
      Array([0.3, 0.4], dtype=float32)
    """

    use_running_average: Optional[bool] = None
    axis: int = -1
    torch_momentum: float = TORCH_BATCH_NORM_MOMENTUM
    epsilon: float = 1e-5
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Any = nn.initializers.zeros
    scale_init: Any = nn.initializers.ones
    #: Refused (an init-only argument, not a field): see :func:`check_batch_norm_args`.
    momentum: dataclasses.InitVar[Optional[float]] = None

    def __post_init__(self, momentum: Optional[float]) -> None:
        check_batch_norm_args(type(self).__name__, self.torch_momentum, momentum)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[self.axis % x.ndim]
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), self.param_dtype)
        running_var = self.variable("batch_stats", "var", jnp.ones, (features,), self.param_dtype)
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, (features,), self.param_dtype) if self.use_bias else None
        initializing = self.is_initializing()
        y, new_mean, new_var = batch_norm(
            x,
            scale,
            bias,
            running_mean.value,
            running_var.value,
            use_running_average=use_running_average,
            axis=self.axis,
            torch_momentum=self.torch_momentum,
            epsilon=self.epsilon,
            dtype=self.dtype,
            layer=layer_name(self),
            check_count=not initializing,
        )
        if new_mean is not None and not initializing:
            running_mean.value, running_var.value = new_mean, new_var
        return y
