"""Turn a dynamic convolution into a plain ``nn.Conv2d`` (PyTorch twin of ``dynconv_jax.export``).

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

Serving the dynamic model itself (exact for every input):

* :func:`fuse_bn` folds every eval-mode ``BatchNorm2d`` that directly follows a static or
  dynamic conv into it: with ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``,
  every expert kernel and expert bias is scaled by ``s`` on its output channels (the
  attentions do not depend on the conv's weights, and ``f * conv(c * x, W) * s =
  f * conv(c * x, W * s)``). The shift ``t`` goes into the bias of a static conv (one is
  added if absent) and into the expert bias of a DynamicConv2d (added if absent: its softmax
  attention sums to 1, so ``sum_k a_k (b_k + t) = sum_k a_k b_k + t``). CondConv's sigmoid
  routing does not sum to 1 and ODConv has no bias, so there ``t`` stays as a
  :class:`ChannelBias` in the BatchNorm's place.
* :func:`to_onnx` writes an ONNX graph with a dynamic batch axis. The layers' own
  per-sample convolution folds the batch into the channels (``groups * B``), which bakes the
  export batch into the graph; the export swaps every dynamic layer for
  :class:`PortableDynamicConv`, which computes the same maths with batch-independent ops.
"""
from __future__ import annotations

import copy
import os
import warnings
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .condconv import CondConv2d
from .dynamic_conv import DynamicConv2d
from .functional import aggregate_experts
from .kernelwarehouse import KWConv1d, KWConv2d, KWConv3d
from .odconv import ODConv2d

DYNAMIC_LAYERS = (CondConv2d, DynamicConv2d, ODConv2d)


class AverageExport(NamedTuple):
    """An approximate static conv from averaged routing, with its measured error.

    ``relative_error`` is ``max|y_static - y_dynamic| / max|y_dynamic|`` over the whole
    calibration set. ``attentions`` are the averaged attentions that were folded
    (``reduce='attention'``) or None (``reduce='kernel'``).
    """

    module: nn.Conv2d
    relative_error: float
    attentions: Optional[Dict[str, Tensor]]


def _check_layer(layer: nn.Module, what: str) -> None:
    if not isinstance(layer, DYNAMIC_LAYERS):
        raise TypeError(f"{what} expects a dynconv_torch CondConv2d, DynamicConv2d or ODConv2d, "
                        f"got {type(layer).__name__}")
    if layer.training:
        raise ValueError(f"{what}: {type(layer).__name__} is in training mode; call .eval() first (the export "
                         "folds inference-mode attentions: no routing dropout, BatchNorm running statistics)")


def experts_oihw(layer: nn.Module) -> Tensor:
    """The expert kernels as ``[K, O, I/g, kh, kw]`` (CondConv2d stores them flattened, timm layout)."""
    if isinstance(layer, CondConv2d):
        return layer.weight.view((layer.num_experts,) + layer.weight_shape)
    return layer.weight


def fold_attentions(experts: Tensor, attentions: Dict[str, Tensor], groups: int, expert_bias: Optional[Tensor]):
    """Fold per-sample attentions into static kernels and biases (exact; see the module docstring).

    experts: ``[K, O, I/g, kh, kw]``; attentions (batched, as ``layer.attentions(x)``
    returns them): ``kernel_attention [B, K]`` and optionally ``spatial_attention [B, kh, kw]``,
    ``channel_attention [B, I]``, ``filter_attention [B, O]``; expert_bias: ``[K, O]`` or None.
    Returns ``(weight [B, O, I/g, kh, kw], bias [B, O] or None)``.
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
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                     padding=layer.padding, dilation=layer.dilation, groups=layer.groups, bias=bias is not None,
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv.eval()


def _attentions(layer: nn.Module, x: Tensor, routing_weights: Optional[Tensor]) -> Dict[str, Tensor]:
    if isinstance(layer, CondConv2d) and layer.external_routing:
        expected = (x.shape[0], layer.num_experts)
        if routing_weights is None or tuple(routing_weights.shape) != expected:
            got = None if routing_weights is None else tuple(routing_weights.shape)
            raise ValueError(f"CondConv2d with external_routing: routing_weights of shape [B, K] = {list(expected)} "
                             f"needed, got {got}")
        return {"kernel_attention": routing_weights}
    if routing_weights is not None:
        raise ValueError(f"{type(layer).__name__}: routing_weights are only for a CondConv2d with external_routing")
    return layer.attentions(x)


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
    """
    _check_layer(layer, "export_static")
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"export_static: x has shape {tuple(x.shape)}; expected one sample [1, I, H, W] or "
                         "[I, H, W] (use export_average for a calibration set)")
    weight, bias = fold_attentions(experts_oihw(layer), _attentions(layer, x, routing_weights), layer.groups,
                                   layer.bias if isinstance(layer, (CondConv2d, DynamicConv2d)) else None)
    return _static_conv(layer, weight[0], None if bias is None else bias[0])


@torch.no_grad()
def export_average(layer: nn.Module, calibration_x: Tensor, *, reduce: str = "attention", batch_size: int = 128,
                   routing_weights: Optional[Tensor] = None) -> AverageExport:
    """APPROXIMATE static export from the routing averaged over a calibration set.

    ``reduce='attention'`` averages each attention over the set, then folds;
    ``reduce='kernel'`` folds every sample, then averages the kernels and biases (the mean
    effective kernel). Both agree for CondConv and DynamicConv; for ODConv they differ
    (its attentions multiply). No static conv reproduces a dynamic one on varied inputs:
    ``relative_error`` = ``max|y_static - y_dynamic| / max|y_dynamic|`` over the
    calibration set says how close this one gets there; expect worse elsewhere.

    calibration_x: ``[N, I, H, W]``; routing_weights: ``[N, K]`` with ``external_routing``.
    ``reduce='kernel'`` holds ``batch_size`` folded kernels in memory at once.
    """
    _check_layer(layer, "export_average")
    if reduce not in ("attention", "kernel"):
        raise ValueError(f"export_average: reduce={reduce!r}; expected 'attention' or 'kernel'")
    n = calibration_x.shape[0]
    if calibration_x.dim() != 4 or n == 0:
        raise ValueError(f"export_average: calibration_x has shape {tuple(calibration_x.shape)}; expected "
                         "[N, I, H, W] with N >= 1")
    experts = experts_oihw(layer)
    expert_bias = layer.bias if isinstance(layer, (CondConv2d, DynamicConv2d)) else None
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

    outputs, sums = [], {}
    for sl in batches:
        xb = calibration_x[sl]
        rw = None if routing_weights is None else routing_weights[sl]
        outputs.append(layer(xb) if rw is None else layer(xb, rw))
        attentions = _attentions(layer, xb, rw)
        if reduce == "attention":
            summed = {name: value.sum(dim=0) for name, value in attentions.items()}
        else:
            weights, biases = fold_attentions(experts, attentions, layer.groups, expert_bias)
            summed = {"weight": weights.sum(dim=0)}
            if biases is not None:
                summed["bias"] = biases.sum(dim=0)
        sums = summed if not sums else {name: sums[name] + value for name, value in summed.items()}
    means = {name: value / n for name, value in sums.items()}

    if reduce == "attention":
        weight, bias = fold_attentions(experts, {name: value[None] for name, value in means.items()}, layer.groups,
                                       expert_bias)
        conv = _static_conv(layer, weight[0], None if bias is None else bias[0])
    else:
        conv = _static_conv(layer, means["weight"], means.get("bias"))

    max_diff, max_ref = 0.0, 0.0
    for sl, y in zip(batches, outputs):
        max_diff = max(max_diff, float((conv(calibration_x[sl]) - y).abs().max()))
        max_ref = max(max_ref, float(y.abs().max()))
    if max_ref > 0:
        relative_error = max_diff / max_ref
    else:
        relative_error = 0.0 if max_diff == 0 else float("inf")
    return AverageExport(conv, relative_error, means if reduce == "attention" else None)


# --------------------------------------------------------------------------- BatchNorm folding
class ChannelBias(nn.Module):
    """``x + bias[None, :, None, None]``: what is left of a BatchNorm folded into a conv without a bias slot."""

    def __init__(self, bias: Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias[None, :, None, None]


class _LeafTracer(torch.fx.Tracer):
    """Keeps every conv (static or dynamic, subclasses too) and BatchNorm as one call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d) + DYNAMIC_LAYERS) or super().is_leaf_module(m, qualname)


def _refuse_kernelwarehouse(model: nn.Module, what: str) -> None:
    """KernelWarehouse layers have no folding or batch-independent form here yet: a clear error."""
    if any(isinstance(m, (KWConv1d, KWConv2d, KWConv3d)) for m in model.modules()):
        raise ValueError(f"{what}: the model has KernelWarehouse layers (KWConv*), which BatchNorm folding and the "
                         f"batch-independent ONNX export do not support yet")


def _check_eval(model: nn.Module, what: str) -> None:
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"{what}: the model is in training mode ({len(training)} module(s), e.g. {training[0]!r}); "
                         "call model.eval() first (inference BatchNorm statistics, no dropout)")


def conv_batchnorm_pairs(model: nn.Module) -> Tuple[Tuple[str, str], ...]:
    """``((conv_name, bn_name), ...)``: each ``BatchNorm2d`` whose only input is a conv used by nothing else.

    Found by ``torch.fx`` symbolic tracing with convs (``nn.Conv2d`` and the dynamic layers,
    subclasses included) and BatchNorms kept as leaves; a model fx cannot trace raises.
    """
    if isinstance(model, (nn.Conv2d, nn.BatchNorm2d) + DYNAMIC_LAYERS):
        return ()
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # fx raises assorted types on untraceable Python
        raise ValueError(f"fuse_bn: torch.fx could not trace {type(model).__name__} to find conv -> BatchNorm pairs "
                         f"({type(error).__name__}: {error})") from error
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1
                and isinstance(modules[source.target], (nn.Conv2d,) + DYNAMIC_LAYERS)):
            pairs.append((source.target, node.target))
    return tuple(pairs)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def fuse_bn(model: nn.Module) -> nn.Module:
    """A copy of the eval-mode ``model`` with every conv -> BatchNorm2d pair folded (see module docstring).

    Works for a static ``nn.Conv2d``, CondConv2d, DynamicConv2d and ODConv2d (and their
    subclasses) followed directly by a ``BatchNorm2d`` with running statistics. The copy
    computes the same function as ``model`` up to float rounding (≤ 1e-12 relative in
    float64, tested for the three layers, ResNet, MobileNetV2 and EfficientNet-CondConv); the
    BatchNorms become ``nn.Identity`` or :class:`ChannelBias`. ``model`` is not modified.
    """
    _check_eval(model, "fuse_bn")
    _refuse_kernelwarehouse(model, "fuse_bn")
    fused = copy.deepcopy(model)
    for conv_name, bn_name in conv_batchnorm_pairs(fused):
        conv, bn = fused.get_submodule(conv_name), fused.get_submodule(bn_name)
        if bn.running_mean is None:
            continue  # batch statistics even in eval mode: not a constant affine map
        dtype = torch.float64
        gamma = bn.weight.to(dtype) if bn.weight is not None else torch.ones_like(bn.running_var, dtype=dtype)
        beta = bn.bias.to(dtype) if bn.bias is not None else torch.zeros_like(bn.running_var, dtype=dtype)
        s = gamma / torch.sqrt(bn.running_var.to(dtype) + bn.eps)
        t = beta - bn.running_mean.to(dtype) * s
        if isinstance(conv, DYNAMIC_LAYERS):
            experts = experts_oihw(conv)  # a view: scaling it scales the parameter
            experts.copy_(experts.to(dtype) * s[:, None, None, None])
            bias = conv.bias if isinstance(conv, (CondConv2d, DynamicConv2d)) else None
            if bias is not None:
                bias.copy_(bias.to(dtype) * s)
            if isinstance(conv, DynamicConv2d):  # softmax attention: the shift goes into the expert bias
                if bias is None:
                    conv.bias = nn.Parameter(torch.zeros(conv.num_experts, conv.out_channels, dtype=conv.weight.dtype,
                                                         device=conv.weight.device))
                conv.bias.copy_(conv.bias.to(dtype) + t)
                replacement = nn.Identity()
            else:
                replacement = ChannelBias(t.to(conv.weight.dtype))
        else:
            conv.weight.copy_(conv.weight.to(dtype) * s[:, None, None, None])
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                     device=conv.weight.device))
            conv.bias.copy_(conv.bias.to(dtype) * s + t)
            replacement = nn.Identity()
        _set_submodule(fused, bn_name, replacement)
    return fused


# --------------------------------------------------------------------------- batch-independent dynamic conv
FORMULATIONS = ("matmul", "experts")


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
    taps = [x[:, :, i * dh: i * dh + sh * (out_h - 1) + 1: sh, j * dw: j * dw + sw * (out_w - 1) + 1: sw]
            for i in range(kh) for j in range(kw)]
    patches = torch.stack(taps, dim=2)  # [B, I, T, H', W']
    return patches.reshape(patches.shape[0], patches.shape[1], kh * kw, out_h * out_w), out_h, out_w


def batched_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, dilation, groups: int) -> Tensor:
    """Per-sample convolution of an already padded ``x [B, I, H, W]`` with ``weight [B, O, I/g, kh, kw]``.

    Batched matmuls over im2col patches (a broadcast multiply and a sum over the taps for a
    depthwise conv): no operator's attributes depend on the batch size, unlike the
    folded-batch grouped conv of :func:`dynconv_torch.functional.per_sample_conv2d`.
    bias: ``[B, O]`` or None. Returns ``[B, O, H', W']``.
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
    """

    def __init__(self, layer: nn.Module, formulation: str = "matmul"):
        super().__init__()
        _check_layer(layer, "PortableDynamicConv")
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
            self.register_buffer("stacked_experts", stacked.reshape((g * k * (o // g),) + tuple(experts.shape[2:])),
                                 persistent=False)

    def forward(self, x: Tensor, routing_weights: Optional[Tensor] = None) -> Tensor:
        layer = self.layer
        if self.tf_same:
            from .models.efficientnet_cc import _pad_tf_same

            x = _pad_tf_same(x, layer.kernel_size[0], layer.stride[0])
        attentions = _attentions(layer, x, routing_weights)
        x = F.pad(x, self.pads)
        expert_bias = layer.bias if isinstance(layer, (CondConv2d, DynamicConv2d)) else None
        if self.formulation == "matmul":
            weight, bias = fold_attentions(experts_oihw(layer), attentions, layer.groups, expert_bias)
            return batched_conv2d(x, weight, bias, layer.stride, layer.dilation, layer.groups)
        a = attentions["kernel_attention"]  # [B, K]
        c = attentions.get("channel_attention")
        if c is not None:
            x = x * c[:, :, None, None]
        out = F.conv2d(x, self.stacked_experts, None, layer.stride, 0, layer.dilation, layer.groups)
        g, k = layer.groups, a.shape[1]
        out = out.reshape(-1, g, k, layer.out_channels // g, out.shape[-2], out.shape[-1])
        out = (out * a[:, None, :, None, None, None]).sum(dim=2).reshape(-1, layer.out_channels, out.shape[-2],
                                                                          out.shape[-1])
        f = attentions.get("filter_attention")
        if f is not None:
            out = out * f[:, :, None, None]
        if expert_bias is not None:
            out = out + (a @ expert_bias)[:, :, None, None]
        return out


def portable(model: nn.Module, formulation: str = "matmul") -> nn.Module:
    """A copy of ``model`` with every dynamic layer wrapped in :class:`PortableDynamicConv` (same function)."""
    _refuse_kernelwarehouse(model, "portable")
    if isinstance(model, DYNAMIC_LAYERS):
        return PortableDynamicConv(copy.deepcopy(model), formulation)
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, DYNAMIC_LAYERS):
            _set_submodule(out, name, PortableDynamicConv(module, formulation))
    return out


# --------------------------------------------------------------------------- ONNX
# Opsets the export is tested with (torch's exporter, onnxruntime); the default is the newest.
ONNX_OPSETS = tuple(range(17, 21))


def _check_input_shape(input_shape, what: str) -> Tuple[Optional[int], int, int, int]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if (shape is None or len(shape) != 4 or not (shape[0] is None or (isinstance(shape[0], int) and shape[0] > 0))
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:])):
        raise ValueError(f"{what}: input_shape={input_shape!r}; expected a 4-D NCHW shape (None or batch, C, H, W) "
                         "with positive ints, e.g. (None, 3, 32, 32)")
    return shape


def to_onnx(model: nn.Module, path: Union[str, os.PathLike], input_shape: Sequence[Optional[int]],
            opset: Optional[int] = None, *, fuse: bool = True, formulation: str = "matmul") -> str:
    """Write the eval-mode ``model`` (or a single dynamic layer) as ONNX with a dynamic batch axis.

    The graph folds BatchNorms first (:func:`fuse_bn`, unless ``fuse=False``) and computes
    every dynamic layer with :class:`PortableDynamicConv` (``formulation``), so it runs at any
    batch size. Input ``'input'`` ``[batch, C, H, W]`` (float32), output ``'output'``; the
    spatial size is fixed to ``input_shape``'s. A layer with ``external_routing`` (which needs
    routing weights from outside) cannot be exported alone.

    Args:
      model: an eval-mode ``nn.Module`` taking one NCHW tensor.
      path: the ``.onnx`` file to write (the weights are stored inside it).
      input_shape: ``(None, C, H, W)``; a batch size instead of None is only used for tracing.
      opset: ONNX opset, one of :data:`ONNX_OPSETS` (None: the newest).
      fuse: fold BatchNorms into the convolutions.
      formulation: 'matmul' or 'experts' (see :class:`PortableDynamicConv`).

    Returns the path written. Needs ``onnx`` (``pip install 'dynconv[export]'``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_onnx: expected a torch.nn.Module, got {type(model).__name__}")
    _check_eval(model, "to_onnx")
    _refuse_kernelwarehouse(model, "to_onnx")
    shape = _check_input_shape(input_shape, "to_onnx")
    if opset is None:
        opset = ONNX_OPSETS[-1]
    if opset not in ONNX_OPSETS:
        raise ValueError(f"to_onnx: opset={opset!r} is not supported; expected one of {ONNX_OPSETS}")
    if isinstance(model, CondConv2d) and model.external_routing:
        raise ValueError("to_onnx: a CondConv2d with external_routing needs routing weights from outside; export "
                         "the model that computes them")
    served = portable(fuse_bn(model) if fuse else model, formulation)
    example = torch.randn((2,) + tuple(shape[1:]), dtype=torch.float32)
    with torch.no_grad():
        try:
            served(example)
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"to_onnx: input_shape={tuple(input_shape)!r} does not fit "
                             f"{type(model).__name__}: {error}") from error
    path = os.fspath(path)
    # The TorchScript exporter: the dynamo one measured several times slower (docs/tools.md).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(served, (example,), path, dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path


def onnx_session(path: Union[str, os.PathLike], threads: Optional[int] = None):
    """An ``onnxruntime.InferenceSession`` on CPU for ``path``; a ValueError names a file that is not a valid model."""
    import onnxruntime as ort

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"onnx_session: no file {path!r}")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail / InvalidProtobuf types
        raise ValueError(f"onnx_session: {path!r} is not a valid ONNX model (corrupt or another format): "
                         f"{type(error).__name__}: {error}") from error


@torch.no_grad()
def check_onnx(model: nn.Module, path: Union[str, os.PathLike], x: Tensor, session=None) -> float:
    """``max|onnxruntime(x) - model(x)| / max|model(x)|`` for the eval-mode ``model`` and its export at ``path``."""
    session = session or onnx_session(path)
    expected = model(x.float()).numpy()
    actual = session.run(None, {session.get_inputs()[0].name: x.float().numpy()})[0]
    scale = float(abs(expected).max())
    diff = float(abs(actual - expected).max())
    return diff / scale if scale > 0 else diff
