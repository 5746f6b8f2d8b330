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

from dynconv_jax import routing


class _Attention(nn.Module):
    """``[B, I] -> [B, K]``: softmax(fc2(relu(fc1(.))) / T) (fc1 I -> H, fc2 H -> K); PyTorch ``nn.Linear`` init."""

    in_channels: int
    hidden: int
    num_experts: int
    dtype: object
    param_dtype: object
    precision: object

    @nn.compact
    def __call__(self, pooled, temperature):
        def dense(n, fan_in, name):
            return nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                            kernel_init=routing.torch_default_dense_init,
                            bias_init=routing.torch_default_bias_init(fan_in), name=name)

        return routing.dynamic_attention(pooled, dense(self.hidden, self.in_channels, "fc1"),
                                         dense(self.num_experts, self.hidden, "fc2"), temperature)


class DynamicConv(routing.DynamicConvBase):
    """DynamicConv layer, channels-last, 1-D/2-D/3-D (rank = ``len(kernel_size)``).

    Params: ``kernel [K, *k, I/g, O]``, ``bias [K, O]`` (if ``use_bias``),
    ``attention/fc1/{kernel [I, H], bias [H]}``, ``attention/fc2/{kernel [H, K], bias [K]}``
    with ``H = max(int(I * reduction), min_channels)``.
    Sows ``intermediates/kernel_attention [B, K]``.

    Attributes (beyond the flax.linen.Conv fields, ``num_experts`` and ``strategy``):
      use_bias: per-expert bias, mixed with the attention (default True, as the paper).
      bias_init: initializer of the ``[K, O]`` bias; None = PyTorch's U(±1/sqrt(fan_in)).
      reduction, min_channels: hidden width of the attention MLP.
    """

    use_bias: bool = True
    bias_init: Optional[routing.Initializer] = None
    reduction: float = 0.25
    min_channels: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        """``x [B, *S, I] -> [B, *S_out, O]``; ``temperature`` scalar (may be traced), None = 1.

        ``train`` is accepted for a uniform layer API; DynamicConv behaves the same in both modes.
        """
        del train
        layer = routing.layer_name(self)
        geometry, in_channels, experts, dtype = self._experts(x)
        bias = self._expert_bias(geometry, in_channels)
        attn_dtype = routing.attention_dtype(dtype)
        temperature = routing.temperature_scalar(temperature, layer, attn_dtype)
        pooled = routing.global_avg_pool(x, attn_dtype)  # [B, I]
        attention = _Attention(
            in_channels, routing.attention_width(in_channels, self.reduction, self.min_channels, layer), self.num_experts,
            attn_dtype, self.param_dtype, self.precision, name="attention",
        )(pooled, temperature)  # [B, K]
        self.sow("intermediates", "kernel_attention", attention)
        return self._convolve(x, experts, geometry, dtype, attention, expert_bias=bias)
