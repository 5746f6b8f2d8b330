"""The shared core of the three dynamic convolutions.

Every dynamic convolution in this package computes, for each sample ``b``::

    W_b = sum_k a[b, k] * (s_b * W_k)                      # aggregated kernel
    y_b = f_b * conv(c_b * x_b, W_b) + sum_k a[b, k] * bias_k

with ``a`` the kernel (expert) attention ``[B, K]``, ``s`` an optional spatial
attention over kernel positions ``[B, *kernel_size]``, ``c`` an optional input
channel attention ``[B, C_in]`` and ``f`` an optional output (filter) attention
``[B, C_out]``. CondConv (Yang et al., NeurIPS 2019) uses only ``a`` (sigmoid
routing), DynamicConv (Chen et al., CVPR 2020) ``a`` (softmax attention) and the
expert bias, ODConv (Li et al., ICLR 2022) all four attentions. ODConv's channel
and filter attentions scale whole input/output channels of ``W_b``, so each is
applied to the per-sample kernel or to the activations (``c`` to the input, ``f``
to the output), whichever holds fewer values; exact either way.

:func:`dynamic_conv` is the one entry point the layers call. Its ``strategy``
picks how the per-sample convolution is computed; every strategy is exact
(equal to the naive per-sample loop up to floating-point rounding):

``'vmap'``
    The readable reference: ``jax.vmap`` of a single-sample conv, which XLA
    lowers to one grouped convolution (``feature_group_count = B * groups``).
    On XLA:CPU its kernel gradient (a ``batch_group_count`` convolution) is
    catastrophically slow; with ``B == 1`` it is exactly a static conv.
``'shifted'``
    ``prod(kernel_size)`` strided slices of the padded input ("taps"), each
    multiplied by that tap's per-sample kernel matrix in one batched matmul and
    summed. The gradients are again batched matmuls (no grouped conv anywhere).
``'patches'``
    The same taps concatenated into an im2col tensor ``[B, S_out, T*C_in]``,
    then a single per-sample batched matmul with ``[B, T*C_in, C_out]``.
``'pointwise'``
    The 1x1-kernel case (any stride / padding): one strided slice and one
    batched matmul. Raises for larger kernels.
``'mix'``
    Expert-output mixing: one static conv with ``K * C_out`` outputs, then
    ``y = sum_k a_k y_k`` (exact by linearity). Costs ``K`` static convs but no
    per-sample kernel. With a spatial attention (ODConv) ``s_b`` scales sample
    ``b``'s im2col columns, which are then multiplied by all experts at once.
``'map'``
    ``lax.map`` over samples of a batch-1 static conv, with a custom VJP that maps
    again: ``dx_b`` by a static conv with the transposed kernel, ``dW_b`` by one
    matmul of the sample's (cache-sized) im2col with ``dy_b``. On XLA:CPU batch-1
    static convs run at the full static rate, so this is the fastest exact strategy
    for most shapes there. Reverse mode only (``jax.grad`` to any order; no ``jax.jvp``).

``'auto'`` (the default) measures: each applicable strategy is timed once per problem (backend,
device, shapes, dtype, differentiated or not) and the fastest is cached on disk, see
:mod:`dynconv_jax.autotune`. With measuring turned off (``DYNCONV_AUTOTUNE=0``) it follows the
fixed rules of :func:`choose_strategy`.

Layout: channels-last. ``x`` is ``[B, *S, Cin]``; expert kernels are
``[K, *kernel_size, C_in // groups, C_out]`` (flax ``Conv`` layout with a
leading expert axis).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from dynconv_jax import autotune

PaddingLike = Union[str, int, Sequence[int], Sequence[Tuple[int, int]]]

STRATEGIES = ("vmap", "shifted", "patches", "pointwise", "mix", "map")


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
    """A plain (static) convolution, channels-last: ``x [B, *S, Cin]``, ``kernel [*k, Cin/g, Cout]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dynconv_jax import static_conv
      >>> y = static_conv(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4)), strides=(2, 2), padding="VALID",
      ...                 dilation=(1, 1), groups=1)
      >>> y.shape, float(y[0, 0, 0, 0])
      ((1, 2, 2, 4), 18.0)
    """
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


def aggregate_kernels(experts, kernel_attention, spatial_attention=None, channel_attention=None,
                      filter_attention=None, groups: int = 1):
    """Per-sample kernels ``W_b = sum_k a[b,k] * s_b * W_k``, optionally with the channel and filter
    attentions folded in (``W_b[..., i, o] *= c_b[input channel of (i, o)] * f_b[o]``, exact).

    experts: ``[K, *k, Cin/g, Cout]``; kernel_attention: ``[B, K]``; spatial_attention:
    ``[B, *k]``; channel_attention: ``[B, Cin]``; filter_attention: ``[B, Cout]`` (each optional).
    ``kernel_attention`` None: ``experts`` already are the per-sample kernels ``[B, *k, Cin/g, Cout]``
    (a method that assembles its kernels otherwise, see :func:`assembled_conv`).
    Returns ``[B, *k, Cin/g, Cout]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dynconv_jax import aggregate_kernels
      >>> experts = jnp.stack([jnp.zeros((1, 1, 2, 2)), jnp.ones((1, 1, 2, 2))])  # K = 2 experts [1, 1, I, O]
      >>> kernels = aggregate_kernels(experts, jnp.array([[0.25, 0.75]]))          # one sample's attention
      >>> kernels.shape, float(kernels[0, 0, 0, 0, 0])                              # [B, kh, kw, I, O]
      ((1, 1, 1, 2, 2), 0.75)
    """
    kernels = experts if kernel_attention is None else jnp.tensordot(kernel_attention, experts, axes=([1], [0]))
    if spatial_attention is not None:
        kernels = kernels * spatial_attention[..., None, None]
    batch, cin_per_group, cout = kernels.shape[0], kernels.shape[-2], kernels.shape[-1]
    scale = None
    if channel_attention is not None:
        # Input channel of kernel[..., i, o] is group(o) * Cin/g + i, with group(o) = o // (Cout/g).
        c = channel_attention.reshape(batch, groups, 1, cin_per_group)
        scale = jnp.broadcast_to(c, (batch, groups, cout // groups, cin_per_group)).reshape(batch, cout, cin_per_group)
        scale = jnp.swapaxes(scale, 1, 2)  # [B, Cin/g, Cout]
    if filter_attention is not None:
        f = filter_attention[:, None, :]  # [B, 1, Cout]
        scale = f if scale is None else scale * f
    if scale is not None:
        kernels = kernels * scale.reshape((batch,) + (1,) * (kernels.ndim - 3) + scale.shape[1:])
    return kernels


def per_sample_conv(x, kernels, *, strides, padding, dilation, groups, precision=None):
    """The reference per-sample convolution: ``jax.vmap`` over a single-sample conv.

    x: ``[B, *S, Cin]``; kernels: ``[B, *k, Cin/g, Cout]``. XLA lowers the vmap to
    one grouped convolution (``feature_group_count = B * groups``), the trick the
    PyTorch references write by hand.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dynconv_jax import per_sample_conv
      >>> x = jnp.ones((2, 5, 5, 1))
      >>> kernels = jnp.stack([jnp.ones((3, 3, 1, 1)), 2 * jnp.ones((3, 3, 1, 1))])  # one kernel per sample
      >>> y = per_sample_conv(x, kernels, strides=(1, 1), padding="VALID", dilation=(1, 1), groups=1)
      >>> y[:, 0, 0, 0]
      Array([ 9., 18.], dtype=float32)
    """

    def one(xb, kb):
        return static_conv(
            xb[None], kb, strides=strides, padding=padding, dilation=dilation, groups=groups, precision=precision
        )[0]

    return jax.vmap(one)(x, kernels)


# --------------------------------------------------------------------------- geometry


def explicit_padding(padding, spatial_shape, kernel_size, strides, dilation) -> Tuple[Tuple[int, int], ...]:
    """``(lo, hi)`` per spatial dimension, resolving 'SAME' / 'VALID' exactly as ``lax`` does."""
    if isinstance(padding, str):
        window = tuple((k - 1) * d + 1 for k, d in zip(kernel_size, dilation))
        return tuple(tuple(p) for p in lax.padtype_to_pads(spatial_shape, window, strides, padding))
    return tuple(padding)


def output_shape(spatial_shape, kernel_size, strides, pads, dilation) -> Tuple[int, ...]:
    """Output spatial shape of a convolution; raises when a dimension would be empty."""
    out = []
    for axis, (n, k, s, (lo, hi), d) in enumerate(zip(spatial_shape, kernel_size, strides, pads, dilation)):
        span = n + lo + hi - (k - 1) * d
        if span <= 0:
            raise ValueError(
                f"spatial dimension {axis}: input size {n} with padding ({lo}, {hi}) is smaller than the "
                f"dilated kernel extent {(k - 1) * d + 1}: the convolution output would be empty")
        out.append((span - 1) // s + 1)
    return tuple(out)


def _taps(x, kernel_size, strides, pads, dilation):
    """The ``prod(kernel_size)`` strided input slices ("taps"), in row-major kernel order.

    x: ``[B, *S, C]``. Tap ``t`` at kernel offset ``(i_1, ..., i_d)`` is the
    ``[B, *S_out, C]`` slice ``x_pad[:, i*d : i*d + (S_out-1)*s + 1 : s, :]``, so that
    ``conv(x, W) = sum_t tap_t @ W[t]``. Padding uses ``lax.pad`` (negative = crop).
    """
    out = output_shape(x.shape[1:-1], kernel_size, strides, pads, dilation)
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))
    taps = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        start = tuple(i * d for i, d in zip(offset, dilation))
        limit = tuple(st + (o - 1) * s + 1 for st, o, s in zip(start, out, strides))
        taps.append(lax.slice(xp, (0,) + start + (0,), (x.shape[0],) + limit + (x.shape[-1],),
                              (1,) + tuple(strides) + (1,)))
    return taps, out


def _im2col(x, kernel_size, strides, pads, dilation):
    """The taps stacked: ``([B, *S_out, T, C], S_out)``, ``T = prod(kernel_size)`` (see :func:`_taps`)."""
    taps, out = _taps(x, kernel_size, strides, pads, dilation)
    return jnp.stack(taps, axis=-2), out


# --------------------------------------------------------------------------- strategies
# Each strategy maps (x [B, *S, Cin], experts [K, *k, Cin/g, Cout], a [B, K], s [B, *k] | None)
# to conv outputs [B, *S_out, Cout]; channel/filter attention and bias are applied by dynamic_conv.


def _vmap_strategy(x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups,
                   precision):
    kernels = aggregate_kernels(experts, kernel_attention, spatial_attention, **folded, groups=groups)
    return per_sample_conv(x, kernels, strides=strides, padding=padding, dilation=dilation, groups=groups,
                           precision=precision)


def _grouped_kernels(experts, kernel_attention, spatial_attention, folded, groups):
    """Aggregated kernels as per-tap matrices ``[B, T, Cin/g, g, Cout/g]``."""
    kernels = aggregate_kernels(experts, kernel_attention, spatial_attention, **folded, groups=groups)
    b, ci, cout = kernels.shape[0], kernels.shape[-2], kernels.shape[-1]
    return kernels.reshape(b, -1, ci, groups, cout // groups)


def _tap_matmul(tap, w, precision):
    """``tap [B, *S, g*Ci] x w [B, Ci, g, M] -> [B, *S, g, M]`` (per sample and group)."""
    b, ci, g, m = w.shape
    tap = tap.reshape(tap.shape[:-1] + (g, ci))
    if ci == 1:  # depthwise: a broadcast multiply, no contraction
        return tap * w[:, 0].reshape((b,) + (1,) * (tap.ndim - 3) + (g, m))
    spatial = tap.shape[1:-2]
    flat = tap.reshape(b, -1, g, ci)
    y = jnp.einsum("bsgi,bigm->bsgm", flat, w, precision=precision)
    return y.reshape((b,) + spatial + (g, m))


def _shifted_strategy(x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups,
                      precision):
    kernel_size = experts.shape[1:-2]
    pads = explicit_padding(padding, x.shape[1:-1], kernel_size, strides, dilation)
    taps, _ = _taps(x, kernel_size, strides, pads, dilation)
    w = _grouped_kernels(experts, kernel_attention, spatial_attention, folded, groups)  # [B, T, Ci, g, M]
    y = _tap_matmul(taps[0], w[:, 0], precision)
    for t in range(1, len(taps)):
        y = y + _tap_matmul(taps[t], w[:, t], precision)
    return y.reshape(y.shape[:-2] + (-1,))


def _pointwise_strategy(x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups,
                        precision):
    kernel_size = experts.shape[1:-2]
    if any(k != 1 for k in kernel_size):
        raise ValueError(f"strategy='pointwise' needs a 1x1 kernel, got kernel_size={tuple(kernel_size)}")
    return _shifted_strategy(x, experts, kernel_attention, spatial_attention, folded, strides=strides, padding=padding,
                             dilation=dilation, groups=groups, precision=precision)


def _patches_strategy(x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups,
                      precision):
    kernel_size = experts.shape[1:-2]
    w = _grouped_kernels(experts, kernel_attention, spatial_attention, folded, groups)  # [B, T, Ci, g, M]
    b, t, ci, g, m = w.shape
    if ci == 1:  # depthwise: im2col has nothing to contract per group; the tap sum is the same arithmetic
        return _shifted_strategy(x, experts, kernel_attention, spatial_attention, folded, strides=strides, padding=padding,
                                 dilation=dilation, groups=groups, precision=precision)
    pads = explicit_padding(padding, x.shape[1:-1], kernel_size, strides, dilation)
    cols, out = _im2col(x, kernel_size, strides, pads, dilation)  # [B, *S_out, T, g*Ci]
    cols = cols.reshape(b, -1, t, g, ci)
    y = jnp.einsum("bstgi,btigm->bsgm", cols, w, precision=precision)
    return y.reshape((b,) + out + (g * m,))


def transposed_conv_padding(spatial_shape, kernel_size, strides, pads, dilation) -> Tuple[Tuple[int, int], ...]:
    """Padding of the input-gradient conv: ``dx = conv(dilate(dy, strides), flip(W)^T)`` with these pads.

    With forward pads ``(lo, hi)`` and dilated kernel extent ``e = (k - 1) * d + 1``, the gradient conv
    runs over ``dy`` dilated by the stride (length ``(n_out - 1) * s + 1``) and must give back the input
    length ``n``: ``lo' = e - 1 - lo``, ``hi' = n + e - 1 - lo' - ((n_out - 1) * s + 1)``.
    """
    out = output_shape(spatial_shape, kernel_size, strides, pads, dilation)
    result = []
    for n, k, s, (lo, _), d, o in zip(spatial_shape, kernel_size, strides, pads, dilation, out):
        extent = (k - 1) * d + 1
        lo_t = extent - 1 - lo
        result.append((lo_t, n + extent - 1 - lo_t - ((o - 1) * s + 1)))
    return tuple(result)


def transposed_kernel(kernel, groups: int):
    """The kernel of the input-gradient conv: ``[*k, Cin/g, Cout]`` -> spatially flipped ``[*k, Cout/g, Cin]``,
    input and output channels swapped within each group."""
    rank = kernel.ndim - 2
    ci, cout = kernel.shape[-2], kernel.shape[-1]
    w = kernel.reshape(kernel.shape[:-1] + (groups, cout // groups))  # [*k, Ci, g, M]
    w = jnp.moveaxis(w, rank, -1)                                       # [*k, g, M, Ci]
    w = jnp.swapaxes(w, rank, rank + 1)                                 # [*k, M, g, Ci]
    w = w.reshape(kernel.shape[:-2] + (cout // groups, groups * ci))
    return jnp.flip(w, axis=tuple(range(rank)))


def _map_samples(fn, args, consts=()):
    """``lax.map(lambda a: fn(consts, a), args)`` over the leading (batch) axis of every leaf of ``args``.

    Under a mesh set with ``jax.set_mesh`` whose size divides the batch, each device maps over its
    own shard of the batch (``jax.shard_map``, the batch split over every mesh axis, ``consts``
    replicated): one ``lax.map`` over the global batch would make XLA gather every sample to every
    device (checked in the compiled HLO). The result is the same either way.
    """
    mesh = jax.sharding.get_abstract_mesh()
    batch = jax.tree_util.tree_leaves(args)[0].shape[0]

    def local(consts, args):
        return lax.map(lambda a: fn(consts, a), args)

    if mesh.empty or mesh.size == 1 or batch % mesh.size:
        return local(consts, args)
    samples = jax.sharding.PartitionSpec(mesh.axis_names)
    return jax.shard_map(local, in_specs=(jax.sharding.PartitionSpec(), samples), out_specs=samples)(consts, args)


def _kernels_of(experts, attentions, groups: int):
    """:func:`aggregate_kernels` from a dict of per-sample attentions (``kernel_attention`` ``[B, K]``
    and optionally ``spatial_attention``, ``channel_attention``, ``filter_attention``)."""
    return aggregate_kernels(experts, attentions["kernel_attention"], attentions.get("spatial_attention"),
                             attentions.get("channel_attention"), attentions.get("filter_attention"), groups=groups)


def _map_forward(x, kernels, bias, geometry):
    """``lax.map`` over samples of a batch-1 static conv plus its bias.

    x ``[B, *S, Cin]``, kernels ``[B, *k, Cin/g, Cout]``, bias ``[B, Cout]``.
    """
    strides, pads, dilation, groups, precision = geometry

    def one(_, args):
        xb, wb, bb = args
        return static_conv(xb[None], wb, strides=strides, padding=pads, dilation=dilation, groups=groups,
                           precision=precision)[0] + bb

    return _map_samples(one, (x, kernels, bias))


def _map_forward_aggregating(x, experts, attentions, bias, geometry):
    """:func:`_map_forward` with each sample's kernel aggregated inside its step (in cache), so the
    ``[B, *k, Cin/g, Cout]`` kernels are never written to memory: the inference path."""
    strides, pads, dilation, groups, precision = geometry
    if attentions["kernel_attention"] is None:  # per-sample kernels already (assembled_conv): map over them
        return _map_forward(x, experts, bias, geometry)

    def one(experts, args):
        xb, attentions_b, bb = args
        wb = _kernels_of(experts, jax.tree_util.tree_map(lambda v: v[None], attentions_b), groups)[0]
        return static_conv(xb[None], wb, strides=strides, padding=pads, dilation=dilation, groups=groups,
                           precision=precision)[0] + bb

    return _map_samples(one, (x, attentions, bias), experts)


def _map_backward(x, kernels, dy, geometry):
    """``(dx, dW, dbias)`` of :func:`_map_forward`, one sample per step (its slices stay in cache).

    ``dx_b`` is a static conv of ``dy_b`` with the transposed kernel; ``dW_b`` one matmul of the
    sample's im2col with ``dy_b``; ``dbias_b`` the spatial sum of ``dy_b``.
    """
    strides, pads, dilation, groups, precision = geometry
    rank = x.ndim - 2
    kernel_shape = kernels.shape[1:]
    kernel_size, ci, cout = kernel_shape[:-2], kernel_shape[-2], kernel_shape[-1]
    grad_pads = transposed_conv_padding(x.shape[1:-1], kernel_size, strides, pads, dilation)

    def one(_, args):
        xb, wb, dyb = args
        dxb = lax.conv_general_dilated(dyb[None], transposed_kernel(wb, groups), window_strides=(1,) * rank,
                                       padding=grad_pads, lhs_dilation=strides, rhs_dilation=dilation,
                                       dimension_numbers=conv_dimension_numbers(rank), feature_group_count=groups,
                                       precision=precision)[0]
        cols, _ = _im2col(xb[None], kernel_size, strides, pads, dilation)
        cols = cols.reshape(-1, cols.shape[-2], groups, ci)                  # [S_out, T, g, Ci]
        dyg = dyb.reshape(-1, groups, cout // groups)                        # [S_out, g, M]
        dwb = jnp.einsum("stgi,sgm->tigm", cols, dyg, precision=precision)   # [T, Ci, g, M]
        return dxb, dwb.reshape(kernel_shape), jnp.sum(dyb, axis=tuple(range(rank)))

    return _map_samples(one, (x, kernels, dy))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def mapped_conv(x, experts, attentions, bias, geometry):
    """Per-sample convolution plus bias as ``lax.map`` over samples of a static conv, with its own VJP.

    x: ``[B, *S, Cin]``; experts: ``[K, *k, Cin/g, Cout]``; attentions: dict of per-sample
    attentions for :func:`aggregate_kernels` (``kernel_attention`` ``[B, K]``, optionally
    ``spatial_attention``, ``channel_attention``, ``filter_attention``); bias: ``[B, Cout]``;
    geometry: ``(strides, explicit pads, dilation, groups, precision)``. Each step is a batch-1
    static conv, which XLA:CPU runs at its static-conv rate; under a mesh set with
    ``jax.set_mesh`` each device maps over its own samples (:func:`_map_samples`).

    Without differentiation each step aggregates its own kernel (:func:`_map_forward_aggregating`:
    the per-sample kernels never reach memory). Under differentiation the kernels are aggregated
    once for the batch and kept for the backward, which maps again (:func:`_map_backward`) instead of
    differentiating the ``lax.map`` itself (XLA:CPU's batch-1 kernel-gradient conv). The measured
    reasons for both choices: docs/performance.md, "'map'". Reverse mode, to any order (the VJP is made of differentiable ops); forward mode
    (``jax.jvp``, ``jax.jacfwd``) is not defined for a custom VJP: use another strategy.
    """
    return _map_forward_aggregating(x, experts, attentions, bias, geometry)


def _mapped_conv_fwd(x, experts, attentions, bias, geometry):
    kernels = _kernels_of(experts, attentions, geometry[3])
    return _map_forward(x, kernels, bias, geometry), (x, experts, attentions, kernels)


def _mapped_conv_bwd(geometry, residuals, dy):
    x, experts, attentions, kernels = residuals
    dx, d_kernels, d_bias = _map_backward(x, kernels, dy, geometry)
    _, aggregation_vjp = jax.vjp(lambda e, a: _kernels_of(e, a, geometry[3]), experts, attentions)
    d_experts, d_attentions = aggregation_vjp(d_kernels)
    return dx, d_experts, d_attentions, d_bias


mapped_conv.defvjp(_mapped_conv_fwd, _mapped_conv_bwd)


def _map_strategy(x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups,
                  precision):
    kernel_size = experts.shape[1:-2]
    pads = explicit_padding(padding, x.shape[1:-1], kernel_size, strides, dilation)
    attentions = {n: v for n, v in folded.items() if n != "bias"}
    attentions["kernel_attention"] = kernel_attention
    if spatial_attention is not None:
        attentions["spatial_attention"] = spatial_attention
    bias = folded.get("bias")
    if bias is None:
        bias = jnp.zeros((x.shape[0], experts.shape[-1]), experts.dtype)
    return mapped_conv(x, experts, attentions, bias, (strides, pads, dilation, groups, precision))


def _mix_strategy(x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups,
                  precision):
    del folded  # always empty: dynamic_conv applies channel / filter attention to the activations here
    k = experts.shape[0]
    kernel_shape, ci, cout = experts.shape[1:-2], experts.shape[-2], experts.shape[-1]
    m = cout // groups
    # [K, *k, Ci, g, M] -> [*k, Ci, g, K, M]: each group's outputs stay contiguous, as feature_group_count needs.
    stacked = experts.reshape((k,) + kernel_shape + (ci, groups, m))
    stacked = jnp.moveaxis(stacked, 0, -2)
    if spatial_attention is None:  # one static conv with K * Cout outputs
        ys = static_conv(x, stacked.reshape(kernel_shape + (ci, groups * k * m)), strides=strides, padding=padding,
                         dilation=dilation, groups=groups, precision=precision)  # [B, *S_out, g*K*M]
        ys = ys.reshape(ys.shape[:-1] + (groups, k, m))
    else:  # s_b scales kernel positions, i.e. sample b's im2col columns: scaled patches x stacked experts
        pads = explicit_padding(padding, x.shape[1:-1], kernel_shape, strides, dilation)
        cols, _ = _im2col(x, kernel_shape, strides, pads, dilation)  # [B, *S_out, T, g*Ci]
        s = spatial_attention.reshape(x.shape[0], -1)  # [B, T]
        cols = cols * s.reshape((x.shape[0],) + (1,) * (cols.ndim - 3) + (-1, 1))
        cols = cols.reshape(cols.shape[:-1] + (groups, ci))  # [B, *S_out, T, g, Ci]
        ys = jnp.einsum("b...tgi,tigkm->b...gkm", cols, stacked.reshape((-1, ci, groups, k, m)),
                        precision=precision)
    y = jnp.einsum("b...gkm,bk->b...gm", ys, kernel_attention, precision=precision)
    return y.reshape(y.shape[:-2] + (cout,))


_IMPLS = {
    "vmap": _vmap_strategy,
    "shifted": _shifted_strategy,
    "patches": _patches_strategy,
    "pointwise": _pointwise_strategy,
    "mix": _mix_strategy,
    "map": _map_strategy,
}


def applicable_strategies(kernel_size: Sequence[int]) -> Tuple[str, ...]:
    """The strategies that can compute a convolution with this kernel (all of them are exact; every
    one handles every attention, 'pointwise' only 1x1 kernels)."""
    names = ["vmap", "shifted", "patches", "map", "mix"]
    if all(k == 1 for k in kernel_size):
        names.append("pointwise")
    return tuple(names)


def choose_strategy(x_shape, experts_shape, *, strides, dilation, groups, spatial_attention: bool,
                    backend: Optional[str] = None) -> str:
    """What ``strategy='auto'`` runs, by backend and shape (see ``docs/performance.md``).

    XLA:CPU rules, from ``python -m benchmarks strategies`` (forward+backward, the training path;
    the measurements behind each rule: docs/performance.md, "The fixed rules"):

    - a depthwise conv (one input channel per group) is a sum of broadcast multiplies over
      the taps ('shifted'): XLA:CPU's own depthwise conv is slow, even static;
    - batch 1 is exactly a static conv ('vmap' lowers to one);
    - ungrouped, with at most ``_MIX_MAX_POSITIONS`` output positions, the per-sample kernels
      (``B * k^d * Cin * Cout`` values for few output rows) cost more memory traffic than ``K``
      compute-bound static convs: 'mix' (with a spatial attention too);
    - otherwise batch-1 static convs under ``lax.map`` with their own VJP ('map').

    Other backends were never measured (no accelerator was available): there every sample
    at once is the better bet, so batch 1 takes 'vmap', a 1x1 kernel 'pointwise', few output
    positions 'mix' and the rest 'patches' (batched matmuls).
    """
    backend = backend or jax.default_backend()
    kernel_size = tuple(experts_shape[1:-2])
    batch, ci = x_shape[0], experts_shape[-2]
    out_positions = math.prod(-(-n // s) for n, s in zip(x_shape[1:-1], strides))
    del dilation
    few_positions = groups == 1 and out_positions <= _MIX_MAX_POSITIONS
    if ci == 1 and (backend == "cpu" or batch != 1):  # '!=' is decidable for a symbolic batch, '>' is not
        return "shifted"
    if batch == 1:
        return "vmap"
    if backend == "cpu":
        return "mix" if few_positions else "map"
    if all(k == 1 for k in kernel_size):
        return "pointwise"
    return "mix" if few_positions else "patches"


# Most output positions for which 'mix' (K static convs) beats per-sample kernels in
# forward+backward on XLA:CPU (measured: docs/performance.md, "The fixed rules", rule 3).
_MIX_MAX_POSITIONS = 16


def attention_placement(x_shape, experts_shape, *, strides, padding, dilation, strategy: str,
                        channel_attention: bool, filter_attention: bool) -> Tuple[bool, bool]:
    """Where ODConv's channel / filter attentions go: ``(fold_channel, fold_filter)``.

    Both scale whole input / output channels of ``W_b``, so each can scale the per-sample kernel
    (``k^d * Cin/g * Cout`` values per sample) or the activations (the input's ``S * Cin`` /
    the output's ``S_out * Cout`` values per sample): a ``True`` folds it into the kernel, chosen
    when the kernel holds no more values (exact either way). 'mix' has no per-sample kernel,
    so it always scales the activations. ``strategy`` is a concrete strategy, not 'auto'.
    """
    if strategy == "mix":
        return False, False
    kernel_size = tuple(experts_shape[1:-2])
    kernel_values = math.prod(kernel_size) * experts_shape[-2] * experts_shape[-1]
    fold_channel = channel_attention and kernel_values <= math.prod(x_shape[1:])
    fold_filter = False
    if filter_attention:
        pads = explicit_padding(padding, x_shape[1:-1], kernel_size, strides, dilation)
        out_positions = math.prod(output_shape(x_shape[1:-1], kernel_size, strides, pads, dilation))
        fold_filter = kernel_values <= out_positions * experts_shape[-1]
    return fold_channel, fold_filter


def _auto_strategy(x, experts, attentions, *, strides, padding, dilation, groups, precision) -> str:
    """``strategy='auto'``: the fastest measured strategy for this problem (:mod:`dynconv_jax.autotune`),
    or :func:`choose_strategy`'s rule when measuring is off. ``attentions`` maps the names of
    :func:`dynamic_conv`'s optional arguments to arrays or None."""
    rule = choose_strategy(x.shape, experts.shape, strides=strides, dilation=dilation, groups=groups,
                           spatial_attention=attentions["spatial_attention"] is not None)
    present = {name: a for name, a in attentions.items() if a is not None}
    mode = autotune.differentiation(x, experts, *present.values())
    candidates = applicable_strategies(experts.shape[1:-2])
    if mode == "forward":  # 'map' has a custom VJP: reverse mode only
        candidates = tuple(s for s in candidates if s != "map")
        rule = "shifted" if rule == "map" else rule
    if not autotune.enabled() or not all(isinstance(d, int) for d in x.shape):
        return rule  # measuring off, or a symbolic dimension (jax.export): nothing concrete to time
    candidates = [rule] + [s for s in candidates if s != rule]
    batch = autotune.local_batch(x.shape[0])
    per_sample = lambda a: (batch, *a.shape[1:])  # noqa: E731  (expert_bias has no batch axis)
    shapes = [((batch, *x.shape[1:]), x.dtype), (experts.shape, experts.dtype)] + [
        (a.shape if name == "expert_bias" else per_sample(a), a.dtype) for name, a in present.items()]
    key = autotune.problem_key(shapes[0][0], experts.shape, dtype=(x.dtype, experts.dtype), strides=strides, padding=padding,
                               dilation=dilation, groups=groups, attentions=list(present), differentiated=mode)

    def forward(name):
        def run(x, experts, *values):
            return dynamic_conv(x, experts, strides=strides, padding=padding, dilation=dilation, groups=groups,
                                strategy=name, precision=precision, **dict(zip(present, values)))
        return run

    def timed(name):
        if mode is None:
            return forward(name)

        def forward_backward(*args):  # the last argument is the output cotangent
            _, vjp = jax.vjp(forward(name), *args[:-1])
            return vjp(args[-1])
        return forward_backward

    def measure():
        cotangent = []
        if mode:
            y = jax.eval_shape(forward(rule), *[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
            cotangent = [(y.shape, y.dtype)]
        return autotune.measure(candidates, timed, autotune.random_like(shapes + cotangent))

    return autotune.choose(key, candidates, rule, measure)


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
      kernel_attention: ``[B, K]`` (routing weights / expert attention), or None: per-sample kernels (assembled_conv).
      spatial_attention: ``[B, *k]`` or None.
      channel_attention: ``[B, Cin]`` or None (scales the input channels).
      filter_attention: ``[B, Cout]`` or None (scales the output channels).
      expert_bias: ``[K, Cout]`` or None.
      strides, dilation: tuples, one entry per spatial dimension.
      padding: 'SAME', 'VALID' or explicit pairs (see :func:`normalize_padding`).
      strategy: how the per-sample convolution is computed; one of
        :data:`STRATEGIES` or 'auto' (see :func:`choose_strategy`).

    Returns ``[B, *S_out, Cout]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dynconv_jax import dynamic_conv
      >>> x = jnp.ones((2, 8, 8, 4))                 # [B, H, W, Cin]
      >>> experts = jnp.ones((3, 3, 3, 4, 6))        # [K, kh, kw, Cin, Cout]
      >>> attention = jnp.full((2, 3), 1 / 3)        # [B, K]
      >>> y = dynamic_conv(x, experts, attention, strides=(1, 1), padding="SAME", dilation=(1, 1))
      >>> y.shape, float(y[0, 4, 4, 0])              # 3x3 taps x 4 channels, each weight 1
      ((2, 8, 8, 6), 36.0)
    """
    rank = x.ndim - 2
    if experts.ndim != rank + 3:
        raise ValueError(f"experts shape {experts.shape} does not match x shape {x.shape}: expected "
                         f"[K, *kernel_size ({rank} dims), Cin // groups, Cout]")
    if x.shape[-1] != experts.shape[-2] * groups or experts.shape[-1] % groups:
        raise ValueError(f"x has {x.shape[-1]} channels and experts {experts.shape}: with groups={groups} "
                         f"expected Cin = groups * experts.shape[-2] and Cout divisible by groups")
    if strategy == "auto":
        attentions = {"kernel_attention": kernel_attention, "spatial_attention": spatial_attention,
                      "channel_attention": channel_attention, "filter_attention": filter_attention,
                      "expert_bias": expert_bias}
        strategy = _auto_strategy(x, experts, attentions, strides=tuple(strides), padding=padding,
                                  dilation=tuple(dilation), groups=groups, precision=precision)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected 'auto' or one of {STRATEGIES}")
    batch_shape = (x.shape[0],) + (1,) * rank
    fold_channel, fold_filter = attention_placement(
        x.shape, experts.shape, strides=strides, padding=padding, dilation=dilation, strategy=strategy,
        channel_attention=channel_attention is not None, filter_attention=filter_attention is not None)
    folded = {}  # what the strategy applies per sample: folded attentions (and 'map': the bias)
    if fold_channel:
        folded["channel_attention"] = channel_attention.astype(experts.dtype)
    elif channel_attention is not None:
        x = x * channel_attention.reshape(batch_shape + (-1,)).astype(x.dtype)
    if fold_filter:
        folded["filter_attention"] = filter_attention.astype(experts.dtype)
    # 'map' adds the bias inside its per-sample step, unless a filter attention still scales the output.
    fuse_bias = strategy == "map" and (filter_attention is None or fold_filter)
    if expert_bias is not None:
        bias = kernel_attention.astype(expert_bias.dtype) @ expert_bias  # [B, Cout]
        if fuse_bias:  # added inside each sample's step, where its output is in cache
            folded["bias"] = bias.astype(experts.dtype)
    attention = None if kernel_attention is None else kernel_attention.astype(experts.dtype)
    spatial = None if spatial_attention is None else spatial_attention.astype(experts.dtype)
    y = _IMPLS[strategy](x, experts, attention, spatial, folded, strides=tuple(strides), padding=padding,
                         dilation=tuple(dilation), groups=groups, precision=precision)
    if filter_attention is not None and not fold_filter:
        y = y * filter_attention.reshape(batch_shape + (-1,)).astype(y.dtype)
    if expert_bias is not None and not fuse_bias:
        y = y + bias.reshape(batch_shape + (-1,)).astype(y.dtype)
    return y


# --------------------------------------------------------------------------- methods with their own assembly


def im2col(x, kernel_size: Sequence[int], *, strides, padding, dilation):
    """The kernel taps of ``x [B, *S, C]`` stacked: ``[B, *S_out, prod(kernel_size), C]`` (row-major kernel
    order), so that ``conv(x, W)[b, s] = sum_t cols[b, s, t] @ W[t]`` for ``W [prod(k), C, Cout]``."""
    pads = explicit_padding(padding, x.shape[1:-1], tuple(kernel_size), tuple(strides), tuple(dilation))
    return _im2col(x, tuple(kernel_size), tuple(strides), pads, tuple(dilation))[0]


def assembled_conv(x, assemble, kernel_shape, *, mix=None, strides: Sequence[int], padding,
                   dilation: Sequence[int], groups: int = 1, strategy: str = "auto", precision=None):
    """The per-sample convolution of a method whose kernels are not an attention-weighted sum of whole
    experts (KernelWarehouse: mixtures of cells shared between layers), by :func:`dynamic_conv`'s strategies.

    Args:
      x: ``[B, *S, Cin]``.
      assemble: ``() -> [B, *k, Cin // groups, Cout]``, the per-sample kernels (called only when the
        strategy needs them).
      kernel_shape: ``(*k, Cin // groups, Cout)``.
      mix: ``(strides=, padding=, dilation=, precision=) -> [B, *S_out, Cout]``, the method's own mixing of
        static-conv outputs, run for ``strategy='mix'`` (None: the method has none).
      strides, padding, dilation, groups, precision: as :func:`dynamic_conv`.
      strategy: 'vmap', 'shifted', 'patches', 'pointwise', 'map' (on the assembled kernels), 'mix', or
        'auto': :func:`choose_strategy`'s rule for this kernel shape with the 'mix' choice replaced by the
        per-sample-kernel strategy the rule takes otherwise (the cost of a method's mixing differs from the
        expert mixing the rule was measured for). Not measured: :mod:`dynconv_jax.autotune` times expert
        problems only.
    """
    kernel_shape = tuple(kernel_shape)
    if strategy == "auto":
        strategy = choose_strategy(x.shape, (1, *kernel_shape), strides=tuple(strides), dilation=tuple(dilation),
                                   groups=groups, spatial_attention=False)
        if strategy == "mix":
            backend = jax.default_backend()
            strategy = "map" if backend == "cpu" else "pointwise" if all(k == 1 for k in kernel_shape[:-2]) \
                else "patches"
    if strategy == "mix":
        if mix is None:
            raise ValueError("strategy='mix' needs the method's own output mixing (mix=None)")
        return mix(strides=tuple(strides), padding=padding, dilation=tuple(dilation), precision=precision)
    return dynamic_conv(x, assemble(), None, strides=strides, padding=padding, dilation=dilation, groups=groups,
                        strategy=strategy, precision=precision)
