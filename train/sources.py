"""Random-access sources of training records: ``len(source)``, ``source[i] -> {'image', 'label'}``,
``source.describe(i)`` (what an error message names).

``'digits'`` (scikit-learn's UCI digits embedded in ``train/data/digits.npz``, see ``train/make_digits.py``),
``'imagefolder'`` (``ROOT/<split>/<class>/*.jpg``, torchvision's ImageFolder layout) and any TFDS dataset
prepared as ArrayRecord (``tfds.data_source``, no TensorFlow). A folder's records hold the encoded file
bytes: images are decoded by the preprocessing (:mod:`train.preprocess`), per record, so memory does not
grow with the data set.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from train.config import UsageError

DIGITS_PATH = os.path.join(os.path.dirname(__file__), "data", "digits.npz")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_CONSECUTIVE_BAD = 16  # a run of unreadable records this long stops the run


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
                raise UsageError(
                    f"imagefolder: class {name!r} has no folder {class_dir} in split {split!r} "
                    f"(every class must be present in every split)"
                )
            found = list_images(class_dir)
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


def list_images(class_dir: str) -> List[str]:
    """The image files under ``class_dir``, in the order of their sorted folders, then names.

    Symbolic links to folders are followed (as torchvision's ImageFolder does), but each real folder is listed
    once, and a link to a folder that holds ``class_dir`` (``loop -> ..``) is not entered: it would list the
    class again, or the other classes under this class's label, until the path grew too long. Each link
    skipped is named on stderr."""
    top = os.path.realpath(class_dir)
    listed, seen = [], set()
    for folder, subfolders, files in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(folder)
        holds_top = folder != class_dir and (top + os.sep).startswith(real.rstrip(os.sep) + os.sep)
        if real in seen or holds_top:
            why = "a folder listed already" if real in seen else "a folder that holds the class folder (a loop)"
            print(
                f"WARNING: imagefolder: not following {folder}: it leads to {real}, {why}", file=sys.stderr, flush=True
            )
            subfolders.clear()
            continue
        seen.add(real)
        listed.append((folder, [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]))
    return [os.path.join(folder, f) for folder, files in sorted(listed) for f in sorted(files)]


class TfdsSource:
    """A split of a TFDS dataset prepared as ArrayRecord, read with ``tfds.data_source``."""

    def __init__(self, name: str, split: str, data_dir: Optional[str]):
        import tensorflow_datasets as tfds  # here: seconds to import, and only TFDS datasets need it

        self.name, self.split = name, split
        if data_dir is not None and not os.path.isdir(data_dir):
            raise UsageError(f"--data_dir={data_dir}: no such directory")
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as error:  # TFDS raises several unrelated types for "not prepared"
            raise UsageError(_tfds_failure(tfds, name, split, data_dir, error)) from error
        features = self.source.dataset_info.features
        if "image" not in features or "label" not in features:
            raise UsageError(
                f"TFDS dataset {name!r} has features {sorted(features.keys())}; the training loop "
                f"needs 'image' and 'label'"
            )
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


def _tfds_failure(tfds, name: str, split: str, data_dir: Optional[str], error: Exception) -> str:
    """Why ``tfds.data_source`` failed, in one paragraph: an unknown name with the closest registered ones, else
    the first line of TFDS's message (the rest can be its whole registry) and how to prepare the data."""
    builders = tfds.list_builders(with_community_datasets=False)
    base = name.split("/")[0].split(":")[0]
    if base not in builders:
        close = difflib.get_close_matches(base, builders + ["digits", "imagefolder"], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return (
            f"--dataset={name!r}: no TFDS dataset of that name{hint}; --dataset is 'digits', 'imagefolder' or "
            f"a TFDS name (tfds.list_builders())"
        )
    first_line = (str(error).strip().splitlines() or [""])[0][:300]
    return (
        f"could not open TFDS dataset {name!r} split {split!r} in data_dir={data_dir!r} "
        f"({type(error).__name__}: {first_line}). Prepare it on a machine with internet: "
        f"`tfds build {name} --data_dir=DIR --file_format=array_record`, then pass --data_dir=DIR"
    )


def load_digits_npz(path: str = DIGITS_PATH) -> Tuple[ArraySource, ArraySource]:
    """The embedded digits: 1,437 train / 360 test 8x8x1 images with values 0..16."""
    with np.load(path) as data:
        return (
            ArraySource("digits", "train", data["train_image"], data["train_label"]),
            ArraySource("digits", "test", data["test_image"], data["test_label"]),
        )


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
            raise UsageError(
                f"imagefolder: split folder {split_dir} does not exist (present: {present or 'none'}); "
                f"see --train_split / --eval_split"
            )
        splits[split] = sorted(
            d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith(".")
        )
        if not splits[split]:
            raise UsageError(f"imagefolder: no class folders in {split_dir}")
        if len(splits[split]) == 1:  # every prediction would be right: 'accuracy 1.0000' says nothing
            raise UsageError(
                f"imagefolder: one class folder in {split_dir} ({splits[split][0]!r}); a classifier "
                f"needs at least 2 classes (ROOT/<split>/<class>/<image>)"
            )
    only = sorted(set(splits[train_split]) ^ set(splits[eval_split]))
    if only:
        where = {c: (train_split if c in splits[train_split] else eval_split) for c in only}
        raise UsageError(
            f"imagefolder {root}: class folder(s) present in one split only: "
            + ", ".join(f"{os.path.join(root, s, c)}" for c, s in where.items())
        )
    classes = splits[train_split]
    return FolderSource(root, train_split, classes), FolderSource(root, eval_split, classes)
