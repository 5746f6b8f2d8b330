"""Batch-independent dynamic convolutions, for graphs that serve every batch size (ONNX).

The layers' own per-sample convolution folds the batch into the channels (``groups * B``),
which bakes the batch size into a traced graph; :class:`PortableDynamicConv` computes the same
maths with operations whose attributes do not depend on the batch, and :func:`portable` swaps
every dynamic layer of a model for one.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.efficientnet_cc import _pad_tf_same
from ..odconv import ODConv2d
from ._common import (
    DYNAMIC_LAYERS,
    check_layer,
    expert_bias_of,
    experts_oihw,
    refuse_kernelwarehouse,
    routed_attentions,
    set_submodule,
)
from .static import fold_attentions

FORMULATIONS = ("matmul", "experts")
"""How a :class:`PortableDynamicConv` computes: ``'matmul'`` (per-sample kernels, batched matmuls over im2col
patches) or ``'experts'`` (one static conv of all experts, then the attention-weighted sum)."""


def _explicit_padding(layer: nn.Module) -> Tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` zero padding equal to the layer's ``padding`` (as ``F.pad`` takes it)."""
    padding = layer.padding
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":  # nn.Conv2d's 'same': total d*(k-1), the extra one on the right/bottom
        pads = []
        for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    return (padding[1], padding[1], padding[0], padding[0])


def _patches(x: Tensor, kernel_size, stride, dilation) -> Tuple[Tensor, int, int]:
    """im2col of a padded ``x [B, I, H, W]``: ``[B, I, kh*kw, H'*W']`` (tap-major after the channel), H', W'."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    height, width = x.shape[-2], x.shape[-1]
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    taps = [
        x[:, :, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = torch.stack(taps, dim=2)  # [B, I, T, H', W']
    return patches.reshape(patches.shape[0], patches.shape[1], kh * kw, out_h * out_w), out_h, out_w


def batched_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, dilation, groups: int) -> Tensor:
    """Per-sample convolution of an already padded ``x [B, I, H, W]`` with ``weight [B, O, I/g, kh, kw]``.

    Batched matmuls over im2col patches (a broadcast multiply and a sum over the taps for a
    depthwise conv): no operator's attributes depend on the batch size, unlike the
    folded-batch grouped conv of :func:`dynconv_torch.functional.per_sample_conv2d`.
    bias: ``[B, O]`` or None. Returns ``[B, O, H', W']``.

    Examples:
      >>> import torch
      >>> from dynconv_torch.export import batched_conv2d
      >>> x = torch.ones(2, 1, 3, 3)
      >>> weight = torch.stack([torch.ones(1, 1, 3, 3), 2 * torch.ones(1, 1, 3, 3)])   # [B, O, I, kh, kw]
      >>> batched_conv2d(x, weight, None, stride=(1, 1), dilation=(1, 1), groups=1).flatten()
      tensor([ 9., 18.])
    """
    out_channels, in_per_group, kh, kw = weight.shape[1:]
    patches, out_h, out_w = _patches(x, (kh, kw), stride, dilation)  # [B, I, T, L]
    taps = kh * kw
    w = weight.reshape(-1, groups, out_channels // groups, in_per_group * taps)
    p = patches.reshape(-1, groups, in_per_group * taps, out_h * out_w)
    if in_per_group == 1 and out_channels == groups:  # depthwise: [B, g, T, 1] * [B, g, T, L] summed over T
        out = (w.transpose(2, 3) * p).sum(dim=2)
    else:
        out = torch.matmul(w, p)  # [B, g, O/g, L]
    out = out.reshape(-1, out_channels, out_h, out_w)
    return out if bias is None else out + bias[:, :, None, None]


class PortableDynamicConv(nn.Module):
    """A dynamic layer's inference forward in batch-independent operations, for ONNX export.

    Same maths as the wrapped eval-mode layer (the attentions come from the layer itself),
    two formulations of the per-sample convolution:

    * ``'matmul'``: fold every attention into per-sample kernels ``[B, O, I/g, kh, kw]``
      (:func:`fold_attentions`) and convolve with batched matmuls over im2col patches
      (:func:`batched_conv2d`);
    * ``'experts'``: one static conv with all ``K`` experts stacked on the output channels,
      then the attention-weighted sum over experts (``K`` times the conv FLOPs, no per-sample
      kernels); channel and filter attentions scale the input and output. Not defined with a
      spatial attention (ODConv with a kernel larger than 1x1): such a layer uses 'matmul'.

    ``forward(x, routing_weights=None)`` takes the layer's arguments.

    Examples:
      >>> import torch
      >>> from dynconv_torch import ODConv2d
      >>> layer = ODConv2d(4, 8, 3, padding=1, kernel_num=3).eval()
      >>> x = torch.randn(1, 4, 8, 8)
      >>> from dynconv_torch.export import PortableDynamicConv
      >>> portable_layer = PortableDynamicConv(layer)                  # batch-independent operations only
      >>> torch.allclose(portable_layer(x), layer(x), atol=1e-5)
      True
    """

    def __init__(self, layer: nn.Module, formulation: str = "matmul"):
        super().__init__()
        check_layer(layer, "PortableDynamicConv")
        if formulation not in FORMULATIONS:
            raise ValueError(f"PortableDynamicConv: formulation={formulation!r}; expected one of {FORMULATIONS}")
        spatial = isinstance(layer, ODConv2d) and layer.attention.spatial_fc is not None
        self.layer = layer
        self.formulation = "matmul" if spatial else formulation
        self.pads = _explicit_padding(layer)
        # TF 'SAME' padding of timm's EfficientNet CondConv layers depends on the input size.
        self.tf_same = bool(getattr(layer, "dynamic_pad", False))
        if self.formulation == "experts":
            experts = experts_oihw(layer).detach()  # [K, O, I/g, kh, kw]
            k, o = experts.shape[:2]
            g = layer.groups
            stacked = experts.reshape((k, g, o // g) + tuple(experts.shape[2:])).transpose(0, 1)  # [g, K, O/g, ...]
            self.register_buffer(
                "stacked_experts", stacked.reshape((g * k * (o // g),) + tuple(experts.shape[2:])), persistent=False
            )

    def forward(self, x: Tensor, routing_weights: Optional[Tensor] = None) -> Tensor:
        layer = self.layer
        if self.tf_same:
            x = _pad_tf_same(x, layer.kernel_size[0], layer.stride[0])
        attentions = routed_attentions(layer, x, routing_weights)
        x = F.pad(x, self.pads)
        bias_k = expert_bias_of(layer)
        if self.formulation == "matmul":
            weight, bias = fold_attentions(experts_oihw(layer), attentions, layer.groups, bias_k)
            return batched_conv2d(x, weight, bias, layer.stride, layer.dilation, layer.groups)
        a = attentions["kernel_attention"]  # [B, K]
        c = attentions.get("channel_attention")
        if c is not None:
            x = x * c[:, :, None, None]
        out = F.conv2d(x, self.stacked_experts, None, layer.stride, 0, layer.dilation, layer.groups)
        g, k = layer.groups, a.shape[1]
        out = out.reshape(-1, g, k, layer.out_channels // g, out.shape[-2], out.shape[-1])
        out = (
            (out * a[:, None, :, None, None, None])
            .sum(dim=2)
            .reshape(-1, layer.out_channels, out.shape[-2], out.shape[-1])
        )
        f = attentions.get("filter_attention")
        if f is not None:
            out = out * f[:, :, None, None]
        if bias_k is not None:
            out = out + (a @ bias_k)[:, :, None, None]
        return out


def portable(model: nn.Module, formulation: str = "matmul") -> nn.Module:
    """A copy of ``model`` with every dynamic layer wrapped in :class:`PortableDynamicConv` (same function).

    Examples:
      >>> import torch
      >>> from dynconv_torch.models import resnet18
      >>> model = resnet18(conv="odconv", num_experts=2, stem="cifar", base_width=4, num_classes=10).eval()
      >>> from dynconv_torch.export import portable
      >>> x = torch.randn(2, 3, 16, 16)
      >>> torch.allclose(portable(model)(x), model(x), atol=1e-5)
      True
    """
    refuse_kernelwarehouse(model, "portable")
    if isinstance(model, DYNAMIC_LAYERS):
        return PortableDynamicConv(copy.deepcopy(model), formulation)
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, DYNAMIC_LAYERS):
            set_submodule(out, name, PortableDynamicConv(module, formulation))
    return out
