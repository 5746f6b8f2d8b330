"""ResNet-18/34/50/101 as NNX Modules with static or dynamic convolutions, channels-last.

Twin of :mod:`dynconv_jax.models.resnet` (Linen): same arguments, architecture and parameter
paths (``layer1_0/conv1``, ``downsample_0``, ``fc``), so Linen variables, PyTorch and the official
OSVAI/ODConv checkpoints load into it. ``model(x [B, H, W, C], temperature=None)``; training vs
inference by ``model.train()`` / ``model.eval()`` (a new model is in training mode, as NNX's).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional, Sequence

import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, PrecisionLike

from dynconv_jax.models._conv import ModuleDef, check_input
from dynconv_jax.nnx.models._conv import apply_conv, module_defs
from dynconv_jax.nnx.models._registry import register_model
from dynconv_spec import KW_CONV, RESNET_ARCHS, check_resnet_args, stage_blocks
from dynconv_spec.kernelwarehouse import resnet_plan
from dynconv_spec.registry import kw_model_args, odconv_model_args


class ResidualBlock(nnx.Module):
    """The shortcut of :class:`BasicBlock` and :class:`Bottleneck`: identity, or the static
    ``downsample_0`` 1×1 conv + ``downsample_1`` BatchNorm."""

    expansion: ClassVar[int] = 1

    def init_shortcut(
        self, inplanes: int, planes: int, stride: int, downsample: bool, *, static_conv: ModuleDef, norm: ModuleDef
    ) -> None:
        """Create the shortcut (after the block's convolutions, the Linen and PyTorch order)."""
        self.has_downsample = downsample
        if downsample:
            features = planes * self.expansion
            self.downsample_0 = static_conv(
                in_features=inplanes, out_features=features, kernel_size=(1, 1), strides=stride, padding=0
            )
            self.downsample_1 = norm(features)

    def shortcut(self, x, temperature, warehouse_manager):
        if not self.has_downsample:
            return x
        return self.downsample_1(apply_conv(self.downsample_0, x, temperature, warehouse_manager))


class BasicBlock(ResidualBlock):
    """Two 3×3 convolutions (``conv1`` carries the stride) and an identity or 1×1 shortcut.

    Arguments as the Linen :class:`dynconv_jax.models.resnet.BasicBlock` (``inplanes``: input channels),
    the module definitions of :func:`dynconv_jax.nnx.models._conv.module_defs`.
    """

    expansion: ClassVar[int] = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: bool,
        *,
        conv: ModuleDef,
        static_conv: ModuleDef,
        norm: ModuleDef,
    ):
        self.conv1 = conv(in_features=inplanes, out_features=planes, kernel_size=(3, 3), strides=stride, padding=1)
        self.bn1 = norm(planes)
        self.conv2 = conv(in_features=planes, out_features=planes, kernel_size=(3, 3), padding=1)
        self.bn2 = norm(planes)
        self.init_shortcut(inplanes, planes, stride, downsample, static_conv=static_conv, norm=norm)

    def __call__(self, x, temperature=None, warehouse_manager=None):
        out = nnx.relu(self.bn1(apply_conv(self.conv1, x, temperature, warehouse_manager)))
        out = self.bn2(apply_conv(self.conv2, out, temperature, warehouse_manager))
        return nnx.relu(out + self.shortcut(x, temperature, warehouse_manager))


class Bottleneck(ResidualBlock):
    """1×1 reduce, 3×3 (carries the stride, torchvision's "ResNet v1.5"), 1×1 expand ×4 (arguments as
    :class:`BasicBlock`)."""

    expansion: ClassVar[int] = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        downsample: bool,
        *,
        conv: ModuleDef,
        static_conv: ModuleDef,
        norm: ModuleDef,
    ):
        self.conv1 = conv(in_features=inplanes, out_features=planes, kernel_size=(1, 1), padding=0)
        self.bn1 = norm(planes)
        self.conv2 = conv(in_features=planes, out_features=planes, kernel_size=(3, 3), strides=stride, padding=1)
        self.bn2 = norm(planes)
        self.conv3 = conv(in_features=planes, out_features=planes * self.expansion, kernel_size=(1, 1), padding=0)
        self.bn3 = norm(planes * self.expansion)
        self.init_shortcut(inplanes, planes, stride, downsample, static_conv=static_conv, norm=norm)

    def __call__(self, x, temperature=None, warehouse_manager=None):
        out = nnx.relu(self.bn1(apply_conv(self.conv1, x, temperature, warehouse_manager)))
        out = nnx.relu(self.bn2(apply_conv(self.conv2, out, temperature, warehouse_manager)))
        out = self.bn3(apply_conv(self.conv3, out, temperature, warehouse_manager))
        return nnx.relu(out + self.shortcut(x, temperature, warehouse_manager))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nnx.Module):
    """ResNet with a selectable convolution type in its blocks (arguments as the Linen
    :class:`dynconv_jax.models.ResNet`; see it for their meaning), plus ``rngs``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import ResNet
      >>> model = ResNet(block="basic", layers=(1, 1, 1, 1), base_width=8, stem="cifar", num_classes=10,
      ...                rngs=nnx.Rngs(0))
      >>> model.eval()
      >>> model(jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
    """

    def __init__(
        self,
        block: str = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        *,
        conv: str = "static",
        num_experts: int = 4,
        num_classes: int = 1000,
        stem: str = "imagenet",
        base_width: int = 64,
        dropout: float = 0.1,
        reduction: Optional[float] = None,
        in_channels: int = 3,
        conv_options: Optional[Mapping[str, Any]] = None,
        strategy: str = "auto",
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        check_resnet_args(block, layers, base_width)
        defs = module_defs(
            "ResNet",
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
            kw_plan=lambda: resnet_plan(block, layers, base_width, in_channels, stem, reduction, conv_options),
        )
        self.in_channels = in_channels
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = defs.static_conv(
                in_features=in_channels, out_features=base_width, kernel_size=(7, 7), strides=2, padding=3
            )
        else:
            self.conv1 = defs.static_conv(
                in_features=in_channels, out_features=base_width, kernel_size=(3, 3), padding=1
            )
        self.bn1 = defs.norm(base_width)
        block_cls = BLOCKS[block]
        self.block_names = []
        for i, j, inplanes, planes, stride, downsample in stage_blocks(layers, base_width, block_cls.expansion):
            name = f"layer{i + 1}_{j}"
            setattr(
                self,
                name,
                block_cls(
                    inplanes, planes, stride, downsample, conv=defs.conv, static_conv=defs.static_conv, norm=defs.norm
                ),
            )
            self.block_names.append(name)
        self.block_names = tuple(self.block_names)
        self.dropout = nnx.Dropout(dropout, rngs=rngs if dropout > 0 else None)
        self.fc = defs.classifier(base_width * 8 * block_cls.expansion, num_classes)
        self.warehouse_manager = nnx.data(None)
        if conv == KW_CONV:
            defs.conv.finish()
            self.warehouse_manager = defs.conv.manager

    def __call__(self, x, temperature=None):
        """``x [B, H, W, in_channels]`` → logits ``[B, num_classes]``; ``temperature`` goes to every dynamic layer."""
        check_input(x, self.in_channels, "ResNet")
        x = nnx.relu(self.bn1(apply_conv(self.conv1, x, temperature, self.warehouse_manager)))
        if self.stem == "imagenet":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for name in self.block_names:
            x = getattr(self, name)(x, temperature, self.warehouse_manager)
        x = jnp.mean(x, axis=(1, 2))  # [B, C]
        return self.fc(self.dropout(x))


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18; keyword arguments as :class:`ResNet` (``rngs`` required).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import resnet18
      >>> model = nnx.eval_shape(lambda: resnet18(num_classes=10, rngs=nnx.Rngs(0)))   # shapes only
      >>> model.fc.kernel.shape
      (512, 10)
    """
    return ResNet(**RESNET_ARCHS["resnet18"], **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    """ResNet-34; keyword arguments as :class:`ResNet`.

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import resnet34
      >>> model = nnx.eval_shape(lambda: resnet34(num_classes=10, rngs=nnx.Rngs(0)))   # shapes only
      >>> model.fc.kernel.shape
      (512, 10)
    """
    return ResNet(**RESNET_ARCHS["resnet34"], **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50; keyword arguments as :class:`ResNet`.

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import resnet50
      >>> model = nnx.eval_shape(lambda: resnet50(num_classes=10, rngs=nnx.Rngs(0)))   # shapes only
      >>> model.fc.kernel.shape
      (2048, 10)
    """
    return ResNet(**RESNET_ARCHS["resnet50"], **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    """ResNet-101; keyword arguments as :class:`ResNet`.

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import resnet101
      >>> model = nnx.eval_shape(lambda: resnet101(num_classes=10, rngs=nnx.Rngs(0)))   # shapes only
      >>> model.fc.kernel.shape
      (2048, 10)
    """
    return ResNet(**RESNET_ARCHS["resnet101"], **kwargs)


@register_model
def od_resnet18(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet18(kernel_num=1, reduction=0.0625, **kwargs)``: ResNet-18 with ODConv
    (:func:`dynconv_spec.registry.odconv_model_args`: ``num_experts=`` in place of the official ``kernel_num=``
    works too; ``kwargs`` as :class:`ResNet`).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import od_resnet18
      >>> model = nnx.eval_shape(lambda: od_resnet18(kernel_num=4, rngs=nnx.Rngs(0)))    # shapes only
      >>> type(model.layer1_0.conv1).__name__, model.layer1_0.conv1.kernel.shape[0]
      ('ODConv', 4)
    """
    return resnet18(**odconv_model_args("od_resnet18", **kwargs))


@register_model
def od_resnet34(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet34``: ResNet-34 with ODConv (arguments as :func:`od_resnet18`).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import od_resnet34
      >>> model = nnx.eval_shape(lambda: od_resnet34(kernel_num=4, rngs=nnx.Rngs(0)))    # shapes only
      >>> type(model.layer1_0.conv1).__name__, model.layer1_0.conv1.kernel.shape[0]
      ('ODConv', 4)
    """
    return resnet34(**odconv_model_args("od_resnet34", **kwargs))


@register_model
def od_resnet50(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet50``: ResNet-50 with ODConv (arguments as :func:`od_resnet18`).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import od_resnet50
      >>> model = nnx.eval_shape(lambda: od_resnet50(kernel_num=4, rngs=nnx.Rngs(0)))    # shapes only
      >>> type(model.layer1_0.conv1).__name__, model.layer1_0.conv1.kernel.shape[0]
      ('ODConv', 4)
    """
    return resnet50(**odconv_model_args("od_resnet50", **kwargs))


@register_model
def od_resnet101(**kwargs) -> ResNet:
    """OSVAI/ODConv ``od_resnet101``: ResNet-101 with ODConv (arguments as :func:`od_resnet18`).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import od_resnet101
      >>> model = nnx.eval_shape(lambda: od_resnet101(kernel_num=4, rngs=nnx.Rngs(0)))    # shapes only
      >>> type(model.layer1_0.conv1).__name__, model.layer1_0.conv1.kernel.shape[0]
      ('ODConv', 4)
    """
    return resnet101(**odconv_model_args("od_resnet101", **kwargs))


@register_model
def kw_resnet18(**kwargs) -> ResNet:
    """OSVAI/KernelWarehouse ``kw_resnet18``: ResNet-18 with KernelWarehouse (arguments as the Linen
    :func:`dynconv_jax.models.kw_resnet18`, plus ``rngs``).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import kw_resnet18
      >>> model = nnx.eval_shape(lambda: kw_resnet18(rngs=nnx.Rngs(0)))                 # shapes only
      >>> type(model.layer1_0.conv1).__name__, model.warehouse_manager.weights[0].shape  # stage 1's warehouse
      ('KWConv', (56, 64, 64, 1, 1))
    """
    return resnet18(**kw_model_args("kw_resnet18", **kwargs))


@register_model
def kw_resnet50(**kwargs) -> ResNet:
    """OSVAI/KernelWarehouse ``kw_resnet50``: ResNet-50 with KernelWarehouse (arguments as :func:`kw_resnet18`).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx.models import kw_resnet50
      >>> model = nnx.eval_shape(lambda: kw_resnet50(rngs=nnx.Rngs(0)))                 # shapes only
      >>> type(model.layer1_0.conv2).__name__, len(model.warehouse_manager.weights)
      ('KWConv', 4)
    """
    return resnet50(**kw_model_args("kw_resnet50", **kwargs))
