"""The attention heads of the three dynamic convolutions, and the checks of their arguments.

One definition of the maths both front ends (``flax.linen`` and ``flax.nnx``) run: global average
pooling, the temperature, the sigmoid/softmax heads of CondConv (Yang et al., NeurIPS 2019),
DynamicConv / DY-CNN (Chen et al., CVPR 2020) and ODConv (Li et al., ICLR 2022). The heads take
the layer's own submodules as callables (``pooled [B, I] -> [B, n]``), so each front end owns its
parameters and this module owns the computation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import Dtype

import dynconv_spec

# --------------------------------------------------------------------------- pooling, width, dtype
def attention_width(in_channels: int, reduction: float, min_channels: int, layer: str = "") -> int:
    """Hidden width of an attention branch: ``max(int(in * reduction), min_channels)``.

    ODConv's attention width A (reduction 1/16, min 16) and DynamicConv's hidden width H
    (reduction 1/4, min 4) both follow this rule.
    """
    if not (reduction > 0 and isinstance(min_channels, int) and min_channels >= 1):
        raise ValueError(f"{layer}: reduction={reduction} must be > 0 and min_channels={min_channels} an int >= 1")
    return max(int(in_channels * reduction), min_channels)


def attention_dtype(dtype: Dtype) -> jnp.dtype:
    """The attention branch runs in at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def global_avg_pool(x, dtype: Dtype) -> jax.Array:
    """Mean over the spatial axes: ``[B, *S, C] -> [B, C]``, accumulated in ``dtype``."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)), dtype=dtype)


# --------------------------------------------------------------------------- temperature
#: The smallest temperature the layers use (docs/reliability.md, :data:`dynconv_spec.TEMPERATURE_FLOOR`).
#: A concrete T must be a finite number >= the floor (ValueError otherwise, also inside a trace); a
#: traced one cannot be checked without a host round trip, so a value below the floor, or NaN, is
#: replaced by the floor: the attention then saturates (hard routing) instead of turning every output
#: into NaN.
TEMPERATURE_FLOOR = dynconv_spec.TEMPERATURE_FLOOR


def temperature_scalar(temperature, layer: str, dtype: Dtype) -> jax.Array:
    """``temperature`` (None = 1) as a scalar array in ``dtype``; a traced one stays traced, so changing it
    under ``jit`` never recompiles.

    A concrete value (Python, NumPy, or a JAX array that is not a tracer: a ``static_argnums`` value or a
    constant inside ``jit`` is concrete too) is checked by :func:`dynconv_spec.check_temperature`. A
    traced one is checked for its shape and dtype only; its value is clamped to
    :data:`TEMPERATURE_FLOOR` (NaN included), so a bad schedule value under ``jit`` cannot silently
    produce NaN outputs.
    """
    if temperature is None:
        temperature = 1.0
    if np.ndim(temperature) != 0:
        raise ValueError(f"{layer}: temperature must be a scalar, got shape {np.shape(temperature)}")
    if not isinstance(temperature, jax.core.Tracer):
        value = dynconv_spec.check_temperature(temperature, layer)
        return jnp.asarray(min(value, float(jnp.finfo(dtype).max)), dtype)  # past the max: inf, the same limit
    if not jnp.issubdtype(temperature.dtype, jnp.integer) and not jnp.issubdtype(temperature.dtype, jnp.floating):
        raise ValueError(f"{layer}: a traced temperature of dtype {temperature.dtype} must be a real number")
    value = jnp.asarray(temperature, dtype)
    return jnp.where(value >= TEMPERATURE_FLOOR, value, jnp.asarray(TEMPERATURE_FLOOR, dtype))


def sigmoid_attention(logits, temperature):
    """``sigmoid(logits / T)`` (CondConv routing; ODConv channel/filter/spatial attention)."""
    return jax.nn.sigmoid(logits / temperature)


def softmax_attention(logits, temperature):
    """``softmax(logits / T)`` over the last (expert) axis (DynamicConv; ODConv kernel attention)."""
    return jax.nn.softmax(logits / temperature, axis=-1)


# --------------------------------------------------------------------------- the heads
#: A submodule of a head, called on ``[B, n_in]`` and returning ``[B, n_out]``.
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


def odconv_attention(pooled, fc: Head, norm: Optional[Head], channel_fc: Head, filter_fc: Optional[Head],
                     spatial_fc: Optional[Head], kernel_fc: Optional[Head], kernel_size: Sequence[int], temperature):
    """ODConv's four attentions from ``pooled [B, I]``, with ``h = relu(norm(fc(pooled)))`` ``[B, A]``
    (``norm`` the attention BatchNorm or LayerNorm; None: ``h = relu(fc(pooled))``).

    Returns ``(channel [B, I], filter [B, O] | None, spatial [B, *k] | None, kernel [B, K])``;
    a head given as None (skipped, see :func:`odconv_heads`) gives None, the kernel one ones ``[B, 1]``.
    """
    batch = pooled.shape[0]
    z = fc(pooled)  # [B, A]
    h = jax.nn.relu(z if norm is None else norm(z))
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


# --------------------------------------------------------------------------- argument checks
def check_odconv_train_batch(layer: str, batch: int) -> None:
    """ODConv's attention BatchNorm needs a batch of at least 2 in training, as PyTorch's."""
    if batch < 2:
        raise ValueError(
            f"{layer}: training with a batch of {batch}: ODConv's attention BatchNorm normalises the pooled "
            f"[B, A] vector over the batch, so it needs B >= 2 in training (PyTorch raises 'Expected more than "
            f"1 value per channel when training'). Use a larger batch or train=False."
        )


def check_routing_dropout(layer: str, rate: float) -> None:
    """CondConv's ``routing_dropout`` must be in [0, 1)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{layer}: routing_dropout={rate} must be in [0, 1)")


def external_routing_weights(layer: str, external_routing: bool, routing_weights, batch: int, num_experts: int,
                             dtype: Dtype) -> Optional[jax.Array]:
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
