"""MobileNetV2 (Sandler et al., CVPR 2018): the stage table and the channel rounding both frameworks use."""

from __future__ import annotations

from typing import List, Tuple

INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
"""(expansion t, channels c, repeats n, first stride s) per stage, as in the paper's Table 2."""


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of ``divisor`` (at least ``divisor``),
    going up one step when rounding would lose more than 10 % (the TF-slim MobileNet rule).

    Examples:
      >>> from dynconv_spec import make_divisible
      >>> make_divisible(32 * 0.75), make_divisible(3)
      (24, 8)
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def stage_settings(width_mult: float, stem: str) -> Tuple[int, int, List[Tuple[int, int, int, int]], int]:
    """``(stem channels, stem stride, [(t, c, n, s)] per stage, head channels)`` for ``width_mult`` and ``stem``.

    Examples:
      >>> from dynconv_spec import stage_settings
      >>> stem_channels, stem_stride, stages, head = stage_settings(0.5, "cifar")
      >>> stem_channels, stem_stride, stages[1], head
      (16, 1, (6, 16, 2, 1), 1280)
    """
    strides = [s for _, _, _, s in INVERTED_RESIDUAL_SETTING]
    stem_stride = 2
    if stem == "cifar":  # 32×32 inputs: stem and the 24-channel stage at stride 1 (total stride 8)
        stem_stride, strides[1] = 1, 1
    stages = [(t, make_divisible(c * width_mult), n, s) for (t, c, n, _), s in zip(INVERTED_RESIDUAL_SETTING, strides)]
    return make_divisible(32 * width_mult), stem_stride, stages, make_divisible(1280 * max(1.0, width_mult))
