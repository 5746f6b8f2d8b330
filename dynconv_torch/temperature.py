"""Setting the attention temperature of every dynamic layer in a model.

DY-CNN (Chen et al., CVPR 2020) and ODConv (Li et al., ICLR 2022) anneal the softmax/sigmoid
temperature T from 30 to 1 over the first epochs; the layers expose ``update_temperature(t)``
(the official OSVAI/ODConv name) and this walks a model to call it everywhere.
"""

from __future__ import annotations

from torch import nn


def set_temperature(module: nn.Module, temperature: float) -> int:
    """Call ``update_temperature(temperature)`` on ``module`` and every submodule that has one.

    Works for the layers of :mod:`dynconv_torch` and for any other module that follows the
    same protocol (the official OSVAI/ODConv ``ODConv2d`` included). Returns how many modules
    were updated, so a caller can check that a model has dynamic layers at all. Each layer
    validates ``temperature`` (finite, > 0) and raises ValueError otherwise.

    Examples:
      >>> import torch
      >>> from dynconv_torch import DynamicConv2d, ODConv2d, set_temperature
      >>> model = torch.nn.Sequential(ODConv2d(4, 8, 3, padding=1), DynamicConv2d(8, 8, 3, padding=1))
      >>> set_temperature(model, 30.0)           # how many layers were set
      2
    """
    updated = 0
    for m in module.modules():
        update = getattr(m, "update_temperature", None)
        if callable(update):
            update(temperature)
            updated += 1
    return updated
