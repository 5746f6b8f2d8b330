"""ResNet-18/34/50/101 (He et al., CVPR 2016): block types, stage depths and the block order
both frameworks build (torchvision's rule, the official OSVAI/ODConv ``od_resnet*`` too)."""

from __future__ import annotations

from typing import Dict, Iterator, Sequence, Tuple

BLOCK_EXPANSION: Dict[str, int] = {"basic": 1, "bottleneck": 4}
"""Output channels of a block / its ``planes``."""
RESNET_ARCHS: Dict[str, Dict[str, object]] = {
    "resnet18": dict(block="basic", layers=(2, 2, 2, 2)),
    "resnet34": dict(block="basic", layers=(3, 4, 6, 3)),
    "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3)),
    "resnet101": dict(block="bottleneck", layers=(3, 4, 23, 3)),
}
"""Entry-point name -> ``dict(block=..., layers=...)``, the architecture arguments of ``ResNet``."""


def stage_blocks(
    layers: Sequence[int], base_width: int, expansion: int
) -> Iterator[Tuple[int, int, int, int, int, bool]]:
    """``(stage, index, inplanes, planes, stride, downsample)`` of every block, in order.

    Stage ``i`` (0-based) has ``base_width * 2**i`` planes; its first block carries the stride
    (2 from the second stage on) and a 1×1 downsample shortcut when the shape changes.

    Examples:
      >>> from dynconv_spec import stage_blocks
      >>> list(stage_blocks((2, 2, 2, 2), base_width=64, expansion=1))[:3]
      [(0, 0, 64, 64, 1, False), (0, 1, 64, 64, 1, False), (1, 0, 64, 128, 2, True)]
    """
    inplanes = base_width
    for i, num_blocks in enumerate(layers):
        planes = base_width * 2**i
        for j in range(num_blocks):
            stride = 2 if i > 0 and j == 0 else 1
            downsample = j == 0 and (stride != 1 or inplanes != planes * expansion)
            yield i, j, inplanes, planes, stride, downsample
            inplanes = planes * expansion
