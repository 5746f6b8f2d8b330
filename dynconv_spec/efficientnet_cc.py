"""EfficientNet-CondConv (Yang et al., NeurIPS 2019; timm ``_gen_efficientnet_condconv``): the stage
table, the per-block resolution, the variants and their evaluation preprocessing, shared by
``dynconv_torch.models.efficientnet_cc`` and ``dynconv_jax.models.efficientnet_cc``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Tuple

from .args import check_num_classes, check_rate
from .mobilenetv2 import make_divisible

BN_EPS_TF = 1e-3  # TensorFlow's BatchNormalization default, kept by the tf_* ports
BN_EPS_TORCH = 1e-5


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of the EfficientNet-B0 table: ``repeats`` blocks of one kind."""

    block: str  # 'ds' (depthwise-separable) or 'ir' (inverted residual)
    repeats: int
    kernel_size: int  # depthwise kernel
    stride: int  # of the first block of the stage
    exp_ratio: float
    out_chs: int
    se_ratio: float  # squeeze ratio relative to the block input channels
    num_experts: int  # 0: static convs; > 0: CondConv block (before the experts multiplier)


#: EfficientNet-B0 with CondConv in the last three stages (timm ``_gen_efficientnet_condconv``).
CONDCONV_B0_STAGES: Tuple[StageSpec, ...] = (
    StageSpec("ds", 1, 3, 1, 1.0, 16, 0.25, 0),
    StageSpec("ir", 2, 3, 2, 6.0, 24, 0.25, 0),
    StageSpec("ir", 2, 5, 2, 6.0, 40, 0.25, 0),
    StageSpec("ir", 3, 3, 2, 6.0, 80, 0.25, 0),
    StageSpec("ir", 3, 5, 1, 6.0, 112, 0.25, 4),
    StageSpec("ir", 4, 5, 2, 6.0, 192, 0.25, 4),
    StageSpec("ir", 1, 3, 1, 6.0, 320, 0.25, 4),
)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block, fully resolved (channels rounded, stride/experts/drop-path set)."""

    block: str
    in_chs: int
    out_chs: int
    kernel_size: int
    stride: int
    exp_ratio: float
    se_ratio: float
    num_experts: int
    drop_path_rate: float

    @property
    def mid_chs(self) -> int:
        """Expanded width of an inverted residual (the input width for 'ds')."""
        return make_divisible(self.in_chs * self.exp_ratio) if self.block == "ir" else self.in_chs

    @property
    def se_chs(self) -> int:
        """Squeeze width ``round(mid * (se_ratio / exp_ratio))``: the ratio is relative to the block input (timm)."""
        return round(self.mid_chs * (self.se_ratio / (self.exp_ratio if self.block == "ir" else 1.0)))

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_chs == self.out_chs


#: name -> (depth multiplier, experts multiplier, TF port). Channel multiplier is 1.0 for all.
VARIANTS: Dict[str, Tuple[float, int, bool]] = {
    "tf_efficientnet_cc_b0_4e": (1.0, 1, True),
    "tf_efficientnet_cc_b0_8e": (1.0, 2, True),
    "tf_efficientnet_cc_b1_8e": (1.1, 2, True),
    "efficientnet_cc_b0_4e": (1.0, 1, False),
    "efficientnet_cc_b0_8e": (1.0, 2, False),
    "efficientnet_cc_b1_8e": (1.1, 2, False),
}

_INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
#: Evaluation preprocessing of each variant (timm's default cfgs): resize the shorter side to
#: ``floor(input_size / crop_pct)`` (bicubic), center-crop ``input_size``, scale to [0, 1], normalise.
DEFAULT_CFGS: Dict[str, Dict[str, Any]] = {
    "tf_efficientnet_cc_b0_4e": dict(input_size=224, crop_pct=0.875, interpolation="bicubic", **_INCEPTION),
    "tf_efficientnet_cc_b0_8e": dict(input_size=224, crop_pct=0.875, interpolation="bicubic", **_INCEPTION),
    "tf_efficientnet_cc_b1_8e": dict(input_size=240, crop_pct=0.882, interpolation="bicubic", **_INCEPTION),
    "efficientnet_cc_b0_4e": dict(input_size=224, crop_pct=0.875, interpolation="bicubic", **_IMAGENET),
    "efficientnet_cc_b0_8e": dict(input_size=224, crop_pct=0.875, interpolation="bicubic", **_IMAGENET),
    "efficientnet_cc_b1_8e": dict(input_size=240, crop_pct=0.882, interpolation="bicubic", **_IMAGENET),
}


def block_specs(
    stem_chs: int = 32,
    depth_multiplier: float = 1.0,
    channel_multiplier: float = 1.0,
    experts_multiplier: int = 1,
    drop_path_rate: float = 0.0,
    stages: Tuple[StageSpec, ...] = CONDCONV_B0_STAGES,
) -> List[List[BlockSpec]]:
    """Resolve the stage table into per-block specs, stage by stage.

    Depth scaling is EfficientNet's: ``ceil(repeats * depth_multiplier)`` blocks per stage; only
    the first block of a stage is strided. Block ``i`` of ``n`` gets drop-path rate
    ``drop_path_rate * i / n`` (stochastic depth grows linearly with depth).
    """
    if not (isinstance(experts_multiplier, int) and experts_multiplier >= 1):
        raise ValueError(f"block_specs: experts_multiplier={experts_multiplier!r} must be an int >= 1")
    counts = [int(math.ceil(s.repeats * depth_multiplier)) for s in stages]
    total = sum(counts)
    in_chs, index, out = stem_chs, 0, []
    for stage, count in zip(stages, counts):
        out_chs = make_divisible(stage.out_chs * channel_multiplier)
        blocks = []
        for j in range(count):
            blocks.append(
                BlockSpec(
                    stage.block,
                    in_chs,
                    out_chs,
                    stage.kernel_size,
                    stage.stride if j == 0 else 1,
                    stage.exp_ratio,
                    stage.se_ratio,
                    stage.num_experts * experts_multiplier,
                    drop_path_rate * index / total,
                )
            )
            in_chs, index = out_chs, index + 1
        out.append(blocks)
    return out


def tf_same_padding(size: int, kernel_size: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """TensorFlow 'SAME' padding ``(before, after)`` of one spatial axis; the odd pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def check_efficientnet_args(where: str, num_classes: int, drop_rate: float, drop_path_rate: float) -> None:
    """``num_classes`` an int >= 0 (0: no classifier), the two dropout rates in [0, 1)."""
    check_num_classes(num_classes, where, allow_zero=True)
    check_rate(drop_rate, "drop_rate", where)
    check_rate(drop_path_rate, "drop_path_rate", where)


def resolve_variant(name: str) -> Dict[str, Any]:
    """The ``EfficientNetCondConv`` arguments of variant ``name`` (a key of :data:`VARIANTS`)."""
    if name not in VARIANTS:
        raise ValueError(f"efficientnet_cc: unknown variant {name!r}; expected one of {sorted(VARIANTS)}")
    depth, experts, tf_port = VARIANTS[name]
    return dict(depth_multiplier=depth, experts_multiplier=experts, tf_port=tf_port)


def variant_entry_point(name: str, build: Callable[..., Any]) -> Callable[..., Any]:
    """The entry point ``name(num_classes=1000, drop_rate=0.0, drop_path_rate=0.0, **kwargs)`` of a
    variant: ``build(**resolve_variant(name), ...)``, named and documented after the variant
    (ImageNet accuracy and parameter counts of timm's weights: docs/efficientnet_cc.md)."""
    *_, size, experts = name.split("_")  # e.g. 'b0', '4e'
    tf_port = VARIANTS[name][2]
    weights = "timm's ported TF weights convert into it" if tf_port else "no public weights"

    def entry_point(num_classes: int = 1000, drop_rate: float = 0.0, drop_path_rate: float = 0.0, **kwargs):
        return build(
            **resolve_variant(name),
            num_classes=num_classes,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            **kwargs,
        )

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__doc__ = (
        f"EfficientNet-CondConv-{size.upper()}, {experts[:-1]} experts per CondConv layer, "
        f"{'TF port (BN eps 1e-3, TF SAME padding)' if tf_port else 'PyTorch padding and eps'}; "
        f"{weights} (docs/efficientnet_cc.md).\n\n"
        "    ``kwargs``: further ``EfficientNetCondConv`` arguments.\n\n"
        "    Examples:\n"
        f"      >>> from {build.__module__} import {name}\n"
        f"      >>> model = {name}(num_classes=10)\n"
        "      >>> model.num_classes\n"
        "      10\n"
    )
    return entry_point
