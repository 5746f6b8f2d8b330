"""Random-access sources of training records: ``len(source)``, ``source[i] -> {'image', 'label'}``,
``source.describe(i)`` (what an error message names).

``'digits'`` (scikit-learn's UCI digits embedded in ``train/data/digits.npz``, see ``train/make_digits.py``),
``'imagefolder'`` (``ROOT/<split>/<class>/*.jpg``, torchvision's ImageFolder layout) and any TFDS dataset
prepared as ArrayRecord (``tfds.data_source``, no TensorFlow). A folder's records hold the encoded file
bytes: images are decoded by the preprocessing (:mod:`train.preprocess`), per record, so memory does not
grow with the data set.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from train.config import UsageError

DIGITS_PATH = os.path.join(os.path.dirname(__file__), "data", "digits.npz")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_CONSECUTIVE_BAD = 16     # a run of unreadable records this long stops the run


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
        import tensorflow_datasets as tfds  # here: seconds to import, and only TFDS datasets need it

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
