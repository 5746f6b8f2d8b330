"""Decoding and preprocessing of one image: the training augmentation (its randomness drawn per global
batch, :meth:`Preprocess.draws`), the eval transform and the per-channel normalisation of a batch.

The per-image transforms run in the grain worker processes; :meth:`Preprocess.normalize` runs in the
training process (inside the jitted steps).
"""

from __future__ import annotations

import dataclasses
import io
import math
import zlib
from typing import Tuple

import jax.numpy as jnp
import numpy as np
from PIL import Image

from train.config import UsageError

# ImageNet channel statistics in 8-bit pixel units (torchvision's 0.485/0.456/0.406, 0.229/0.224/0.225).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
EVAL_CROP_FRACTION = 0.875  # ImageNet eval: resize the shorter side to image_size / 0.875, centre crop
RESIZED_CROP_AREA = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)
RESIZED_CROP_TRIES = 10
# Each training image takes its randomness from its own row of draws: 4 uniforms in [0, 1) per
# resized-crop try (area, log aspect, top, left), the flip uniform and the two integer offsets of the
# padded crop (see Preprocess.draws).
_FLIP, _CROP_Y, _CROP_X = 4 * RESIZED_CROP_TRIES, 4 * RESIZED_CROP_TRIES + 1, 4 * RESIZED_CROP_TRIES + 2
NUM_DRAWS = 4 * RESIZED_CROP_TRIES + 3
# What decoding a broken file raises (PIL: OSError incl. UnidentifiedImageError, SyntaxError for a
# broken PNG chunk, zlib.error, EOFError, ValueError for bad headers, DecompressionBombError for an image of
# more than 2 * Image.MAX_IMAGE_PIXELS pixels, which is not an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)
# PIL's modes of 16-bit grayscale ('I;16*': PNG, TIFF) and 32-bit integer pixels ('I': 16-bit PNGs in older
# Pillows). PIL's convert() to 'L' clips them at 255 (a 16-bit image turns almost white): they are scaled.
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_8_bit(pixels: np.ndarray) -> np.ndarray:
    """16-bit pixel values (0..65535; outside clipped) -> uint8 0..255, rounded: ``round(v * 255 / 65535)``."""
    wide = np.clip(pixels, 0, 65535).astype(np.uint32)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _decode_pil(data: bytes, channels: int):
    """Encoded image bytes -> a PIL image in mode 'RGB' (``channels=3``) or 'L', decoded once (no
    conversion copy when the file already has that mode; 16-bit grayscale scaled to 8 bits); raises one of
    :data:`DECODE_ERRORS`."""
    img = Image.open(io.BytesIO(data))  # in memory: nothing to close
    img.load()
    if img.mode in _WIDE_GRAY_MODES:
        img = Image.fromarray(to_8_bit(np.asarray(img)))
    mode = "RGB" if channels == 3 else "L"
    return img if img.mode == mode else img.convert(mode)


def decode(image, channels: int) -> np.ndarray:
    """An encoded image (bytes) or a decoded array -> uint8 ``[H, W, channels]``.

    Grayscale, grayscale+alpha, RGBA, palette and CMYK images become RGB for ``channels=3``; 16-bit
    images are scaled to 8 bits; raises one of :data:`DECODE_ERRORS` for an unreadable or truncated file."""
    if isinstance(image, (bytes, bytearray)):
        array = np.asarray(_decode_pil(image, channels))
    else:
        array = np.asarray(image)
        if array.dtype == np.uint16:  # a 16-bit array (TFDS): scaled, not wrapped around by astype
            array = to_8_bit(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == channels:
        return array.astype(np.uint8, copy=False)
    if channels == 3 and array.shape[-1] in (1, 2):  # gray (+ alpha)
        return np.repeat(array[..., :1], 3, axis=-1).astype(np.uint8)
    if channels == 3 and array.shape[-1] == 4:  # RGBA array: drop alpha
        return array[..., :3].astype(np.uint8)
    raise ValueError(f"cannot convert an image with {array.shape[-1]} channels to {channels}")


def _array(img) -> np.ndarray:
    """PIL image -> uint8 ``[H, W, C]`` (a channel axis also for mode 'L')."""
    out = np.asarray(img)
    return out[..., None] if out.ndim == 2 else out


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Per-image training augmentation and eval transform to uint8 ``[image_size, image_size, channels]``,
    and the per-channel normalisation of a batch.

    Attributes:
      kind: 'imagenet' (train: random-resized crop, area 0.08-1, aspect 3/4-4/3, bilinear; eval: resize the
        shorter side to ``image_size / 0.875`` and centre crop), 'cifar' (train: random crop of the
        ``padding``-pixel zero-padded image; eval: unchanged) or 'none' (unchanged). 'cifar' and 'none'
        need images of the fixed size ``image_size``.
      image_size: side of the square output.
      channels: channels of the output (3: any image is converted to RGB).
      crop: training draws a random crop ('imagenet': resized crop; 'cifar': padded crop).
      flip: training flips horizontally with probability 1/2.
      padding: zero padding of the 'cifar' crop.
      mean: per-channel mean subtracted by :meth:`normalize`, in pixel units.
      std: per-channel standard deviation divided by :meth:`normalize`, in pixel units.
    """

    kind: str
    image_size: int
    channels: int
    crop: bool
    flip: bool
    padding: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def _check_size(self, array: np.ndarray) -> np.ndarray:
        if array.shape[:2] != (self.image_size, self.image_size):
            raise UsageError(
                f"--preprocess={self.kind} needs {self.image_size}x{self.image_size} images, got "
                f"{array.shape[0]}x{array.shape[1]}; use --preprocess=imagenet to resize variable-size "
                f"images"
            )
        return array

    def draws(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """The randomness of ``n`` training images, float64 ``[n, NUM_DRAWS]`` (one row per image).

        The padded crop's offsets and the flip are drawn first, for all ``n`` images at once, as the
        loop has drawn them since its first version (so the digits' batches did not change with the
        streaming pipeline); the resized-crop uniforms come after them."""
        out = np.empty((n, NUM_DRAWS))
        out[:, _CROP_Y] = rng.integers(0, 2 * self.padding + 1, size=n)
        out[:, _CROP_X] = rng.integers(0, 2 * self.padding + 1, size=n)
        out[:, _FLIP] = rng.random(n)
        out[:, : 4 * RESIZED_CROP_TRIES] = rng.random((n, 4 * RESIZED_CROP_TRIES))
        return out

    def train(self, image, draws: np.ndarray) -> np.ndarray:
        """One training image (encoded bytes or array) -> augmented uint8 ``[S, S, C]``; all randomness
        comes from ``draws`` (its row of :meth:`draws`)."""
        flip = self.flip and draws[_FLIP] < 0.5
        if self.kind == "imagenet" and self.crop:  # in PIL from decoding to the flip: no array copies between
            img = self._pil_image(image)
            box = self._resized_crop_box(img.height, img.width, draws)
            img = img.resize((self.image_size, self.image_size), Image.BILINEAR, box=box)
            return _array(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img)
        if self.kind == "imagenet":
            out = self._imagenet_eval(self._pil_image(image))
        else:
            out = self._check_size(decode(image, self.channels))
            if self.crop and self.padding:
                p = self.padding
                dy, dx = int(draws[_CROP_Y]), int(draws[_CROP_X])
                padded = np.zeros((self.image_size + 2 * p, self.image_size + 2 * p, out.shape[-1]), np.uint8)
                padded[p : p + self.image_size, p : p + self.image_size] = out
                out = padded[dy : dy + self.image_size, dx : dx + self.image_size]
        return np.ascontiguousarray(out[:, ::-1] if flip else out)

    def eval(self, image) -> np.ndarray:
        """One eval image -> uint8 ``[S, S, C]`` (deterministic)."""
        if self.kind != "imagenet":
            return self._check_size(decode(image, self.channels))
        return self._imagenet_eval(self._pil_image(image))

    def _pil_image(self, image):
        """``image`` as a PIL image in mode 'RGB' (3 channels) or 'L' (1): encoded bytes are decoded
        straight into it, with no array in between (the crop and resize then read PIL's own pixels)."""
        if isinstance(image, (bytes, bytearray)):
            return _decode_pil(image, self.channels)
        array = decode(image, self.channels)
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)

    def _imagenet_eval(self, img) -> np.ndarray:
        """Resize the shorter side of PIL image ``img`` to ``image_size / 0.875``, centre crop."""
        w, h = img.size
        short = int(self.image_size / EVAL_CROP_FRACTION)
        # torchvision Resize(int): the shorter side becomes ``short``, the longer one is truncated.
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # (width, height)
        top, left = int(round((size[1] - self.image_size) / 2.0)), int(round((size[0] - self.image_size) / 2.0))
        resized = _array(img.resize(size, Image.BILINEAR))
        return np.ascontiguousarray(resized[top : top + self.image_size, left : left + self.image_size])

    @staticmethod
    def _resized_crop_box(h: int, w: int, draws: np.ndarray) -> Tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of a random crop covering 8-100 % of the area with aspect
        ratio 3/4-4/3 (10 tries, then the largest centred crop of clamped aspect; torchvision's rule)."""
        (a0, a1), (r0, r1) = RESIZED_CROP_AREA, (math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1]))
        for u_area, u_ratio, u_top, u_left in draws[: 4 * RESIZED_CROP_TRIES].reshape(RESIZED_CROP_TRIES, 4):
            target = h * w * (a0 + (a1 - a0) * u_area)
            ratio = math.exp(r0 + (r1 - r0) * u_ratio)
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = int(u_top * (h - ch + 1)), int(u_left * (w - cw + 1))
                return left, top, left + cw, top + ch
        ratio = w / h
        if ratio < RESIZED_CROP_RATIO[0]:
            cw, ch = w, int(round(w / RESIZED_CROP_RATIO[0]))
        elif ratio > RESIZED_CROP_RATIO[1]:
            cw, ch = int(round(h * RESIZED_CROP_RATIO[1])), h
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
        return left, top, left + cw, top + ch

    def normalize(self, images):
        """uint8 ``[..., C]`` -> float32 ``(x - mean) / std``, each value looked up in the float32 table of
        all 256 values per channel.

        Takes a NumPy array or a (traced) JAX array: the training loop sends uint8 batches to the devices
        and normalises inside its jitted steps (4x fewer bytes to move, no per-pixel work on the host).
        The table is computed by NumPy, so both give NumPy's bits (tested); arithmetic under XLA would
        not, since XLA turns a division by a broadcast into a multiplication by its rounded reciprocal."""
        mean, std = np.asarray(self.mean, np.float32)[:, None], np.asarray(self.std, np.float32)[:, None]
        table = (np.arange(256, dtype=np.float32) - mean) / std  # [C, 256]
        channels = np.arange(len(self.mean))
        if isinstance(images, np.ndarray):
            return table[channels, images]
        return jnp.asarray(table)[channels, images]
