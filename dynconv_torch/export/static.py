"""Static export: a dynamic convolution as a plain ``nn.Conv2d`` (twin of ``dynconv_jax.export.static``).

For each sample ``b`` the layers compute (DESIGN.md, "Maths")::

    y_b = f_b * conv(c_b * x_b, sum_k a[b,k] * s_b * W_k) + sum_k a[b,k] * bias_k

For one fixed sample every attention is a constant that folds into the kernel exactly:
kernel attention ``a`` and spatial attention ``s`` by aggregating the experts; the channel
attention ``c [I]`` into the kernel's input channels (``W'[o, i] = W[o, i] * c[group(o) * I/g + i]``:
each input channel belongs to one group, so this holds for any ``groups``; zero padding
commutes with the scaling); the filter attention ``f [O]`` into its output channels; the
aggregated expert bias ``sum_k a_k bias_k`` becomes the conv bias (not scaled by ``f``).
Papers: CondConv (Yang et al., NeurIPS 2019), DynamicConv (Chen et al., CVPR 2020),
ODConv (Li et al., ICLR 2022).

:func:`export_static` is exact for the one input it is given; :func:`export_average`
folds attentions averaged over a calibration set and is an approximation, with its error
measured on that set.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..functional import aggregate_experts
from ._common import check_layer, expert_bias_of, experts_oihw, routed_attentions


class AverageExport(NamedTuple):
    """An approximate static conv from averaged routing, with its measured error.

    ``relative_error`` is ``max|y_static - y_dynamic| / max|y_dynamic|`` over the whole
    calibration set. ``attentions`` are the averaged attentions that were folded
    (``reduce='attention'``) or None (``reduce='kernel'``).

    Examples:
      >>> import torch
      >>> from dynconv_torch import ODConv2d
      >>> layer = ODConv2d(4, 8, 3, padding=1, kernel_num=3).eval()
      >>> x = torch.randn(1, 4, 8, 8)
      >>> from dynconv_torch.export import AverageExport, export_average
      >>> result = export_average(layer, torch.randn(16, 4, 8, 8), reduce="kernel")
      >>> isinstance(result, AverageExport), result.attentions is None
      (True, True)
    """

    module: nn.Conv2d
    relative_error: float
    attentions: Optional[Dict[str, Tensor]]


def fold_attentions(experts: Tensor, attentions: Dict[str, Tensor], groups: int, expert_bias: Optional[Tensor]):
    """Fold per-sample attentions into static kernels and biases (exact; see the module docstring).

    experts: ``[K, O, I/g, kh, kw]``; attentions (batched, as ``layer.attentions(x)``
    returns them): ``kernel_attention [B, K]`` and optionally ``spatial_attention [B, kh, kw]``,
    ``channel_attention [B, I]``, ``filter_attention [B, O]``; expert_bias: ``[K, O]`` or None.
    Returns ``(weight [B, O, I/g, kh, kw], bias [B, O] or None)``.

    Examples:
      >>> import torch
      >>> from dynconv_torch import ODConv2d
      >>> layer = ODConv2d(4, 8, 3, padding=1, kernel_num=3).eval()
      >>> x = torch.randn(1, 4, 8, 8)
      >>> from dynconv_torch.export import experts_oihw, fold_attentions
      >>> with torch.no_grad():
      ...     kernels, biases = fold_attentions(experts_oihw(layer), layer.attentions(x), groups=1, expert_bias=None)
      >>> tuple(kernels.shape), biases                                   # one folded kernel per sample
      ((1, 8, 4, 3, 3), None)
    """
    a = attentions["kernel_attention"].to(experts.dtype)
    weight = aggregate_experts(a, experts)  # [B, O, I/g, kh, kw]
    batch, out_channels, in_per_group = weight.shape[:3]
    s = attentions.get("spatial_attention")
    if s is not None:
        weight = weight * s.to(weight.dtype)[:, None, None]
    c = attentions.get("channel_attention")
    if c is not None:
        # Input channel of weight[:, o, i] is group(o) * I/g + i, group(o) = o // (O/g).
        c_groups = c.to(weight.dtype).reshape(batch, groups, in_per_group)
        c_per_output = c_groups.repeat_interleave(out_channels // groups, dim=1)  # [B, O, I/g]
        weight = weight * c_per_output[..., None, None]
    f = attentions.get("filter_attention")
    if f is not None:
        weight = weight * f.to(weight.dtype)[:, :, None, None, None]
    bias = None if expert_bias is None else a.to(expert_bias.dtype) @ expert_bias
    return weight, bias


def _static_conv(layer: nn.Module, weight: Tensor, bias: Optional[Tensor]) -> nn.Conv2d:
    """An ``nn.Conv2d`` with the layer's geometry holding ``weight [O, I/g, kh, kw]`` and ``bias [O]``."""
    conv = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv.eval()


@torch.no_grad()
def export_static(layer: nn.Module, x: Tensor, routing_weights: Optional[Tensor] = None) -> nn.Conv2d:
    """Exact static export of an eval-mode dynamic layer for ONE input: a plain ``nn.Conv2d``.

    The attentions the layer computes for ``x`` (at its current temperature) are folded
    into one kernel and bias (see :func:`fold_attentions`); the returned conv has the
    layer's stride, padding, dilation and groups, and its output on ``x`` equals
    ``layer(x)`` up to float rounding (≤ 1e-12 relative in float64, tested).

    Exact only for this ``x``: any other input has other attentions. Not defined in
    training mode (routing dropout, batch statistics in ODConv's attention BN): the layer
    must be in eval mode.

    x: ``[1, I, H, W]`` or ``[I, H, W]``; routing_weights: ``[1, K]`` for a CondConv2d with
    ``external_routing``.

    Examples:
      >>> import torch
      >>> from dynconv_torch import ODConv2d
      >>> layer = ODConv2d(4, 8, 3, padding=1, kernel_num=3).eval()
      >>> x = torch.randn(1, 4, 8, 8)
      >>> from dynconv_torch.export import export_static
      >>> conv = export_static(layer, x)                                  # a plain nn.Conv2d
      >>> type(conv).__name__, torch.allclose(conv(x), layer(x), atol=1e-5)
      ('Conv2d', True)
    """
    check_layer(layer, "export_static")
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(
            f"export_static: x has shape {tuple(x.shape)}; expected one sample [1, I, H, W] or "
            "[I, H, W] (use export_average for a calibration set)"
        )
    weight, bias = fold_attentions(
        experts_oihw(layer), routed_attentions(layer, x, routing_weights), layer.groups, expert_bias_of(layer)
    )
    return _static_conv(layer, weight[0], None if bias is None else bias[0])


@torch.no_grad()
def export_average(
    layer: nn.Module,
    calibration_x: Tensor,
    *,
    reduce: str = "attention",
    batch_size: int = 128,
    routing_weights: Optional[Tensor] = None,
) -> AverageExport:
    """APPROXIMATE static export from the routing averaged over a calibration set.

    ``reduce='attention'`` averages each attention over the set, then folds;
    ``reduce='kernel'`` folds every sample, then averages the kernels and biases (the mean
    effective kernel). Both agree for CondConv and DynamicConv; for ODConv they differ
    (its attentions multiply). No static conv reproduces a dynamic one on varied inputs:
    ``relative_error`` = ``max|y_static - y_dynamic| / max|y_dynamic|`` over the
    calibration set says how close this one gets there; expect worse elsewhere.

    calibration_x: ``[N, I, H, W]``; routing_weights: ``[N, K]`` with ``external_routing``.
    ``reduce='kernel'`` holds ``batch_size`` folded kernels in memory at once.

    Examples:
      >>> import torch
      >>> from dynconv_torch import ODConv2d
      >>> layer = ODConv2d(4, 8, 3, padding=1, kernel_num=3).eval()
      >>> x = torch.randn(1, 4, 8, 8)
      >>> from dynconv_torch.export import export_average
      >>> result = export_average(layer, torch.randn(16, 4, 8, 8))
      >>> type(result.module).__name__, result.relative_error > 0      # an approximation, with its measured error
      ('Conv2d', True)
    """
    check_layer(layer, "export_average")
    _check_calibration(calibration_x, reduce)
    n = calibration_x.shape[0]
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    outputs, means = _mean_routing(layer, calibration_x, batches, reduce, routing_weights)
    conv = _fold_means(layer, means, reduce)
    relative_error = _relative_error(conv, calibration_x, batches, outputs)
    return AverageExport(conv, relative_error, means if reduce == "attention" else None)


def _check_calibration(calibration_x: Tensor, reduce: str) -> None:
    if reduce not in ("attention", "kernel"):
        raise ValueError(f"export_average: reduce={reduce!r}; expected 'attention' or 'kernel'")
    if calibration_x.dim() != 4 or calibration_x.shape[0] == 0:
        raise ValueError(
            f"export_average: calibration_x has shape {tuple(calibration_x.shape)}; expected [N, I, H, W] with N >= 1"
        )


def _batch_sums(layer: nn.Module, attentions: Dict[str, Tensor], reduce: str) -> Dict[str, Tensor]:
    """One batch's attentions summed over its samples (``reduce='attention'``), or its folded kernels and
    biases summed (``reduce='kernel'``)."""
    if reduce == "attention":
        return {name: value.sum(dim=0) for name, value in attentions.items()}
    weights, biases = fold_attentions(experts_oihw(layer), attentions, layer.groups, expert_bias_of(layer))
    summed = {"weight": weights.sum(dim=0)}
    if biases is not None:
        summed["bias"] = biases.sum(dim=0)
    return summed


def _mean_routing(layer: nn.Module, calibration_x: Tensor, batches, reduce: str, routing_weights):
    """``(outputs, means)``: the layer's output on each batch, and the means over the calibration set of
    what :func:`_batch_sums` sums."""
    outputs, sums = [], {}
    for sl in batches:
        xb = calibration_x[sl]
        rw = None if routing_weights is None else routing_weights[sl]
        outputs.append(layer(xb) if rw is None else layer(xb, rw))
        summed = _batch_sums(layer, routed_attentions(layer, xb, rw), reduce)
        sums = summed if not sums else {name: sums[name] + value for name, value in summed.items()}
    n = calibration_x.shape[0]
    return outputs, {name: value / n for name, value in sums.items()}


def _fold_means(layer: nn.Module, means: Dict[str, Tensor], reduce: str) -> nn.Conv2d:
    if reduce == "kernel":
        return _static_conv(layer, means["weight"], means.get("bias"))
    weight, bias = fold_attentions(
        experts_oihw(layer), {name: value[None] for name, value in means.items()}, layer.groups, expert_bias_of(layer)
    )
    return _static_conv(layer, weight[0], None if bias is None else bias[0])


def _relative_error(conv: nn.Conv2d, calibration_x: Tensor, batches, outputs) -> float:
    """``max|y_static - y_dynamic| / max|y_dynamic|`` over the calibration set."""
    max_diff, max_ref = 0.0, 0.0
    for sl, y in zip(batches, outputs):
        max_diff = max(max_diff, float((conv(calibration_x[sl]) - y).abs().max()))
        max_ref = max(max_ref, float(y.abs().max()))
    if max_ref > 0:
        return max_diff / max_ref
    return 0.0 if max_diff == 0 else float("inf")
