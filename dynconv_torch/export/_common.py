"""What the export modules share about the dynamic layers and the models that hold them."""

from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor, nn

from ..condconv import CondConv2d
from ..dynamic_conv import DynamicConv2d
from ..kernelwarehouse import KWConv1d, KWConv2d, KWConv3d
from ..odconv import ODConv2d

DYNAMIC_LAYERS = (CondConv2d, DynamicConv2d, ODConv2d)
"""The dynamic layer classes the exports replace (what :func:`~dynconv_torch.export.portable` wraps)."""
KW_LAYERS = (KWConv1d, KWConv2d, KWConv3d)
"""KernelWarehouse's layers: BatchNorm folding leaves them alone, the ONNX export refuses them."""


def check_layer(layer: nn.Module, what: str) -> None:
    if not isinstance(layer, DYNAMIC_LAYERS):
        raise TypeError(
            f"{what} expects a dynconv_torch CondConv2d, DynamicConv2d or ODConv2d, got {type(layer).__name__}"
        )
    if layer.training:
        raise ValueError(
            f"{what}: {type(layer).__name__} is in training mode; call .eval() first (the export "
            "folds inference-mode attentions: no routing dropout, BatchNorm running statistics)"
        )


def refuse_kernelwarehouse(model: nn.Module, what: str) -> None:
    """A clear error for KernelWarehouse layers, which the batch-independent ONNX form does not support."""
    if any(isinstance(m, KW_LAYERS) for m in model.modules()):
        raise ValueError(
            f"{what}: the model has KernelWarehouse layers (KWConv*d), which have no batch-independent "
            f"ONNX form here (their per-sample kernels are mixed from warehouse cells shared across "
            f"layers, run as one grouped conv over the batch); export the dynconv_jax model with "
            f"dynconv_jax.export.to_stablehlo (exact at any batch) instead"
        )


def check_eval(model: nn.Module, what: str) -> None:
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"{what}: the model is in training mode ({len(training)} module(s), e.g. {training[0]!r}); "
            "call model.eval() first (inference BatchNorm statistics, no dropout)"
        )


def experts_oihw(layer: nn.Module) -> Tensor:
    """The expert kernels as ``[K, O, I/g, kh, kw]`` (CondConv2d stores them flattened, timm layout).

    Examples:
      >>> from dynconv_torch import CondConv2d
      >>> from dynconv_torch.export import experts_oihw
      >>> layer = CondConv2d(4, 8, 3, num_experts=3)
      >>> tuple(layer.weight.shape), tuple(experts_oihw(layer).shape)      # timm's flat layout, unflattened
      ((3, 288), (3, 8, 4, 3, 3))
    """
    if isinstance(layer, CondConv2d):
        return layer.weight.view((layer.num_experts,) + layer.weight_shape)
    return layer.weight


def expert_bias_of(layer: nn.Module) -> Optional[Tensor]:
    """The expert bias ``[K, O]`` of a CondConv2d or DynamicConv2d, or None (none set; ODConv2d has none)."""
    return layer.bias if isinstance(layer, (CondConv2d, DynamicConv2d)) else None


def routed_attentions(layer: nn.Module, x: Tensor, routing_weights: Optional[Tensor]) -> Dict[str, Tensor]:
    """The layer's attentions for ``x``; with ``external_routing``, ``routing_weights`` as the kernel attention."""
    if isinstance(layer, CondConv2d) and layer.external_routing:
        expected = (x.shape[0], layer.num_experts)
        if routing_weights is None or tuple(routing_weights.shape) != expected:
            got = None if routing_weights is None else tuple(routing_weights.shape)
            raise ValueError(
                f"CondConv2d with external_routing: routing_weights of shape [B, K] = {list(expected)} "
                f"needed, got {got}"
            )
        return {"kernel_attention": routing_weights}
    if routing_weights is not None:
        raise ValueError(f"{type(layer).__name__}: routing_weights are only for a CondConv2d with external_routing")
    return layer.attentions(x)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
