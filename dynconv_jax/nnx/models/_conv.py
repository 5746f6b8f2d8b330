"""The conv switch of the NNX models (twin of :mod:`dynconv_jax.models._conv`).

:func:`module_defs` gives the module definitions (``functools.partial`` of the constructors, ``rngs``
bound) a model builds its layers from: the blocks' convolution (``nnx.Conv`` or the selected dynamic
layer of :mod:`dynconv_jax.nnx`), static stem/shortcut convolutions, the PyTorch-semantics BatchNorm
and the classifier, with the Linen models' initializers, so the parameter paths and shapes are the
Linen models' and whole-model checkpoints convert the same way. NNX creates parameters eagerly, so
each definition is completed with its input width: ``conv(in_features=, out_features=, kernel_size=,
strides=, padding=, feature_group_count=)``, ``norm(num_features)``, ``classifier(in_features,
out_features)``.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

from flax import nnx
from flax.typing import Dtype, PrecisionLike

from dynconv_jax.initializers import classifier_init, kaiming_fan_out_normal
from dynconv_jax.models._conv import ModuleDefs, check_args
from dynconv_jax.nnx.layers import BatchNorm, CondConv, DynamicConv, ODConv

DYNAMIC_LAYERS = {"condconv": CondConv, "dynamic": DynamicConv, "odconv": ODConv}


def module_defs(where: str, *, conv: str, num_experts: int, reduction: Optional[float],
                conv_options: Optional[Mapping[str, Any]], stem: str, dropout: float, num_classes: int,
                strategy: str, dtype: Optional[Dtype], param_dtype: Dtype, precision: PrecisionLike,
                rngs: nnx.Rngs) -> ModuleDefs:
    """Check a model's arguments (as the Linen :class:`~dynconv_jax.models._conv.DynamicNet`, ``where``
    names the model) and return the module definitions of its layers."""
    options = dict(check_args(where, conv, num_experts, reduction, conv_options, stem, dropout, num_classes))
    numerics = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    static_conv = functools.partial(nnx.Conv, use_bias=False, kernel_init=kaiming_fan_out_normal, **numerics)
    if conv == "static":
        block_conv = static_conv
    else:
        if reduction is not None:
            options["reduction"] = reduction
        block_conv = functools.partial(DYNAMIC_LAYERS[conv], num_experts=num_experts, strategy=strategy, **numerics,
                                       **options)
    return ModuleDefs(conv=block_conv, static_conv=static_conv,
                      norm=functools.partial(BatchNorm, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                      classifier=functools.partial(nnx.Linear, kernel_init=classifier_init, **numerics))


def apply_conv(layer: nnx.Module, x, temperature):
    """Call a convolution made from :attr:`ModuleDefs.conv`: dynamic layers get the ``temperature``."""
    return layer(x) if isinstance(layer, nnx.Conv) else layer(x, temperature=temperature)
