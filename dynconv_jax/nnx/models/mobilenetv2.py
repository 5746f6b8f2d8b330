"""MobileNetV2 as an NNX Module with static or dynamic convolutions, channels-last.

Twin of :mod:`dynconv_jax.models.mobilenetv2` (Linen): same arguments, architecture and
parameter paths (``features_0_0``, ``features_1/conv_0_0``, ``classifier_1``; ``classifier`` and
``warehouse_manager`` with KernelWarehouse), so Linen variables, PyTorch and the official OSVAI/ODConv
``od_mobilenetv2_*`` and OSVAI/KernelWarehouse ``kw_mobilenetv2_*`` checkpoints load into it.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, PrecisionLike

from dynconv_jax.models._conv import ModuleDef, check_input
from dynconv_jax.nnx.models._conv import apply_conv, module_defs
from dynconv_jax.nnx.models._registry import register_model
from dynconv_spec import KW_CONV, check_width_mult, stage_settings
from dynconv_spec.kernelwarehouse import mobilenetv2_plan
from dynconv_spec.registry import kw_model_args, odconv_model_args


def _add_conv_bn(
    module: nnx.Module,
    prefix: str,
    conv: ModuleDef,
    norm: ModuleDef,
    in_features: int,
    features: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
) -> None:
    """Attach a ``ConvBNReLU``'s conv and BatchNorm as ``{prefix}_0`` and ``{prefix}_1`` (the Linen paths)."""
    setattr(
        module,
        f"{prefix}_0",
        conv(
            in_features=in_features,
            out_features=features,
            kernel_size=(kernel_size, kernel_size),
            strides=stride,
            padding=(kernel_size - 1) // 2,
            feature_group_count=groups,
        ),
    )
    setattr(module, f"{prefix}_1", norm(features))


def _conv_bn_relu6(module: nnx.Module, prefix: str, x, temperature, warehouse_manager):
    """PyTorch's ``ConvBNReLU`` Sequential: conv ``{prefix}_0``, BatchNorm ``{prefix}_1``, ReLU6."""
    conv, bn = getattr(module, f"{prefix}_0"), getattr(module, f"{prefix}_1")
    return nnx.relu6(bn(apply_conv(conv, x, temperature, warehouse_manager)))


class InvertedResidual(nnx.Module):
    """Expansion 1×1 (absent when t = 1) → depthwise 3×3 → linear projection 1×1, residual if shapes allow
    (arguments as the Linen :class:`dynconv_jax.models.mobilenetv2.InvertedResidual`)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, *, conv: ModuleDef, norm: ModuleDef):
        hidden = int(round(inp * expand_ratio))
        i = 0  # index in PyTorch's ``self.conv`` Sequential
        self.expand = expand_ratio != 1
        if self.expand:
            _add_conv_bn(self, "conv_0", conv, norm, inp, hidden, 1)
            i = 1
        self.depthwise = f"conv_{i}"
        _add_conv_bn(self, self.depthwise, conv, norm, hidden, hidden, 3, stride, groups=hidden)
        self.project, self.project_bn = f"conv_{i + 1}", f"conv_{i + 2}"
        setattr(self, self.project, conv(in_features=hidden, out_features=oup, kernel_size=(1, 1), padding=0))
        setattr(self, self.project_bn, norm(oup))
        self.residual = stride == 1 and inp == oup

    def __call__(self, x, temperature=None, warehouse_manager=None):
        h = _conv_bn_relu6(self, "conv_0", x, temperature, warehouse_manager) if self.expand else x
        h = _conv_bn_relu6(self, self.depthwise, h, temperature, warehouse_manager)
        h = getattr(self, self.project_bn)(apply_conv(getattr(self, self.project), h, temperature, warehouse_manager))
        return x + h if self.residual else h


class MobileNetV2(nnx.Module):
    """MobileNetV2 with a selectable convolution type after the stem (arguments as the Linen
    :class:`dynconv_jax.models.MobileNetV2`), plus ``rngs``.

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import MobileNetV2
      >>> model = nnx.eval_shape(lambda: MobileNetV2(width_mult=0.25, stem="cifar", num_classes=10,
      ...                                            rngs=nnx.Rngs(0)))          # shapes only
      >>> model.features_0_0.kernel.shape, model.classifier_1.kernel.shape
      ((3, 3, 3, 8), (1280, 10))
    """

    def __init__(
        self,
        width_mult: float = 1.0,
        *,
        conv: str = "static",
        num_experts: int = 4,
        num_classes: int = 1000,
        stem: str = "imagenet",
        dropout: float = 0.2,
        reduction: Optional[float] = None,
        in_channels: int = 3,
        conv_options: Optional[Mapping[str, Any]] = None,
        strategy: str = "auto",
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        check_width_mult(width_mult)
        defs = module_defs(
            "MobileNetV2",
            conv=conv,
            num_experts=num_experts,
            reduction=reduction,
            conv_options=conv_options,
            stem=stem,
            dropout=dropout,
            num_classes=num_classes,
            strategy=strategy,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
            kw_plan=lambda: mobilenetv2_plan(width_mult, stem, in_channels, reduction, conv_options),
        )
        self.in_channels = in_channels
        channels, stem_stride, stages, last_channel = stage_settings(width_mult, stem)
        _add_conv_bn(self, "features_0", defs.static_conv, defs.norm, in_channels, channels, 3, stem_stride)
        index = 1
        for t, out, n, s in stages:
            for j in range(n):
                setattr(
                    self,
                    f"features_{index}",
                    InvertedResidual(channels, out, s if j == 0 else 1, t, conv=defs.conv, norm=defs.norm),
                )
                channels = out
                index += 1
        self.num_blocks = index - 1
        _add_conv_bn(self, f"features_{index}", defs.conv, defs.norm, channels, last_channel, 1)
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        self.head = "classifier" if conv == KW_CONV else "classifier_1"  # the official models' names
        setattr(self, self.head, defs.classifier(last_channel, num_classes))
        self.warehouse_manager = nnx.data(None)
        if conv == KW_CONV:
            defs.conv.finish()
            self.warehouse_manager = defs.conv.manager

    def __call__(self, x, temperature=None):
        """``x [B, H, W, in_channels]`` → logits ``[B, num_classes]``; ``temperature`` goes to every dynamic layer."""
        check_input(x, self.in_channels, "MobileNetV2")
        manager = self.warehouse_manager
        x = _conv_bn_relu6(self, "features_0", x, temperature, manager)
        for index in range(1, self.num_blocks + 1):
            x = getattr(self, f"features_{index}")(x, temperature, manager)
        x = _conv_bn_relu6(self, f"features_{self.num_blocks + 1}", x, temperature, manager)
        x = jnp.mean(x, axis=(1, 2))  # [B, C]
        return getattr(self, self.head)(self.dropout(x))


@register_model
def mobilenet_v2(width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """MobileNetV2; keyword arguments as :class:`MobileNetV2` (``rngs`` required).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import mobilenet_v2
      >>> model = nnx.eval_shape(lambda: mobilenet_v2(width_mult=0.5, num_classes=10, rngs=nnx.Rngs(0)))
      >>> model.classifier_1.kernel.shape
      (1280, 10)
    """
    return MobileNetV2(width_mult=width_mult, **kwargs)


@register_model
def od_mobilenetv2_050(**kwargs) -> MobileNetV2:
    """OSVAI/ODConv ``od_mobilenetv2_050(kernel_num=1, reduction=0.0625, **kwargs)``: MobileNetV2 ×0.5 with
    ODConv (:func:`dynconv_spec.registry.odconv_model_args`: ``num_experts=`` in place of the official ``kernel_num=``
    works too; ``kwargs`` as :class:`MobileNetV2`).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import od_mobilenetv2_050
      >>> model = nnx.eval_shape(lambda: od_mobilenetv2_050(kernel_num=4, rngs=nnx.Rngs(0)))    # shapes only
      >>> model.classifier_1.kernel.shape
      (1280, 1000)
    """
    return mobilenet_v2(**odconv_model_args("od_mobilenetv2_050", **kwargs))


@register_model
def od_mobilenetv2_075(**kwargs) -> MobileNetV2:
    """OSVAI/ODConv ``od_mobilenetv2_075``: MobileNetV2 ×0.75 with ODConv (arguments as :func:`od_mobilenetv2_050`).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import od_mobilenetv2_075
      >>> model = nnx.eval_shape(lambda: od_mobilenetv2_075(kernel_num=4, rngs=nnx.Rngs(0)))    # shapes only
      >>> model.classifier_1.kernel.shape
      (1280, 1000)
    """
    return mobilenet_v2(**odconv_model_args("od_mobilenetv2_075", **kwargs))


@register_model
def od_mobilenetv2_100(**kwargs) -> MobileNetV2:
    """OSVAI/ODConv ``od_mobilenetv2_100``: MobileNetV2 ×1.0 with ODConv (arguments as :func:`od_mobilenetv2_050`).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import od_mobilenetv2_100
      >>> model = nnx.eval_shape(lambda: od_mobilenetv2_100(kernel_num=4, rngs=nnx.Rngs(0)))    # shapes only
      >>> model.classifier_1.kernel.shape
      (1280, 1000)
    """
    return mobilenet_v2(**odconv_model_args("od_mobilenetv2_100", **kwargs))


@register_model
def kw_mobilenetv2_050(**kwargs) -> MobileNetV2:
    """OSVAI/KernelWarehouse ``kw_mobilenetv2_050``: MobileNetV2 ×0.5 with KernelWarehouse (arguments as the
    Linen :func:`dynconv_jax.models.kw_mobilenetv2_050`, plus ``rngs``).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import kw_mobilenetv2_050
      >>> model = nnx.eval_shape(lambda: kw_mobilenetv2_050(rngs=nnx.Rngs(0)))                   # shapes only
      >>> len(model.warehouse_manager.weights), model.classifier.kernel.shape
      (13, (1280, 1000))
    """
    return mobilenet_v2(**kw_model_args("kw_mobilenetv2_050", **kwargs))


@register_model
def kw_mobilenetv2_100(**kwargs) -> MobileNetV2:
    """OSVAI/KernelWarehouse ``kw_mobilenetv2_100``: MobileNetV2 ×1.0 with KernelWarehouse (arguments as
    :func:`kw_mobilenetv2_050`).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import kw_mobilenetv2_100
      >>> model = nnx.eval_shape(lambda: kw_mobilenetv2_100(rngs=nnx.Rngs(0)))                   # shapes only
      >>> len(model.warehouse_manager.weights), model.classifier.kernel.shape
      (13, (1280, 1000))
    """
    return mobilenet_v2(**kw_model_args("kw_mobilenetv2_100", **kwargs))
