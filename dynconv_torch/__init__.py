"""PyTorch reference implementations of dynamic convolutions (NCHW).

- :class:`CondConv2d` — CondConv (Yang et al., NeurIPS 2019), timm's expert layout.
- :class:`DynamicConv2d` — DY-CNN dynamic convolution (Chen et al., CVPR 2020).
- :class:`ODConv2d` — ODConv (Li et al., ICLR 2022), state-dict compatible with OSVAI/ODConv.
- :class:`KWConv2d` (``KWConv1d``, ``KWConv3d``, ``KWLinear``) and :class:`WarehouseManager` —
  KernelWarehouse (Li & Yao, ICML 2024), state-dict compatible with OSVAI/KernelWarehouse.
- :func:`set_temperature` — set T on every dynamic layer of a model.

This package never imports JAX.
"""

from dynconv_spec import __version__

from .condconv import CondConv2d
from .dynamic_conv import DynamicConv2d, DynamicConvAttention
from .kernelwarehouse import KWAttention, KWConv1d, KWConv2d, KWConv3d, KWLinear, WarehouseManager
from .odconv import ODConv2d, ODConvAttention
from .temperature import set_temperature

__all__ = [
    "__version__",
    "CondConv2d",
    "DynamicConv2d",
    "DynamicConvAttention",
    "ODConv2d",
    "ODConvAttention",
    "KWAttention",
    "KWConv1d",
    "KWConv2d",
    "KWConv3d",
    "KWLinear",
    "WarehouseManager",
    "set_temperature",
]
