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
from dynconv_jax.nnx.kernelwarehouse import KWConv, WarehouseManager
from dynconv_jax.nnx.layers import BatchNorm, CondConv, DynamicConv, ODConv
from dynconv_spec.kernelwarehouse import KW_CONV, WarehousePlan

DYNAMIC_LAYERS = {"condconv": CondConv, "dynamic": DynamicConv, "odconv": ODConv}


class KWConvs:
    """The convolution definition of a KernelWarehouse model (NNX): hands out the warehouse plan's
    convolutions in module order (the order the model builds them), each a :class:`KWConv` at its place
    in the plan or, where the plan says static, an ``nnx.Conv``. The model holds :attr:`manager` as
    ``warehouse_manager`` and passes it to the layers when it calls them (:func:`apply_conv`)."""

    def __init__(self, plan: WarehousePlan, where: str, strategy: str, numerics: Mapping[str, Any]):
        self.where, self.strategy, self.numerics = where, strategy, dict(numerics)
        self.manager = WarehouseManager(plan, param_dtype=numerics["param_dtype"], rngs=numerics["rngs"])
        self._queue = plan.queue("module")

    def __call__(
        self, *, in_features: int, out_features: int, kernel_size, strides=1, padding=0, feature_group_count: int = 1
    ):
        _, layer = self._queue.take(in_features, out_features, kernel_size, feature_group_count, self.where)
        conv = dict(strides=strides, padding=padding, feature_group_count=feature_group_count, **self.numerics)
        if layer is None:
            return nnx.Conv(
                in_features, out_features, kernel_size, use_bias=False, kernel_init=kaiming_fan_out_normal, **conv
            )
        return KWConv(in_features, out_features, kernel_size, layer=layer, strategy=self.strategy, **conv)

    def finish(self) -> None:
        """Raise unless the model built every convolution of the plan."""
        self._queue.finish(self.where)


def module_defs(
    where: str,
    *,
    conv: str,
    num_experts: int,
    reduction: Optional[float],
    conv_options: Optional[Mapping[str, Any]],
    stem: str,
    dropout: float,
    num_classes: int,
    strategy: str,
    dtype: Optional[Dtype],
    param_dtype: Dtype,
    precision: PrecisionLike,
    rngs: nnx.Rngs,
    kw_plan=None,
) -> ModuleDefs:
    """Check a model's arguments (as the Linen :class:`~dynconv_jax.models._conv.DynamicNet`, ``where``
    names the model) and return the module definitions of its layers. ``kw_plan``: ``() -> WarehousePlan``
    of the model, called with ``conv='kernelwarehouse'`` (then ``conv`` and ``static_conv`` are one
    :class:`KWConvs`)."""
    options = dict(check_args(where, conv, num_experts, reduction, conv_options, stem, dropout, num_classes))
    numerics = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    static_conv = functools.partial(nnx.Conv, use_bias=False, kernel_init=kaiming_fan_out_normal, **numerics)
    if conv == "static":
        block_conv = static_conv
    elif conv == KW_CONV:
        block_conv = static_conv = KWConvs(kw_plan(), where, strategy, numerics)
    else:
        if reduction is not None:
            options["reduction"] = reduction
        block_conv = functools.partial(
            DYNAMIC_LAYERS[conv], num_experts=num_experts, strategy=strategy, **numerics, **options
        )
    return ModuleDefs(
        conv=block_conv,
        static_conv=static_conv,
        norm=functools.partial(BatchNorm, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        classifier=functools.partial(nnx.Linear, kernel_init=classifier_init, **numerics),
    )


def apply_conv(layer: nnx.Module, x, temperature, warehouse_manager: Optional[WarehouseManager] = None):
    """Call a convolution made from :attr:`ModuleDefs.conv`: dynamic layers get the ``temperature``,
    KernelWarehouse layers also the model's ``warehouse_manager``."""
    if isinstance(layer, nnx.Conv):
        return layer(x)
    if isinstance(layer, KWConv):
        return layer(x, temperature=temperature, warehouse_manager=warehouse_manager)
    return layer(x, temperature=temperature)
