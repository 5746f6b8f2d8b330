"""CondConv: conditionally parameterized convolution (Yang et al., NeurIPS 2019, arXiv 1904.04971).

Per sample ``b``: ``r_b = sigmoid(routing_fn(dropout(GAP(x_b))) / T)`` (``[K]``, independent
sigmoids, not a softmax), ``W_b = sum_k r_b[k] W_k``, ``y_b = conv(x_b, W_b) (+ sum_k r_b[k] bias_k)``.
Layout and initialisation follow timm's ``CondConv2d`` (experts initialised one by one with
PyTorch's conv default) with the routing ``nn.Linear(in, K)`` of timm's CondConv blocks.
"""
from __future__ import annotations

from typing import Optional

from flax import linen as nn

from dynconv_jax import routing


class CondConv(routing.DynamicConvBase):
    """CondConv layer, channels-last, 1-D/2-D/3-D (rank = ``len(kernel_size)``).

    Params: ``kernel [K, *k, I/g, O]``, ``bias [K, O]`` (if ``use_bias``),
    ``routing_fn/{kernel [I, K], bias [K]}`` (absent with ``external_routing``).
    Sows ``intermediates/kernel_attention [B, K]`` (the routing weights).

    Attributes (beyond :class:`~dynconv_jax.routing.DynamicConvBase`'s flax.linen.Conv fields,
    ``num_experts`` and ``strategy``):
      use_bias: per-expert bias, mixed with the routing weights.
      bias_init: initializer of the ``[K, O]`` bias; None = PyTorch's U(±1/sqrt(fan_in)).
      routing_dropout: dropout rate on the pooled input of the routing function in
        training (needs ``rngs={'dropout': key}`` when > 0).
      external_routing: take the routing weights ``[B, K]`` from the caller (timm's
        ``CondConv2d.forward(x, routing_weights)``) instead of computing them.
    """

    use_bias: bool = False
    bias_init: Optional[routing.Initializer] = None
    routing_dropout: float = 0.0
    external_routing: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None, routing_weights=None):
        """``x [B, *S, I] -> [B, *S_out, O]``.

        ``temperature`` (scalar, may be traced; None = 1) divides the routing logits;
        it is unused with external routing. ``routing_weights [B, K]`` is required iff
        ``external_routing``.
        """
        layer = routing.layer_name(self)
        if not 0.0 <= self.routing_dropout < 1.0:
            raise ValueError(f"{layer}: routing_dropout={self.routing_dropout} must be in [0, 1)")
        geometry, in_channels, experts, dtype = self._experts(x)
        bias = self._expert_bias(geometry, in_channels)

        attn_dtype = routing.attention_dtype(dtype)
        batch = x.shape[0]
        if self.external_routing:
            if routing_weights is None:
                raise ValueError(f"{layer}: external_routing=True needs routing_weights of shape [B, K]")
            if tuple(routing_weights.shape) != (batch, self.num_experts):
                raise ValueError(
                    f"{layer}: routing_weights shape {tuple(routing_weights.shape)} != "
                    f"(batch, num_experts) = {(batch, self.num_experts)}"
                )
            weights = routing_weights.astype(attn_dtype)
        else:
            if routing_weights is not None:
                raise ValueError(f"{layer}: routing_weights given but external_routing=False")
            temperature = routing.temperature_scalar(temperature, layer, attn_dtype)
            pooled = routing.global_avg_pool(x, attn_dtype)  # [B, I]
            pooled = nn.Dropout(self.routing_dropout, deterministic=not train)(pooled)
            logits = nn.Dense(
                self.num_experts, dtype=attn_dtype, param_dtype=self.param_dtype, precision=self.precision,
                kernel_init=routing.torch_default_dense_init,
                bias_init=routing.torch_default_bias_init(in_channels), name="routing_fn",
            )(pooled)  # [B, K]
            weights = routing.sigmoid_attention(logits, temperature)
        self.sow("intermediates", "kernel_attention", weights)
        return self._convolve(x, experts, geometry, dtype, weights, expert_bias=bias)
