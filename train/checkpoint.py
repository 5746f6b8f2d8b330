"""Orbax checkpoints with integrity checks and fallback to the previous good one.

Each checkpoint step directory holds two items: ``state`` (the train state as a plain
dict: step, params, batch_stats, opt_state) and ``meta`` (JSON: the SHA-256 of every
array of ``state`` plus whatever the loop needs to resume exactly, e.g. the running
epoch metrics), and a third, ``data``, when the loop passes its grain data iterator: one
JSON file of iterator state per process (grain's Orbax handler). Saving is atomic (Orbax writes a
temporary directory and renames it), so a run killed at any moment leaves only complete checkpoints or
ignored temporaries; a write that fails (e.g. disk full) raises :class:`CheckpointWriteError`, removes its
temporary directory and leaves the earlier checkpoints as they were.

``Checkpointer(..., asynchronous=True)`` (what the training loop uses) returns from :meth:`Checkpointer.save`
once the state is copied to host memory, checked for NaN/Inf and checksummed and the data iterator's state
is written; the arrays are written and committed by Orbax's background thread while training goes on. One
write at a time: the next :meth:`~Checkpointer.save`, :meth:`~Checkpointer.wait` and
:meth:`~Checkpointer.close` wait for it, and a failure of the background write is raised there as
:class:`CheckpointWriteError` naming its step.

:meth:`Checkpointer.restore_latest` tries the newest checkpoint first and tells three
failures apart (docs/reliability.md):

- *integrity failure* (proven): the bytes cannot be read, or the arrays, read back in the
  dtypes they were stored with, do not match the recorded checksum. The checkpoint is
  reported on stderr, moved to ``<workdir>/corrupt_checkpoints/`` (kept for inspection,
  never deleted; a read-only checkpointer leaves it in place) and the next older one is tried.
- *structure mismatch*: the checkpoint is intact but holds other keys or shapes than the
  state the code builds (the code or the configuration changed). :class:`CheckpointMismatch`
  names the differing keys; every checkpoint stays where it is.
- *environment error* (permission denied, out of memory, ...): raised as
  :class:`CheckpointError` naming the checkpoint; nothing is moved.

Dtype differences of the same kind are not failures: a step saved as int32 restores into an
int64 state under ``JAX_ENABLE_X64`` (and back), each leaf cast to the dtype of the target.
A state with NaN/Inf is refused at save time. With several processes, every process checks
the same checkpoint, process 0 alone moves a corrupt one while the others wait at a barrier,
then all go on to the next older one (the workdir must be on a file system they share).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Tuple

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization
from jax.experimental import multihost_utils


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read, or no readable checkpoint remains."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (e.g. disk full); the earlier checkpoints are untouched."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint does not fit the state the code builds (other keys, shapes or kinds of dtype)."""


class NoIntactCheckpoint(CheckpointError):
    """Every checkpoint failed its integrity check (each was moved aside, or left in place when read-only)."""


class _IntegrityFailure(Exception):
    """Proof that one checkpoint is damaged: unreadable bytes or a checksum mismatch."""


# Errors that say something about the machine, not about the checkpoint's bytes.
_ENVIRONMENT_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EIO)


def _is_environment_error(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS)


def _shorten(text: str, limit: int = 400) -> str:
    """``text`` cut in the middle: tensorstore puts the OS error (e.g. "No space left on device") at the end."""
    return text if len(text) <= limit else f"{text[: limit // 3]} ... {text[-(2 * limit) // 3 :]}"


def tree_checksum(tree) -> str:
    """SHA-256 over the dtype, shape and bytes of every leaf, in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        array = np.asarray(leaf)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def nonfinite_leaves(tree) -> list:
    """Paths of floating-point leaves that contain NaN or Inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            bad.append(jax.tree_util.keystr(path))
    return bad


def _leaf_specs(tree) -> Dict[str, Tuple[np.dtype, Tuple[int, ...]]]:
    """``{'['params']['w']': (dtype, shape)}`` of every leaf (``.dtype``/``.shape`` or an array-like)."""
    specs = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            specs[jax.tree_util.keystr(path)] = (np.dtype(leaf.dtype), tuple(leaf.shape))
        else:  # a Python scalar: the dtype a fresh state has on device (int32 unless jax_enable_x64)
            array = np.asarray(leaf)
            specs[jax.tree_util.keystr(path)] = (np.dtype(jax.dtypes.canonicalize_dtype(array.dtype)), array.shape)
    return specs


def _same_kind(a: np.dtype, b: np.dtype) -> bool:
    def kind(d):
        return "f" if np.issubdtype(d, np.floating) or d.name == "bfloat16" else d.kind

    return kind(a) == kind(b)


def _sync(name: str) -> None:
    """A barrier over all processes (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _remove_unfinished_writes(directory: str) -> None:
    """Remove the temporary directories of writes that never committed (a run killed mid-write) from
    ``directory``, before the manager opens it: process 0 removes, every process waits for it.

    What is temporary is Orbax's own public test (``orbax.checkpoint.utils.is_tmp_checkpoint``). Orbax's
    ``cleanup_tmp_directories`` option would remove them in a background thread that only its next save
    waits for (through a private method), so a run reopened and stopped before its first save (a refused
    --resume, an error) could leave the removal half done, or the thread running at exit.
    """
    if jax.process_index() == 0 and os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if os.path.isdir(path) and ocp.utils.is_tmp_checkpoint(path):
                shutil.rmtree(path)
    _sync("dynconv-remove-unfinished-writes")


def committed_steps(workdir: str) -> List[int]:
    """The steps of the committed checkpoints in ``workdir/checkpoints`` (a folder per step, named by it, as
    Orbax names them; its temporaries left out), read from the folder alone: no Orbax manager is opened."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and not ocp.utils.is_tmp_checkpoint(os.path.join(directory, name))
    )


class Checkpointer:
    """Save every ``every`` steps (and at the end), keep the newest ``keep``.

    ``read_only=True`` (tools that only read a run: ``train.plot_attention``) creates,
    moves and deletes nothing in the workdir, and skips a damaged checkpoint in place.
    ``asynchronous=True`` writes in the background (module doc).
    """

    def __init__(self, workdir: str, keep: int, read_only: bool = False, asynchronous: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.corrupt_directory = os.path.abspath(os.path.join(workdir, "corrupt_checkpoints"))
        self.read_only, self.asynchronous = read_only, asynchronous
        self.manager = None
        self._pending: Optional[int] = None  # the step whose write may still run in the background
        # Handlers registered up front: a fresh manager then also reads the array metadata.
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        }
        if read_only:
            if os.path.isdir(self.directory):
                options = ocp.CheckpointManagerOptions(
                    read_only=True, create=False, save_interval_steps=0, max_to_keep=None, cleanup_tmp_directories=False
                )
                self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        else:
            _remove_unfinished_writes(self.directory)
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous, cleanup_tmp_directories=False
            )
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def all_steps(self) -> List[int]:
        return sorted(self.manager.all_steps()) if self.manager is not None else []

    def quarantined_steps(self) -> List[str]:
        """Names of the checkpoints moved to ``corrupt_checkpoints/`` (``'6'``, ``'6.1'``, ...)."""
        if not os.path.isdir(self.corrupt_directory):
            return []
        return sorted(
            os.listdir(self.corrupt_directory), key=lambda n: tuple(int(p) for p in n.split(".") if p.isdigit())
        )

    def save(self, step: int, state, meta: Dict[str, Any], data_iterator=None) -> None:
        """Write ``state`` (a flax struct / pytree) and the state of ``data_iterator`` (a grain
        iterator, if given) at ``step``; refuse NaN/Inf. Asynchronous: returns once the write is
        started (the previous one finished first).

        Raises :class:`CheckpointWriteError` (the earlier checkpoints untouched) when the write
        fails, e.g. on a full disk; asynchronous, a background failure is raised by the next call
        of :meth:`save`, :meth:`wait` or :meth:`close`, naming the step it belongs to.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        self.wait()
        # Own copies: on CPU device_get may alias device buffers that the next (donating) step reuses;
        # the background write reads these while training goes on.
        host_state = jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(serialization.to_state_dict(state)))
        bad = nonfinite_leaves(host_state)
        if bad:
            raise CheckpointError(
                f"refusing to save the state of step {step}: NaN/Inf in {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''}"
            )
        meta = dict(meta, step=int(step), checksum=tree_checksum(host_state))
        items = dict(state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            # grain's handler is synchronous: the iterator's state is written before save() returns.
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._pending = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:
            self._pending = None
            self._write_failed(step, error)
        if not self.asynchronous:
            self.wait()

    def wait(self) -> None:
        """Block until the write in flight (if any) is committed; :class:`CheckpointWriteError` if it failed."""
        step, self._pending = self._pending, None
        if step is None:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # OSError, or tensorstore's ValueError wrapping one (ENOSPC, EDQUOT, ...)
            self._write_failed(step, error)

    @property
    def latest_committed(self) -> Optional[int]:
        """The newest step on disk (not the one whose write is in flight), or None."""
        steps = [s for s in self.all_steps() if s != self._pending]
        return steps[-1] if steps else None

    def last_good(self) -> str:
        """``'step N in DIR'`` (or ``'none in DIR'``) once the write in flight is done, for error messages:
        a failure of that write is described, not raised."""
        failure = ""
        try:
            self.wait()
        except CheckpointWriteError as error:
            failure = f" ({error})"
        step = self.latest_committed
        return f"{'none' if step is None else f'step {step}'} in {self.directory}{failure}"

    def _write_failed(self, step: int, error: Exception) -> None:
        """Clean up after the failed write of ``step`` and raise :class:`CheckpointWriteError`."""
        self._remove_partial(step)
        earlier = [s for s in self.all_steps() if s != step]
        disk_full = getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {step} to {self.directory}"
            f"{' (disk full)' if disk_full else ''} ({type(error).__name__}: {_shorten(str(error))}); the earlier "
            f"checkpoints ({earlier or 'none'}) are untouched"
        ) from error

    def _remove_partial(self, step: int) -> None:
        """Delete what a failed save of ``step`` left: Orbax temporaries (never a committed checkpoint)."""
        if jax.process_index() == 0:
            for path in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
                shutil.rmtree(path, ignore_errors=True)
        _sync(f"dynconv-checkpoint-{step}-write-failed")
        self.manager.reload()

    def _restore_step(self, step: int, target) -> Tuple[Any, Dict[str, Any]]:
        """Read, verify and normalise one checkpoint; :class:`_IntegrityFailure` is proof of damage."""
        path = os.path.join(self.directory, str(step))
        template = serialization.to_state_dict(target)
        expected = _leaf_specs(template)

        def attempt(what, read):
            try:
                return read()
            except Exception as error:
                if _is_environment_error(error) or _is_environment_error(error.__cause__ or error):
                    raise CheckpointError(
                        f"cannot read the {what} of checkpoint step {step} at {path} "
                        f"({type(error).__name__}: {error}); left in place"
                    ) from error
                raise _IntegrityFailure(
                    f"its {what} cannot be read ({type(error).__name__}: {_shorten(str(error))})"
                ) from error

        meta = attempt(
            "metadata",
            lambda: dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]),
        )
        if meta.get("step") != step or not isinstance(meta.get("checksum"), str):
            raise _IntegrityFailure(
                f"its metadata records step {meta.get('step')!r}, checksum {str(meta.get('checksum'))[:12]!r}"
            )
        stored_tree = attempt("array metadata", lambda: self.manager.item_metadata(step)["state"].tree)
        stored = _leaf_specs(stored_tree)
        self._check_structure(step, path, stored, expected)
        # Read every array in the dtype it was stored with (the checksum covers those bytes).
        abstract = jax.tree_util.tree_map_with_path(
            lambda p, _: np.zeros(stored[jax.tree_util.keystr(p)][1], stored[jax.tree_util.keystr(p)][0]), template
        )
        restored = attempt(
            "arrays",
            lambda: self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))[
                "state"
            ],
        )
        host_state = jax.tree.map(np.asarray, restored)
        checksum = tree_checksum(host_state)
        if checksum != meta["checksum"]:
            raise _IntegrityFailure(
                f"array checksum {checksum[:12]}... differs from the recorded "
                f"{meta['checksum'][:12]}... (the data was altered after saving)"
            )
        host_state = self._normalise(step, host_state, expected)
        return serialization.from_state_dict(target, host_state), meta

    @staticmethod
    def _check_structure(step: int, path: str, stored, expected) -> None:
        problems = [f"missing in the checkpoint: {k} {list(expected[k][1])}" for k in expected if k not in stored]
        problems += [f"not in the current state: {k} {list(stored[k][1])}" for k in stored if k not in expected]
        for k in expected.keys() & stored.keys():
            (e_dtype, e_shape), (s_dtype, s_shape) = expected[k], stored[k]
            if e_shape != s_shape or not _same_kind(e_dtype, s_dtype):
                problems.append(
                    f"differs: {k} stored {s_dtype.name}{list(s_shape)}, current {e_dtype.name}{list(e_shape)}"
                )
        if problems:
            raise CheckpointMismatch(
                f"checkpoint step {step} at {path} is intact but does not fit the state this code builds "
                f"({len(problems)} difference(s); was the code or the configuration changed?); every checkpoint "
                f"was left in place:\n  "
                + "\n  ".join(sorted(problems)[:20])
                + ("\n  ..." if len(problems) > 20 else "")
            )

    @staticmethod
    def _normalise(step: int, host_state, expected):
        """Cast every leaf to the dtype of the target (int32 <-> int64 under jax_enable_x64, ...)."""

        def cast(path, leaf):
            dtype = expected[jax.tree_util.keystr(path)][0]
            out = leaf.astype(dtype)
            if np.issubdtype(dtype, np.integer) and not np.array_equal(out.astype(leaf.dtype), leaf):
                raise CheckpointMismatch(
                    f"checkpoint step {step}: {jax.tree_util.keystr(path)} ({leaf.dtype}) does not fit in {dtype}"
                )
            return out

        return jax.tree_util.tree_map_with_path(cast, host_state)

    def restore_latest(self, target) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        """``(step, state, meta)`` of the newest intact checkpoint, or None if there is none.

        ``target`` gives the structure, shapes and dtypes (a freshly created state). A
        damaged checkpoint is reported on stderr, moved aside (left in place when read-only)
        and skipped; if every checkpoint is damaged, :class:`CheckpointError` lists them.
        A :class:`CheckpointMismatch` or an environment error is raised at once, nothing moved.
        """
        failures = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self._restore_step(step, target)
                return step, state, meta
            except _IntegrityFailure as failure:
                path = os.path.join(self.directory, str(step))
                where = "left it in place (read-only)" if self.read_only else f"moved it to {self._quarantine(step)}"
                message = (
                    f"checkpoint step {step} at {path} is damaged: {failure}; {where} "
                    f"and falling back to the previous checkpoint"
                )
                print(f"WARNING: {message}", file=sys.stderr, flush=True)
                failures.append(message)
        if failures:
            raise NoIntactCheckpoint("no intact checkpoint left:\n  " + "\n  ".join(failures))
        return None

    def restore_data(self, step: int, data_iterator) -> bool:
        """Set ``data_iterator`` (a grain iterator) to the state saved at ``step``; False when that checkpoint
        has no data state this iterator can take (none saved, another process count or worker count)."""
        try:
            self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except Exception as error:  # absent item, missing per-process file, state of another iterator layout
            print(
                f"data iterator state of checkpoint step {step} not restored ({type(error).__name__}: "
                f"{str(error)[:200]}); restarting the data at step {step}",
                file=sys.stderr,
                flush=True,
            )
            return False
        return True

    def _quarantine(self, step: int) -> str:
        """Move checkpoint ``step`` to ``corrupt_checkpoints/``: process 0 moves once every process has read it."""
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.corrupt_directory, str(step))
        suffix = 1
        while os.path.exists(target):
            target = os.path.join(self.corrupt_directory, f"{step}.{suffix}")
            suffix += 1
        _sync(f"dynconv-quarantine-{step}-checked")
        if jax.process_index() == 0:
            os.makedirs(self.corrupt_directory, exist_ok=True)
            shutil.move(source, target)
        _sync(f"dynconv-quarantine-{step}-moved")
        self.manager.reload()
        return target

    def close(self) -> None:
        """Wait for the write in flight (:class:`CheckpointWriteError` if it failed), then release Orbax."""
        try:
            self.wait()
        finally:
            if self.manager is not None:
                self.manager.close()
