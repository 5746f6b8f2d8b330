"""ODConv: omni-dimensional dynamic convolution (Li, Zhou, Yao; ICLR 2022), as the official OSVAI/ODConv.

Per sample ``b``, with ``h_b = relu(bn(fc(GAP(x))))_b`` (``[A]``, BN over the batch; a LayerNorm or
nothing instead of the BN with ``attention_norm='layer'`` / ``'none'``):
channel ``c_b = sigmoid(channel_fc(h_b)/T)`` ``[I]``, filter ``f_b = sigmoid(filter_fc(h_b)/T)`` ``[O]``,
spatial ``s_b = sigmoid(spatial_fc(h_b)/T)`` ``[*k]``, kernel ``a_b = softmax(kernel_fc(h_b)/T)`` ``[K]``;
``y_b = f_b * conv(c_b * x_b, sum_k a_b[k] s_b W_k)``. As the official code: no bias; the filter
attention is skipped (1) for depthwise convs (in == groups == out), the spatial one for 1x1
kernels, the kernel one for K == 1. Initialisation: kaiming_normal (fan_out, relu) for the experts
(one by one) and the attention layers, zero attention biases, BN bias 0 and BN scale
``attention_bn_init`` (0.1; the official code's 1.0 is ``attention_bn_init=1.0``): with scale 1
the attention logits are O(1) before the division by T, and at T = 1 the initial gradient through
the attention explodes (docs/training.md).
"""

from __future__ import annotations

import math
from typing import Tuple

from flax import linen as nn
from flax.typing import Dtype, Initializer, PrecisionLike

from dynconv_jax import attention
from dynconv_jax.conv_base import DynamicConvBase, layer_name
from dynconv_jax.initializers import kaiming_fan_out_dense_init, kaiming_fan_out_expert_init
from dynconv_jax.norm import BatchNorm, LayerNorm
from dynconv_spec import check_attention_norm


class ODConvAttention(nn.Module):
    """``pooled [B, I] -> (channel [B, I], filter [B, O] | None, spatial [B, *k] | None, kernel [B, K])``.

    Attributes:
      in_channels: I.
      out_channels: O.
      kernel_size: the layer's kernel shape ``k``.
      groups: the layer's feature groups (a depthwise layer has no filter attention).
      num_experts: K.
      width: A, the width of the hidden vector ``h``.
      norm: the normalisation of ``h``: 'batch', 'layer' or 'none' (:data:`dynconv_spec.ATTENTION_NORMS`).
      bn_init: initial scale of that normalisation.
      dtype: the dtype of the computation.
      param_dtype: the dtype of the parameters.
      precision: numerical precision of the dense layers.
    """

    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    groups: int
    num_experts: int
    width: int
    norm: str
    bn_init: float
    dtype: Dtype
    param_dtype: Dtype
    precision: PrecisionLike

    @nn.compact
    def __call__(self, pooled, train: bool, temperature):
        def dense(n, name, use_bias=True):
            return nn.Dense(
                n,
                use_bias=use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=kaiming_fan_out_dense_init,
                bias_init=nn.initializers.zeros,
                name=name,
            )

        heads = attention.odconv_heads(
            self.in_channels, self.out_channels, self.groups, self.kernel_size, self.num_experts
        )
        scale_init = nn.initializers.constant(self.bn_init)
        if self.norm == "batch":
            norm = BatchNorm(
                use_running_average=not train,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                scale_init=scale_init,
                name="bn",
            )
        elif self.norm == "layer":
            norm = LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, scale_init=scale_init, name="ln")
        else:
            norm = None
        return attention.odconv_attention(
            pooled,
            dense(self.width, "fc", use_bias=False),
            norm,
            dense(self.in_channels, "channel_fc"),
            dense(self.out_channels, "filter_fc") if heads.filter else None,
            dense(math.prod(self.kernel_size), "spatial_fc") if heads.spatial else None,
            dense(self.num_experts, "kernel_fc") if heads.kernel else None,
            self.kernel_size,
            temperature,
        )


class ODConv(DynamicConvBase):
    """ODConv layer (no bias), channels-last, 1-D/2-D/3-D (rank = ``len(kernel_size)``).

    Params: ``kernel [K, *k, I/g, O]``, ``attention/fc/kernel [I, A]``, ``attention/bn/{scale, bias}``
    (batch_stats ``attention/bn/{mean, var}``), ``attention/{channel,filter,spatial,kernel}_fc/
    {kernel [A, n], bias [n]}`` with n = I, O, prod(k), K and ``A = max(int(I * reduction), min_channels)``;
    skipped attentions have no params.
    Sows ``intermediates/`` ``kernel_attention [B, K]`` (ones for K == 1), ``channel_attention [B, I]``,
    ``filter_attention [B, O]`` and ``spatial_attention [B, *k]`` (the last two only when not skipped).

    Attributes:
      reduction: attention width ratio, ``A = max(int(I * reduction), min_channels)``.
      min_channels: smallest attention width.
      attention_norm: normalisation of the attention's hidden vector: ``'batch'`` (the official
        BatchNorm, parameters above), ``'layer'`` (a LayerNorm over A, per sample: params
        ``attention/ln/{scale, bias}``, no ``batch_stats``) or ``'none'`` (``h = relu(fc(pooled))``,
        no normalisation parameters). Only ``'batch'`` loads official checkpoints
        (docs/training.md compares them).
      attention_bn_init: initial scale (γ) of the attention normalisation (BatchNorm or LayerNorm;
        unused with ``'none'``); 0.1 by default, 1.0 is the official OSVAI/ODConv init (whose
        initial gradient explodes at T = 1, docs/training.md). Only the initial value: same
        parameters and forward pass. Must be > 0.

    Training (``train=True``) with ``attention_norm='batch'`` normalises the attention with batch
    statistics (needs a batch of at least 2, as PyTorch) and updates ``batch_stats``: pass
    ``mutable=['batch_stats']``. ``'layer'`` and ``'none'`` train with any batch size.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import ODConv
      >>> layer = ODConv(features=8, kernel_size=(3, 3), num_experts=3)
      >>> x = jnp.ones((2, 16, 16, 4))
      >>> variables = jax.eval_shape(layer.init, jax.random.key(0), x)
      >>> sorted(variables), sorted(variables['params']['attention'])     # the official names
      (['batch_stats', 'params'], ['bn', 'channel_fc', 'fc', 'filter_fc', 'kernel_fc', 'spatial_fc'])
      >>> y, updates = jax.eval_shape(lambda v: layer.apply(v, x, train=True, mutable=['batch_stats']), variables)
      >>> y.shape
      (2, 16, 16, 8)
    """

    kernel_init: Initializer = kaiming_fan_out_expert_init
    reduction: float = 0.0625
    min_channels: int = 16
    attention_norm: str = "batch"
    attention_bn_init: float = 0.1

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        """``x [B, *S, I] -> [B, *S_out, O]``; ``temperature`` scalar (may be traced), None = 1."""
        layer = layer_name(self)
        geometry, in_channels, experts, dtype = self.experts(x)
        check_attention_norm(layer, self.attention_norm, self.attention_bn_init)
        if train and self.attention_norm == "batch" and not self.is_initializing():
            attention.check_odconv_train_batch(layer, x.shape[0])
        attn_dtype = attention.attention_dtype(dtype)
        temperature = attention.temperature_scalar(temperature, layer, attn_dtype)
        pooled = attention.global_avg_pool(x, attn_dtype)  # [B, I]
        channel, filter_, spatial, kernel = ODConvAttention(
            in_channels=in_channels,
            out_channels=self.features,
            kernel_size=geometry.kernel_size,
            groups=geometry.groups,
            num_experts=self.num_experts,
            width=attention.attention_width(in_channels, self.reduction, self.min_channels, layer),
            norm=self.attention_norm,
            bn_init=self.attention_bn_init,
            dtype=attn_dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name="attention",
        )(pooled, train, temperature)
        self.sow("intermediates", "kernel_attention", kernel)
        self.sow("intermediates", "channel_attention", channel)
        if filter_ is not None:
            self.sow("intermediates", "filter_attention", filter_)
        if spatial is not None:
            self.sow("intermediates", "spatial_attention", spatial)
        return self.convolve_experts(
            x,
            experts,
            geometry,
            dtype,
            kernel,
            spatial_attention=spatial,
            channel_attention=channel,
            filter_attention=filter_,
        )
