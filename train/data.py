"""Deterministic, TensorFlow-free input pipeline: in-memory numpy arrays + numpy augmentation.

A batch is a pure function of ``(seed, step)``:

* the training order of epoch ``e`` is ``permutation(seed, e)``; step ``s`` takes the
  ``s % steps_per_epoch``-th slice of the order of epoch ``s // steps_per_epoch``
  (the incomplete last batch of an epoch is dropped);
* the augmentation parameters (crop offsets, flips) of step ``s`` come from a generator
  seeded with ``(seed, s)`` and are drawn for the whole global batch, so they do not
  depend on how many processes share it.

So a resumed run sees exactly the batches the uninterrupted run would have seen, and
each process of a multi-host run reads only its own slice (``process_index``) of the
same global batch.

Sources: ``'digits'`` is scikit-learn's copy of the UCI handwritten digits embedded in
the package (``train/data/digits.npz``, see ``train/make_digits.py``); any other name is
read with ``tfds.data_source`` (ArrayRecord, no TensorFlow) from ``data_dir`` and held in
memory as uint8 (CIFAR-10: 150 MB).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator, Optional, Tuple

import numpy as np

from train.config import UsageError

DIGITS_PATH = os.path.join(os.path.dirname(__file__), "data", "digits.npz")
# Salts that separate the random streams derived from the one user seed.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train and an eval split as uint8 ``[N, H, W, C]`` images and int32 labels."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    num_classes: int
    max_value: float  # largest possible pixel value (16 for digits, 255 for 8-bit images)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def channel_stats(self) -> Tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of the training images, in pixel units (float32 ``[C]``)."""
        x = self.train_images.reshape(-1, self.train_images.shape[-1]).astype(np.float64)
        return x.mean(0).astype(np.float32), x.std(0).astype(np.float32)


def load_digits_npz(path: str = DIGITS_PATH) -> Dataset:
    """The embedded digits: 1,437 train / 360 test 8x8x1 images with values 0..16."""
    with np.load(path) as data:
        return Dataset("digits", data["train_image"], data["train_label"].astype(np.int32),
                       data["test_image"], data["test_label"].astype(np.int32), num_classes=10, max_value=16.0)


def _read_source(source, name: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """All records of a TFDS data source as ``(images uint8 [N,H,W,C], labels int32 [N])``."""
    n = len(source)
    images, labels = None, np.empty((n,), np.int32)
    chunk = 1024
    for start in range(0, n, chunk):
        keys = list(range(start, min(n, start + chunk)))
        try:
            records = source.__getitems__(keys)
        except (TypeError, AttributeError):  # tfds.testing.mock_data serves single indices only
            records = [source[i] for i in keys]
        for i, record in zip(keys, records):
            if "image" not in record or "label" not in record:
                raise UsageError(f"TFDS dataset {name!r} split {split!r}: records have keys {sorted(record)}; "
                                 "the training loop needs 'image' and 'label'")
            image = np.asarray(record["image"])
            if image.ndim == 2:
                image = image[..., None]
            if images is None:
                images = np.empty((n,) + image.shape, np.uint8)
            if image.shape != images.shape[1:]:
                raise UsageError(f"TFDS dataset {name!r} split {split!r}: record {i} has image shape {image.shape}, "
                                 f"record 0 has {images.shape[1:]}; only fixed-size images are supported")
            images[i] = image
            labels[i] = record["label"]
    return images, labels


def load_tfds(name: str, train_split: str, eval_split: str, data_dir: Optional[str]) -> Dataset:
    """Read a prepared TFDS dataset through ``tfds.data_source`` (no TensorFlow, no download)."""
    import tensorflow_datasets as tfds

    splits = {}
    for split in (train_split, eval_split):
        try:
            splits[split] = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as error:  # TFDS raises several unrelated types for "not prepared"
            raise UsageError(
                f"could not open TFDS dataset {name!r} split {split!r} in data_dir={data_dir!r} "
                f"({type(error).__name__}: {error}). Prepare it on a machine with internet: "
                f"`tfds build {name} --data_dir=DIR --file_format=array_record`, then pass --data_dir=DIR"
            ) from error
    source = splits[train_split]
    label = source.dataset_info.features["label"]
    num_classes = int(getattr(label, "num_classes", 0))
    if num_classes <= 0:
        raise UsageError(f"TFDS dataset {name!r}: feature 'label' is not a ClassLabel")
    train_images, train_labels = _read_source(source, name, train_split)
    eval_images, eval_labels = _read_source(splits[eval_split], name, eval_split)
    return Dataset(name, train_images, train_labels, eval_images, eval_labels, num_classes, max_value=255.0)


def load_dataset(config) -> Dataset:
    if config.dataset == "digits":
        ignored = [f"--{name}={getattr(config, name)!r}" for name, default in
                   (("train_split", "train"), ("eval_split", "test"), ("data_dir", None))
                   if getattr(config, name) != default]
        if ignored:  # the embedded digits have one fixed train/test split and no files to point at
            raise UsageError(f"--dataset=digits has only its embedded 'train' and 'test' splits and reads no "
                             f"--data_dir: {', '.join(ignored)} would be ignored; leave them out or choose a TFDS "
                             f"--dataset")
        return load_digits_npz()
    return load_tfds(config.dataset, config.train_split, config.eval_split, config.data_dir)


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random crop after zero padding (``padding`` pixels) and optional horizontal flip."""

    padding: int = 0
    flip: bool = False

    @classmethod
    def from_config(cls, config, dataset: Dataset) -> "Augment":
        """'auto': digits get a 1-pixel random shift and no flip (a mirrored 2, 3, 7 or 9 is
        not the same digit, and an 8x8 digit has only 1 pixel of margin); natural images
        (CIFAR) get the standard 4-pixel crop and horizontal flip."""
        mode = config.augment
        if mode == "auto":
            mode = "crop" if dataset.name == "digits" else "crop_flip"
        padding = config.crop_padding
        if padding is None:
            padding = 1 if dataset.name == "digits" else 4
        if mode == "none":
            return cls()
        return cls(padding=padding, flip=(mode == "crop_flip"))

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """images: uint8 ``[B, H, W, C]`` -> augmented copy, same shape."""
        b, h, w, _ = images.shape
        # Draw the parameters for the whole batch first (fixed amount of randomness per step).
        dy = rng.integers(0, 2 * self.padding + 1, size=b)
        dx = rng.integers(0, 2 * self.padding + 1, size=b)
        flip = rng.random(b) < 0.5
        if self.padding:
            p = self.padding
            padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
            rows = dy[:, None] + np.arange(h)[None, :]  # [B, H]
            cols = dx[:, None] + np.arange(w)[None, :]  # [B, W]
            images = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
        if self.flip:
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        return images


class Batches:
    """Global-batch indexing and per-process slicing for one training run (see module doc)."""

    def __init__(self, dataset: Dataset, augment: Augment, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        n = len(dataset.train_labels)
        if global_batch > n:
            raise UsageError(f"--batch_size={global_batch} is larger than the training split ({n} images)")
        if global_batch % process_count:
            raise UsageError(f"--batch_size={global_batch} must be divisible by the number of processes "
                             f"({process_count})")
        self.dataset, self.augment, self.global_batch, self.seed = dataset, augment, global_batch, seed
        self.local_batch = global_batch // process_count
        self.local_slice = slice(process_index * self.local_batch, (process_index + 1) * self.local_batch)
        self.steps_per_epoch = n // global_batch
        mean, std = dataset.channel_stats()
        self.mean, self.std = mean, std
        self._order_cache = (None, None)

    def epoch_order(self, epoch: int) -> np.ndarray:
        cached_epoch, order = self._order_cache
        if cached_epoch != epoch:
            rng = np.random.default_rng([self.seed, _ORDER_STREAM, epoch])
            order = rng.permutation(len(self.dataset.train_labels))
            self._order_cache = (epoch, order)
        return order

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[B,H,W,C]`` -> float32, per-channel zero mean / unit std (training statistics)."""
        return (images.astype(np.float32) - self.mean) / self.std

    def train_batch(self, step: int) -> Tuple[np.ndarray, np.ndarray]:
        """This process's part of global batch ``step``: float32 images, int32 labels."""
        epoch, i = divmod(step, self.steps_per_epoch)
        index = self.epoch_order(epoch)[i * self.global_batch:(i + 1) * self.global_batch]
        rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, step])
        images = self.dataset.train_images[index]
        images = self.augment(images, rng)[self.local_slice]
        return self.normalize(images), self.dataset.train_labels[index][self.local_slice]

    def iterate_train(self, start_step: int, end_step: int) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
        for step in range(start_step, end_step):
            images, labels = self.train_batch(step)
            yield step, images, labels

    def eval_batches(self) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The eval split in global batches, the last one zero-padded: this process's
        ``(images, labels, mask)`` with ``mask`` 1.0 for real examples."""
        images, labels = self.dataset.eval_images, self.dataset.eval_labels
        n = len(labels)
        for start in range(0, n, self.global_batch):
            stop = min(n, start + self.global_batch)
            x = np.zeros((self.global_batch,) + images.shape[1:], np.float32)
            y = np.zeros((self.global_batch,), np.int32)
            mask = np.zeros((self.global_batch,), np.float32)
            x[:stop - start] = self.normalize(images[start:stop])
            y[:stop - start] = labels[start:stop]
            mask[:stop - start] = 1.0
            yield x[self.local_slice], y[self.local_slice], mask[self.local_slice]
