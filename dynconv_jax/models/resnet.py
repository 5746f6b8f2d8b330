"""ResNet-18/34/50/101 (He et al., CVPR 2016) with static or dynamic convolutions, channels-last.

Flax twin of ``dynconv_torch.models.resnet``: same architecture, same attribute names
(``layer1.0.conv1`` ↔ ``layer1_0/conv1``, ``downsample.0`` ↔ ``downsample_0``), so whole-model
checkpoints convert with :func:`dynconv_jax.convert.torch_to_flax`. ``conv='odconv'`` is the
official OSVAI/ODConv ``od_resnet*`` (Li et al., ICLR 2022): dynamic 3×3 and 1×1 convolutions
in the blocks; static stem, downsample shortcut and classifier; dropout before ``fc``.
``conv='kernelwarehouse'`` is the official OSVAI/KernelWarehouse ``kw_resnet*`` (Li & Yao, ICML 2024):
KernelWarehouse block convolutions and strided shortcuts sharing the warehouses of ``warehouse_manager``.

``model.apply(variables, x [B, H, W, C], train=False, temperature=None)``; training needs
``mutable=['batch_stats']`` and, with dropout, ``rngs={'dropout': key}``.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import jax.numpy as jnp
from flax import linen as nn

from dynconv_spec import RESNET_ARCHS, check_resnet_args, stage_blocks
from dynconv_spec.kernelwarehouse import WarehousePlan, resnet_plan
from dynconv_spec.registry import kw_model_args, odconv_model_args

from ._conv import DynamicNet, ModuleDef, apply_conv, check_input
from ._registry import register_model


class ResidualBlock(nn.Module):
    """The fields and the shortcut of :class:`BasicBlock` and :class:`Bottleneck`.

    Attributes:
      planes: width of the block (its output has ``planes * expansion`` channels).
      conv: module definition of the block's convolutions (:attr:`~dynconv_jax.models._conv.ModuleDefs.conv`).
      static_conv: module definition of the shortcut's 1×1 conv.
      norm: module definition of the BatchNorms.
      stride: stride of the block (its strided conv and the shortcut).
      downsample: the shortcut is a 1×1 conv ``downsample_0`` + BatchNorm ``downsample_1`` (else the identity).
    """

    planes: int
    conv: ModuleDef
    static_conv: ModuleDef
    norm: ModuleDef
    stride: int = 1
    downsample: bool = False
    expansion: ClassVar[int] = 1

    def shortcut(self, x, train: bool, temperature):
        """Identity, or the ``downsample_0`` 1×1 conv (static but in KernelWarehouse models) + ``downsample_1``
        BatchNorm."""
        if not self.downsample:
            return x
        layer = self.static_conv(
            features=self.planes * self.expansion,
            kernel_size=(1, 1),
            strides=self.stride,
            padding=0,
            name="downsample_0",
        )
        return self.norm(name="downsample_1")(apply_conv(layer, x, train=train, temperature=temperature))


class BasicBlock(ResidualBlock):
    """Two 3×3 convolutions (``conv1`` carries the stride) and an identity or 1×1 shortcut."""

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        conv1 = self.conv(features=self.planes, kernel_size=(3, 3), strides=self.stride, padding=1, name="conv1")
        out = nn.relu(self.norm(name="bn1")(apply_conv(conv1, x, train=train, temperature=temperature)))
        conv2 = self.conv(features=self.planes, kernel_size=(3, 3), padding=1, name="conv2")
        out = self.norm(name="bn2")(apply_conv(conv2, out, train=train, temperature=temperature))
        return nn.relu(out + self.shortcut(x, train, temperature))


class Bottleneck(ResidualBlock):
    """1×1 reduce, 3×3 (carries the stride, torchvision's "ResNet v1.5"), 1×1 expand ×4."""

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        conv1 = self.conv(features=self.planes, kernel_size=(1, 1), padding=0, name="conv1")
        out = nn.relu(self.norm(name="bn1")(apply_conv(conv1, x, train=train, temperature=temperature)))
        conv2 = self.conv(features=self.planes, kernel_size=(3, 3), strides=self.stride, padding=1, name="conv2")
        out = nn.relu(self.norm(name="bn2")(apply_conv(conv2, out, train=train, temperature=temperature)))
        conv3 = self.conv(features=self.planes * self.expansion, kernel_size=(1, 1), padding=0, name="conv3")
        out = self.norm(name="bn3")(apply_conv(conv3, out, train=train, temperature=temperature))
        return nn.relu(out + self.shortcut(x, train, temperature))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(DynamicNet):
    """ResNet with a selectable convolution type in its blocks (arguments as ``dynconv_torch.models.ResNet``).

    Attributes:
      block: 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50/101).
      layers: blocks per stage, e.g. ``(2, 2, 2, 2)``.
      base_width: channels of the first stage; later stages ×2, ×4, ×8 (64 = the standard nets).
      stem: 'imagenet' (7×7/2 conv + 3×3/2 max-pool) or 'cifar' (3×3/1 conv, no max-pool).
      dropout: dropout on the pooled features before ``fc`` (official ODConv default 0.1).

    The other fields (``conv``, ``num_experts``, ``num_classes``, ``reduction``, ``in_channels``,
    ``conv_options``, ``strategy``, ``dtype``, ``param_dtype``, ``precision``) are those of
    :class:`~dynconv_jax.models._conv.DynamicNet`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax.models import ResNet
      >>> model = ResNet(block="basic", layers=(1, 1, 1, 1), base_width=8, stem="cifar", conv="condconv", num_classes=10)
      >>> x = jnp.zeros((2, 32, 32, 3))
      >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
      >>> jax.eval_shape(lambda v: model.apply(v, x, temperature=1.0), variables).shape
      (2, 10)
    """

    block: str = "basic"
    layers: Sequence[int] = (2, 2, 2, 2)
    base_width: int = 64
    dropout: float = 0.1

    def __post_init__(self):
        check_resnet_args(self.block, self.layers, self.base_width)
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        """``x [B, H, W, in_channels]`` → logits ``[B, num_classes]``; ``temperature`` goes to every dynamic layer."""
        check_input(x, self.in_channels, type(self).__name__)
        defs = self.module_defs(train)
        if self.stem == "imagenet":
            stem = defs.static_conv(features=self.base_width, kernel_size=(7, 7), strides=2, padding=3, name="conv1")
        else:
            stem = defs.static_conv(features=self.base_width, kernel_size=(3, 3), padding=1, name="conv1")
        x = nn.relu(defs.norm(name="bn1")(apply_conv(stem, x, train=train, temperature=temperature)))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block_cls = BLOCKS[self.block]
        for i, j, _, planes, stride, downsample in stage_blocks(self.layers, self.base_width, block_cls.expansion):
            x = block_cls(
                planes=planes,
                stride=stride,
                downsample=downsample,
                conv=defs.conv,
                static_conv=defs.static_conv,
                norm=defs.norm,
                name=f"layer{i + 1}_{j}",
            )(x, train=train, temperature=temperature)
        x = jnp.mean(x, axis=(1, 2))  # [B, C]
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return defs.classifier(features=self.num_classes, name="fc")(x)

    def kw_plan(self) -> WarehousePlan:
        """The warehouse plan of the official ``KW_ResNet`` of this depth and width (``conv='kernelwarehouse'``)."""
        return resnet_plan(
            self.block, self.layers, self.base_width, self.in_channels, self.stem, self.reduction, self.conv_options
        )


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18; keyword arguments as :class:`ResNet` (conv, num_experts, num_classes, stem, base_width, ...).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax.models import resnet18
      >>> model = resnet18(conv="odconv", num_experts=4, num_classes=10, stem="cifar", base_width=16)
      >>> x = jnp.zeros((8, 32, 32, 3))
      >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
      >>> logits, updates = jax.eval_shape(lambda v: model.apply(v, x, train=True, temperature=30.0,
      ...     mutable=['batch_stats'], rngs={'dropout': jax.random.key(1)}), variables)
      >>> logits.shape
      (8, 10)
    """
    return ResNet(**RESNET_ARCHS["resnet18"], **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    """ResNet-34; keyword arguments as :class:`ResNet`.

    Examples:
      >>> from dynconv_jax.models import resnet34
      >>> model = resnet34(conv="dynamic", num_experts=4)     # a Linen module: nothing is built until init
      >>> model.block, model.layers
      ('basic', (3, 4, 6, 3))
    """
    return ResNet(**RESNET_ARCHS["resnet34"], **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50; keyword arguments as :class:`ResNet`.

    Examples:
      >>> from dynconv_jax.models import resnet50
      >>> model = resnet50(conv="dynamic", num_experts=4)     # a Linen module: nothing is built until init
      >>> model.block, model.layers
      ('bottleneck', (3, 4, 6, 3))
    """
    return ResNet(**RESNET_ARCHS["resnet50"], **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    """ResNet-101; keyword arguments as :class:`ResNet`.

    Examples:
      >>> from dynconv_jax.models import resnet101
      >>> model = resnet101(conv="dynamic", num_experts=4)     # a Linen module: nothing is built until init
      >>> model.block, model.layers
      ('bottleneck', (3, 4, 23, 3))
    """
    return ResNet(**RESNET_ARCHS["resnet101"], **kwargs)


@register_model
def od_resnet18(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet18(kernel_num=1, reduction=0.0625, **kwargs)``: ResNet-18 with ODConv
    (:func:`dynconv_spec.registry.odconv_model_args`: ``num_experts=`` in place of the official ``kernel_num=``
    works too; ``kwargs`` as :class:`ResNet`).

    Examples:
      >>> from dynconv_jax.models import od_resnet18
      >>> model = od_resnet18(kernel_num=4)                      # the official entry point's arguments
      >>> model.conv, model.num_experts, model.reduction, model.layers
      ('odconv', 4, 0.0625, (2, 2, 2, 2))
    """
    return resnet18(**odconv_model_args("od_resnet18", **kwargs))


@register_model
def od_resnet34(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet34``: ResNet-34 with ODConv (arguments as :func:`od_resnet18`).

    Examples:
      >>> from dynconv_jax.models import od_resnet34
      >>> model = od_resnet34(kernel_num=4)                      # the official entry point's arguments
      >>> model.conv, model.num_experts, model.reduction, model.layers
      ('odconv', 4, 0.0625, (3, 4, 6, 3))
    """
    return resnet34(**odconv_model_args("od_resnet34", **kwargs))


@register_model
def od_resnet50(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet50``: ResNet-50 with ODConv (arguments as :func:`od_resnet18`).

    Examples:
      >>> from dynconv_jax.models import od_resnet50
      >>> model = od_resnet50(kernel_num=4)                      # the official entry point's arguments
      >>> model.conv, model.num_experts, model.reduction, model.layers
      ('odconv', 4, 0.0625, (3, 4, 6, 3))
    """
    return resnet50(**odconv_model_args("od_resnet50", **kwargs))


@register_model
def od_resnet101(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet101``: ResNet-101 with ODConv (arguments as :func:`od_resnet18`).

    Examples:
      >>> from dynconv_jax.models import od_resnet101
      >>> model = od_resnet101(kernel_num=4)                      # the official entry point's arguments
      >>> model.conv, model.num_experts, model.reduction, model.layers
      ('odconv', 4, 0.0625, (3, 4, 23, 3))
    """
    return resnet101(**odconv_model_args("od_resnet101", **kwargs))


@register_model
def kw_resnet18(**kwargs) -> ResNet:
    """OSVAI/KernelWarehouse ``kw_resnet18(reduction=0.0625, cell_num_ratio=1, cell_inplane_ratio=1,
    cell_outplane_ratio=1, sharing_range=('layer', 'conv'), nonlocal_basis_ratio=1, **kwargs)``: ResNet-18
    with KernelWarehouse (:func:`dynconv_spec.registry.kw_model_args`; ``kwargs`` as :class:`ResNet`).

    Examples:
      >>> from dynconv_jax.models import kw_resnet18
      >>> model = kw_resnet18(cell_num_ratio=4.0)                # the official KW 4x config's budget
      >>> model.conv, model.conv_options["cell_num_ratio"], model.layers
      ('kernelwarehouse', 4.0, (2, 2, 2, 2))
    """
    return resnet18(**kw_model_args("kw_resnet18", **kwargs))


@register_model
def kw_resnet50(**kwargs) -> ResNet:
    """OSVAI/KernelWarehouse ``kw_resnet50``: ResNet-50 with KernelWarehouse (arguments as :func:`kw_resnet18`).

    Examples:
      >>> from dynconv_jax.models import kw_resnet50
      >>> model = kw_resnet50(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5)
      >>> model.conv, model.conv_options["cell_num_ratio"], model.layers
      ('kernelwarehouse', 0.5, (3, 4, 6, 3))
    """
    return resnet50(**kw_model_args("kw_resnet50", **kwargs))
