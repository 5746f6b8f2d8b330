"""Write a synthetic image folder (``ROOT/<split>/<class>/*.jpg|png``) for tests and benchmarks.

    python -m train.make_imagefolder --out /tmp/folder --train 2000 --test 200 --classes 10

Each image is smooth noise plus a class-dependent brightness ramp (so a model can learn
something), of random size between ``min_size`` and ``max_size`` pixels per side. ``modes``
cycles through PIL modes and formats, so every colour layout the loader must convert to RGB
(grayscale, RGBA, palette, CMYK JPEG) appears.
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, Sequence, Tuple

import numpy as np

# (PIL mode, file extension) cycled over the images of a folder.
ALL_MODES: Tuple[Tuple[str, str], ...] = (
    ("RGB", ".jpg"),
    ("L", ".png"),
    ("RGBA", ".png"),
    ("P", ".png"),
    ("CMYK", ".jpg"),
    ("L", ".jpg"),
    ("RGB", ".png"),
)


def synthetic_image(rng: np.random.Generator, label: int, num_classes: int, height: int, width: int) -> np.ndarray:
    """uint8 ``[height, width, 3]``: coarse noise upsampled, plus a ramp whose direction encodes ``label``."""
    coarse = rng.integers(0, 256, size=(max(height // 16, 2), max(width // 16, 2), 3)).astype(np.float32)
    rows = np.linspace(0, coarse.shape[0] - 1, height).astype(np.int64)
    cols = np.linspace(0, coarse.shape[1] - 1, width).astype(np.int64)
    noise = coarse[rows][:, cols]
    angle = 2 * np.pi * label / num_classes
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    ramp = 127.5 * (1 + np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    return np.clip(0.5 * noise + 0.5 * ramp, 0, 255).astype(np.uint8)


def write_image_folder(
    root: str,
    split_sizes: Dict[str, int],
    num_classes: int = 10,
    min_size: int = 64,
    max_size: int = 400,
    seed: int = 0,
    modes: Sequence[Tuple[str, str]] = ALL_MODES,
    quality: int = 90,
) -> Dict[str, int]:
    """Write ``split_sizes[split]`` images per split, classes round-robin (files that exist are kept: the
    same seed gives the same files, so an interrupted run can be continued); returns the counts."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in split_sizes.items():
        for label in range(num_classes):
            os.makedirs(os.path.join(root, split, f"class_{label:03d}"), exist_ok=True)
        for i in range(count):
            label = i % num_classes
            height, width = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
            mode, ext = modes[i % len(modes)]
            path = os.path.join(root, split, f"class_{label:03d}", f"{split}_{i:06d}{ext}")
            pixels = synthetic_image(rng, label, num_classes, height, width)  # drawn always: same stream
            if os.path.exists(path):
                continue
            img = Image.fromarray(pixels)
            img = img.convert(mode) if mode != "P" else img.convert("P", palette=Image.ADAPTIVE, colors=64)
            img.save(path, quality=quality) if ext == ".jpg" else img.save(path)
    return dict(split_sizes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.make_imagefolder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="ROOT folder to write (ROOT/<split>/<class>/...)")
    parser.add_argument("--train", type=int, default=2000, help="training images (default: 2000)")
    parser.add_argument("--test", type=int, default=200, help="test images (default: 200)")
    parser.add_argument("--classes", type=int, default=10, help="classes (default: 10)")
    parser.add_argument("--min_size", type=int, default=64, help="smallest image side in pixels (default: 64)")
    parser.add_argument("--max_size", type=int, default=400, help="largest image side in pixels (default: 400)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and their sizes (default: 0)")
    args = parser.parse_args(argv)
    counts = write_image_folder(
        args.out, {"train": args.train, "test": args.test}, args.classes, args.min_size, args.max_size, args.seed
    )
    print(f"wrote {counts} images of {args.classes} classes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
