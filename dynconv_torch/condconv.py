"""CondConv: Conditionally Parameterized Convolutions (Yang, Bender, Le, Ngiam; NeurIPS 2019, arXiv:1904.04971).

The expert layout and initialisation follow timm's ``CondConv2d``
(``timm/layers/cond_conv2d.py``, huggingface/pytorch-image-models); the routing function
follows timm's ``CondConvResidual`` block and the paper: ``r = sigmoid(routing_fn(GAP(x)))``,
with dropout on the pooled vector in training.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

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
)


class CondConv2d(DynamicLayerMixin, nn.Module):
    """Conditionally parameterized 2-D convolution (CondConv, Yang et al., NeurIPS 2019).

    For each sample ``b``: ``r_b = sigmoid(routing_fn(dropout(GAP(x_b))) / T)`` (``[K]``),
    ``W_b = sum_k r_b[k] W_k`` and ``y_b = conv(x_b, W_b) + sum_k r_b[k] bias_k``.

    Args mirror ``nn.Conv2d`` (``padding`` may be an int, a pair, 'same' or 'valid'), plus:
        num_experts: K >= 1.
        routing_dropout: dropout probability on the pooled input of the routing function
            (training only).
        external_routing: if True the layer has no ``routing_fn``; ``forward(x, routing_weights)``
            takes the ``[B, K]`` routing weights from outside, as timm's ``CondConv2d`` does
            (its EfficientNet blocks share one routing function between several convolutions).
            The temperature then does not apply.
        temperature: T > 0 dividing the routing logits; change it with ``update_temperature``.

    State dict (timm layout): ``weight [K, O*I/g*kh*kw]`` (row k is expert k's ``[O, I/g, kh, kw]``
    kernel flattened in row-major order), ``bias [K, O]`` if ``bias``, ``routing_fn.weight [K, I]``
    and ``routing_fn.bias [K]`` unless ``external_routing``. ``load_state_dict`` also accepts a
    ``[K, O, I/g, kh, kw]`` weight (a pre-hook flattens it).

    Examples:
      >>> import torch
      >>> from dynconv_torch import CondConv2d
      >>> layer = CondConv2d(4, 8, 3, padding=1, num_experts=3)
      >>> layer.weight.shape                      # timm's layout: [K, O * I/g * kh * kw]
      torch.Size([3, 288])
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
        bias: bool = False,
        num_experts: int = 4,
        routing_dropout: float = 0.0,
        external_routing: bool = False,
        temperature: float = 1.0,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        where = (
            f"CondConv2d(in_channels={in_channels!r}, out_channels={out_channels!r}, "
            f"kernel_size={kernel_size!r}, groups={groups!r}, num_experts={num_experts!r})"
        )
        self.kernel_size, self.stride, self.padding, self.dilation = conv_geometry(
            where, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, num_experts, dtype
        )
        if not 0.0 <= routing_dropout < 1.0:
            raise ValueError(f"{where}: routing_dropout must be in [0, 1), got {routing_dropout!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.num_experts = num_experts
        self.routing_dropout = float(routing_dropout)
        self.external_routing = bool(external_routing)
        self.temperature = check_temperature(temperature, where)
        # One expert kernel: [O, I/g, kh, kw]; stored flattened, one row per expert (timm).
        self.weight_shape = (out_channels, in_channels // groups) + self.kernel_size
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_experts, math.prod(self.weight_shape), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.routing_fn = None if self.external_routing else nn.Linear(in_channels, num_experts, **factory)
        self.register_load_state_dict_pre_hook(_flatten_expert_weight)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Experts as timm initialises them (each like an ``nn.Conv2d``); ``routing_fn`` as ``nn.Linear``."""
        init_experts_like_conv2d(self.weight.view((self.num_experts,) + self.weight_shape), self.bias)
        if self.routing_fn is not None:
            self.routing_fn.reset_parameters()

    def _layer_repr(self) -> str:
        s = f", bias={self.bias is not None}, num_experts={self.num_experts}"
        if self.routing_dropout:
            s += f", routing_dropout={self.routing_dropout}"
        if self.external_routing:
            s += ", external_routing=True"
        return s

    def _routing(self, x: Tensor, routing_weights: Optional[Tensor]) -> Tensor:
        """The ``[B, K]`` routing weights: computed from ``x``, or checked when given from outside."""
        batch = x.shape[0]
        if self.external_routing:
            if routing_weights is None:
                raise ValueError(
                    f"{self._where()}: external_routing=True, so forward(x, routing_weights) needs "
                    f"routing_weights of shape [B, K] = [{batch}, {self.num_experts}]"
                )
            if not isinstance(routing_weights, Tensor) or tuple(routing_weights.shape) != (batch, self.num_experts):
                shape = tuple(routing_weights.shape) if isinstance(routing_weights, Tensor) else routing_weights
                raise ValueError(
                    f"{self._where()}: routing_weights must have shape [B, K] = "
                    f"[{batch}, {self.num_experts}], got {shape!r}"
                )
            return routing_weights
        if routing_weights is not None:
            raise ValueError(
                f"{self._where()}: this layer computes its own routing from x; construct it with "
                f"external_routing=True to pass routing_weights"
            )
        pooled = F.dropout(global_avg_pool(x), self.routing_dropout, self.training)  # [B, I]
        return torch.sigmoid(self.routing_fn(pooled) / self.temperature)  # [B, K]

    def attentions(self, x: Tensor) -> Dict[str, Tensor]:
        """``{'kernel_attention': [B, K]}``: the routing weights the layer would use for ``x``.

        Named as the Flax modules sow them. Not available with ``external_routing``.
        """
        check_input(x, self.in_channels, self._where(), self.weight.dtype)
        if self.external_routing:
            raise ValueError(f"{self._where()}: external_routing=True, the routing weights come from outside")
        return {"kernel_attention": self._routing(x, None)}

    def forward(self, x: Tensor, routing_weights: Optional[Tensor] = None) -> Tensor:
        """x: ``[B, I, H, W]``; routing_weights: ``[B, K]`` iff ``external_routing``. Returns ``[B, O, H', W']``."""
        check_input(x, self.in_channels, self._where(), self.weight.dtype)
        routing = self._routing(x, routing_weights)
        weight = aggregate_experts(routing, self.weight).view((x.shape[0],) + self.weight_shape)
        bias = None if self.bias is None else aggregate_experts(routing, self.bias)
        return per_sample_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _flatten_expert_weight(
    module: CondConv2d, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """load_state_dict pre-hook: accept expert kernels as ``[K, O, I/g, kh, kw]`` and flatten them.

    Any other shape is left alone, so ``load_state_dict`` reports its usual size mismatch.
    """
    key = prefix + "weight"
    weight = state_dict.get(key)
    if isinstance(weight, Tensor) and tuple(weight.shape) == (module.num_experts,) + module.weight_shape:
        state_dict[key] = weight.reshape(module.num_experts, -1)
