"""The conv-type factory shared by the PyTorch models.

Every model takes ``conv='static'|'condconv'|'dynamic'|'odconv'`` and builds the
convolutions of its blocks through :func:`make_conv`, so one switch turns a ResNet or
MobileNetV2 into its CondConv (Yang et al., NeurIPS 2019), DynamicConv (Chen et al.,
CVPR 2020) or ODConv (Li et al., ICLR 2022) version. The stem, the downsample
shortcut and the classifier stay static (:func:`static_conv`), as in the official
OSVAI/ODConv models.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

from torch import nn

from dynconv_spec import CONV_TYPES, check_model_args
from dynconv_spec.kernelwarehouse import KW_CONV, KW_OPTIONS, WarehousePlan
from dynconv_torch import CondConv2d, DynamicConv2d, ODConv2d
from dynconv_torch.kernelwarehouse import WarehouseManager

DYNAMIC_LAYERS = {"condconv": CondConv2d, "dynamic": DynamicConv2d, "odconv": ODConv2d}
#: The keyword arguments each dynamic layer takes (what ``conv_options`` may name, less the reserved ones);
#: KernelWarehouse's are its warehouse options, which the model's manager takes.
LAYER_OPTIONS = {
    **{conv: frozenset(inspect.signature(layer).parameters) for conv, layer in DYNAMIC_LAYERS.items()},
    KW_CONV: frozenset(KW_OPTIONS),
}


def check_args(
    where: str,
    conv: str,
    num_experts: int,
    reduction: Optional[float],
    conv_options: Optional[Mapping[str, Any]],
    stem: str,
    dropout: float,
    num_classes: int,
) -> dict:
    """:func:`dynconv_spec.check_model_args` against the PyTorch layers' options; returns ``conv_options``."""
    return check_model_args(
        where, conv, num_experts, reduction, conv_options, stem, dropout, num_classes, LAYER_OPTIONS
    )


def static_conv(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, groups: int = 1
) -> nn.Conv2d:
    """A bias-free ``nn.Conv2d`` with the He (fan-out) normal init of torchvision and the official models.

    Examples:
      >>> from dynconv_torch.models import static_conv
      >>> conv = static_conv(3, 64, 7, stride=2, padding=3)          # a ResNet stem
      >>> conv.bias is None, tuple(conv.weight.shape)
      (True, (64, 3, 7, 7))
    """
    layer = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    return layer


def make_conv(
    conv: str,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    *,
    num_experts: int = 4,
    reduction: Optional[float] = None,
    conv_options: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """One convolution of the requested type (no bias unless the layer's default or ``conv_options`` adds one).

    ``conv_options`` are extra keyword arguments of the dynamic layer (e.g. ``routing_dropout``
    for CondConv, ``bias`` / ``min_channels`` for DynamicConv); ``reduction=None`` keeps the
    layer's default (1/16 for ODConv, 1/4 for DynamicConv).

    Examples:
      >>> from dynconv_torch.models import make_conv
      >>> conv = make_conv("odconv", 16, 32, 3, padding=1, num_experts=4)
      >>> type(conv).__name__, tuple(conv.weight.shape)
      ('ODConv2d', (4, 32, 16, 3, 3))
      >>> type(make_conv("static", 16, 32, 3)).__name__
      'Conv2d'
    """
    options = dict(conv_options or {})
    if reduction is not None:
        options["reduction"] = reduction
    if conv == "static":
        return static_conv(in_channels, out_channels, kernel_size, stride, padding, groups)
    if conv == KW_CONV:
        raise ValueError(
            "make_conv: KernelWarehouse layers share their model's warehouses; a model builds them with KWBuilder"
        )
    if conv not in DYNAMIC_LAYERS:
        raise ValueError(f"make_conv: conv={conv!r} is not a conv type; expected one of {CONV_TYPES}")
    # ODConv2d takes num_experts as a keyword alias of the official kernel_num.
    return DYNAMIC_LAYERS[conv](
        in_channels, out_channels, kernel_size, stride, padding, groups=groups, num_experts=num_experts, **options
    )


class KWBuilder:
    """Builds a KernelWarehouse model's convolutions in the reservation order of its warehouse plan
    (the order the official models call ``Warehouse_Manager.reserve``): each one static or reserved
    from :attr:`manager` as the plan says, then :meth:`finish` stores the warehouses and allocates."""

    def __init__(self, plan: WarehousePlan, where: str):
        self.where = where
        self.manager = WarehouseManager(**vars(plan.options))
        self._queue = plan.queue("reserve")

    def conv(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0, groups: int = 1
    ) -> nn.Module:
        """The next convolution of the plan (``make_conv``'s arguments); static ones as :func:`static_conv`."""
        spec, _ = self._queue.take(in_channels, out_channels, (kernel_size, kernel_size), groups, self.where)
        if spec.warehouse_name is None:
            return static_conv(in_channels, out_channels, kernel_size, stride, padding, groups)
        return self.manager.reserve(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            groups=groups,
            bias=False,
            warehouse_name=spec.warehouse_name,
        )

    def finish(self, model: nn.Module) -> None:
        """After the model is built: every planned conv built, warehouses stored, cells allocated."""
        self._queue.finish(self.where)
        self.manager.store()
        self.manager.allocate(model)
