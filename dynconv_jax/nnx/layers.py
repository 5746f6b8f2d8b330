"""CondConv, DynamicConv, ODConv and the PyTorch-semantics BatchNorm as ``flax.nnx`` Modules.

The same layers as :mod:`dynconv_jax` (Linen) on the same core: validation, attention heads,
initializers, kernel aggregation and the per-sample convolution are the functions of
:mod:`dynconv_jax.conv_base`, :mod:`dynconv_jax.attention`, :mod:`dynconv_jax.initializers`,
:mod:`dynconv_jax.norm` and :mod:`dynconv_jax.ops` that the Linen layers call. Parameters are created eagerly (NNX style) with the Linen layers' shapes, names and
initializers, so ``nnx.state(layer, nnx.Param)`` has the paths of the Linen ``params`` tree and
``nnx.state(layer, nnx.BatchStat)`` those of ``batch_stats`` (see :mod:`dynconv_jax.nnx.convert`).

Training vs inference follows NNX's convention: ``layer.train()`` / ``layer.eval()`` (or
``nnx.view``) set ``use_running_average`` of ODConv's attention BatchNorm and ``deterministic``
of CondConv's routing dropout. As ``nnx.BatchNorm`` and ``nnx.Dropout``, a new layer is in
training mode. Attentions are sown as ``nnx.Intermediate`` while the call runs under
``nnx.capture(..., nnx.Intermediate)`` (the NNX counterpart of Linen's ``mutable=['intermediates']``);
a plain call records nothing.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer, PrecisionLike

from dynconv_jax import attention, conv_base, ops
from dynconv_jax._compat import nnx_capturing
from dynconv_jax.initializers import (
    expert_bias_init,
    kaiming_fan_out_dense_init,
    kaiming_fan_out_expert_init,
    torch_default_bias_init,
    torch_default_dense_init,
    torch_default_expert_init,
)
from dynconv_jax.norm import TORCH_BATCH_NORM_MOMENTUM, batch_norm, check_batch_norm_args, layer_norm
from dynconv_spec import check_attention_norm, check_expert_bank

__all__ = ["BatchNorm", "CondConv", "DynamicConv", "LayerNorm", "ODConv"]


def _sow(module: nnx.Module, name: str, value) -> None:
    """Sow ``value`` as ``nnx.Intermediate`` only while an ``nnx.capture`` collects it.

    Outside a capture, ``Module.sow`` would store (and keep appending to) a module attribute on
    every call, which flax deprecates; Linen's layers likewise record only when asked
    (``mutable=['intermediates']``). Whether a capture runs: :func:`dynconv_jax._compat.nnx_capturing`.
    """
    if nnx_capturing(module):
        module.sow(nnx.Intermediate, name, value)


class BatchNorm(nnx.Module):
    """PyTorch-semantics BatchNorm over all axes but ``axis`` (as :class:`dynconv_jax.norm.BatchNorm`).

    State: params ``scale``, ``bias`` ``[num_features]``; batch stats ``mean``, ``var`` (running
    statistics, updated with PyTorch's momentum and the unbiased batch variance in training).
    Unlike ``flax.nnx.BatchNorm`` there is no ``momentum``: ``torch_momentum`` has PyTorch's meaning
    (``momentum=`` raises a ``TypeError`` explaining both).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from dynconv_jax.nnx import BatchNorm
    >>> bn = BatchNorm(3, rngs=nnx.Rngs(0))  # training mode, as a new nnx.BatchNorm
    >>> y = bn(jnp.arange(12.0).reshape(4, 3))
    >>> bn.mean[...].tolist()  # 0.9 * 0 + 0.1 * the batch mean
    [0.45000001788139343, 0.550000011920929, 0.6500000357627869]

    Attributes:
      num_features: channels (size of ``axis``).
      use_running_average: normalise with the running statistics (inference) instead of the
        batch statistics (training); set by ``train()`` / ``eval()``.
      axis: the feature (channel) axis.
      torch_momentum: PyTorch's ``momentum``: the weight of the new batch statistic in the running
        average (0.1; flax's ``momentum=m`` is ``torch_momentum=1 - m``).
      epsilon: added to the variance.
      dtype: output dtype (default: promoted from input and params).
      param_dtype: dtype of ``scale``/``bias`` and of the running statistics.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dynconv_jax.nnx import BatchNorm
      >>> bn = BatchNorm(2, rngs=nnx.Rngs(0))
      >>> y = bn(jnp.arange(8.0).reshape(4, 2))      # training mode: normalised with the batch statistics
      >>> bn.var[...]                                # 0.9 * 1 + 0.1 * the unbiased batch variance
      Array([1.5666666, 1.5666666], dtype=float32)
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        axis: int = -1,
        torch_momentum: float = TORCH_BATCH_NORM_MOMENTUM,
        epsilon: float = 1e-5,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Initializer = jax.nn.initializers.zeros,
        scale_init: Initializer = jax.nn.initializers.ones,
        rngs: nnx.Rngs,
        momentum: None = None,
    ):
        check_batch_norm_args("BatchNorm", torch_momentum, momentum)  # momentum= is refused, with the reason
        shape = (num_features,)
        self.mean = nnx.BatchStat(jnp.zeros(shape, param_dtype))
        self.var = nnx.BatchStat(jnp.ones(shape, param_dtype))
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype)) if use_scale else nnx.data(None)
        self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias else nnx.data(None)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.torch_momentum = torch_momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype

    def set_view(self, use_running_average: Optional[bool] = None):
        """Used by ``nnx.view``: switch between batch and running statistics."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x, use_running_average: Optional[bool] = None):
        """Normalise ``x``; in training, update the running statistics."""
        use_running_average = self.use_running_average if use_running_average is None else use_running_average
        y, new_mean, new_var = batch_norm(
            x,
            None if self.scale is None else self.scale[...],
            None if self.bias is None else self.bias[...],
            self.mean[...],
            self.var[...],
            use_running_average=use_running_average,
            axis=self.axis,
            torch_momentum=self.torch_momentum,
            epsilon=self.epsilon,
            dtype=self.dtype,
            layer="BatchNorm",
        )
        if new_mean is not None:
            self.mean[...], self.var[...] = new_mean, new_var
        return y


class LayerNorm(nnx.Module):
    """PyTorch-semantics LayerNorm over the last axis (as :class:`dynconv_jax.norm.LayerNorm`).

    State: params ``scale``, ``bias`` ``[num_features]``.

    Attributes:
      num_features: size of the last axis.
      epsilon: added to the variance.
      dtype: output dtype (default: promoted from input and params).
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-5,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        scale_init: Initializer = jax.nn.initializers.ones,
        rngs: nnx.Rngs,
    ):
        shape = (num_features,)
        self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros(shape, param_dtype))
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x):
        return layer_norm(x, self.scale[...], self.bias[...], epsilon=self.epsilon, dtype=self.dtype)


def _linear(
    in_features: int,
    out_features: int,
    *,
    dtype: Optional[Dtype],
    param_dtype: Dtype,
    precision: PrecisionLike,
    kernel_init: Initializer,
    bias_init: Initializer,
    rngs: nnx.Rngs,
    use_bias: bool = True,
) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_init=kernel_init,
        bias_init=bias_init,
        rngs=rngs,
    )


def _attention_dtype(dtype):
    """The attention branch's compute dtype: None (promoted from input and params, at least float32
    since the pooled input is) or at least float32 of an explicit ``dtype`` (the Linen layers' rule)."""
    return None if dtype is None else attention.attention_dtype(dtype)


class DynamicConvBase(nnx.Module):
    """Constructor fields and plumbing shared by the three NNX layers (``flax.nnx.Conv``'s fields)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Union[int, Sequence[int]],
        strides: Union[int, Sequence[int]] = 1,
        *,
        padding: ops.PaddingLike = "SAME",
        kernel_dilation: Union[int, Sequence[int]] = 1,
        feature_group_count: int = 1,
        use_bias: bool,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer,
        bias_init: Optional[Initializer],
        num_experts: int = 4,
        strategy: str = "auto",
        rngs: nnx.Rngs,
    ):
        layer = (
            f"{type(self).__name__}(in_features={in_features!r}, out_features={out_features!r}, "
            f"kernel_size={kernel_size!r})"
        )
        geometry = conv_base.validate_conv_config(
            layer,
            features=out_features,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            num_experts=num_experts,
            strategy=strategy,
            dtype=dtype,
            param_dtype=param_dtype,
            features_arg="out_features",
        )
        if not (isinstance(in_features, int) and not isinstance(in_features, bool) and in_features >= 1):
            raise ValueError(f"{layer}: in_features={in_features!r} must be a positive int")
        if in_features % feature_group_count:
            raise ValueError(
                f"{layer}: feature_group_count={feature_group_count} does not divide in_features={in_features}"
            )
        self.layer = layer
        self.geometry = geometry
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = geometry.kernel_size
        self.strides = geometry.strides
        self.padding = geometry.padding
        self.kernel_dilation = geometry.dilation
        self.feature_group_count = feature_group_count
        self.use_bias = use_bias
        self.num_experts = num_experts
        self.strategy = strategy
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        check_expert_bank(layer, geometry.expert_shape(in_features))
        self.kernel = nnx.Param(kernel_init(rngs.params(), geometry.expert_shape(in_features), param_dtype))
        if use_bias:
            init = expert_bias_init(bias_init, geometry.fan_in(in_features))
            self.bias = nnx.Param(init(rngs.params(), (num_experts, out_features), param_dtype))
        else:
            self.bias = nnx.data(None)

    def _check(self, x):
        """Validate the input ``[B, *S, in_features]``; returns ``(experts, compute dtype, attention dtype)``."""
        in_channels = conv_base.check_input(self.layer, x, self.geometry)
        if in_channels != self.in_features:
            raise ValueError(
                f"{self.layer}: input shape {tuple(x.shape)} has {in_channels} channels, but the layer "
                f"was built with in_features={self.in_features}"
            )
        experts = self.kernel[...]
        dtype = conv_base.compute_dtype(x, experts, self.dtype)
        return experts, dtype, attention.attention_dtype(dtype)

    def _convolve(self, x, experts, dtype, kernel_attention, **attentions):
        bias = None if self.bias is None else self.bias[...]
        return conv_base.convolve(
            x,
            experts,
            self.geometry,
            dtype,
            kernel_attention,
            expert_bias=bias,
            strategy=self.strategy,
            precision=self.precision,
            **attentions,
        )


class CondConv(DynamicConvBase):
    """CondConv (Yang et al., NeurIPS 2019) as an NNX Module, channels-last, 1-D/2-D/3-D.

    State: ``kernel [K, *k, I/g, O]``, ``bias [K, O]`` (if ``use_bias``),
    ``routing_fn/{kernel [I, K], bias [K]}`` (absent with ``external_routing``): the Linen
    :class:`dynconv_jax.CondConv` tree. Sows ``kernel_attention [B, K]``.

    Attributes (beyond ``flax.nnx.Conv``'s, ``num_experts`` and ``strategy``):
      use_bias: per-expert bias, mixed with the routing weights.
      bias_init: initializer of the ``[K, O]`` bias; None = PyTorch's U(±1/sqrt(fan_in)).
      routing_dropout: dropout rate on the pooled input of the routing function in training
        (the ``dropout`` stream of ``rngs``, or its default stream).
      external_routing: take the routing weights ``[B, K]`` from the caller.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dynconv_jax.nnx import CondConv
      >>> layer = CondConv(4, 8, (3, 3), num_experts=3, rngs=nnx.Rngs(0))  # as nnx.Conv(in, out, kernel_size)
      >>> layer.kernel[...].shape
      (3, 3, 3, 4, 8)
      >>> layer(jnp.ones((2, 8, 8, 4))).shape
      (2, 8, 8, 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Union[int, Sequence[int]],
        strides: Union[int, Sequence[int]] = 1,
        *,
        padding: ops.PaddingLike = "SAME",
        kernel_dilation: Union[int, Sequence[int]] = 1,
        feature_group_count: int = 1,
        use_bias: bool = False,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = torch_default_expert_init,
        bias_init: Optional[Initializer] = None,
        num_experts: int = 4,
        strategy: str = "auto",
        routing_dropout: float = 0.0,
        external_routing: bool = False,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_features,
            out_features,
            kernel_size,
            strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            bias_init=bias_init,
            num_experts=num_experts,
            strategy=strategy,
            rngs=rngs,
        )
        attention.check_routing_dropout(self.layer, routing_dropout)
        self.routing_dropout = routing_dropout
        self.external_routing = external_routing
        if external_routing:
            self.routing_fn = nnx.data(None)
        else:
            self.routing_fn = _linear(
                in_features,
                num_experts,
                dtype=_attention_dtype(dtype),
                param_dtype=param_dtype,
                precision=precision,
                kernel_init=torch_default_dense_init,
                bias_init=torch_default_bias_init(in_features),
                rngs=rngs,
            )
        self.dropout = nnx.Dropout(routing_dropout, rngs=rngs if routing_dropout > 0 else None)

    def __call__(self, x, temperature=None, routing_weights=None):
        """``x [B, *S, I] -> [B, *S_out, O]``; ``temperature`` scalar (may be traced), None = 1.

        ``routing_weights [B, K]`` is required iff ``external_routing`` (then ``temperature`` is unused).
        """
        experts, dtype, attn_dtype = self._check(x)
        weights = attention.external_routing_weights(
            self.layer, self.external_routing, routing_weights, x.shape[0], self.num_experts, attn_dtype
        )
        if weights is None:
            temperature = attention.temperature_scalar(temperature, self.layer, attn_dtype)
            pooled = attention.global_avg_pool(x, attn_dtype)  # [B, I]
            weights = attention.condconv_routing(pooled, self.routing_fn, self.dropout, temperature)  # [B, K]
        _sow(self, "kernel_attention", weights)
        return self._convolve(x, experts, dtype, weights)


class DynamicConvAttention(nnx.Module):
    """``[B, I] -> [B, K]``: softmax(fc2(relu(fc1(.))) / T) with PyTorch ``nn.Linear`` init."""

    def __init__(
        self,
        in_features: int,
        hidden: int,
        num_experts: int,
        *,
        dtype: Optional[Dtype],
        param_dtype: Dtype,
        precision: PrecisionLike,
        rngs: nnx.Rngs,
    ):
        def linear(n_in, n_out):
            return _linear(
                n_in,
                n_out,
                dtype=dtype,
                param_dtype=param_dtype,
                precision=precision,
                kernel_init=torch_default_dense_init,
                bias_init=torch_default_bias_init(n_in),
                rngs=rngs,
            )

        self.fc1 = linear(in_features, hidden)
        self.fc2 = linear(hidden, num_experts)

    def __call__(self, pooled, temperature):
        return attention.dynamic_attention(pooled, self.fc1, self.fc2, temperature)


class DynamicConv(DynamicConvBase):
    """DynamicConv / DY-CNN (Chen et al., CVPR 2020) as an NNX Module, channels-last, 1-D/2-D/3-D.

    State: ``kernel [K, *k, I/g, O]``, ``bias [K, O]`` (if ``use_bias``),
    ``attention/fc1/{kernel [I, H], bias [H]}``, ``attention/fc2/{kernel [H, K], bias [K]}`` with
    ``H = max(int(I * reduction), min_channels)``: the Linen :class:`dynconv_jax.DynamicConv` tree.
    Sows ``kernel_attention [B, K]``. Behaves the same in training and inference.

    Attributes (beyond ``flax.nnx.Conv``'s, ``num_experts`` and ``strategy``):
      use_bias: per-expert bias, mixed with the attention (default True, as the paper).
      bias_init: initializer of the ``[K, O]`` bias; None = PyTorch's U(±1/sqrt(fan_in)).
      reduction, min_channels: hidden width of the attention MLP.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dynconv_jax.nnx import DynamicConv
      >>> layer = DynamicConv(4, 8, (3, 3), num_experts=3, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 8, 8, 4)), temperature=30.0).shape
      (2, 8, 8, 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Union[int, Sequence[int]],
        strides: Union[int, Sequence[int]] = 1,
        *,
        padding: ops.PaddingLike = "SAME",
        kernel_dilation: Union[int, Sequence[int]] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = torch_default_expert_init,
        bias_init: Optional[Initializer] = None,
        num_experts: int = 4,
        strategy: str = "auto",
        reduction: float = 0.25,
        min_channels: int = 4,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_features,
            out_features,
            kernel_size,
            strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            bias_init=bias_init,
            num_experts=num_experts,
            strategy=strategy,
            rngs=rngs,
        )
        self.reduction = reduction
        self.min_channels = min_channels
        hidden = attention.attention_width(in_features, reduction, min_channels, self.layer)
        self.attention = DynamicConvAttention(
            in_features,
            hidden,
            num_experts,
            dtype=_attention_dtype(dtype),
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )

    def __call__(self, x, temperature=None):
        """``x [B, *S, I] -> [B, *S_out, O]``; ``temperature`` scalar (may be traced), None = 1."""
        experts, dtype, attn_dtype = self._check(x)
        temperature = attention.temperature_scalar(temperature, self.layer, attn_dtype)
        pooled = attention.global_avg_pool(x, attn_dtype)  # [B, I]
        kernel_attention = self.attention(pooled, temperature)  # [B, K]
        _sow(self, "kernel_attention", kernel_attention)
        return self._convolve(x, experts, dtype, kernel_attention)


class ODConvAttention(nnx.Module):
    """``pooled [B, I] -> (channel [B, I], filter [B, O] | None, spatial [B, *k] | None, kernel [B, K])``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        groups: int,
        num_experts: int,
        width: int,
        norm: str,
        bn_init: float,
        *,
        dtype: Optional[Dtype],
        param_dtype: Dtype,
        precision: PrecisionLike,
        rngs: nnx.Rngs,
    ):
        def linear(n_in, n_out, use_bias=True):
            return _linear(
                n_in,
                n_out,
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                precision=precision,
                kernel_init=kaiming_fan_out_dense_init,
                bias_init=jax.nn.initializers.zeros,
                rngs=rngs,
            )

        heads = attention.odconv_heads(in_features, out_features, groups, kernel_size, num_experts)
        self.kernel_size = tuple(kernel_size)
        self.fc = linear(in_features, width, use_bias=False)
        scale_init = jax.nn.initializers.constant(bn_init)
        if norm == "batch":
            self.bn = BatchNorm(width, dtype=dtype, param_dtype=param_dtype, scale_init=scale_init, rngs=rngs)
        elif norm == "layer":
            self.ln = LayerNorm(width, dtype=dtype, param_dtype=param_dtype, scale_init=scale_init, rngs=rngs)
        self.norm = {"batch": "bn", "layer": "ln"}.get(norm)  # attribute name of the normalisation, None: none
        self.channel_fc = linear(width, in_features)
        self.filter_fc = linear(width, out_features) if heads.filter else nnx.data(None)
        self.spatial_fc = linear(width, math.prod(kernel_size)) if heads.spatial else nnx.data(None)
        self.kernel_fc = linear(width, num_experts) if heads.kernel else nnx.data(None)

    def __call__(self, pooled, temperature):
        norm = None if self.norm is None else getattr(self, self.norm)
        return attention.odconv_attention(
            pooled,
            self.fc,
            norm,
            self.channel_fc,
            self.filter_fc,
            self.spatial_fc,
            self.kernel_fc,
            self.kernel_size,
            temperature,
        )


class ODConv(DynamicConvBase):
    """ODConv (Li et al., ICLR 2022; the official OSVAI/ODConv layer) as an NNX Module, no bias.

    State: ``kernel [K, *k, I/g, O]``, ``attention/fc/kernel [I, A]``, ``attention/bn/{scale, bias}``
    (params) and ``attention/bn/{mean, var}`` (``nnx.BatchStat``),
    ``attention/{channel,filter,spatial,kernel}_fc/{kernel [A, n], bias [n]}`` with n = I, O,
    prod(k), K and ``A = max(int(I * reduction), min_channels)``; skipped attentions (depthwise: no
    filter, 1x1: no spatial, K == 1: no kernel attention) have none: the Linen
    :class:`dynconv_jax.ODConv` tree. Sows ``kernel_attention [B, K]`` (ones for K == 1),
    ``channel_attention [B, I]`` and, when not skipped, ``filter_attention [B, O]``,
    ``spatial_attention [B, *k]``.

    In training mode (``train()``, the default of a new layer) the attention BatchNorm
    (``attention_norm='batch'``) normalises with batch statistics (needs a batch of at least 2, as
    PyTorch) and the running statistics update; ``eval()`` uses the running statistics.

    Attributes (beyond ``flax.nnx.Conv``'s, ``num_experts`` and ``strategy``):
      reduction, min_channels: attention width A.
      attention_norm: ``'batch'`` (official BatchNorm), ``'layer'`` (LayerNorm ``attention/ln``, any
        batch size) or ``'none'``, as the Linen :class:`dynconv_jax.ODConv`.
      attention_bn_init: initial scale (γ) of the attention normalisation; 0.1 by default, 1.0 is the
        official code's init (see the Linen :class:`dynconv_jax.ODConv` and docs/training.md).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dynconv_jax.nnx import ODConv
      >>> layer = ODConv(4, 8, (3, 3), num_experts=3, rngs=nnx.Rngs(0))
      >>> y = layer(jnp.ones((2, 8, 8, 4)), temperature=30.0)   # training mode: batch statistics
      >>> layer.eval()                                          # running statistics from now on
      >>> y, inter = nnx.capture(layer, nnx.Intermediate)(jnp.ones((2, 8, 8, 4)))
      >>> inter['kernel_attention'][0].shape                    # [B, K]
      (2, 3)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Union[int, Sequence[int]],
        strides: Union[int, Sequence[int]] = 1,
        *,
        padding: ops.PaddingLike = "SAME",
        kernel_dilation: Union[int, Sequence[int]] = 1,
        feature_group_count: int = 1,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = kaiming_fan_out_expert_init,
        num_experts: int = 4,
        strategy: str = "auto",
        reduction: float = 0.0625,
        min_channels: int = 16,
        attention_norm: str = "batch",
        attention_bn_init: float = 0.1,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_features,
            out_features,
            kernel_size,
            strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            bias_init=None,
            num_experts=num_experts,
            strategy=strategy,
            rngs=rngs,
        )
        self.reduction = reduction
        self.min_channels = min_channels
        check_attention_norm(self.layer, attention_norm, attention_bn_init)
        self.attention_norm = attention_norm
        self.attention_bn_init = attention_bn_init
        width = attention.attention_width(in_features, reduction, min_channels, self.layer)
        self.attention = ODConvAttention(
            in_features,
            out_features,
            self.kernel_size,
            feature_group_count,
            num_experts,
            width,
            attention_norm,
            attention_bn_init,
            dtype=_attention_dtype(dtype),
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )

    def __call__(self, x, temperature=None):
        """``x [B, *S, I] -> [B, *S_out, O]``; ``temperature`` scalar (may be traced), None = 1."""
        experts, dtype, attn_dtype = self._check(x)
        if self.attention_norm == "batch" and not self.attention.bn.use_running_average:
            attention.check_odconv_train_batch(self.layer, x.shape[0])
        temperature = attention.temperature_scalar(temperature, self.layer, attn_dtype)
        pooled = attention.global_avg_pool(x, attn_dtype)  # [B, I]
        channel, filter_, spatial, kernel = self.attention(pooled, temperature)
        _sow(self, "kernel_attention", kernel)
        _sow(self, "channel_attention", channel)
        if filter_ is not None:
            _sow(self, "filter_attention", filter_)
        if spatial is not None:
            _sow(self, "spatial_attention", spatial)
        return self._convolve(
            x, experts, dtype, kernel, spatial_attention=spatial, channel_attention=channel, filter_attention=filter_
        )
