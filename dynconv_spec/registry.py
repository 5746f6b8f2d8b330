"""The model names both frameworks register, and the registry they each keep.

``dynconv_torch.models`` and ``dynconv_jax.models`` each hold one :class:`ModelRegistry` and fill
it with explicit entry points (timm's habit)::

    @register_model
    def resnet18(**kwargs) -> ResNet: ...

so ``create_model('resnet18', conv='odconv')`` builds the same architecture, with the same
parameter names, in either framework. :data:`MODEL_NAMES` is the contract: a registry accepts
only these names and the tests check that both frameworks register all of them.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Dict, List, Optional

from .args import one_spelling
from .efficientnet_cc import VARIANTS
from .kernelwarehouse import KW_CONV
from .resnet import RESNET_ARCHS

CONV_MODELS = (*RESNET_ARCHS, "mobilenet_v2")
"""Models whose blocks take ``conv='static'|'condconv'|'dynamic'|'odconv'`` (and ``num_experts``, ``reduction``,
``stem``, ``conv_options``, ...): the ResNets and MobileNetV2."""
ODCONV_MODELS: Dict[str, tuple] = {
    "od_resnet18": ("resnet18", {}),
    "od_resnet34": ("resnet34", {}),
    "od_resnet50": ("resnet50", {}),
    "od_resnet101": ("resnet101", {}),
    "od_mobilenetv2_050": ("mobilenet_v2", {"width_mult": 0.5}),
    "od_mobilenetv2_075": ("mobilenet_v2", {"width_mult": 0.75}),
    "od_mobilenetv2_100": ("mobilenet_v2", {"width_mult": 1.0}),
}
"""The official OSVAI/ODConv entry points (``models/od_resnet.py``, ``models/od_mobilenetv2.py``): name -> (the
conv model it is, with ``conv='odconv'``, and its fixed arguments). They take the official ``kernel_num``
(or ``num_experts``; default 1) and ``reduction`` (default 1/16)."""
KW_MODELS: Dict[str, tuple] = {
    "kw_resnet18": ("resnet18", {}, {}),
    "kw_resnet50": ("resnet50", {}, {}),
    "kw_mobilenetv2_050": ("mobilenet_v2", {"width_mult": 0.5}, {"dropout": 0.0}),
    "kw_mobilenetv2_100": ("mobilenet_v2", {"width_mult": 1.0}, {"dropout": 0.0}),
}
"""The official OSVAI/KernelWarehouse entry points (``models/kw_resnet.py``, ``models/kw_mobilenetv2.py``):
name -> (the conv model it is, with ``conv='kernelwarehouse'``, its fixed arguments, and the defaults of its
official arguments that differ from the conv model's). ``sharing_range`` defaults to the conv model's
(:data:`dynconv_spec.kernelwarehouse.DEFAULT_SHARING`)."""
EFFICIENTNET_CC_MODELS = tuple(VARIANTS)
"""timm's EfficientNet-CondConv entry points."""
MODEL_NAMES = CONV_MODELS + tuple(ODCONV_MODELS) + tuple(KW_MODELS) + EFFICIENTNET_CC_MODELS
"""Every registered name, in both frameworks."""


def odconv_model_args(
    name: str,
    kernel_num: Optional[int] = None,
    reduction: float = 0.0625,
    *,
    num_experts: Optional[int] = None,
    **kwargs: Any,
) -> Dict[str, Any]:
    """The conv-model arguments of the official ODConv entry point ``name`` (a key of :data:`ODCONV_MODELS`).

    The experts: the official ``kernel_num`` or this library's ``num_experts`` (one of them; default 1, the
    official default); ``kwargs`` are further arguments of the ResNet / MobileNetV2 (``num_classes``,
    ``dropout``, ``stem``, ``conv_options``, ...).

    Examples:
      >>> from dynconv_spec import odconv_model_args
      >>> odconv_model_args("od_mobilenetv2_050", kernel_num=4)
      {'conv': 'odconv', 'num_experts': 4, 'reduction': 0.0625, 'width_mult': 0.5}
    """
    _, fixed = ODCONV_MODELS[name]
    clash = sorted({"conv", *fixed} & set(kwargs))
    if clash:
        raise ValueError(f"{name}: {clash} are fixed by the entry point")
    experts = one_spelling(name, "kernel_num", kernel_num, num_experts, default=1)
    return dict(conv="odconv", num_experts=experts, reduction=reduction, **fixed, **kwargs)


def kw_model_args(
    name: str,
    reduction: float = 0.0625,
    cell_num_ratio=1.0,
    cell_inplane_ratio=1.0,
    cell_outplane_ratio=1.0,
    sharing_range=None,
    nonlocal_basis_ratio: float = 1.0,
    spatial_partition=True,
    drop_path_rate: float = 0.0,
    **kwargs: Any,
) -> Dict[str, Any]:
    """The conv-model arguments of the official KernelWarehouse entry point ``name`` (a key of :data:`KW_MODELS`).

    The official arguments (``reduction``, ``cell_num_ratio``, ``cell_inplane_ratio``,
    ``cell_outplane_ratio``, ``sharing_range``, ``nonlocal_basis_ratio``; the configs of
    :data:`dynconv_spec.kernelwarehouse.OFFICIAL_CONFIGS`) become ``reduction`` and ``conv_options``;
    ``kwargs`` are further arguments of the ResNet / MobileNetV2 (``num_classes``, ``dropout``, ``stem``, ...).
    ``drop_path_rate`` (the official stochastic depth, a training-only option) must be 0 here.


    Examples:
      >>> from dynconv_spec import kw_model_args
      >>> args = kw_model_args("kw_resnet18", cell_num_ratio=4.0, num_classes=10)
      >>> args["conv"], args["conv_options"]["cell_num_ratio"], args["num_classes"]
      ('kernelwarehouse', 4.0, 10)
    """
    _, fixed, defaults = KW_MODELS[name]
    clash = sorted({"conv", "num_experts", "conv_options", *fixed} & set(kwargs))
    if clash:
        raise ValueError(
            f"{name}: {clash} are fixed by the entry point (KernelWarehouse options are its own "
            f"arguments: cell_num_ratio=, sharing_range=, ...)"
        )
    if drop_path_rate:
        raise ValueError(
            f"{name}: drop_path_rate={drop_path_rate!r}: stochastic depth is not implemented; the "
            f"models equal the official ones at drop_path_rate=0 (and in inference at any rate)"
        )
    options = dict(
        cell_num_ratio=cell_num_ratio,
        cell_inplane_ratio=cell_inplane_ratio,
        cell_outplane_ratio=cell_outplane_ratio,
        nonlocal_basis_ratio=nonlocal_basis_ratio,
        spatial_partition=spatial_partition,
    )
    if sharing_range is not None:
        options["sharing_range"] = sharing_range
    extra = {k: v for k, v in defaults.items() if k not in kwargs}
    return dict(conv=KW_CONV, reduction=reduction, conv_options=options, **fixed, **extra, **kwargs)


class ModelRegistry:
    """Entry points by name for one framework (``where``, e.g. ``'dynconv_torch.models'``).

    Examples:
      >>> from dynconv_spec import ModelRegistry
      >>> registry = ModelRegistry("mylib.models")
      >>> @registry.register
      ... def resnet18(**kwargs):          # a name of MODEL_NAMES
      ...     return ("my resnet18", kwargs)
      >>> registry.names("res*"), registry.create("resnet18", num_classes=10)
      (['resnet18'], ('my resnet18', {'num_classes': 10}))
    """

    def __init__(self, where: str):
        self.where = where
        self._entry_points: Dict[str, Callable[..., Any]] = {}

    def register(self, entry_point: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator: register ``entry_point`` under its ``__name__`` (one of :data:`MODEL_NAMES`).

        Examples:
          >>> from dynconv_spec import ModelRegistry
          >>> registry = ModelRegistry("mylib.models")
          >>> registry.register(lambda **kwargs: None)
          Traceback (most recent call last):
          ValueError: ...
        """
        name = entry_point.__name__
        if name not in MODEL_NAMES:
            raise ValueError(
                f"{self.where}: {name!r} is not a model name of dynconv_spec.registry.MODEL_NAMES; "
                "add it there first so that both frameworks register it"
            )
        if name in self._entry_points:
            raise ValueError(f"{self.where}: model {name!r} is registered twice")
        self._entry_points[name] = entry_point
        return entry_point

    def names(self, pattern: Optional[str] = None) -> List[str]:
        """The registered names, sorted; ``pattern`` filters them shell-style (``'od_*'``).

        Examples:
          >>> import dynconv_jax.models as jm
          >>> jm.list_models("od_resnet*")              # the registry's names, as list_models
          ['od_resnet101', 'od_resnet18', 'od_resnet34', 'od_resnet50']
        """
        return sorted(n for n in self._entry_points if pattern is None or fnmatch.fnmatchcase(n, pattern))

    def create(self, name: str, **kwargs: Any) -> Any:
        """Build the model ``name`` with the entry point's keyword arguments.

        Examples:
          >>> import dynconv_jax.models as jm
          >>> model = jm.create_model("resnet18", conv="odconv", num_experts=4, num_classes=10)
          >>> model.conv, model.num_experts, model.num_classes
          ('odconv', 4, 10)
        """
        if name not in self._entry_points:
            raise ValueError(f"{self.where}: unknown model {name!r}; known models: {', '.join(self.names())}")
        return self._entry_points[name](**kwargs)

    def entry_point(self, name: str) -> Callable[..., Any]:
        """The registered entry point ``name`` (for its signature and docstring)."""
        if name not in self._entry_points:
            raise ValueError(f"{self.where}: unknown model {name!r}; known models: {', '.join(self.names())}")
        return self._entry_points[name]
