"""The streaming, deterministic input pipeline on grain: the batches of a :class:`~train.data.Dataset`.

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
An unreadable image is replaced by the next readable record, counted and reported by path.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import grain
import numpy as np
from absl import flags

from train.config import UsageError
from train.data import Dataset
from train.preprocess import DECODE_ERRORS
from train.sources import MAX_CONSECUTIVE_BAD
from train.worker_watchdog import WatchedIterator, worker_init

# Salts that separate the random streams derived from the one user seed.
_ORDER_STREAM, _AUGMENT_STREAM = 0, 1
# The dtypes of the batch arrays the steps take (the loop compiles them for these before any batch exists).
BATCH_DTYPES = {"image": np.dtype(np.uint8), "label": np.dtype(np.int32), "mask": np.dtype(np.float32)}


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
        indices = self.epoch_order(epoch)[i * self.global_batch : (i + 1) * self.global_batch][self.local_slice]
        # The whole global batch's draws (a fixed amount per step), of which this process uses its rows.
        draws = self.preprocess.draws(np.random.default_rng([self.seed, _AUGMENT_STREAM, step]), self.global_batch)[
            self.local_slice
        ]
        images, labels, bad = zip(
            *(
                _read(self.source, int(index), lambda x, d=d: self.preprocess.train(x, d))
                for index, d in zip(indices, draws)
            )
        )
        return {
            "image": np.stack(images),
            "label": np.asarray(labels, BATCH_DTYPES["label"]),
            "bad": np.asarray(bad, np.int64),
            "step": np.full(len(labels), step, np.int64),
        }


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
        out = {
            key: np.zeros(shape, BATCH_DTYPES[key])
            for key, shape in _batch_shapes(len(positions), self.image_shape).items()
        }
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


class Pipeline:
    """The training and eval batches of one run, for this process (see module doc).

    ``train_iterator(total_steps, start_step)`` yields this process's part of global batches
    ``start_step, ...``: ``{'image': uint8 [L, H, W, C], 'label': int32 [L], 'bad': int64 [L] (index of
    a replaced unreadable record, else -1), 'step': int64 [L]}``; :meth:`normalize` turns the images
    into the model's float32 input.
    """

    def __init__(
        self,
        dataset: Dataset,
        global_batch: int,
        seed: int,
        workers: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        n = len(dataset.train)
        if global_batch > n:
            raise UsageError(f"--batch_size={global_batch} is larger than the training split ({n} images)")
        if global_batch % process_count:
            raise UsageError(
                f"--batch_size={global_batch} must be divisible by the number of processes ({process_count})"
            )
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

    def _iterate(self, dataset, what: str):
        """grain iterator over ``dataset`` (a ``MapDataset`` of batches), in order, prepared by
        ``self.workers`` processes (or a thread of this one), two batches ahead. With workers, a worker that
        dies makes ``next()`` raise :class:`~train.worker_watchdog.WorkerDied` (``what`` names the batches)."""
        iterator = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        if not self.workers:
            return iter(iterator)
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts workers
            flags.FLAGS.mark_as_parsed()
        iterator = iterator.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=2), worker_init_fn=worker_init
        )
        return WatchedIterator(iter(iterator), what)

    def train_dataset(self, total_steps: int):
        """grain ``MapDataset`` whose element ``s`` is this process's part of global batch ``s``."""
        return grain.MapDataset.range(total_steps).map(
            _TrainBatch(self.dataset, self.global_batch, self.local_slice, self.steps_per_epoch, self.seed)
        )

    def train_iterator(self, total_steps: int, start_step: int = 0):
        """grain iterator (``get_state``/``set_state``) over the batches of steps ``start_step .. total_steps-1``."""
        return self._iterate(self.train_dataset(total_steps)[start_step:], "training")

    def train_batch(self, step: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(float32 images, int32 labels)`` of step ``step`` (this process's part), computed here."""
        batch = self.train_dataset(step + 1)[step]
        return self.normalize(batch["image"]), batch["label"]

    def eval_batches(self) -> Iterator[Dict[str, np.ndarray]]:
        """The eval split in global batches, the last one padded (one compiled shape): this process's
        ``{'image' uint8 [L, H, W, C], 'label', 'mask' (1.0 for real examples), 'bad'}`` (:meth:`normalize`
        makes the model's input). The eval iterator (and its workers) lives across evaluations: each call
        reads the next pass over the split."""
        num_batches = -(-len(self.dataset.eval) // self.global_batch)
        if self._eval_iterator is None:
            dataset = (
                grain.MapDataset.range(num_batches)
                .repeat(None)
                .map(_EvalBatch(self.dataset, self.global_batch, self.local_slice))
            )
            self._eval_iterator = self._iterate(dataset, "eval")
        for _ in range(num_batches):
            yield next(self._eval_iterator)

    def close(self) -> None:
        """Stop the eval iterator's worker processes."""
        if self._eval_iterator is not None and hasattr(self._eval_iterator, "close"):
            self._eval_iterator.close()
        self._eval_iterator = None
