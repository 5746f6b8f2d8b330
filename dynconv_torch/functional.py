"""Pieces shared by the PyTorch reference dynamic convolutions (NCHW).

Every layer in :mod:`dynconv_torch` computes, for each sample ``b`` (DESIGN.md, "Maths")::

    W_b = sum_k a[b, k] * (s_b * W_k)
    y_b = f_b * conv(c_b * x_b, W_b) + sum_k a[b, k] * bias_k

This module holds the parts that do not depend on how the attentions are made:
argument validation (with errors that name the layer), global average pooling,
expert aggregation and the batched per-sample convolution. The per-sample
convolution uses the grouped-convolution trick (fold the batch into the channel
axis and convolve once with ``groups * B`` groups), as timm's ``CondConv2d`` and the
official OSVAI/ODConv ``ODConv2d`` do; there is no Python loop over samples.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dynconv_spec

Padding = Union[str, int, Tuple[int, int]]

PADDING_STRINGS = ("same", "valid")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value, name: str, where: str, minimum: int = 1) -> int:
    """``value`` as an int, or a ValueError naming ``where`` (the layer)."""
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def int_tuple(value, name: str, where: str, minimum: int, rank: int) -> Tuple[int, ...]:
    """An int or ``rank`` ints (each >= ``minimum``) as a tuple of ``rank`` ints, as ``nn.ConvNd`` takes them."""
    values = (value,) * rank if _is_int(value) else tuple(value) if isinstance(value, (tuple, list)) else None
    if values is None or len(values) != rank or not all(_is_int(v) and v >= minimum for v in values):
        what = "a pair" if rank == 2 else f"{rank} ints"
        raise ValueError(f"{where}: {name} must be an int or {what} of ints >= {minimum}, got {value!r}")
    return values


def int_pair(value, name: str, where: str, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints (each >= ``minimum``) as a pair, like ``nn.Conv2d`` takes them."""
    return int_tuple(value, name, where, minimum, 2)


def conv_padding(padding, stride: Tuple[int, ...], where: str) -> Union[str, Tuple[int, ...]]:
    """Normalise ``padding`` as ``nn.ConvNd`` does: 'same' / 'valid' (kept as strings), an int or one int per
    spatial dimension (``len(stride)`` of them).

    'same' with a stride other than 1 raises ``nn.Conv2d``'s own error (prefixed with ``where``).
    """
    if isinstance(padding, str):
        if padding not in PADDING_STRINGS:
            raise ValueError(f"{where}: invalid padding string {padding!r}, should be one of {set(PADDING_STRINGS)}")
        if padding == "same" and any(s != 1 for s in stride):
            raise ValueError(f"{where}: padding='same' is not supported for strided convolutions")
        return padding
    return int_tuple(padding, "padding", where, 0, len(stride))


def conv_geometry(
    where: str, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, num_experts, dtype=None
):
    """Validate the ``nn.Conv2d``-style arguments of a dynamic convolution, its ``dtype`` (None or a real
    floating-point dtype) and the size of its expert bank (:func:`dynconv_spec.check_expert_bank`).

    Returns ``(kernel_size, stride, padding, dilation)`` normalised to pairs (padding may
    stay 'same' / 'valid'). Raises ValueError saying what is wrong and in which layer.
    """
    positive_int(in_channels, "in_channels", where)
    positive_int(out_channels, "out_channels", where)
    positive_int(groups, "groups", where)
    positive_int(num_experts, "the number of experts K", where)
    if in_channels % groups:
        raise ValueError(f"{where}: in_channels={in_channels} must be divisible by groups={groups}")
    if out_channels % groups:
        raise ValueError(f"{where}: out_channels={out_channels} must be divisible by groups={groups}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"{where}: dtype={dtype!r} must be a real floating-point dtype (torch.float32, "
            f"torch.bfloat16, torch.float16 or torch.float64)"
        )
    kernel_size = int_pair(kernel_size, "kernel_size", where, minimum=1)
    stride = int_pair(stride, "stride", where, minimum=1)
    dilation = int_pair(dilation, "dilation", where, minimum=1)
    dynconv_spec.check_expert_bank(where, (num_experts, out_channels, in_channels // groups) + kernel_size)
    return kernel_size, stride, conv_padding(padding, stride, where), dilation


def check_temperature(temperature, where: str) -> float:
    """The softmax/sigmoid temperature T as a float (:func:`dynconv_spec.check_temperature`: a real number,
    not a bool, finite and at least :data:`dynconv_spec.TEMPERATURE_FLOOR`, as the Flax layers require)."""
    return dynconv_spec.check_temperature(temperature, where)


_LAYOUTS = {1: "NCL", 2: "NCHW", 3: "NCDHW"}
_DIMS = {1: "[B, C, L]", 2: "[B, C, H, W]", 3: "[B, C, D, H, W]"}


def check_input(x, in_channels: int, where: str, dtype: Optional[torch.dtype] = None, rank: int = 2) -> None:
    """``x`` must be a non-empty ``[B, C, *spatial]`` tensor (``rank`` spatial dims, NCHW for 2) with
    ``in_channels`` channels (of ``dtype``, the parameters' dtype)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor input, got {type(x).__name__}")
    if x.dim() != rank + 2:
        raise ValueError(
            f"{where}: expected a {rank + 2}-D {_LAYOUTS[rank]} input {_DIMS[rank]}, got shape {tuple(x.shape)}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{where}: expected {in_channels} input channels (dim 1 of {_LAYOUTS[rank]}), got input of "
            f"shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{where}: got an empty batch (input shape {tuple(x.shape)})")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        alternative = f" or the layer (layer.to({x.dtype}))" if x.is_floating_point() else ""
        raise ValueError(
            f"{where}: input dtype {x.dtype} differs from the layer's parameters ({dtype}); convert "
            f"the input (x.to({dtype})){alternative}"
        )


def global_avg_pool(x: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, C]``: the mean over the spatial dimensions."""
    return x.mean(dim=(2, 3))


def aggregate_experts(attention: Tensor, experts: Tensor) -> Tensor:
    """``sum_k attention[b, k] * experts[k]`` for every sample.

    attention: ``[B, K]``; experts: ``[K, *shape]``. Returns ``[B, *shape]`` (one matmul).
    """
    k = experts.shape[0]
    return torch.matmul(attention, experts.reshape(k, -1)).reshape((attention.shape[0],) + tuple(experts.shape[1:]))


def per_sample_conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int
) -> Tensor:
    """Convolve sample ``b`` of ``x`` with its own kernel ``weight[b]`` (and bias ``bias[b]``).

    x: ``[B, C, H, W]``; weight: ``[B, O, C/groups, kh, kw]``; bias: ``[B, O]`` or None.
    Returns ``[B, O, H', W']``. One grouped convolution: the batch is folded into the
    channels (``[1, B*C, H, W]``) and the kernels into ``[B*O, C/groups, kh, kw]`` with
    ``groups * B`` groups, so group ``b*groups + j`` of the output sees only sample ``b``.
    """
    b, c, h, w = x.shape
    out_channels = weight.shape[1]
    out = F.conv2d(
        x.reshape(1, b * c, h, w),
        weight.reshape((b * out_channels,) + tuple(weight.shape[2:])),
        None if bias is None else bias.reshape(b * out_channels),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups * b,
    )
    return out.reshape(b, out_channels, out.shape[-2], out.shape[-1])


@torch.no_grad()
def init_experts_like_conv2d(experts: Tensor, bias: Optional[Tensor]) -> None:
    """Initialise each expert as ``nn.Conv2d.reset_parameters`` initialises one kernel (in place).

    experts: ``[K, O, I/g, kh, kw]`` (a view is fine); bias: ``[K, O]`` or None.
    Weights: ``kaiming_uniform_(a=sqrt(5))`` per expert, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    with ``fan_in = I/g * kh * kw``; bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Expert by expert,
    in the order timm's ``get_condconv_initializer`` uses.
    """
    for k in range(experts.shape[0]):
        nn.init.kaiming_uniform_(experts[k], a=math.sqrt(5))
    if bias is not None:
        bound = 1.0 / math.sqrt(math.prod(experts.shape[2:]))
        for k in range(bias.shape[0]):
            nn.init.uniform_(bias[k], -bound, bound)


def conv_extra_repr(in_channels, out_channels, kernel_size, stride, padding, dilation, groups) -> str:
    """The ``nn.Conv2d``-style head of a layer's ``extra_repr``."""
    parts = [f"{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}"]
    if padding != (0, 0):
        parts.append(f"padding={padding!r}")
    if dilation != (1, 1):
        parts.append(f"dilation={dilation}")
    if groups != 1:
        parts.append(f"groups={groups}")
    return ", ".join(parts)
