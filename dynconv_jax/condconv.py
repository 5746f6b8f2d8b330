"""CondConv: conditionally parameterized convolution (Yang et al., NeurIPS 2019, arXiv 1904.04971).

Per sample ``b``: ``r_b = sigmoid(routing_fn(dropout(GAP(x_b))) / T)`` (``[K]``, independent
sigmoids, not a softmax), ``W_b = sum_k r_b[k] W_k``, ``y_b = conv(x_b, W_b) (+ sum_k r_b[k] bias_k)``.
Layout and initialisation follow timm's ``CondConv2d`` (experts initialised one by one with
PyTorch's conv default) with the routing ``nn.Linear(in, K)`` of timm's CondConv blocks.
"""

from __future__ import annotations

from typing import Optional

from flax import linen as nn
from flax.typing import Initializer

from dynconv_jax import attention
from dynconv_jax.conv_base import DynamicConvBase, layer_name
from dynconv_jax.initializers import torch_default_bias_init, torch_default_dense_init


class CondConv(DynamicConvBase):
    """CondConv layer, channels-last, 1-D/2-D/3-D (rank = ``len(kernel_size)``).

    Params: ``kernel [K, *k, I/g, O]``, ``bias [K, O]`` (if ``use_bias``),
    ``routing_fn/{kernel [I, K], bias [K]}`` (absent with ``external_routing``).
    Sows ``intermediates/kernel_attention [B, K]`` (the routing weights).

    Attributes (beyond :class:`~dynconv_jax.conv_base.DynamicConvBase`'s flax.linen.Conv fields,
    ``num_experts`` and ``strategy``):
      use_bias: per-expert bias, mixed with the routing weights.
      bias_init: initializer of the ``[K, O]`` bias; None = PyTorch's U(±1/sqrt(fan_in)).
      routing_dropout: dropout rate on the pooled input of the routing function in
        training (needs ``rngs={'dropout': key}`` when > 0).
      external_routing: take the routing weights ``[B, K]`` from the caller (timm's
        ``CondConv2d.forward(x, routing_weights)``) instead of computing them.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import CondConv
      >>> layer = CondConv(features=8, kernel_size=(3, 3), num_experts=3)
      >>> x = jnp.ones((2, 16, 16, 4))
      >>> variables = jax.eval_shape(layer.init, jax.random.key(0), x)  # shapes only: nothing computed
      >>> variables['params']['kernel'].shape                          # [K, kh, kw, I, O]
      (3, 3, 3, 4, 8)
      >>> jax.eval_shape(layer.apply, variables, x).shape
      (2, 16, 16, 8)
    """

    use_bias: bool = False
    bias_init: Optional[Initializer] = None
    routing_dropout: float = 0.0
    external_routing: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None, routing_weights=None):
        """``x [B, *S, I] -> [B, *S_out, O]``.

        ``temperature`` (scalar, may be traced; None = 1) divides the routing logits;
        it is unused with external routing. ``routing_weights [B, K]`` is required iff
        ``external_routing``.
        """
        layer = layer_name(self)
        attention.check_routing_dropout(layer, self.routing_dropout)
        geometry, in_channels, experts, dtype = self.experts(x)
        bias = self.expert_bias(geometry, in_channels, self.bias_init) if self.use_bias else None

        attn_dtype = attention.attention_dtype(dtype)
        weights = attention.external_routing_weights(
            layer, self.external_routing, routing_weights, x.shape[0], self.num_experts, attn_dtype
        )
        if weights is None:
            temperature = attention.temperature_scalar(temperature, layer, attn_dtype)
            pooled = attention.global_avg_pool(x, attn_dtype)  # [B, I]
            routing_fn = nn.Dense(
                self.num_experts,
                dtype=attn_dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=torch_default_dense_init,
                bias_init=torch_default_bias_init(in_channels),
                name="routing_fn",
            )
            dropout = nn.Dropout(self.routing_dropout, deterministic=not train)
            weights = attention.condconv_routing(pooled, routing_fn, dropout, temperature)  # [B, K]
        self.sow("intermediates", "kernel_attention", weights)
        return self.convolve_experts(x, experts, geometry, dtype, weights, expert_bias=bias)
