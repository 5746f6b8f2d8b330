"""Dynamic Convolution (DY-CNN): Attention over Convolution Kernels (Chen, Dai, Liu, Chen, Yuan, Liu; CVPR 2020).

The paper publishes no official code; this follows its equations: ``pi(x) =
softmax(fc2(relu(fc1(GAP(x)))) / T)``, kernel and bias aggregated with ``pi``, and T
annealed from 30 to 1 during the first epochs (``update_temperature``).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._layer import DynamicLayerMixin
from .functional import (
    aggregate_experts,
    check_input,
    check_temperature,
    conv_geometry,
    global_avg_pool,
    init_experts_like_conv2d,
    per_sample_conv2d,
    positive_int,
)


class DynamicConvAttention(nn.Module):
    """The kernel attention of DY-CNN: ``softmax(fc2(relu(fc1(GAP(x)))) / T)``, ``[B, K]``.

    Examples:
      >>> import torch
      >>> from dynconv_torch import DynamicConvAttention
      >>> attention = DynamicConvAttention(4, 8, num_experts=3)
      >>> a = attention(torch.randn(2, 4, 16, 16), temperature=30.0)
      >>> a.shape, torch.allclose(a.sum(1), torch.ones(2))
      (torch.Size([2, 3]), True)
    """

    def __init__(self, in_channels: int, hidden_channels: int, num_experts: int, *, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(in_channels, hidden_channels, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_channels, num_experts, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        """Both layers of the attention MLP as ``nn.Linear`` initialises them."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: Tensor, temperature: float) -> Tensor:
        """x: ``[B, I, H, W]`` -> attention ``[B, K]`` (rows sum to 1)."""
        logits = self.fc2(F.relu(self.fc1(global_avg_pool(x))))
        return torch.softmax(logits / temperature, dim=1)


class DynamicConv2d(DynamicLayerMixin, nn.Module):
    """Dynamic convolution (DY-CNN, Chen et al., CVPR 2020).

    For each sample ``b``: ``pi_b = softmax(fc2(relu(fc1(GAP(x_b)))) / T)`` (``[K]``),
    ``y_b = conv(x_b, sum_k pi_b[k] W_k) + sum_k pi_b[k] bias_k``.

    Args mirror ``nn.Conv2d`` (``padding`` may be an int, a pair, 'same' or 'valid'), plus:
        num_experts: K >= 1.
        reduction, min_channels: hidden width of the attention MLP,
            ``H = max(int(in_channels * reduction), min_channels)``.
        temperature: T > 0 of the softmax; the paper anneals it 30 -> 1 (``update_temperature``).

    State dict: ``weight [K, O, I/g, kh, kw]``, ``bias [K, O]`` (if ``bias``),
    ``attention.fc1.{weight [H, I], bias [H]}``, ``attention.fc2.{weight [K, H], bias [K]}``.
    Experts are initialised like ``nn.Conv2d`` kernels, the attention MLP like ``nn.Linear``.

    Examples:
      >>> import torch
      >>> from dynconv_torch import DynamicConv2d
      >>> layer = DynamicConv2d(4, 8, 3, padding="same", num_experts=3)
      >>> layer.temperature = 30.0                # or dynconv_torch.set_temperature(model, 30.0)
      >>> layer(torch.ones(2, 4, 16, 16)).shape
      torch.Size([2, 8, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 4,
        reduction: float = 0.25,
        min_channels: int = 4,
        temperature: float = 1.0,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        where = (
            f"DynamicConv2d(in_channels={in_channels!r}, out_channels={out_channels!r}, "
            f"kernel_size={kernel_size!r}, groups={groups!r}, num_experts={num_experts!r})"
        )
        self.kernel_size, self.stride, self.padding, self.dilation = conv_geometry(
            where, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, num_experts, dtype
        )
        if not reduction > 0:
            raise ValueError(f"{where}: reduction must be > 0, got {reduction!r}")
        positive_int(min_channels, "min_channels", where)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.num_experts = num_experts
        self.reduction = reduction
        self.min_channels = min_channels
        self.hidden_channels = max(int(in_channels * reduction), min_channels)
        self.temperature = check_temperature(temperature, where)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty((num_experts, out_channels, in_channels // groups) + self.kernel_size, **factory)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.attention = DynamicConvAttention(in_channels, self.hidden_channels, num_experts, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert (and its bias) as ``nn.Conv2d`` initialises a kernel; the MLP as ``nn.Linear``."""
        init_experts_like_conv2d(self.weight, self.bias)
        self.attention.reset_parameters()

    def _layer_repr(self) -> str:
        return f", bias={self.bias is not None}, num_experts={self.num_experts}, hidden_channels={self.hidden_channels}"

    def attentions(self, x: Tensor) -> Dict[str, Tensor]:
        """``{'kernel_attention': [B, K]}`` for ``x`` (named as the Flax modules sow it)."""
        check_input(x, self.in_channels, self._where(), self.weight.dtype)
        return {"kernel_attention": self.attention(x, self.temperature)}

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[B, I, H, W]`` -> ``[B, O, H', W']``."""
        check_input(x, self.in_channels, self._where(), self.weight.dtype)
        pi = self.attention(x, self.temperature)  # [B, K]
        weight = aggregate_experts(pi, self.weight)  # [B, O, I/g, kh, kw]
        bias = None if self.bias is None else aggregate_experts(pi, self.bias)  # [B, O]
        return per_sample_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
