"""MobileNetV2 (Sandler et al., CVPR 2018) with static or dynamic convolutions, channels-last.

Flax twin of ``dynconv_torch.models.mobilenetv2`` with the same names: PyTorch's
``features.1.conv.0.0`` (an ``nn.Sequential`` inside an ``nn.Sequential``) is
``features_1/conv_0_0`` here, ``features.0.1`` (stem BatchNorm) is ``features_0_1`` and
``classifier.1`` is ``classifier_1``. ``conv='odconv'`` is the official OSVAI/ODConv
``od_mobilenetv2_*`` (Li et al., ICLR 2022): every convolution after the stem is dynamic.
``conv='kernelwarehouse'`` is the official OSVAI/KernelWarehouse ``kw_mobilenetv2_*`` (Li & Yao, ICML
2024): every convolution, the stem's too, is a KernelWarehouse layer of ``warehouse_manager``, and the
classifier is ``classifier`` (PyTorch's bare ``Linear``), not ``classifier_1``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from dynconv_spec import KW_CONV, check_width_mult, stage_settings
from dynconv_spec.kernelwarehouse import WarehousePlan, mobilenetv2_plan
from dynconv_spec.registry import kw_model_args, odconv_model_args

from ._conv import DynamicNet, ModuleDef, apply_conv, check_input
from ._registry import register_model


def conv_bn_relu6(
    conv: ModuleDef,
    norm: ModuleDef,
    x,
    prefix: str,
    features: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    *,
    train: bool,
    temperature=None,
):
    """PyTorch's ``ConvBNReLU`` Sequential in the calling module: conv ``{prefix}_0`` (made from the
    definition ``conv``), BatchNorm ``{prefix}_1``, ReLU6."""
    layer = conv(
        features=features,
        kernel_size=(kernel_size, kernel_size),
        strides=stride,
        padding=(kernel_size - 1) // 2,
        feature_group_count=groups,
        name=f"{prefix}_0",
    )
    x = apply_conv(layer, x, train=train, temperature=temperature)
    return nn.relu6(norm(name=f"{prefix}_1")(x))


class InvertedResidual(nn.Module):
    """Expansion 1×1 (absent when t = 1) → depthwise 3×3 → linear projection 1×1, residual if shapes allow.

    Attributes:
      inp: input channels.
      oup: output channels.
      stride: stride of the depthwise conv.
      expand_ratio: t, the expansion of the hidden width ``round(inp * t)``.
      conv: module definition of the convolutions (:attr:`~dynconv_jax.models._conv.ModuleDefs.conv`).
      norm: module definition of the BatchNorms.
    """

    inp: int
    oup: int
    stride: int
    expand_ratio: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        hidden = int(round(self.inp * self.expand_ratio))
        i = 0  # index in PyTorch's ``self.conv`` Sequential
        h = x
        if self.expand_ratio != 1:
            h = conv_bn_relu6(self.conv, self.norm, h, "conv_0", hidden, 1, train=train, temperature=temperature)
            i = 1
        h = conv_bn_relu6(
            self.conv,
            self.norm,
            h,
            f"conv_{i}",
            hidden,
            3,
            self.stride,
            groups=hidden,
            train=train,
            temperature=temperature,
        )
        project = self.conv(features=self.oup, kernel_size=(1, 1), padding=0, name=f"conv_{i + 1}")
        h = self.norm(name=f"conv_{i + 2}")(apply_conv(project, h, train=train, temperature=temperature))
        return x + h if self.stride == 1 and self.inp == self.oup else h


class MobileNetV2(DynamicNet):
    """MobileNetV2 with a selectable convolution type after the stem (arguments as the torch twin).

    Attributes:
      width_mult: channel multiplier (channels rounded to multiples of 8).
      stem: 'imagenet' (total stride 32) or 'cifar' (stem and second stage at stride 1, total stride 8).
      dropout: dropout before the classifier (0.2 as torchvision and the official models).

    The other fields (``conv``, ``num_experts``, ``num_classes``, ``reduction``, ``in_channels``,
    ``conv_options``, ``strategy``, ``dtype``, ``param_dtype``, ``precision``) are those of
    :class:`~dynconv_jax.models._conv.DynamicNet`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax.models import MobileNetV2
      >>> model = MobileNetV2(width_mult=0.25, conv="dynamic", stem="cifar", num_classes=10)
      >>> x = jnp.zeros((2, 32, 32, 3))
      >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
      >>> jax.eval_shape(model.apply, variables, x).shape
      (2, 10)
    """

    width_mult: float = 1.0
    dropout: float = 0.2

    def __post_init__(self):
        check_width_mult(self.width_mult)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        """``x [B, H, W, in_channels]`` → logits ``[B, num_classes]``; ``temperature`` goes to every dynamic layer."""
        check_input(x, self.in_channels, type(self).__name__)
        defs = self.module_defs(train)
        channels, stem_stride, stages, last_channel = stage_settings(self.width_mult, self.stem)
        x = conv_bn_relu6(
            defs.static_conv, defs.norm, x, "features_0", channels, 3, stem_stride, train=train, temperature=temperature
        )
        index = 1
        for t, out, n, s in stages:
            for j in range(n):
                x = InvertedResidual(
                    inp=channels,
                    oup=out,
                    stride=s if j == 0 else 1,
                    expand_ratio=t,
                    conv=defs.conv,
                    norm=defs.norm,
                    name=f"features_{index}",
                )(x, train=train, temperature=temperature)
                channels = out
                index += 1
        x = conv_bn_relu6(
            defs.conv, defs.norm, x, f"features_{index}", last_channel, 1, train=train, temperature=temperature
        )
        x = jnp.mean(x, axis=(1, 2))  # [B, C]
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        head = "classifier" if self.conv == KW_CONV else "classifier_1"  # the official models' names
        return defs.classifier(features=self.num_classes, name=head)(x)

    def kw_plan(self) -> WarehousePlan:
        """The warehouse plan of the official ``KW_MobileNetV2`` at this width (``conv='kernelwarehouse'``)."""
        return mobilenetv2_plan(self.width_mult, self.stem, self.in_channels, self.reduction, self.conv_options)


@register_model
def mobilenet_v2(width_mult: float = 1.0, **kwargs) -> MobileNetV2:
    """MobileNetV2; keyword arguments as :class:`MobileNetV2` (conv, num_experts, num_classes, stem, ...).

    Examples:
      >>> from dynconv_jax.models import mobilenet_v2
      >>> model = mobilenet_v2(width_mult=0.5, conv="condconv", num_experts=8)
      >>> model.width_mult, model.conv, model.num_experts
      (0.5, 'condconv', 8)
    """
    return MobileNetV2(width_mult=width_mult, **kwargs)


@register_model
def od_mobilenetv2_050(**kwargs) -> MobileNetV2:
    """OSVAI/ODConv ``od_mobilenetv2_050(kernel_num=1, reduction=0.0625, **kwargs)``: MobileNetV2 ×0.5 with
    ODConv (:func:`dynconv_spec.registry.odconv_model_args`: ``num_experts=`` in place of the official ``kernel_num=``
    works too; ``kwargs`` as :class:`MobileNetV2`).

    Examples:
      >>> from dynconv_jax.models import od_mobilenetv2_050
      >>> model = od_mobilenetv2_050(kernel_num=4)
      >>> model.conv, model.num_experts, model.width_mult
      ('odconv', 4, 0.5)
    """
    return mobilenet_v2(**odconv_model_args("od_mobilenetv2_050", **kwargs))


@register_model
def od_mobilenetv2_075(**kwargs) -> MobileNetV2:
    """OSVAI/ODConv ``od_mobilenetv2_075``: MobileNetV2 ×0.75 with ODConv (arguments as :func:`od_mobilenetv2_050`).

    Examples:
      >>> from dynconv_jax.models import od_mobilenetv2_075
      >>> model = od_mobilenetv2_075(kernel_num=4)
      >>> model.conv, model.num_experts, model.width_mult
      ('odconv', 4, 0.75)
    """
    return mobilenet_v2(**odconv_model_args("od_mobilenetv2_075", **kwargs))


@register_model
def od_mobilenetv2_100(**kwargs) -> MobileNetV2:
    """OSVAI/ODConv ``od_mobilenetv2_100``: MobileNetV2 ×1.0 with ODConv (arguments as :func:`od_mobilenetv2_050`).

    Examples:
      >>> from dynconv_jax.models import od_mobilenetv2_100
      >>> model = od_mobilenetv2_100(kernel_num=4)
      >>> model.conv, model.num_experts, model.width_mult
      ('odconv', 4, 1.0)
    """
    return mobilenet_v2(**odconv_model_args("od_mobilenetv2_100", **kwargs))


@register_model
def kw_mobilenetv2_050(**kwargs) -> MobileNetV2:
    """OSVAI/KernelWarehouse ``kw_mobilenetv2_050(reduction=0.0625, cell_num_ratio=1, ..., sharing_range=('layer',
    'pwconv'), dropout=0.0, **kwargs)``: MobileNetV2 ×0.5 with KernelWarehouse
    (:func:`dynconv_spec.registry.kw_model_args`; ``kwargs`` as :class:`MobileNetV2`).

    Examples:
      >>> from dynconv_jax.models import kw_mobilenetv2_050
      >>> model = kw_mobilenetv2_050()
      >>> model.conv, model.width_mult, model.dropout                # the official models' dropout is 0
      ('kernelwarehouse', 0.5, 0.0)
    """
    return mobilenet_v2(**kw_model_args("kw_mobilenetv2_050", **kwargs))


@register_model
def kw_mobilenetv2_100(**kwargs) -> MobileNetV2:
    """OSVAI/KernelWarehouse ``kw_mobilenetv2_100``: MobileNetV2 ×1.0 with KernelWarehouse (arguments as
    :func:`kw_mobilenetv2_050`).

    Examples:
      >>> from dynconv_jax.models import kw_mobilenetv2_100
      >>> model = kw_mobilenetv2_100()
      >>> model.conv, model.width_mult, model.dropout                # the official models' dropout is 0
      ('kernelwarehouse', 1.0, 0.0)
    """
    return mobilenet_v2(**kw_model_args("kw_mobilenetv2_100", **kwargs))
