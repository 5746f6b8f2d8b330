"""DynamicConv (DY-CNN): dynamic convolution, attention over convolution kernels (Chen et al., CVPR 2020).

Per sample ``b``: ``a_b = softmax(fc2(relu(fc1(GAP(x_b)))) / T)`` (``[K]``),
``y_b = conv(x_b, sum_k a_b[k] W_k) + sum_k a_b[k] bias_k``. The paper anneals T from 30 to 1
over the first epochs; pass it per step as the traced ``temperature`` argument.
Initialisation: experts and bias as ``nn.Conv2d`` (kaiming_uniform a=sqrt(5), U(±1/sqrt(fan_in)))
expert by expert, the attention FCs as ``nn.Linear``.
"""

from __future__ import annotations

from typing import Optional

from flax import linen as nn
from flax.typing import Dtype, Initializer, PrecisionLike

from dynconv_jax import attention
from dynconv_jax.conv_base import DynamicConvBase, layer_name
from dynconv_jax.initializers import torch_default_bias_init, torch_default_dense_init


class DynamicConvAttention(nn.Module):
    """``[B, I] -> [B, K]``: softmax(fc2(relu(fc1(.))) / T) (fc1 I -> H, fc2 H -> K); PyTorch ``nn.Linear`` init.

    Attributes:
      in_channels: I, the width of the pooled input.
      hidden: H, the width of ``fc1``.
      num_experts: K.
      dtype: the dtype of the computation.
      param_dtype: the dtype of the parameters.
      precision: numerical precision of the dense layers.
    """

    in_channels: int
    hidden: int
    num_experts: int
    dtype: Dtype
    param_dtype: Dtype
    precision: PrecisionLike

    @nn.compact
    def __call__(self, pooled, temperature):
        def dense(n, fan_in, name):
            return nn.Dense(
                n,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=torch_default_dense_init,
                bias_init=torch_default_bias_init(fan_in),
                name=name,
            )

        return attention.dynamic_attention(
            pooled,
            dense(self.hidden, self.in_channels, "fc1"),
            dense(self.num_experts, self.hidden, "fc2"),
            temperature,
        )


class DynamicConv(DynamicConvBase):
    """DynamicConv layer, channels-last, 1-D/2-D/3-D (rank = ``len(kernel_size)``).

    Params: ``kernel [K, *k, I/g, O]``, ``bias [K, O]`` (if ``use_bias``),
    ``attention/fc1/{kernel [I, H], bias [H]}``, ``attention/fc2/{kernel [H, K], bias [K]}``
    with ``H = max(int(I * reduction), min_channels)``.
    Sows ``intermediates/kernel_attention [B, K]``.

    Attributes (beyond the flax.linen.Conv fields, ``num_experts`` and ``strategy``):
      use_bias: per-expert bias, mixed with the attention (default True, as the paper).
      bias_init: initializer of the ``[K, O]`` bias; None = PyTorch's U(±1/sqrt(fan_in)).
      reduction, min_channels: hidden width of the attention MLP.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import DynamicConv
      >>> layer = DynamicConv(features=8, kernel_size=(3, 3), num_experts=3)
      >>> x = jnp.ones((2, 16, 16, 4))
      >>> variables = jax.eval_shape(layer.init, jax.random.key(0), x)
      >>> variables['params']['kernel'].shape, variables['params']['bias'].shape  # experts and their biases
      ((3, 3, 3, 4, 8), (3, 8))
      >>> jax.eval_shape(lambda v: layer.apply(v, x, temperature=30.0), variables).shape
      (2, 16, 16, 8)
    """

    use_bias: bool = True
    bias_init: Optional[Initializer] = None
    reduction: float = 0.25
    min_channels: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        """``x [B, *S, I] -> [B, *S_out, O]``; ``temperature`` scalar (may be traced), None = 1.

        ``train`` is accepted for a uniform layer API; DynamicConv behaves the same in both modes.
        """
        del train
        layer = layer_name(self)
        geometry, in_channels, experts, dtype = self.experts(x)
        bias = self.expert_bias(geometry, in_channels, self.bias_init) if self.use_bias else None
        attn_dtype = attention.attention_dtype(dtype)
        temperature = attention.temperature_scalar(temperature, layer, attn_dtype)
        pooled = attention.global_avg_pool(x, attn_dtype)  # [B, I]
        hidden = attention.attention_width(in_channels, self.reduction, self.min_channels, layer)
        kernel_attention = DynamicConvAttention(
            in_channels=in_channels,
            hidden=hidden,
            num_experts=self.num_experts,
            dtype=attn_dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            name="attention",
        )(pooled, temperature)  # [B, K]
        self.sow("intermediates", "kernel_attention", kernel_attention)
        return self.convolve_experts(x, experts, geometry, dtype, kernel_attention, expert_bias=bias)
