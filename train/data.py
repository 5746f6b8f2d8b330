"""Streaming, deterministic input pipeline on grain (sources, preprocessing, batches).

A training batch is a pure function of ``(seed, step)``:

* the order of epoch ``e`` is ``permutation(seed, e)`` of the training records; step ``s`` takes the
  ``s % steps_per_epoch``-th slice of ``global_batch`` records of the order of epoch
  ``s // steps_per_epoch`` (the incomplete last batch of an epoch is dropped);
* the augmentation of the image at position ``i`` of global batch ``s`` is row ``i`` of the draws
  made for the whole global batch from a generator seeded with ``(seed, s)``
  (:meth:`Preprocess.draws`), so it does not depend on which process or worker prepares it.

Each JAX process builds only its own slice (``process_index``) of every global batch, and the
per-step batches form a grain ``MapDataset`` (element ``s`` = this process's part of batch ``s``),
read in order by ``--data_workers`` worker processes (``mp_prefetch``; 0 = in this process). So the
batches are the same for any number of workers and of processes, a resumed run sees exactly the
batches of the uninterrupted run, and the iterator's grain state is saved in the checkpoints.

Sources (random access: ``len(source)``, ``source[i] -> {'image', 'label'}``, ``source.describe(i)``):
``'digits'`` (scikit-learn's UCI digits embedded in ``train/data/digits.npz``, see
``train/make_digits.py``), ``'imagefolder'`` (``ROOT/<split>/<class>/*.jpg``, torchvision's
ImageFolder layout) and any TFDS dataset prepared as ArrayRecord (``tfds.data_source``, no
TensorFlow). Images are decoded and preprocessed per record, so memory does not grow with the
data set. An unreadable image is replaced by the next readable record, counted and reported by path.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import zlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from train.config import UsageError

DIGITS_PATH = os.path.join(os.path.dirname(__file__), "data", "digits.npz")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# ImageNet channel statistics in 8-bit pixel units (torchvision's 0.485/0.456/0.406, 0.229/0.224/0.225).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
EVAL_CROP_FRACTION = 0.875   # ImageNet eval: resize the shorter side to image_size / 0.875, centre crop
RESIZED_CROP_AREA = (0.08, 1.0)
RESIZED_CROP_RATIO = (3 / 4, 4 / 3)
STATS_RECORDS = 10_000       # 'cifar'/'none' normalisation: channel statistics of at most this many records
MAX_CONSECUTIVE_BAD = 16     # a run of unreadable records this long stops the run
RESIZED_CROP_TRIES = 10
# Each training image takes its randomness from its own row of draws: 4 uniforms in [0, 1) per
# resized-crop try (area, log aspect, top, left), the flip uniform and the two integer offsets of the
# padded crop (see Preprocess.draws).
_FLIP, _CROP_Y, _CROP_X = 4 * RESIZED_CROP_TRIES, 4 * RESIZED_CROP_TRIES + 1, 4 * RESIZED_CROP_TRIES + 2
NUM_DRAWS = 4 * RESIZED_CROP_TRIES + 3
# Salts that separate the random streams derived from the one user seed.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1
# The dtypes of the batch arrays the steps take (the loop compiles them for these before any batch exists).
BATCH_DTYPES = {"image": np.dtype(np.uint8), "label": np.dtype(np.int32), "mask": np.dtype(np.float32)}
# What decoding a broken file raises (PIL: OSError incl. UnidentifiedImageError, SyntaxError for a
# broken PNG chunk, zlib.error, EOFError, ValueError for bad headers).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)


# ------------------------------------------------------------------------------------------ sources
class ArraySource:
    """Records from in-memory uint8 ``[N, H, W, C]`` images and integer labels."""

    def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray):
        self.name, self.split, self.images, self.labels = name, split, images, labels.astype(np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}

    def describe(self, index: int) -> str:
        return f"{self.name} {self.split} record {index}"


class FolderSource:
    """``root/split/<class>/**/*.<image extension>``; label = index of the class in ``classes``.

    Files are listed once (sorted, recursively as torchvision's ImageFolder); a record's image is
    the file's bytes, decoded by the preprocessing (in the worker processes)."""

    def __init__(self, root: str, split: str, classes: Sequence[str]):
        self.root, self.split, self.classes = root, split, list(classes)
        self.paths: List[str] = []
        labels = []
        for label, name in enumerate(self.classes):
            class_dir = os.path.join(root, split, name)
            if not os.path.isdir(class_dir):
                raise UsageError(f"imagefolder: class {name!r} has no folder {class_dir} in split {split!r} "
                                 f"(every class must be present in every split)")
            found = [os.path.join(d, f) for d, _, files in sorted(os.walk(class_dir, followlinks=True))
                     for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
            if not found:
                raise UsageError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) in {class_dir}")
            self.paths += found
            labels += [label] * len(found)
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        with open(self.paths[index], "rb") as f:
            return {"image": f.read(), "label": self.labels[index]}

    def describe(self, index: int) -> str:
        return self.paths[index]


class TfdsSource:
    """A split of a TFDS dataset prepared as ArrayRecord, read with ``tfds.data_source``."""

    def __init__(self, name: str, split: str, data_dir: Optional[str]):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as error:  # TFDS raises several unrelated types for "not prepared"
            raise UsageError(
                f"could not open TFDS dataset {name!r} split {split!r} in data_dir={data_dir!r} "
                f"({type(error).__name__}: {error}). Prepare it on a machine with internet: "
                f"`tfds build {name} --data_dir=DIR --file_format=array_record`, then pass --data_dir=DIR"
            ) from error
        features = self.source.dataset_info.features
        if "image" not in features or "label" not in features:
            raise UsageError(f"TFDS dataset {name!r} has features {sorted(features.keys())}; the training loop "
                             f"needs 'image' and 'label'")
        self.num_classes = int(getattr(features["label"], "num_classes", 0) or 0)
        if self.num_classes <= 0:
            raise UsageError(f"TFDS dataset {name!r}: feature 'label' is not a ClassLabel")
        self.image_shape = tuple(features["image"].shape)  # (H, W, C); H, W None for variable sizes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        record = self.source[index]
        return {"image": record["image"], "label": record["label"]}

    def describe(self, index: int) -> str:
        return f"TFDS {self.name} {self.split} record {index}"


def load_digits_npz(path: str = DIGITS_PATH) -> Tuple[ArraySource, ArraySource]:
    """The embedded digits: 1,437 train / 360 test 8x8x1 images with values 0..16."""
    with np.load(path) as data:
        return (ArraySource("digits", "train", data["train_image"], data["train_label"]),
                ArraySource("digits", "test", data["test_image"], data["test_label"]))


def open_folder(root: Optional[str], train_split: str, eval_split: str) -> Tuple[FolderSource, FolderSource]:
    """Both splits of an image folder, with the class list of the training split (sorted names)."""
    if not root:
        raise UsageError("--dataset=imagefolder needs --data_dir=ROOT (ROOT/<split>/<class>/<image>)")
    if not os.path.isdir(root):
        raise UsageError(f"--data_dir={root}: no such directory")
    splits = {}
    for split in (train_split, eval_split):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            raise UsageError(f"imagefolder: split folder {split_dir} does not exist (present: {present or 'none'}); "
                             f"see --train_split / --eval_split")
        splits[split] = sorted(d for d in os.listdir(split_dir)
                               if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))
        if not splits[split]:
            raise UsageError(f"imagefolder: no class folders in {split_dir}")
    only = sorted(set(splits[train_split]) ^ set(splits[eval_split]))
    if only:
        where = {c: (train_split if c in splits[train_split] else eval_split) for c in only}
        raise UsageError(f"imagefolder {root}: class folder(s) present in one split only: "
                         + ", ".join(f"{os.path.join(root, s, c)}" for c, s in where.items()))
    classes = splits[train_split]
    return FolderSource(root, train_split, classes), FolderSource(root, eval_split, classes)


# ------------------------------------------------------------------------------------ preprocessing
def _decode_pil(data: bytes, channels: int):
    """Encoded image bytes -> a PIL image in mode 'RGB' (``channels=3``) or 'L', decoded once (no
    conversion copy when the file already has that mode); raises one of :data:`DECODE_ERRORS`."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))  # in memory: nothing to close
    img.load()
    mode = "RGB" if channels == 3 else "L"
    return img if img.mode == mode else img.convert(mode)


def decode(image, channels: int) -> np.ndarray:
    """An encoded image (bytes) or a decoded array -> uint8 ``[H, W, channels]``.

    Grayscale, grayscale+alpha, RGBA, palette and CMYK images become RGB for ``channels=3``;
    raises one of :data:`DECODE_ERRORS` for an unreadable or truncated file."""
    if isinstance(image, (bytes, bytearray)):
        array = np.asarray(_decode_pil(image, channels))
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == channels:
        return array.astype(np.uint8, copy=False)
    if channels == 3 and array.shape[-1] in (1, 2):      # gray (+ alpha)
        return np.repeat(array[..., :1], 3, axis=-1).astype(np.uint8)
    if channels == 3 and array.shape[-1] == 4:           # RGBA array: drop alpha
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
            raise UsageError(f"--preprocess={self.kind} needs {self.image_size}x{self.image_size} images, got "
                             f"{array.shape[0]}x{array.shape[1]}; use --preprocess=imagenet to resize variable-size "
                             f"images")
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
        out[:, :4 * RESIZED_CROP_TRIES] = rng.random((n, 4 * RESIZED_CROP_TRIES))
        return out

    def train(self, image, draws: np.ndarray) -> np.ndarray:
        """One training image (encoded bytes or array) -> augmented uint8 ``[S, S, C]``; all randomness
        comes from ``draws`` (its row of :meth:`draws`)."""
        from PIL import Image

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
                padded[p:p + self.image_size, p:p + self.image_size] = out
                out = padded[dy:dy + self.image_size, dx:dx + self.image_size]
        return np.ascontiguousarray(out[:, ::-1] if flip else out)

    def eval(self, image) -> np.ndarray:
        """One eval image -> uint8 ``[S, S, C]`` (deterministic)."""
        if self.kind != "imagenet":
            return self._check_size(decode(image, self.channels))
        return self._imagenet_eval(self._pil_image(image))

    def _pil_image(self, image):
        """``image`` as a PIL image in mode 'RGB' (3 channels) or 'L' (1): encoded bytes are decoded
        straight into it, with no array in between (the crop and resize then read PIL's own pixels)."""
        from PIL import Image

        if isinstance(image, (bytes, bytearray)):
            return _decode_pil(image, self.channels)
        array = decode(image, self.channels)
        return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)

    def _imagenet_eval(self, img) -> np.ndarray:
        """Resize the shorter side of PIL image ``img`` to ``image_size / 0.875``, centre crop."""
        from PIL import Image

        w, h = img.size
        short = int(self.image_size / EVAL_CROP_FRACTION)
        # torchvision Resize(int): the shorter side becomes ``short``, the longer one is truncated.
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)  # (width, height)
        top, left = int(round((size[1] - self.image_size) / 2.0)), int(round((size[0] - self.image_size) / 2.0))
        resized = _array(img.resize(size, Image.BILINEAR))
        return np.ascontiguousarray(resized[top:top + self.image_size, left:left + self.image_size])

    @staticmethod
    def _resized_crop_box(h: int, w: int, draws: np.ndarray) -> Tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of a random crop covering 8-100 % of the area with aspect
        ratio 3/4-4/3 (10 tries, then the largest centred crop of clamped aspect; torchvision's rule)."""
        (a0, a1), (r0, r1) = RESIZED_CROP_AREA, (math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1]))
        for u_area, u_ratio, u_top, u_left in draws[:4 * RESIZED_CROP_TRIES].reshape(RESIZED_CROP_TRIES, 4):
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
        import jax.numpy as jnp

        return jnp.asarray(table)[channels, images]


# ------------------------------------------------------------------------------------------ dataset
@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train and an eval source with their preprocessing.

    Attributes:
      name: the ``--dataset`` name.
      train: training source.
      eval: evaluation source.
      num_classes: number of classes.
      preprocess: the per-image transforms and normalisation.
    """

    name: str
    train: Any
    eval: Any
    num_classes: int
    preprocess: Preprocess

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(H, W, C)`` of the model's input."""
        p = self.preprocess
        return (p.image_size, p.image_size, p.channels)

    def eval_examples(self, limit: int) -> np.ndarray:
        """The first readable ``limit`` eval images, eval-transformed and normalised (float32 ``[n, H, W, C]``)."""
        images = []
        for index in range(len(self.eval)):
            if len(images) == limit:
                break
            try:
                images.append(self.preprocess.eval(self.eval[index]["image"]))
            except DECODE_ERRORS:
                continue
        return self.preprocess.normalize(np.stack(images))


def _channel_stats(source, channels: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std (pixel units) of at most :data:`STATS_RECORDS` evenly spaced records."""
    n = len(source)
    indices = np.unique(np.linspace(0, n - 1, min(n, STATS_RECORDS)).astype(np.int64))
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for i in indices:
        try:
            x = decode(source[int(i)]["image"], channels).reshape(-1, channels).astype(np.float64)
        except DECODE_ERRORS:
            continue
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return tuple(float(v) for v in mean.astype(np.float32)), tuple(float(v) for v in std.astype(np.float32))


def _first_image_shape(source) -> Tuple[int, ...]:
    for index in range(min(len(source), MAX_CONSECUTIVE_BAD)):
        try:
            return decode(source[index]["image"], 3).shape if isinstance(source, FolderSource) \
                else np.shape(source[index]["image"])
        except DECODE_ERRORS:
            continue
    raise UsageError(f"no readable image among the first records of {source.describe(0)}")


def load_dataset(config) -> Dataset:
    """The sources and preprocessing named by ``config`` (``dataset``, ``data_dir``, splits, ``preprocess``,
    ``image_size``, ``augment``, ``crop_padding``)."""
    if config.dataset == "digits":
        ignored = [f"--{name}={getattr(config, name)!r}" for name, default in
                   (("train_split", "train"), ("eval_split", "test"), ("data_dir", None))
                   if getattr(config, name) != default]
        if ignored:  # the embedded digits have one fixed train/test split and no files to point at
            raise UsageError(f"--dataset=digits has only its embedded 'train' and 'test' splits and reads no "
                             f"--data_dir: {', '.join(ignored)} would be ignored; leave them out or choose "
                             f"--dataset=imagefolder or a TFDS --dataset")
        train, evaluation = load_digits_npz()
        num_classes, channels, native = 10, 1, 8
        kind = "cifar"
    elif config.dataset == "imagefolder":
        train, evaluation = open_folder(config.data_dir, config.train_split, config.eval_split)
        num_classes, channels, kind = len(train.classes), 3, "imagenet"
        native = _first_image_shape(train)[0] if config.preprocess in ("cifar", "none") else None
    else:
        train = TfdsSource(config.dataset, config.train_split, config.data_dir)
        evaluation = TfdsSource(config.dataset, config.eval_split, config.data_dir)
        num_classes = train.num_classes
        h, w, c = (tuple(train.image_shape) + (None, None, None))[:3]
        channels = c or 3
        kind = "cifar" if h is not None and h == w and h <= 64 else "imagenet"
        native = h
    if config.preprocess != "auto":
        kind = config.preprocess
    if kind == "imagenet":
        channels = 3
        image_size = config.image_size or 224
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        if native is None:
            raise UsageError(f"--preprocess={kind} needs fixed-size images; {config.dataset!r} has variable-size "
                             f"images: use --preprocess=imagenet")
        if config.image_size is not None and config.image_size != native:
            raise UsageError(f"--image_size={config.image_size}: --preprocess={kind} keeps the native size {native}; "
                             f"use --preprocess=imagenet to resize")
        image_size = native
        mean, std = _channel_stats(train, channels)
    augment = config.augment
    if augment == "auto":
        augment = "crop" if config.dataset == "digits" else "crop_flip"
    padding = config.crop_padding
    if padding is None:
        padding = 1 if config.dataset == "digits" else 4
    preprocess = Preprocess(kind=kind, image_size=image_size, channels=channels, crop=augment != "none" and
                            kind != "none", flip=augment == "crop_flip", padding=padding, mean=mean, std=std)
    return Dataset(config.dataset, train, evaluation, num_classes, preprocess)


# ------------------------------------------------------------------------------------------ batches
class _TrainBatch:
    """Step ``s`` -> this process's part of global batch ``s``: ``{'image' uint8 [L, H, W, C], 'label',
    'bad', 'step'}`` (runs in the grain workers)."""

    def __init__(self, dataset: Dataset, global_batch: int, local_slice: slice, steps_per_epoch: int, seed: int):
        self.source, self.preprocess = dataset.train, dataset.preprocess
        self.global_batch, self.local_slice = global_batch, local_slice
        self.steps_per_epoch, self.seed = steps_per_epoch, seed
        self._order: Tuple[Optional[int], Optional[np.ndarray]] = (None, None)

    def epoch_order(self, epoch: int) -> np.ndarray:
        cached_epoch, order = self._order
        if cached_epoch != epoch:
            order = np.random.default_rng([self.seed, _ORDER_STREAM, epoch]).permutation(len(self.source))
            self._order = (epoch, order)
        return order

    def __call__(self, step: int) -> Dict[str, np.ndarray]:
        epoch, i = divmod(int(step), self.steps_per_epoch)
        indices = self.epoch_order(epoch)[i * self.global_batch:(i + 1) * self.global_batch][self.local_slice]
        # The whole global batch's draws (a fixed amount per step), of which this process uses its rows.
        draws = self.preprocess.draws(np.random.default_rng([self.seed, _AUGMENT_STREAM, step]),
                                      self.global_batch)[self.local_slice]
        images, labels, bad = zip(*(_read(self.source, int(index), lambda x, d=d: self.preprocess.train(x, d))
                                    for index, d in zip(indices, draws)))
        return {"image": np.stack(images), "label": np.asarray(labels, BATCH_DTYPES["label"]),
                "bad": np.asarray(bad, np.int64), "step": np.full(len(labels), step, np.int64)}


def _read(source, index: int, transform):
    """``(transform(image), label, bad)`` of record ``index``; an unreadable record is replaced by the
    next readable one (``bad`` = its index, else -1)."""
    n = len(source)
    for attempt in range(MAX_CONSECUTIVE_BAD):
        i = (index + attempt) % n
        try:
            record = source[i]
            return transform(record["image"]), int(record["label"]), (index if attempt else -1)
        except DECODE_ERRORS:
            continue
    raise UsageError(f"{MAX_CONSECUTIVE_BAD} consecutive unreadable images starting at {source.describe(index)}")


def _batch_shapes(rows: int, image_shape: Tuple[int, ...]) -> Dict[str, Tuple[int, ...]]:
    """Shapes of a batch's model inputs with ``rows`` rows (their dtypes: :data:`BATCH_DTYPES`)."""
    return {"image": (rows,) + tuple(image_shape), "label": (rows,), "mask": (rows,)}


class _EvalBatch:
    """Eval batch ``b`` -> this process's part ``{'image', 'label', 'mask', 'bad'}``: padding past the end of the
    split and unreadable images get mask 0 (and a zero image)."""

    def __init__(self, dataset: Dataset, global_batch: int, local_slice: slice):
        self.source, self.preprocess, self.image_shape = dataset.eval, dataset.preprocess, dataset.image_shape
        self.global_batch, self.local_slice = global_batch, local_slice

    def __call__(self, batch: int) -> Dict[str, np.ndarray]:
        p = self.preprocess
        positions = np.arange(batch * self.global_batch, (batch + 1) * self.global_batch)[self.local_slice]
        out = {key: np.zeros(shape, BATCH_DTYPES[key])
               for key, shape in _batch_shapes(len(positions), self.image_shape).items()}
        out["bad"] = np.full(len(positions), -1, np.int64)
        for row, position in enumerate(positions):
            if position >= len(self.source):
                break
            try:
                record = self.source[int(position)]
                out["image"][row] = p.eval(record["image"])
                out["label"][row], out["mask"][row] = record["label"], 1.0
            except DECODE_ERRORS:
                out["bad"][row] = position
        return out


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """grain worker init: exit when the training process dies (a SIGKILLed or preempted run leaves no
    orphaned workers; grain's workers otherwise wait for a stop signal that never comes)."""
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name=f"exit-with-parent-{worker_index}/{worker_count}").start()


class Pipeline:
    """The training and eval batches of one run, for this process (see module doc).

    ``train_iterator(total_steps, start_step)`` yields this process's part of global batches
    ``start_step, ...``: ``{'image': uint8 [L, H, W, C], 'label': int32 [L], 'bad': int64 [L] (index of
    a replaced unreadable record, else -1), 'step': int64 [L]}``; :meth:`normalize` turns the images
    into the model's float32 input.
    """

    def __init__(self, dataset: Dataset, global_batch: int, seed: int, workers: int = 0,
                 process_index: int = 0, process_count: int = 1):
        n = len(dataset.train)
        if global_batch > n:
            raise UsageError(f"--batch_size={global_batch} is larger than the training split ({n} images)")
        if global_batch % process_count:
            raise UsageError(f"--batch_size={global_batch} must be divisible by the number of processes "
                             f"({process_count})")
        if workers < 0:
            raise UsageError(f"--data_workers={workers}: must be >= 0")
        self.dataset, self.global_batch, self.seed, self.workers = dataset, global_batch, seed, workers
        self.local_batch = global_batch // process_count
        self.local_slice = slice(process_index * self.local_batch, (process_index + 1) * self.local_batch)
        self.steps_per_epoch = n // global_batch
        self.normalize = dataset.preprocess.normalize
        self._eval_iterator = None

    def model_inputs(self, train: bool = True) -> Tuple[Tuple[Tuple[int, ...], np.dtype], ...]:
        """Global ``(shape, dtype)`` of the arrays the steps take from a batch: ``(image, label)`` for
        training, ``(image, label, mask)`` for eval (what the loop compiles its steps for before the
        first batch exists)."""
        shapes = _batch_shapes(self.global_batch, self.dataset.image_shape)
        return tuple((shapes[key], BATCH_DTYPES[key]) for key in ("image", "label") + (() if train else ("mask",)))

    def _iterate(self, dataset):
        """grain iterator over ``dataset`` (a ``MapDataset`` of batches), in order, prepared by
        ``self.workers`` processes (or a thread of this one), two batches ahead."""
        import grain

        iterator = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        if self.workers:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts workers
                flags.FLAGS.mark_as_parsed()
            iterator = iterator.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                                         per_worker_buffer_size=2),
                                            worker_init_fn=_exit_with_parent)
        return iter(iterator)

    def train_dataset(self, total_steps: int):
        """grain ``MapDataset`` whose element ``s`` is this process's part of global batch ``s``."""
        import grain

        return grain.MapDataset.range(total_steps).map(
            _TrainBatch(self.dataset, self.global_batch, self.local_slice, self.steps_per_epoch, self.seed))

    def train_iterator(self, total_steps: int, start_step: int = 0):
        """grain iterator (``get_state``/``set_state``) over the batches of steps ``start_step .. total_steps-1``."""
        return self._iterate(self.train_dataset(total_steps)[start_step:])

    def train_batch(self, step: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(float32 images, int32 labels)`` of step ``step`` (this process's part), computed here."""
        batch = self.train_dataset(step + 1)[step]
        return self.normalize(batch["image"]), batch["label"]

    def eval_batches(self) -> Iterator[Dict[str, np.ndarray]]:
        """The eval split in global batches, the last one padded (one compiled shape): this process's
        ``{'image' uint8 [L, H, W, C], 'label', 'mask' (1.0 for real examples), 'bad'}`` (:meth:`normalize`
        makes the model's input). The eval iterator (and its workers) lives across evaluations: each call
        reads the next pass over the split."""
        import grain

        num_batches = -(-len(self.dataset.eval) // self.global_batch)
        if self._eval_iterator is None:
            dataset = grain.MapDataset.range(num_batches).repeat(None).map(
                _EvalBatch(self.dataset, self.global_batch, self.local_slice))
            self._eval_iterator = self._iterate(dataset)
        for _ in range(num_batches):
            yield next(self._eval_iterator)

    def close(self) -> None:
        """Stop the eval iterator's worker processes."""
        if self._eval_iterator is not None and hasattr(self._eval_iterator, "close"):
            self._eval_iterator.close()
        self._eval_iterator = None
