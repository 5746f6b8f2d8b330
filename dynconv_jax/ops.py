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
    per-sample kernel; its gradient is ``dW_k = sum_b a_bk G_b`` as one static
    kernel-gradient conv of ``x`` with ``dy`` scaled per sample, and
    ``da_bk = <dy_b, y_bk>``. With a spatial attention (ODConv) ``s_b`` scales
    sample ``b``'s im2col columns, which are then multiplied by all experts at once
    (one matmul; also without a spatial attention at ``_MIX_MAX_POSITIONS`` output
    positions or fewer, where XLA:CPU's conv with ``K * C_out`` outputs is slower).
``'map'``
    ``lax.map`` over samples of a batch-1 static conv, with a custom VJP that maps
    again: ``dx_b`` by a static conv with the transposed kernel, ``dW_b`` by one
    matmul of the sample's (cache-sized) im2col with ``dy_b``. On XLA:CPU batch-1
    static convs run at the full static rate. Under differentiation it keeps the
    whole batch's per-sample kernels and builds their gradients. Reverse mode only
    (``jax.grad`` to any order; no ``jax.jvp``).
``'lean'``
    'map''s batch-1 convs over chunks of a few samples (:func:`lean_conv`): each chunk's
    kernels come from one matmul with the experts, and the backward reduces each chunk's
    per-sample kernel gradients at once (``dW_k = sum_b a_bk G_b`` accumulated over the
    chunks), so neither the per-sample kernels nor their gradients ever exist for the whole
    batch; it saves only its inputs. A depthwise conv (one input channel per group) is
    'shifted''s broadcast multiplies with a fused backward instead (:func:`depthwise_conv`).
    Reverse mode only.

``'auto'`` (the default) follows the fixed per-backend rules of :func:`choose_strategy` and never
measures. A :class:`~dynconv_jax.plan.Plan` (``strategy=plan``) runs measured choices instead: it is
made on request by :func:`dynconv_jax.autotune.tune`.

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

from dynconv_jax import plan

PaddingLike = Union[str, int, Sequence[int], Sequence[Tuple[int, int]]]
STRATEGIES = plan.STRATEGIES


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


def aggregate_kernels(
    experts, kernel_attention, spatial_attention=None, channel_attention=None, filter_attention=None, groups: int = 1
):
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
                f"dilated kernel extent {(k - 1) * d + 1}: the convolution output would be empty"
            )
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
        taps.append(
            lax.slice(xp, (0,) + start + (0,), (x.shape[0],) + limit + (x.shape[-1],), (1,) + tuple(strides) + (1,))
        )
    return taps, out


def _im2col(x, kernel_size, strides, pads, dilation):
    """The taps stacked: ``([B, *S_out, T, C], S_out)``, ``T = prod(kernel_size)`` (see :func:`_taps`)."""
    taps, out = _taps(x, kernel_size, strides, pads, dilation)
    return jnp.stack(taps, axis=-2), out


# --------------------------------------------------------------------------- strategies
# Each strategy maps (x [B, *S, Cin], experts [K, *k, Cin/g, Cout], a [B, K], s [B, *k] | None)
# to conv outputs [B, *S_out, Cout]; channel/filter attention and bias are applied by dynamic_conv.


def _vmap_strategy(
    x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups, precision
):
    kernels = aggregate_kernels(experts, kernel_attention, spatial_attention, **folded, groups=groups)
    return per_sample_conv(
        x, kernels, strides=strides, padding=padding, dilation=dilation, groups=groups, precision=precision
    )


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


def _shifted_strategy(
    x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups, precision
):
    kernel_size = experts.shape[1:-2]
    pads = explicit_padding(padding, x.shape[1:-1], kernel_size, strides, dilation)
    taps, _ = _taps(x, kernel_size, strides, pads, dilation)
    w = _grouped_kernels(experts, kernel_attention, spatial_attention, folded, groups)  # [B, T, Ci, g, M]
    y = _tap_matmul(taps[0], w[:, 0], precision)
    for t in range(1, len(taps)):
        y = y + _tap_matmul(taps[t], w[:, t], precision)
    return y.reshape(y.shape[:-2] + (-1,))


def _pointwise_strategy(
    x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups, precision
):
    kernel_size = experts.shape[1:-2]
    if any(k != 1 for k in kernel_size):
        raise ValueError(f"strategy='pointwise' needs a 1x1 kernel, got kernel_size={tuple(kernel_size)}")
    return _shifted_strategy(
        x,
        experts,
        kernel_attention,
        spatial_attention,
        folded,
        strides=strides,
        padding=padding,
        dilation=dilation,
        groups=groups,
        precision=precision,
    )


def _patches_strategy(
    x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups, precision
):
    kernel_size = experts.shape[1:-2]
    w = _grouped_kernels(experts, kernel_attention, spatial_attention, folded, groups)  # [B, T, Ci, g, M]
    b, t, ci, g, m = w.shape
    if ci == 1:  # depthwise: im2col has nothing to contract per group; the tap sum is the same arithmetic
        return _shifted_strategy(
            x,
            experts,
            kernel_attention,
            spatial_attention,
            folded,
            strides=strides,
            padding=padding,
            dilation=dilation,
            groups=groups,
            precision=precision,
        )
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
    w = jnp.moveaxis(w, rank, -1)  # [*k, g, M, Ci]
    w = jnp.swapaxes(w, rank, rank + 1)  # [*k, M, g, Ci]
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
    return aggregate_kernels(
        experts,
        attentions["kernel_attention"],
        attentions.get("spatial_attention"),
        attentions.get("channel_attention"),
        attentions.get("filter_attention"),
        groups=groups,
    )


def _map_forward(x, kernels, bias, geometry):
    """``lax.map`` over samples of a batch-1 static conv plus its bias.

    x ``[B, *S, Cin]``, kernels ``[B, *k, Cin/g, Cout]``, bias ``[B, Cout]``.
    """
    strides, pads, dilation, groups, precision = geometry

    def one(_, args):
        xb, wb, bb = args
        return (
            static_conv(
                xb[None], wb, strides=strides, padding=pads, dilation=dilation, groups=groups, precision=precision
            )[0]
            + bb
        )

    return _map_samples(one, (x, kernels, bias))


def _sample_kernel(experts, attentions_b, groups: int):
    """Sample ``b``'s aggregated kernel ``[*k, Cin/g, Cout]`` from its attentions (no batch axis)."""
    return _kernels_of(experts, jax.tree_util.tree_map(lambda v: v[None], attentions_b), groups)[0]


def _map_forward_aggregating(x, experts, attentions, bias, geometry):
    """:func:`_map_forward` with each sample's kernel aggregated inside its step (in cache), so the
    ``[B, *k, Cin/g, Cout]`` kernels are never written to memory: the inference path. ``bias`` may be None."""
    strides, pads, dilation, groups, precision = geometry
    if attentions["kernel_attention"] is None:  # per-sample kernels already (assembled_conv): map over them
        return _map_forward(x, experts, bias, geometry)

    def one(experts, args):
        xb, attentions_b, bb = args
        yb = static_conv(
            xb[None],
            _sample_kernel(experts, attentions_b, groups),
            strides=strides,
            padding=pads,
            dilation=dilation,
            groups=groups,
            precision=precision,
        )[0]
        return yb if bb is None else yb + bb

    return _map_samples(one, (x, attentions, bias), experts)


def _input_gradient_conv(dyb, wb, input_spatial, geometry):
    """``dx_b``: sample ``b``'s output gradient ``[*S_out, Cout]`` convolved with its spatially flipped,
    channel-swapped kernel ``wb`` (``lhs_dilation`` = stride)."""
    strides, pads, dilation, groups, precision = geometry
    rank = dyb.ndim - 1
    grad_pads = transposed_conv_padding(input_spatial, wb.shape[:-2], strides, pads, dilation)
    return lax.conv_general_dilated(
        dyb[None],
        transposed_kernel(wb, groups),
        window_strides=(1,) * rank,
        padding=grad_pads,
        lhs_dilation=strides,
        rhs_dilation=dilation,
        dimension_numbers=conv_dimension_numbers(rank),
        feature_group_count=groups,
        precision=precision,
    )[0]


def _sample_kernel_gradient(xb, dyb, kernel_shape, geometry):
    """``G_b = im2col(x_b)^T dy_b`` as ``[T, Cin/g, g, Cout/g]`` (``T = prod(kernel_size)``): one matmul."""
    strides, pads, dilation, groups, precision = geometry
    kernel_size, ci, cout = kernel_shape[:-2], kernel_shape[-2], kernel_shape[-1]
    cols, _ = _im2col(xb[None], kernel_size, strides, pads, dilation)
    cols = cols.reshape(-1, cols.shape[-2], groups, ci)  # [S_out, T, g, Ci]
    dyg = dyb.reshape(-1, groups, cout // groups)  # [S_out, g, M]
    return jnp.einsum("stgi,sgm->tigm", cols, dyg, precision=precision)  # [T, Ci, g, M]


def _map_backward(x, kernels, dy, geometry):
    """``(dx, dW, dbias)`` of :func:`_map_forward`, one sample per step (its slices stay in cache).

    ``dx_b`` is a static conv of ``dy_b`` with the transposed kernel; ``dW_b`` one matmul of the
    sample's im2col with ``dy_b``; ``dbias_b`` the spatial sum of ``dy_b``.
    """
    kernel_shape = kernels.shape[1:]

    def one(_, args):
        xb, wb, dyb = args
        dxb = _input_gradient_conv(dyb, wb, x.shape[1:-1], geometry)
        dwb = _sample_kernel_gradient(xb, dyb, kernel_shape, geometry)
        return dxb, dwb.reshape(kernel_shape), jnp.sum(dyb, axis=tuple(range(dyb.ndim - 1)))

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


def _map_strategy(
    x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups, precision
):
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


# Most per-sample kernel values a chunk of 'lean' holds (8 MiB in float32; measured: docs/performance.md,
# "'lean'": smaller chunks cost per-step overhead with small kernels, larger ones memory with large kernels).
_LEAN_CHUNK_VALUES = 2**21


def _chunk_size(batch: int, kernel_values: int) -> int:
    """Samples per chunk of 'lean': the largest divisor of ``batch`` whose kernels hold at most
    ``_LEAN_CHUNK_VALUES`` values (at least 1); 1 for a symbolic batch (``jax.export``), which has no divisors
    known while tracing."""
    if not isinstance(batch, int):
        return 1
    limit = max(1, _LEAN_CHUNK_VALUES // kernel_values)
    return max(c for c in range(1, min(limit, batch) + 1) if batch % c == 0)


def _scan_chunks(fn, carry, args, consts, kernel_values: int):
    """``lax.scan`` of ``fn(consts, carry, chunk) -> (carry, outputs)`` over chunks of samples (the leading
    axis of every leaf of ``args``); returns ``(carry, outputs)`` with the outputs' chunks joined again.

    Under a mesh set with ``jax.set_mesh`` whose size divides the batch, each device scans its own samples
    (``jax.shard_map``, as :func:`_map_samples`) and the carries are summed over the devices."""
    mesh = jax.sharding.get_abstract_mesh()
    batch = jax.tree_util.tree_leaves(args)[0].shape[0]

    def local(consts, carry, args):
        b = jax.tree_util.tree_leaves(args)[0].shape[0]
        c = _chunk_size(b, kernel_values)
        chunks = jax.tree_util.tree_map(lambda v: v.reshape((b // c, c) + v.shape[1:]), args)
        total, outputs = lax.scan(lambda acc, chunk: fn(consts, acc, chunk), carry, chunks)
        return total, jax.tree_util.tree_map(lambda v: v.reshape((b,) + v.shape[2:]), outputs)

    if mesh.empty or mesh.size == 1 or batch % mesh.size:
        return local(consts, carry, args)
    samples, replicated = jax.sharding.PartitionSpec(mesh.axis_names), jax.sharding.PartitionSpec()

    def per_device(consts, args):  # each device's carry starts equal and becomes its own (varying) sum
        total, outputs = local(consts, lax.pcast(carry, mesh.axis_names, to="varying"), args)
        return lax.psum(total, mesh.axis_names), outputs

    return jax.shard_map(per_device, in_specs=(replicated, samples), out_specs=(replicated, samples))(consts, args)


def _chunk_kernels(experts, attentions_c):
    """A chunk's kernels ``sum_k a_bk W_k`` as ``[c, T, Cin/g * Cout]`` (one matmul with the flattened experts),
    unscaled and scaled by the spatial attention (``(unscaled, scaled)``; the same array without one)."""
    k, taps = experts.shape[0], math.prod(experts.shape[1:-2])
    unscaled = (attentions_c["kernel_attention"] @ experts.reshape(k, -1)).reshape(
        -1, taps, experts.shape[-2] * experts.shape[-1]
    )
    s = attentions_c.get("spatial_attention")
    return unscaled, unscaled if s is None else unscaled * s.reshape(s.shape[0], taps, 1)


def _lean_forward(x, experts, attentions, geometry):
    """:func:`lean_conv`'s output: per chunk, the kernels in one matmul, then one batch-1 static conv per sample."""
    strides, pads, dilation, groups, precision = geometry

    def chunk(experts, carry, args):
        xc, attentions_c = args
        kernels = _chunk_kernels(experts, attentions_c)[1].reshape((-1,) + experts.shape[1:])
        conv = functools.partial(
            static_conv, strides=strides, padding=pads, dilation=dilation, groups=groups, precision=precision
        )
        return carry, lax.map(lambda a: conv(a[0][None], a[1])[0], (xc, kernels))

    return _scan_chunks(chunk, (), (x, attentions), experts, math.prod(experts.shape[1:]))[1]


def _lean_backward(x, experts, attentions, dy, geometry):
    """``(dx, d_experts, d_attentions)`` of :func:`lean_conv`, chunk by chunk.

    Per chunk of ``c`` samples: the kernels again (:func:`_chunk_kernels`), ``dx_b`` by the transposed conv
    of each sample, the per-sample kernel gradients ``G_b`` (:func:`_sample_kernel_gradient`; only the
    chunk's ``c`` of them exist at once), and from them ``da_bk = <s_b G_b, W_k>``, ``ds_bt = <G_bt, U_bt>``
    (``U_b = sum_k a_bk W_k``) and the experts' gradient ``dW_k += sum_b a_bk s_b G_b`` in the scan's carry.
    """
    k, kernel_shape = experts.shape[0], experts.shape[1:]
    flat = experts.reshape(k, -1)

    def chunk(experts, d_experts, args):
        xc, attentions_c, dyc = args
        unscaled, kernels = _chunk_kernels(experts, attentions_c)
        dxc = lax.map(
            lambda a: _input_gradient_conv(a[1], a[0].reshape(kernel_shape), x.shape[1:-1], geometry), (kernels, dyc)
        )
        g = lax.map(lambda a: _sample_kernel_gradient(a[0], a[1], kernel_shape, geometry), (xc, dyc))
        g = g.reshape(unscaled.shape)  # [c, T, Ci*Co]
        s = attentions_c.get("spatial_attention")
        scaled = g if s is None else g * s.reshape(s.shape[0], -1, 1)
        scaled = scaled.reshape(g.shape[0], -1)
        d_attentions = {"kernel_attention": scaled @ flat.T}
        if s is not None:
            d_attentions["spatial_attention"] = jnp.sum(g * unscaled, axis=-1).reshape(s.shape)
        return d_experts + attentions_c["kernel_attention"].T @ scaled, (dxc, d_attentions)

    d_experts, (dx, d_attentions) = _scan_chunks(
        chunk, jnp.zeros_like(flat), (x, attentions, dy), experts, math.prod(kernel_shape)
    )
    return dx, d_experts.reshape(experts.shape), d_attentions


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lean_conv(x, experts, attentions, geometry):
    """Per-sample convolution whose forward and backward hold only a few samples' kernels at once.

    x: ``[B, *S, Cin]``; experts: ``[K, *k, Cin/g, Cout]``; attentions: ``kernel_attention`` ``[B, K]`` and
    optionally ``spatial_attention`` ``[B, *k]``; geometry as :func:`mapped_conv`. Both passes scan over
    chunks of samples (:func:`_scan_chunks`, :func:`_chunk_size`): the forward
    (:func:`_lean_forward`) saves only its inputs; the backward (:func:`_lean_backward`) uses
    ``dL/dW_k = sum_b a_bk G_b`` with each chunk's per-sample kernel gradients ``G_b`` reduced at once, so
    neither the ``[B, *k, Cin/g, Cout]`` kernels nor their gradients ever exist for the whole batch.
    Reverse mode to any order; no forward mode (a custom VJP).
    """
    return _lean_forward(x, experts, attentions, geometry)


def _lean_conv_fwd(x, experts, attentions, geometry):
    return lean_conv(x, experts, attentions, geometry), (x, experts, attentions)


def _lean_conv_bwd(geometry, residuals, dy):
    return _lean_backward(*residuals, dy, geometry)


lean_conv.defvjp(_lean_conv_fwd, _lean_conv_bwd)


def _weighted_taps(x, kernels, kernel_size, strides, pads, dilation):
    """``sum_t tap_t(x) * kernels[:, t]``: x ``[B, *S, g]`` (one input channel per group), kernels ``[B, T, g, M]``
    -> ``[B, *S_out, g, M]`` (broadcast multiplies, one fused loop)."""
    taps, _ = _taps(x, kernel_size, strides, pads, dilation)
    spread = (x.shape[0],) + (1,) * (x.ndim - 2) + kernels.shape[2:]
    return sum(tap[..., None] * kernels[:, t].reshape(spread) for t, tap in enumerate(taps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x, kernels, geometry):
    """Per-sample depthwise convolution (one input channel per group) whose backward is two fused tap sums.

    x: ``[B, *S, g]``; kernels: ``[B, T, g, M]`` (``T = prod(kernel_size)``, ``M`` outputs per group);
    geometry: ``(kernel_size, strides, explicit pads, dilation)``. Returns ``[B, *S_out, g, M]``. The
    forward saves only its inputs; the backward forms the kernels' gradient as one reduction per tap and
    the input's as the taps of the output gradient (dilated by the stride, padded as
    :func:`transposed_conv_padding`) times the flipped kernels, so autodiff's ``T`` padded copies of the
    gradient never exist. Reverse mode to any order; no forward mode (a custom VJP).
    """
    return _weighted_taps(x, kernels, *geometry)


def _tap_reductions(x, dy, kernel_size, strides, pads, dilation):
    """``[B, T, g, M]``: ``sum over positions of tap_t(x)[..., None] * dy`` for each tap ``t``, one tap per step of a
    ``lax.map`` (a slice of the padded input read in place; all ``T`` products at once would each be written)."""
    rank = x.ndim - 2
    out = dy.shape[1 : 1 + rank]
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0),) + tuple((lo, hi, 0) for lo, hi in pads) + ((0, 0, 0),))
    extent = tuple((o - 1) * s + 1 for o, s in zip(out, strides))
    starts = jnp.asarray(
        [[i * d for i, d in zip(offset, dilation)] for offset in itertools.product(*(range(k) for k in kernel_size))],
        jnp.int32,
    )

    def one(start):
        zero = jnp.zeros((), start.dtype)
        window = lax.dynamic_slice(xp, (zero, *start, zero), (x.shape[0],) + extent + (x.shape[-1],))
        tap = lax.slice(window, (0,) * window.ndim, window.shape, (1,) + tuple(strides) + (1,))
        return jnp.sum(tap[..., None] * dy, axis=tuple(range(1, rank + 1)))

    return jnp.moveaxis(lax.map(one, starts), 0, 1)


def _depthwise_conv_fwd(x, kernels, geometry):
    return depthwise_conv(x, kernels, geometry), (x, kernels)


def _depthwise_conv_bwd(geometry, residuals, dy):
    x, kernels = residuals
    kernel_size, strides, pads, dilation = geometry
    rank = x.ndim - 2
    d_kernels = _tap_reductions(x, dy, kernel_size, strides, pads, dilation)
    grad_pads = transposed_conv_padding(x.shape[1:-1], kernel_size, strides, pads, dilation)
    dilated = lax.pad(
        dy,
        jnp.zeros((), dy.dtype),
        ((0, 0, 0),) + tuple((lo, hi, s - 1) for (lo, hi), s in zip(grad_pads, strides)) + ((0, 0, 0),) * 2,
    )
    flipped = jnp.flip(
        kernels.reshape(kernels.shape[:1] + tuple(kernel_size) + kernels.shape[2:]), axis=tuple(range(1, rank + 1))
    ).reshape(kernels.shape)
    grad_taps, _ = _taps(
        dilated.reshape(dilated.shape[:-2] + (-1,)), kernel_size, (1,) * rank, ((0, 0),) * rank, dilation
    )
    spread = (x.shape[0],) + (1,) * rank + kernels.shape[2:]
    dx = sum(
        jnp.sum(tap.reshape(tap.shape[:-1] + kernels.shape[2:]) * flipped[:, t].reshape(spread), axis=-1)
        for t, tap in enumerate(grad_taps)
    )
    return dx, d_kernels


depthwise_conv.defvjp(_depthwise_conv_fwd, _depthwise_conv_bwd)


def _lean_strategy(
    x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups, precision
):
    del folded  # always empty: dynamic_conv applies channel / filter attention and bias to the activations here
    kernel_size = experts.shape[1:-2]
    pads = explicit_padding(padding, x.shape[1:-1], kernel_size, strides, dilation)
    if experts.shape[-2] == 1:  # depthwise: broadcast multiplies of taps, with a fused backward
        kernels = _grouped_kernels(experts, kernel_attention, spatial_attention, {}, groups)[:, :, 0]  # [B, T, g, M]
        y = depthwise_conv(x, kernels, (kernel_size, strides, pads, dilation))
        return y.reshape(y.shape[:-2] + (-1,))
    attentions = {"kernel_attention": kernel_attention}
    if spatial_attention is not None:
        attentions["spatial_attention"] = spatial_attention
    return lean_conv(x, experts, attentions, (strides, pads, dilation, groups, precision))


def _mix_strategy(
    x, experts, kernel_attention, spatial_attention, folded, *, strides, padding, dilation, groups, precision
):
    del folded  # always empty: dynamic_conv applies channel / filter attention to the activations here
    k = experts.shape[0]
    kernel_shape, ci, cout = experts.shape[1:-2], experts.shape[-2], experts.shape[-1]
    m = cout // groups
    pads = explicit_padding(padding, x.shape[1:-1], kernel_shape, strides, dilation)
    positions = math.prod(output_shape(x.shape[1:-1], kernel_shape, strides, pads, dilation))
    if spatial_attention is None and positions > _MIX_MAX_POSITIONS:  # one static conv with K * Cout outputs
        # [K, *k, Ci, g, M] -> [*k, Ci, g, K, M]: each group's outputs stay contiguous, as feature_group_count needs.
        stacked = jnp.moveaxis(experts.reshape((k,) + kernel_shape + (ci, groups, m)), 0, -2)
        ys = static_conv(
            x,
            stacked.reshape(kernel_shape + (ci, groups * k * m)),
            strides=strides,
            padding=padding,
            dilation=dilation,
            groups=groups,
            precision=precision,
        )  # [B, *S_out, g*K*M]
        y = jnp.einsum(
            "b...gkm,bk->b...gm", ys.reshape(ys.shape[:-1] + (groups, k, m)), kernel_attention, precision=precision
        )
        return y.reshape(y.shape[:-2] + (cout,))
    # im2col x each expert, one matmul per expert (no transposed copy of the experts is made or kept);
    # s_b scales kernel positions, i.e. sample b's columns
    cols, out = _im2col(x, kernel_shape, strides, pads, dilation)  # [B, *S_out, T, g*Ci]
    if spatial_attention is not None:
        s = spatial_attention.reshape(x.shape[0], -1)  # [B, T]
        cols = cols * s.reshape((x.shape[0],) + (1,) * (cols.ndim - 3) + (-1, 1))
    cols = cols.reshape((x.shape[0], -1, cols.shape[-2], groups, ci))  # [B, P, T, g, Ci]
    taps = experts.reshape((k, -1, ci, groups, m))  # [K, T, Ci, g, M]
    y = sum(
        kernel_attention[:, e, None, None, None] * jnp.einsum("bptgi,tigm->bpgm", cols, taps[e], precision=precision)
        for e in range(k)
    )
    return y.reshape((x.shape[0],) + out + (cout,))


_IMPLS = {
    "vmap": _vmap_strategy,
    "shifted": _shifted_strategy,
    "patches": _patches_strategy,
    "pointwise": _pointwise_strategy,
    "mix": _mix_strategy,
    "map": _map_strategy,
    "lean": _lean_strategy,
}


def applicable_strategies(kernel_size: Sequence[int]) -> Tuple[str, ...]:
    """The strategies that can compute a convolution with this kernel (all of them are exact; every
    one handles every attention, 'pointwise' only 1x1 kernels)."""
    names = ["vmap", "shifted", "patches", "map", "mix", "lean"]
    if all(k == 1 for k in kernel_size):
        names.append("pointwise")
    return tuple(names)


def choose_strategy(
    x_shape, experts_shape, *, strides, dilation, groups, spatial_attention: bool, backend: Optional[str] = None
) -> str:
    """What ``strategy='auto'`` runs: fixed rules by backend and shape; nothing is measured.

    XLA:CPU, measured (``python -m benchmarks strategies`` and ``plans``, forward+backward; the numbers
    behind each rule: docs/performance.md, "The fixed rules"):

    - a depthwise conv (one input channel per group) is a sum of broadcast multiplies over
      the taps, with a fused backward ('lean', :func:`depthwise_conv`): XLA:CPU's own depthwise
      conv is slow, even static, and autodiff of the taps ('shifted') writes each tap's product;
    - batch 1 is exactly a static conv ('vmap' lowers to one);
    - ungrouped, with at most ``_MIX_MAX_POSITIONS`` output positions, the per-sample kernels
      (``B * k^d * Cin * Cout`` values for few output rows) cost more memory traffic than ``K``
      compute-bound static convs: 'mix' (with a spatial attention too);
    - otherwise 'lean': batch-1 static convs over chunks of samples, whose backward never holds the
      whole batch's per-sample kernels or kernel gradients (as fast as 'map' or faster, a fraction
      of its memory).

    GPU and TPU: **unmeasured** (no accelerator was lent to this project), written from published
    evidence: on CUDA the backward of a grouped convolution costs as much as the dense one
    (jax-ml/jax#13800), so 'vmap' (one grouped conv over ``B * groups`` groups) is taken only at batch 1,
    where it is a static conv; a grouped conv also cannot fill a TPU's matrix units; 'map' and 'lean'
    step through the samples one by one (one small kernel launch each). So every sample at once:
    depthwise 'lean' (broadcast multiplies of the taps, no per-sample loop), a 1x1 kernel 'pointwise'
    (one batched matmul), few
    output positions 'mix' (K dense convs, no per-sample kernel) and the rest 'patches' (one batched
    matmul over the im2col columns).
    """
    backend = backend or jax.default_backend()
    kernel_size = tuple(experts_shape[1:-2])
    batch, ci = x_shape[0], experts_shape[-2]
    out_positions = math.prod(-(-n // s) for n, s in zip(x_shape[1:-1], strides))
    del dilation, spatial_attention
    few_positions = groups == 1 and out_positions <= _MIX_MAX_POSITIONS
    if ci == 1 and (backend == "cpu" or batch != 1):  # '!=' is decidable for a symbolic batch, '>' is not
        return "lean"
    if batch == 1:
        return "vmap"
    if backend == "cpu":
        return "mix" if few_positions else "lean"
    if all(k == 1 for k in kernel_size):
        return "pointwise"
    return "mix" if few_positions else "patches"


# Most output positions for which 'mix' (K static convs) beats per-sample kernels in
# forward+backward on XLA:CPU (measured: docs/performance.md, "The fixed rules", rule 3).
_MIX_MAX_POSITIONS = 16


def attention_placement(
    x_shape,
    experts_shape,
    *,
    strides,
    padding,
    dilation,
    strategy: str,
    channel_attention: bool,
    filter_attention: bool,
) -> Tuple[bool, bool]:
    """Where ODConv's channel / filter attentions go: ``(fold_channel, fold_filter)``.

    Both scale whole input / output channels of ``W_b``, so each can scale the per-sample kernel
    (``k^d * Cin/g * Cout`` values per sample) or the activations (the input's ``S * Cin`` /
    the output's ``S_out * Cout`` values per sample): a ``True`` folds it into the kernel, chosen
    when the kernel holds no more values (exact either way). 'mix' has no per-sample kernel,
    so it always scales the activations. ``strategy`` is a concrete strategy, not 'auto'.
    """
    if strategy in ("mix", "lean"):
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


#: What a ``strategy`` argument may be (for error messages).
STRATEGY_CHOICES = f"'auto', a dynconv_jax.plan.Plan or one of {STRATEGIES}"


def is_strategy(strategy) -> bool:
    """Whether ``strategy`` is 'auto', a :class:`~dynconv_jax.plan.Plan` or one of :data:`STRATEGIES`."""
    return isinstance(strategy, plan.Plan) or (
        isinstance(strategy, str) and (strategy == "auto" or strategy in STRATEGIES)
    )


def _local_batch(batch: int) -> int:
    """The per-device batch a strategy runs on under the current mesh (``jax.set_mesh``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or batch % mesh.size:
        return batch
    return batch // mesh.size


def _resolve_strategy(strategy, arrays, *, strides, padding, dilation, groups, precision):
    """``(concrete strategy, arrays)`` for ``strategy`` 'auto' (:func:`choose_strategy`'s rule) or a
    :class:`~dynconv_jax.plan.Plan` (its entry for this problem, else the rule with a warning).

    ``arrays`` maps the names of :func:`dynamic_conv`'s array arguments to arrays or None. Nothing is
    measured here. While :func:`dynconv_jax.autotune.tune` traces, the problem is recorded, and the
    arrays come back through the recording's probe (which notices differentiation)."""
    x, experts = arrays["x"], arrays["experts"]
    rule = choose_strategy(
        x.shape,
        experts.shape,
        strides=strides,
        dilation=dilation,
        groups=groups,
        spatial_attention=arrays["spatial_attention"] is not None,
    )
    recording = plan.recording()
    if not (recording or isinstance(strategy, plan.Plan)):
        return rule, arrays
    present = {name: a for name, a in arrays.items() if a is not None}
    if not all(isinstance(d, int) for a in present.values() for d in a.shape):  # jax.export's symbolic batch
        if isinstance(strategy, plan.Plan):
            plan.warn_missing(f"with symbolic shape {x.shape}", rule)
        return rule, arrays
    attentions = [n for n in present if n not in ("x", "experts")]
    key = plan.problem_key(
        x.shape,
        experts.shape,
        dtype=(x.dtype, experts.dtype),
        strides=strides,
        padding=padding,
        dilation=dilation,
        groups=groups,
        attentions=attentions,
    )
    choice = strategy.strategy_for(key) if isinstance(strategy, plan.Plan) else rule
    if choice is None:
        plan.warn_missing(key, rule)
        choice = rule
    if recording:
        batch = _local_batch(x.shape[0])  # timed as each device runs it
        shapes = tuple(
            (n, a.shape if n in ("experts", "expert_bias") else (batch, *a.shape[1:]), jnp.dtype(a.dtype).name)
            for n, a in present.items()
        )
        static = dict(strides=strides, padding=padding, dilation=dilation, groups=groups, precision=precision)
        probed = recording.observe(key, plan.Problem(shapes, static, rule), present)
        arrays = {**arrays, **probed}
    return choice, arrays


_ARRAY_NAMES = (
    "x",
    "experts",
    "kernel_attention",
    "spatial_attention",
    "channel_attention",
    "filter_attention",
    "expert_bias",
)


def _check_dynamic_conv_args(x, experts, groups: int, strategy) -> None:
    """ValueErrors for experts whose rank or channels do not fit ``x`` and ``groups``, or an unknown strategy."""
    rank = x.ndim - 2
    if experts.ndim != rank + 3:
        raise ValueError(
            f"experts shape {experts.shape} does not match x shape {x.shape}: expected "
            f"[K, *kernel_size ({rank} dims), Cin // groups, Cout]"
        )
    if x.shape[-1] != experts.shape[-2] * groups or experts.shape[-1] % groups:
        raise ValueError(
            f"x has {x.shape[-1]} channels and experts {experts.shape}: with groups={groups} "
            f"expected Cin = groups * experts.shape[-2] and Cout divisible by groups"
        )
    if not is_strategy(strategy):
        raise ValueError(f"strategy={strategy!r}: expected {STRATEGY_CHOICES}")


def _run_strategy(
    strategy: str,
    x,
    experts,
    kernel_attention,
    spatial_attention,
    channel_attention,
    filter_attention,
    expert_bias,
    *,
    strides,
    padding,
    dilation,
    groups: int,
    precision,
):
    """:func:`dynamic_conv` with a concrete ``strategy``: the attentions placed (:func:`attention_placement`),
    the strategy run, then what it left to the activations (filter attention, expert bias)."""
    batch_shape = (x.shape[0],) + (1,) * (x.ndim - 2)
    fold_channel, fold_filter = attention_placement(
        x.shape,
        experts.shape,
        strides=strides,
        padding=padding,
        dilation=dilation,
        strategy=strategy,
        channel_attention=channel_attention is not None,
        filter_attention=filter_attention is not None,
    )
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
    y = _IMPLS[strategy](
        x,
        experts,
        attention,
        spatial,
        folded,
        strides=tuple(strides),
        padding=padding,
        dilation=tuple(dilation),
        groups=groups,
        precision=precision,
    )
    if filter_attention is not None and not fold_filter:
        y = y * filter_attention.reshape(batch_shape + (-1,)).astype(y.dtype)
    if expert_bias is not None and not fuse_bias:
        y = y + bias.reshape(batch_shape + (-1,)).astype(y.dtype)
    return y


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
    strategy: Union[str, "plan.Plan"] = "auto",
    precision=None,
):
    """``y_b = f_b * conv(c_b * x_b, sum_k a[b,k] s_b W_k) + sum_k a[b,k] bias_k``.

    Args:
      x: ``[B, *S, Cin]``.
      experts: ``[K, *k, Cin // groups, Cout]``.
      kernel_attention: ``[B, K]`` (routing weights / expert attention), or None: per-sample kernels (assembled_conv).
      spatial_attention, channel_attention, filter_attention: ``[B, *k]``, ``[B, Cin]`` (scales the input
        channels), ``[B, Cout]`` (scales the output channels), each or None.
      expert_bias: ``[K, Cout]`` or None.
      strides, dilation: tuples, one entry per spatial dimension.
      padding: 'SAME', 'VALID' or explicit pairs (see :func:`normalize_padding`).
      strategy: how the per-sample convolution is computed: one of :data:`STRATEGIES`, 'auto' (the
        fixed rules of :func:`choose_strategy`) or a :class:`~dynconv_jax.plan.Plan` (measured choices).

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
    _check_dynamic_conv_args(x, experts, groups, strategy)
    if strategy == "auto" or isinstance(strategy, plan.Plan):
        arrays = {
            "x": x,
            "experts": experts,
            "kernel_attention": kernel_attention,
            "spatial_attention": spatial_attention,
            "channel_attention": channel_attention,
            "filter_attention": filter_attention,
            "expert_bias": expert_bias,
        }
        strategy, arrays = _resolve_strategy(
            strategy,
            arrays,
            strides=tuple(strides),
            padding=padding,
            dilation=tuple(dilation),
            groups=groups,
            precision=precision,
        )
        x, experts, kernel_attention, spatial_attention, channel_attention, filter_attention, expert_bias = (
            arrays[n] for n in _ARRAY_NAMES
        )
    return _run_strategy(
        strategy,
        x,
        experts,
        kernel_attention,
        spatial_attention,
        channel_attention,
        filter_attention,
        expert_bias,
        strides=strides,
        padding=padding,
        dilation=dilation,
        groups=groups,
        precision=precision,
    )


# --------------------------------------------------------------------------- methods with their own assembly


def im2col(x, kernel_size: Sequence[int], *, strides, padding, dilation):
    """The kernel taps of ``x [B, *S, C]`` stacked: ``[B, *S_out, prod(kernel_size), C]`` (row-major kernel
    order), so that ``conv(x, W)[b, s] = sum_t cols[b, s, t] @ W[t]`` for ``W [prod(k), C, Cout]``."""
    pads = explicit_padding(padding, x.shape[1:-1], tuple(kernel_size), tuple(strides), tuple(dilation))
    return _im2col(x, tuple(kernel_size), tuple(strides), pads, tuple(dilation))[0]


def assembled_conv(
    x,
    assemble,
    kernel_shape,
    *,
    mix=None,
    strides: Sequence[int],
    padding,
    dilation: Sequence[int],
    groups: int = 1,
    strategy: str = "auto",
    precision=None,
):
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
      strategy: 'vmap', 'shifted', 'patches', 'pointwise', 'map' (on the assembled kernels; 'lean' runs as
        'map'), 'mix', or
        'auto': :func:`choose_strategy`'s rule for this kernel shape with the 'mix' choice replaced by the
        per-sample-kernel strategy the rule takes otherwise, and a 'lean' choice by 'map' ('shifted' when
        depthwise), since 'lean' works from experts and attentions (the cost of a method's mixing differs from the
        expert mixing the rule was measured for). Not measured: :mod:`dynconv_jax.autotune` times expert
        problems only.
    """
    kernel_shape = tuple(kernel_shape)
    if strategy == "auto":
        strategy = choose_strategy(
            x.shape,
            (1, *kernel_shape),
            strides=tuple(strides),
            dilation=tuple(dilation),
            groups=groups,
            spatial_attention=False,
        )
        if strategy == "mix":
            backend = jax.default_backend()
            strategy = (
                "map" if backend == "cpu" else "pointwise" if all(k == 1 for k in kernel_shape[:-2]) else "patches"
            )
        elif strategy == "lean":  # 'lean' computes from experts and attentions: kernels made per sample have neither
            depthwise = groups == x.shape[-1] and kernel_shape[-2] == 1
            strategy = "shifted" if depthwise else "map"
    if strategy == "lean":
        raise ValueError("strategy='lean' needs experts and attentions, not kernels assembled per sample: use 'map'")
    if strategy == "mix":
        if mix is None:
            raise ValueError("strategy='mix' needs the method's own output mixing (mix=None)")
        return mix(strides=tuple(strides), padding=padding, dilation=tuple(dilation), precision=precision)
    return dynamic_conv(
        x,
        assemble(),
        None,
        strides=strides,
        padding=padding,
        dilation=dilation,
        groups=groups,
        strategy=strategy,
        precision=precision,
    )
