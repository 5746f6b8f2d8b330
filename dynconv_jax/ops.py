"""The shared core of the three dynamic convolutions.

Every dynamic convolution in this package computes, for each sample ``b``::

    W_b = sum_k a[b, k] * (s_b * W_k)                      # aggregated kernel
    y_b = f_b * conv(c_b * x_b, W_b) + sum_k a[b, k] * bias_k

with ``a`` the kernel (expert) attention ``[B, K]``, ``s`` an optional spatial
attention over kernel positions ``[B, *kernel_size]``, ``c`` an optional input
channel attention ``[B, C_in]`` and ``f`` an optional output (filter) attention
``[B, C_out]``. CondConv uses only ``a`` (sigmoid routing), DynamicConv ``a``
(softmax attention) and the expert bias, ODConv all four attentions.

:func:`dynamic_conv` is the one entry point the layers call. Its ``strategy``
picks how the per-sample convolution is computed; every strategy is exact
(equal to the naive per-sample loop up to floating-point rounding).

Layout: channels-last. ``x`` is ``[B, *spatial, C_in]``; expert kernels are
``[K, *kernel_size, C_in // groups, C_out]`` (flax ``Conv`` layout with a
leading expert axis).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

PaddingLike = Union[str, int, Sequence[int], Sequence[Tuple[int, int]]]

STRATEGIES = ("vmap",)


def _tuple(value, rank: int, name: str) -> Tuple[int, ...]:
    """Broadcast an int or sequence to a tuple of ``rank`` ints."""
    if isinstance(value, int):
        return (value,) * rank
    value = tuple(int(v) for v in value)
    if len(value) != rank:
        raise ValueError(f"{name}={value} has {len(value)} entries, expected {rank} (one per spatial dimension)")
    return value


def normalize_padding(padding: PaddingLike, rank: int) -> Union[str, Tuple[Tuple[int, int], ...]]:
    """Return 'SAME' / 'VALID' or explicit ``((lo, hi),) * rank`` pairs, as ``lax`` takes them.

    Accepts what ``flax.linen.Conv`` accepts: 'SAME', 'VALID', an int (symmetric,
    every dimension), a sequence of ints (symmetric per dimension) or a sequence of
    ``(lo, hi)`` pairs.
    """
    if isinstance(padding, str):
        upper = padding.upper()
        if upper not in ("SAME", "VALID"):
            raise ValueError(f"padding={padding!r}: expected 'SAME', 'VALID', an int or (lo, hi) pairs")
        return upper
    if isinstance(padding, int):
        return ((padding, padding),) * rank
    padding = tuple(padding)
    if len(padding) != rank:
        raise ValueError(f"padding={padding} has {len(padding)} entries, expected {rank} (one per spatial dimension)")
    pairs = []
    for p in padding:
        if isinstance(p, int):
            pairs.append((p, p))
        else:
            lo, hi = p
            pairs.append((int(lo), int(hi)))
    return tuple(pairs)


def conv_dimension_numbers(rank: int) -> lax.ConvDimensionNumbers:
    """Channels-last dimension numbers for a ``rank``-D convolution (NHWC / HWIO for 2-D)."""
    spatial = "DHW"[-rank:] if rank <= 3 else None
    if spatial is None:
        raise ValueError(f"spatial rank {rank} is not supported (1, 2 or 3)")
    lhs = "N" + spatial + "C"
    rhs = spatial + "IO"
    return lax.conv_dimension_numbers((1,) * (rank + 2), (1,) * (rank + 2), (lhs, rhs, lhs))


def static_conv(x, kernel, *, strides, padding, dilation, groups, precision=None):
    """A plain (static) convolution, channels-last: ``x [B, *S, Cin]``, ``kernel [*k, Cin/g, Cout]``."""
    rank = x.ndim - 2
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=conv_dimension_numbers(rank),
        feature_group_count=groups,
        precision=precision,
    )


def aggregate_kernels(experts, kernel_attention, spatial_attention=None):
    """Per-sample kernels ``W_b = sum_k a[b,k] * s_b * W_k``.

    experts: ``[K, *k, Cin/g, Cout]``; kernel_attention: ``[B, K]``;
    spatial_attention: ``[B, *k]`` or None. Returns ``[B, *k, Cin/g, Cout]``.
    """
    kernels = jnp.tensordot(kernel_attention, experts, axes=([1], [0]))
    if spatial_attention is not None:
        kernels = kernels * spatial_attention[..., None, None]
    return kernels


def per_sample_conv(x, kernels, *, strides, padding, dilation, groups, precision=None):
    """The reference per-sample convolution: ``jax.vmap`` over a single-sample conv.

    x: ``[B, *S, Cin]``; kernels: ``[B, *k, Cin/g, Cout]``. XLA lowers the vmap to
    one grouped convolution (``feature_group_count = B * groups``), the trick the
    PyTorch references write by hand.
    """

    def one(xb, kb):
        return static_conv(
            xb[None], kb, strides=strides, padding=padding, dilation=dilation, groups=groups, precision=precision
        )[0]

    return jax.vmap(one)(x, kernels)


def _vmap_strategy(x, experts, kernel_attention, spatial_attention, *, strides, padding, dilation, groups, precision):
    kernels = aggregate_kernels(experts, kernel_attention.astype(experts.dtype),
                                None if spatial_attention is None else spatial_attention.astype(experts.dtype))
    return per_sample_conv(x, kernels, strides=strides, padding=padding, dilation=dilation, groups=groups,
                           precision=precision)


def dynamic_conv(
    x,
    experts,
    kernel_attention,
    *,
    spatial_attention=None,
    channel_attention=None,
    filter_attention=None,
    expert_bias=None,
    strides: Sequence[int],
    padding,
    dilation: Sequence[int],
    groups: int = 1,
    strategy: str = "auto",
    precision=None,
):
    """``y_b = f_b * conv(c_b * x_b, sum_k a[b,k] s_b W_k) + sum_k a[b,k] bias_k``.

    Args:
      x: ``[B, *S, Cin]``.
      experts: ``[K, *k, Cin // groups, Cout]``.
      kernel_attention: ``[B, K]`` (routing weights / expert attention).
      spatial_attention: ``[B, *k]`` or None.
      channel_attention: ``[B, Cin]`` or None (scales the input channels).
      filter_attention: ``[B, Cout]`` or None (scales the output channels).
      expert_bias: ``[K, Cout]`` or None.
      strides, dilation: tuples, one entry per spatial dimension.
      padding: 'SAME', 'VALID' or explicit pairs (see :func:`normalize_padding`).
      strategy: how the per-sample convolution is computed; one of
        :data:`STRATEGIES` or 'auto'.

    Returns ``[B, *S_out, Cout]``.
    """
    if strategy == "auto":
        strategy = "vmap"
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected 'auto' or one of {STRATEGIES}")
    batch_shape = (x.shape[0],) + (1,) * (x.ndim - 2)
    if channel_attention is not None:
        x = x * channel_attention.reshape(batch_shape + (-1,)).astype(x.dtype)
    y = _vmap_strategy(x, experts, kernel_attention, spatial_attention, strides=strides, padding=padding,
                       dilation=dilation, groups=groups, precision=precision)
    if filter_attention is not None:
        y = y * filter_attention.reshape(batch_shape + (-1,)).astype(y.dtype)
    if expert_bias is not None:
        bias = kernel_attention.astype(expert_bias.dtype) @ expert_bias  # [B, Cout]
        y = y + bias.reshape(batch_shape + (-1,)).astype(y.dtype)
    return y
