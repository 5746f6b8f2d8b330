"""Collect the attentions of every dynamic layer of a PyTorch model with forward hooks.

Returns the same structure as ``dynconv_jax.inspect.collect_attentions``,
``{layer_name: {attention_name: np.ndarray [B, ...]}}`` with the Flax sow names
(``kernel_attention``, ``channel_attention``, ``filter_attention``, ``spatial_attention``),
so the plotting functions of ``dynconv_jax.inspect`` draw either. Layer names are PyTorch's
``named_modules`` names (``'layer1.0.conv1'``; ``'<root>'`` for a model that is one layer).
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch
from torch import nn

from .condconv import CondConv2d
from .export import DYNAMIC_LAYERS

ROOT = "<root>"


@torch.no_grad()
def collect_attentions(model: nn.Module, x: torch.Tensor, *args, **kwargs) -> Dict[str, Dict[str, np.ndarray]]:
    """Run ``model(x, *args, **kwargs)`` once and return each dynamic layer's attentions for the batch.

    A forward pre-hook on every ``CondConv2d`` / ``DynamicConv2d`` / ``ODConv2d`` records
    ``layer.attentions(input)`` (or the ``routing_weights`` passed to a CondConv2d with
    external routing). The dynamic layers must be in eval mode: in training mode the
    routing dropout would draw differently and ODConv's BatchNorm would update twice.
    A layer called several times has its attentions concatenated along the batch axis.

    Examples:
      >>> import torch
      >>> from dynconv_torch import CondConv2d, ODConv2d
      >>> from dynconv_torch.inspect import collect_attentions
      >>> model = torch.nn.Sequential(ODConv2d(4, 8, 3, padding=1, kernel_num=3), CondConv2d(8, 8, 1, num_experts=2))
      >>> attentions = collect_attentions(model.eval(), torch.randn(4, 4, 8, 8))
      >>> sorted(attentions), attentions['0']['kernel_attention'].shape              # named_modules names
      (['0', '1'], (4, 3))
    """
    layers = [(name or ROOT, m) for name, m in model.named_modules() if isinstance(m, DYNAMIC_LAYERS)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no dynamic conv layer (CondConv2d, DynamicConv2d, ODConv2d)")
    training = [name for name, m in layers if m.training]
    if training:
        raise ValueError(
            f"collect_attentions: dynamic layers in training mode ({', '.join(training[:3])}"
            f"{', ...' if len(training) > 3 else ''}); call model.eval() first"
        )

    recorded: Dict[str, list] = {name: [] for name, _ in layers}

    def hook_for(name: str):
        def hook(layer, hook_args, hook_kwargs):
            if isinstance(layer, CondConv2d) and layer.external_routing:
                weights = hook_args[1] if len(hook_args) > 1 else hook_kwargs["routing_weights"]
                recorded[name].append({"kernel_attention": weights})
            else:
                recorded[name].append(layer.attentions(hook_args[0]))

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, m in layers]
    try:
        model(x, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, calls in recorded.items():
        if calls:
            out[name] = {
                key: np.concatenate([c[key].detach().cpu().numpy() for c in calls], axis=0) for key in calls[0]
            }
    return out
