"""dynconv_jax.nnx: CondConv, DynamicConv, ODConv and KernelWarehouse as ``flax.nnx`` Modules on the Linen
layers' core.

Same maths (the shared functions of :mod:`dynconv_jax.conv_base`, :mod:`dynconv_jax.attention`,
:mod:`dynconv_jax.initializers`, :mod:`dynconv_jax.norm`, :mod:`dynconv_jax.ops`), same parameter tree; :mod:`dynconv_jax.nnx.convert` moves variables
between the two APIs and the PyTorch converter. ``dynconv_jax.nnx.models`` holds the models.
"""

from dynconv_jax.nnx.convert import from_linen, load_linen_variables, load_torch
from dynconv_jax.nnx.kernelwarehouse import KWConv, WarehouseManager
from dynconv_jax.nnx.layers import BatchNorm, CondConv, DynamicConv, ODConv
from dynconv_jax.variables import linen_variables

__all__ = [
    "BatchNorm",
    "CondConv",
    "DynamicConv",
    "KWConv",
    "ODConv",
    "WarehouseManager",
    "from_linen",
    "linen_variables",
    "load_linen_variables",
    "load_torch",
]
