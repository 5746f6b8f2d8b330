"""dynconv_jax: CondConv, DynamicConv, ODConv and KernelWarehouse as Flax modules, channels-last, 1-D/2-D/3-D.

``dynconv_jax.models`` and ``dynconv_jax.convert`` are submodules imported on demand.
"""

from dynconv_jax.condconv import CondConv
from dynconv_jax.dynamic_conv import DynamicConv
from dynconv_jax.kernelwarehouse import KWConv, WarehouseManager
from dynconv_jax.norm import BatchNorm
from dynconv_jax.odconv import ODConv
from dynconv_jax.ops import aggregate_kernels, dynamic_conv, per_sample_conv, static_conv
from dynconv_spec import __version__

__all__ = [
    "__version__",
    "BatchNorm",
    "CondConv",
    "DynamicConv",
    "KWConv",
    "ODConv",
    "aggregate_kernels",
    "dynamic_conv",
    "per_sample_conv",
    "static_conv",
    "WarehouseManager",
]
