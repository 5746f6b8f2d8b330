"""BatchNorm folding for serving the dynamic model itself (exact for every input).

:func:`fuse_bn` folds every eval-mode ``BatchNorm2d`` that directly follows a static or
dynamic conv into it: with ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``,
every expert kernel and expert bias is scaled by ``s`` on its output channels (the
attentions do not depend on the conv's weights, and ``f * conv(c * x, W) * s =
f * conv(c * x, W * s)``). The shift ``t`` goes into the bias of a static conv (one is
added if absent) and into the expert bias of a DynamicConv2d (added if absent: its softmax
attention sums to 1, so ``sum_k a_k (b_k + t) = sum_k a_k b_k + t``). CondConv's sigmoid
routing does not sum to 1 and ODConv has no bias, so there ``t`` stays as a
:class:`ChannelBias` in the BatchNorm's place.
"""

from __future__ import annotations

import copy
from typing import Tuple

import torch
from torch import Tensor, nn

from ..dynamic_conv import DynamicConv2d
from ._common import DYNAMIC_LAYERS, KW_LAYERS, check_eval, expert_bias_of, experts_oihw, set_submodule


class ChannelBias(nn.Module):
    """``x + bias[None, :, None, None]``: what is left of a BatchNorm folded into a conv without a bias slot.

    Examples:
      >>> import torch
      >>> from dynconv_torch.export import ChannelBias
      >>> ChannelBias(torch.tensor([1.0, -1.0]))(torch.zeros(1, 2, 1, 1)).flatten()
      tensor([ 1., -1.])
    """

    def __init__(self, bias: Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias[None, :, None, None]


class _LeafTracer(torch.fx.Tracer):
    """Keeps every conv (static or dynamic, subclasses too; KernelWarehouse's as well) and BatchNorm as one
    call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d) + DYNAMIC_LAYERS + KW_LAYERS) or super().is_leaf_module(
            m, qualname
        )


def conv_batchnorm_pairs(model: nn.Module) -> Tuple[Tuple[str, str], ...]:
    """``((conv_name, bn_name), ...)``: each ``BatchNorm2d`` whose only input is a conv used by nothing else.

    Found by ``torch.fx`` symbolic tracing with convs (``nn.Conv2d`` and the dynamic layers,
    subclasses included) and BatchNorms kept as leaves; a model fx cannot trace raises. A KernelWarehouse
    layer (``KWConv*d``) is never paired: its kernel is mixed from warehouse cells that other layers share,
    so it has no kernel of its own to scale (its BatchNorm stays).

    Examples:
      >>> import torch
      >>> from dynconv_torch.models import resnet18
      >>> model = resnet18(conv="odconv", num_experts=2, stem="cifar", base_width=4, num_classes=10).eval()
      >>> from dynconv_torch.export import conv_batchnorm_pairs
      >>> conv_batchnorm_pairs(model)[:2]
      (('conv1', 'bn1'), ('layer1.0.conv1', 'layer1.0.bn1'))
    """
    if isinstance(model, (nn.Conv2d, nn.BatchNorm2d) + DYNAMIC_LAYERS):
        return ()
    try:
        graph = _LeafTracer().trace(model)
    except Exception as error:  # fx raises assorted types on untraceable Python
        raise ValueError(
            f"fuse_bn: torch.fx could not trace {type(model).__name__} to find conv -> BatchNorm pairs "
            f"({type(error).__name__}: {error})"
        ) from error
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0]
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and len(source.users) == 1
            and isinstance(modules[source.target], (nn.Conv2d,) + DYNAMIC_LAYERS)
        ):
            pairs.append((source.target, node.target))
    return tuple(pairs)


@torch.no_grad()
def fuse_bn(model: nn.Module) -> nn.Module:
    """A copy of the eval-mode ``model`` with every conv -> BatchNorm2d pair folded (see module docstring).

    Works for a static ``nn.Conv2d``, CondConv2d, DynamicConv2d and ODConv2d (and their
    subclasses) followed directly by a ``BatchNorm2d`` with running statistics; the BatchNorms after
    KernelWarehouse layers stay (:func:`conv_batchnorm_pairs`). The copy
    computes the same function as ``model`` up to float rounding (≤ 1e-12 relative in
    float64, tested for the three layers, ResNet, MobileNetV2 and EfficientNet-CondConv); the
    BatchNorms become ``nn.Identity`` or :class:`ChannelBias`. ``model`` is not modified.

    Examples:
      >>> import torch
      >>> from dynconv_torch.models import resnet18
      >>> model = resnet18(conv="odconv", num_experts=2, stem="cifar", base_width=4, num_classes=10).eval()
      >>> from dynconv_torch.export import fuse_bn
      >>> x = torch.randn(2, 3, 16, 16)
      >>> fused = fuse_bn(model)                                        # a copy; model untouched
      >>> torch.allclose(fused(x), model(x), atol=1e-5)
      True
    """
    check_eval(model, "fuse_bn")
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
            bias = expert_bias_of(conv)
            if bias is not None:
                bias.copy_(bias.to(dtype) * s)
            if isinstance(conv, DynamicConv2d):  # softmax attention: the shift goes into the expert bias
                if bias is None:
                    conv.bias = nn.Parameter(
                        torch.zeros(
                            conv.num_experts, conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device
                        )
                    )
                conv.bias.copy_(conv.bias.to(dtype) + t)
                replacement = nn.Identity()
            else:
                replacement = ChannelBias(t.to(conv.weight.dtype))
        else:
            conv.weight.copy_(conv.weight.to(dtype) * s[:, None, None, None])
            if conv.bias is None:
                conv.bias = nn.Parameter(
                    torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
                )
            conv.bias.copy_(conv.bias.to(dtype) * s + t)
            replacement = nn.Identity()
        set_submodule(fused, bn_name, replacement)
    return fused
