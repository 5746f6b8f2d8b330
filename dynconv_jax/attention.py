"""The attention heads of the dynamic convolutions, and the checks of their arguments.

One definition of the maths both front ends (``flax.linen`` and ``flax.nnx``) run: global average
pooling, the temperature, the sigmoid/softmax heads of CondConv (Yang et al., NeurIPS 2019),
DynamicConv / DY-CNN (Chen et al., CVPR 2020) and ODConv (Li et al., ICLR 2022), and the cell
attention of KernelWarehouse (Li & Yao, ICML 2024) with its warm-up. The heads take
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


def _scalar(value, layer: str, dtype: Dtype, what: str) -> jax.Array:
    """``value`` as a scalar array of ``dtype``, or a ValueError naming ``layer`` (``what``: what it must be)."""
    try:
        array = jnp.asarray(value, dtype)
    except (TypeError, ValueError):
        raise ValueError(f"{layer}: temperature={value!r} must be {what}") from None
    if array.ndim != 0:
        raise ValueError(f"{layer}: temperature must be a scalar, got shape {array.shape}")
    return array


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


def odconv_heads(
    in_channels: int, out_channels: int, groups: int, kernel_size: Sequence[int], num_experts: int
) -> ODConvHeads:
    """The official ODConv skips: no filter attention for depthwise convs, no spatial one for 1x1
    kernels, no kernel one for K == 1."""
    return ODConvHeads(
        filter=not (in_channels == groups == out_channels), spatial=math.prod(kernel_size) > 1, kernel=num_experts > 1
    )


def odconv_attention(
    pooled,
    fc: Head,
    norm: Optional[Head],
    channel_fc: Head,
    filter_fc: Optional[Head],
    spatial_fc: Optional[Head],
    kernel_fc: Optional[Head],
    kernel_size: Sequence[int],
    temperature,
):
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


def kw_warmup_scalar(temperature, layer: str, dtype: Dtype) -> jax.Array:
    """KernelWarehouse's warm-up weight tau (passed as ``temperature``; None = 0, the official start
    value outside training) as a scalar array, traced under jit. A concrete tau must be in [0, 1]; a
    traced one is clipped to [0, 1] (NaN becomes 0)."""
    value = _scalar(
        0.0 if temperature is None else temperature, layer, dtype, "a number in [0, 1] (the warm-up weight tau)"
    )
    if not isinstance(value, jax.core.Tracer) and not 0.0 <= float(value) <= 1.0:
        raise ValueError(
            f"{layer}: temperature={temperature!r} (the warm-up weight tau) must be in [0, 1]; "
            f"KernelWarehouse blends (1 - tau) * attention + tau * one-hot, it does not divide by T"
        )
    return jnp.where(jnp.isnan(value), jnp.zeros((), dtype), jnp.clip(value, 0.0, 1.0))


def kw_map_to_cell(logits, fc3: Head, basis_bias, num_local_cells: int, num_basis: int, start_cell: int):
    """KernelWarehouse's basis map (``nonlocal_basis_ratio < 1``): per mixture, ``[L local, basis, zero]``
    -> ``[fc3(basis)[:start], local, fc3(basis)[start:], zero]`` plus ``basis_bias``:
    ``[B, M * (L + basis + 1)] -> [B, M * (N + 1)]``."""
    batch = logits.shape[0]
    x = logits.reshape(-1, num_local_cells + num_basis + 1)
    local, basis, zero = x[:, :num_local_cells], x[:, num_local_cells:-1], x[:, -1:]
    nonlocal_ = fc3(basis)
    x = jnp.concatenate([nonlocal_[:, :start_cell], local, nonlocal_[:, start_cell:], zero], axis=1)
    return x.reshape(batch, -1) + basis_bias.reshape(1, -1)


def kw_attention(
    pooled, fc1: Head, norm: Head, fc2: Head, map_to_cell: Optional[Head], temp_bias, tau, num_mixtures: int, eps: float
):
    """KernelWarehouse's cell attention ``[B, I] -> [B, M, N]``.

    ``a = fc2(relu(norm(fc1(pooled))))`` (then ``map_to_cell``, the basis map, when given), per mixture
    divided by ``sum |a| + eps`` (signed weights), blended ``(1 - tau) a + tau temp_bias`` (``temp_bias``
    ``[M * (N + 1)]``, the warm-up one-hots) and the last, zero cell of each mixture dropped.
    """
    logits = fc2(jax.nn.relu(norm(fc1(pooled))))
    if map_to_cell is not None:
        logits = map_to_cell(logits)
    a = logits.reshape(pooled.shape[0], num_mixtures, -1)  # [B, M, N + 1]
    a = a / (jnp.sum(jnp.abs(a), axis=-1, keepdims=True) + eps)
    a = (1.0 - tau) * a + tau * temp_bias.reshape(num_mixtures, -1).astype(a.dtype)
    return a[..., :-1]


# --------------------------------------------------------------------------- argument checks
def check_odconv_train_batch(layer: str, batch: int) -> None:
    """ODConv's attention BatchNorm needs a batch of at least 2 in training, as PyTorch's."""
    if batch < 2:
        raise ValueError(
            f"{layer}: training with a batch of {batch}: ODConv's attention BatchNorm normalises the pooled "
            f"[B, A] vector over the batch, so it needs B >= 2 in training (PyTorch raises 'Expected more than "
            f"1 value per channel when training'). Use a larger batch or train=False."
        )


def check_kw_train_batch(layer: str, batch: int) -> None:
    """KernelWarehouse's attention BatchNorm (``norm1``) needs a batch of at least 2 in training, as PyTorch's."""
    if batch < 2:
        raise ValueError(
            f"{layer}: training with a batch of {batch}: KernelWarehouse's attention BatchNorm (norm1) normalises "
            f"the pooled [B, H] vector over the batch, so it needs B >= 2 in training (PyTorch raises 'Expected "
            f"more than 1 value per channel when training'). Use a larger batch or train=False."
        )


def check_routing_dropout(layer: str, rate: float) -> None:
    """CondConv's ``routing_dropout`` must be in [0, 1)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{layer}: routing_dropout={rate} must be in [0, 1)")


def external_routing_weights(
    layer: str, external_routing: bool, routing_weights, batch: int, num_experts: int, dtype: Dtype
) -> Optional[jax.Array]:
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
