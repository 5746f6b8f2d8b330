"""The data set a configuration names: its train and eval sources (:mod:`train.sources`) and their
preprocessing (:mod:`train.preprocess`), as :func:`load_dataset` chooses them; batches of it come from
:class:`train.pipeline.Pipeline`. See docs/training.md, "Input pipeline".
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Tuple

import numpy as np

from train.config import UsageError
from train.preprocess import DECODE_ERRORS, IMAGENET_MEAN, IMAGENET_STD, Preprocess, decode
from train.sources import MAX_CONSECUTIVE_BAD, FolderSource, TfdsSource, load_digits_npz, open_folder

STATS_RECORDS = 10_000  # 'cifar'/'none' normalisation: channel statistics of at most this many records


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
            return (
                decode(source[index]["image"], 3).shape
                if isinstance(source, FolderSource)
                else np.shape(source[index]["image"])
            )
        except DECODE_ERRORS:
            continue
    raise UsageError(f"no readable image among the first records of {source.describe(0)}")


def check_readable(source, transform, what: str) -> None:
    """Refuse (:class:`~train.config.UsageError`) a split in which no record can be read and transformed: its
    evaluation would find nothing to average after all the training (a ``ZeroDivisionError`` once). Stops at the
    first readable record (the first one, as a rule)."""
    for index in range(len(source)):
        try:
            transform(source[index]["image"])
            return
        except DECODE_ERRORS:
            continue
    where = f" ({os.path.join(source.root, source.split)})" if isinstance(source, FolderSource) else ""
    raise UsageError(
        f"no image of the {what} split {source.split!r}{where} can be read ({len(source)} record(s) "
        f"tried); choose another --{what}_split or repair the files"
    )


def load_dataset(config) -> Dataset:
    """The sources and preprocessing named by ``config`` (``dataset``, ``data_dir``, splits, ``preprocess``,
    ``image_size``, ``augment``, ``crop_padding``)."""
    if config.dataset == "digits":
        ignored = [
            f"--{name}={getattr(config, name)!r}"
            for name, default in (("train_split", "train"), ("eval_split", "test"), ("data_dir", None))
            if getattr(config, name) != default
        ]
        if ignored:  # the embedded digits have one fixed train/test split and no files to point at
            raise UsageError(
                f"--dataset=digits has only its embedded 'train' and 'test' splits and reads no "
                f"--data_dir: {', '.join(ignored)} would be ignored; leave them out or choose "
                f"--dataset=imagefolder or a TFDS --dataset"
            )
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
            raise UsageError(
                f"--preprocess={kind} needs fixed-size images; {config.dataset!r} has variable-size "
                f"images: use --preprocess=imagenet"
            )
        if config.image_size is not None and config.image_size != native:
            raise UsageError(
                f"--image_size={config.image_size}: --preprocess={kind} keeps the native size {native}; "
                f"use --preprocess=imagenet to resize"
            )
        image_size = native
        mean, std = _channel_stats(train, channels)
    augment = config.augment
    if augment == "auto":
        augment = "crop" if config.dataset == "digits" else "crop_flip"
    padding = config.crop_padding
    if padding is None:
        padding = 1 if config.dataset == "digits" else 4
    preprocess = Preprocess(
        kind=kind,
        image_size=image_size,
        channels=channels,
        crop=augment != "none" and kind != "none",
        flip=augment == "crop_flip",
        padding=padding,
        mean=mean,
        std=std,
    )
    check_readable(evaluation, preprocess.eval, "eval")
    return Dataset(config.dataset, train, evaluation, num_classes, preprocess)
