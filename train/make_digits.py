"""Regenerate ``train/data/digits.npz`` from scikit-learn's copy of the UCI digits.

The embedded file is what ``--dataset=digits`` reads, so the default run needs neither
internet nor scikit-learn. It holds the 1,797 real 8x8 grayscale digits (pixel values
0..16, stored as uint8 ``[N, 8, 8, 1]``) split once, stratified by class, into 1,437
training and 360 test images (``train_test_split(..., test_size=360, stratify=y,
random_state=0)``). Run ``python -m train.make_digits`` to rebuild it; the output is
byte-for-byte reproducible for a given scikit-learn version.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

PATH = os.path.join(os.path.dirname(__file__), "data", "digits.npz")
TEST_SIZE = 360


def build(path: str = PATH) -> None:
    # Here: scikit-learn is needed only to regenerate the embedded file.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]  # [1797, 8, 8, 1], values 0..16
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=0
    )
    np.savez_compressed(path, train_image=x_train, train_label=y_train, test_image=x_test, test_label=y_test)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.make_digits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=PATH, help="file to write (default: the embedded train/data/digits.npz)")
    out = parser.parse_args(argv).out
    build(out)
    with np.load(out) as data:
        print(out, {k: data[k].shape for k in data.files})


if __name__ == "__main__":
    main()
