"""The conv switch and the fields shared by the Flax models (twin of ``dynconv_torch.models._conv``).

One switch ``conv='static'|'condconv'|'dynamic'|'odconv'`` gives the CondConv (Yang et al., NeurIPS
2019), DynamicConv (Chen et al., CVPR 2020) or ODConv (Li et al., ICLR 2022) version of a network.
As in flax's ``examples/imagenet``, a model builds module definitions (``functools.partial`` of a
Module class, :class:`ModuleDefs`) in its ``__call__`` and passes them to its blocks as fields; a
block completes them with keywords (``features``, ``kernel_size``, ``name``, ...). Stems, downsample
shortcuts and classifiers stay static. Padding is explicit and symmetric (``(k - 1) // 2``), as
PyTorch pads, so outputs and checkpoints carry over (flax's 'SAME' pads stride-2 convolutions
asymmetrically).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Mapping, NamedTuple, Optional

import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype, PrecisionLike

from dynconv_jax import CondConv, DynamicConv, ODConv
from dynconv_jax.initializers import classifier_init, kaiming_fan_out_normal
from dynconv_jax.kernelwarehouse import KWConv, WarehouseManager
from dynconv_jax.norm import BatchNorm
from dynconv_spec import check_model_args
from dynconv_spec.kernelwarehouse import KW_CONV, KW_OPTIONS, WarehousePlan

#: A Module class or a ``functools.partial`` of one (flax's examples call it ``ModuleDef``).
ModuleDef = Any

DYNAMIC_LAYERS = {"condconv": CondConv, "dynamic": DynamicConv, "odconv": ODConv}
#: The fields each dynamic layer takes (what ``conv_options`` may name, less the reserved ones).
LAYER_OPTIONS = {
    **{conv: frozenset(f.name for f in dataclasses.fields(layer) if f.init) for conv, layer in DYNAMIC_LAYERS.items()},
    KW_CONV: frozenset(KW_OPTIONS),
}  # KernelWarehouse: the warehouse options of the model's plan


def check_args(
    where: str,
    conv: str,
    num_experts: int,
    reduction: Optional[float],
    conv_options: Optional[Mapping[str, Any]],
    stem: str,
    dropout: float,
    num_classes: int,
) -> Dict[str, Any]:
    """:func:`dynconv_spec.check_model_args` against the Flax layers' fields (both Flax APIs);
    returns ``conv_options``."""
    return check_model_args(
        where, conv, num_experts, reduction, conv_options, stem, dropout, num_classes, LAYER_OPTIONS
    )


def check_input(x, in_channels: int, where: str) -> None:
    """``x`` must be ``[B, H, W, in_channels]`` floating point (channels-last)."""
    if x.ndim != 4 or x.shape[-1] != in_channels:
        raise ValueError(
            f"{where}: input shape {tuple(x.shape)} must be [batch, height, width, {in_channels}] "
            f"(channels-last, in_channels={in_channels})"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{where}: input dtype {x.dtype} must be floating point")


def apply_conv(layer: nn.Module, x, *, train: bool, temperature):
    """Call a convolution made from :attr:`ModuleDefs.conv`: a dynamic layer gets ``train`` and
    ``temperature``, a static ``nn.Conv`` only ``x``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from dynconv_jax import CondConv
      >>> from dynconv_jax.models import apply_conv
      >>> x = jnp.ones((1, 4, 4, 2))
      >>> for layer in (nn.Conv(3, (1, 1)), CondConv(3, (1, 1))):           # static: x only; dynamic: + train, T
      ...     variables = layer.init(jax.random.key(0), x)
      ...     y = layer.apply(variables, x, method=lambda m, x: apply_conv(m, x, train=False, temperature=1.0))
      ...     print(type(layer).__name__, y.shape)
      Conv (1, 4, 4, 3)
      CondConv (1, 4, 4, 3)
    """
    return layer(x) if isinstance(layer, nn.Conv) else layer(x, train=train, temperature=temperature)


class ModuleDefs(NamedTuple):
    """The module definitions a model's layers are made from (each a partial Module class), in Linen
    (:meth:`DynamicNet.module_defs`) and NNX (:func:`dynconv_jax.nnx.models._conv.module_defs`).

    Attributes:
      conv: the blocks' convolutions: the static conv or the dynamic layer ``conv=`` selects; Linen
        ``conv(features=, kernel_size=, strides=, padding=, feature_group_count=, name=)``, called
        with :func:`apply_conv`.
      static_conv: stems and shortcuts: a bias-free static conv with PyTorch's kaiming fan-out init.
      norm: PyTorch-semantics BatchNorm (Linen: batch statistics when training), ``norm(name=)``.
      classifier: the dense classifier with the official models' N(0, 0.01²) init,
        ``classifier(features=, name=)``.

    Examples:
      >>> from dynconv_jax.models import ModuleDefs, resnet18
      >>> defs = resnet18(conv="odconv").module_defs(train=False)
      >>> isinstance(defs, ModuleDefs), defs.conv.func.__name__        # the dynamic layer conv= selects
      (True, 'ODConv')
    """

    conv: ModuleDef
    static_conv: ModuleDef
    norm: ModuleDef
    classifier: ModuleDef


def kw_module_defs(plan: WarehousePlan, numerics: Mapping[str, Any], strategy: str) -> ModuleDef:
    """The convolution definition of a KernelWarehouse model (Linen): :class:`~dynconv_jax.KWConv` sharing
    one :class:`~dynconv_jax.WarehouseManager` (``warehouse_manager``, created in the calling model), a
    KernelWarehouse layer or a static convolution wherever the plan says."""
    manager = WarehouseManager(plan, param_dtype=numerics["param_dtype"], name="warehouse_manager")
    return functools.partial(KWConv, warehouse_manager=manager, strategy=strategy, **numerics)


class DynamicNet(nn.Module):
    """The fields and checks shared by the Flax ResNet and MobileNetV2.

    Attributes:
      conv: 'static', 'condconv', 'dynamic', 'odconv' or 'kernelwarehouse': the blocks' convolutions.
      num_experts: experts per dynamic layer.
      num_classes: outputs of the classifier.
      stem: 'imagenet' or 'cifar' (the model's own meaning, see its class).
      dropout: dropout on the pooled features before the classifier (the model sets its default).
      reduction: attention reduction ratio of DynamicConv / ODConv (None: the layer's default).
      in_channels: input channels (checked against the input).
      conv_options: further fields for every dynamic layer (e.g. ``{'routing_dropout': 0.1}``; KernelWarehouse:
        the warehouse options of :class:`dynconv_spec.kernelwarehouse.KWOptions`, e.g. ``{'cell_num_ratio': 4}``).
      strategy: per-sample conv strategy of every dynamic layer (:func:`dynconv_jax.ops.dynamic_conv`).
      dtype: the dtype of the computation of every layer (default: inferred from input and params).
      param_dtype: the dtype of every parameter.
      precision: numerical precision of every convolution and dense layer.

    Examples:
      >>> from dynconv_jax.models import DynamicNet, ResNet
      >>> issubclass(ResNet, DynamicNet), ResNet(conv="odconv").num_experts   # the shared fields
      (True, 4)
    """

    conv: str = "static"
    num_experts: int = 4
    num_classes: int = 1000
    stem: str = "imagenet"
    dropout: float = 0.0
    reduction: Optional[float] = None
    in_channels: int = 3
    conv_options: Optional[Mapping[str, Any]] = None
    strategy: str = "auto"
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None

    def __post_init__(self):
        check_args(
            type(self).__name__,
            self.conv,
            self.num_experts,
            self.reduction,
            self.conv_options,
            self.stem,
            self.dropout,
            self.num_classes,
        )
        super().__post_init__()

    def module_defs(self, train: bool) -> ModuleDefs:
        """The module definitions of this model's layers; ``train`` selects BatchNorm's statistics."""
        options = dict(
            check_args(
                type(self).__name__,
                self.conv,
                self.num_experts,
                self.reduction,
                self.conv_options,
                self.stem,
                self.dropout,
                self.num_classes,
            )
        )
        numerics = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        static_conv = functools.partial(nn.Conv, use_bias=False, kernel_init=kaiming_fan_out_normal, **numerics)
        if self.conv == "static":
            conv = static_conv
        elif self.conv == KW_CONV:  # every convolution, stems and shortcuts too, as the warehouse plan says
            conv = static_conv = kw_module_defs(self.kw_plan(), numerics, self.strategy)
        else:
            if self.reduction is not None:
                options["reduction"] = self.reduction
            conv = functools.partial(
                DYNAMIC_LAYERS[self.conv], num_experts=self.num_experts, strategy=self.strategy, **numerics, **options
            )
        norm = functools.partial(
            BatchNorm, use_running_average=not train, dtype=self.dtype, param_dtype=self.param_dtype
        )
        classifier = functools.partial(nn.Dense, kernel_init=classifier_init, **numerics)
        return ModuleDefs(conv=conv, static_conv=static_conv, norm=norm, classifier=classifier)

    def kw_plan(self) -> WarehousePlan:
        """The warehouse plan of this model with ``conv='kernelwarehouse'`` (each model provides it)."""
        raise NotImplementedError(f"{type(self).__name__} has no KernelWarehouse plan")
