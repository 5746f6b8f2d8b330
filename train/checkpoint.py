"""Orbax checkpoints with integrity checks and fallback to the previous good one.

Each checkpoint step directory holds two items: ``state`` (the train state as a plain
dict: step, params, batch_stats, opt_state) and ``meta`` (JSON: the SHA-256 of every
array of ``state`` plus whatever the loop needs to resume exactly, e.g. the running
epoch metrics), and a third, ``data``, when the loop passes its grain data iterator: one
JSON file of iterator state per process (grain's Orbax handler). Saving is synchronous and atomic (Orbax writes a temporary directory and
renames it), so a run killed at any moment leaves only complete checkpoints or ignored
temporaries.

:meth:`Checkpointer.restore_latest` tries the newest checkpoint first; if it cannot be read
or its arrays do not match the recorded checksums, it says so, moves that directory to
``<workdir>/corrupt_checkpoints/`` (kept for inspection, never deleted) and tries the next
older one. A state with NaN/Inf is refused at save time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no readable checkpoint remains."""


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


class Checkpointer:
    """Save every ``every`` steps (and at the end), keep the newest ``keep``."""

    def __init__(self, workdir: str, keep: int):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.corrupt_directory = os.path.abspath(os.path.join(workdir, "corrupt_checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta", "data"))

    def all_steps(self):
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, meta: Dict[str, Any], data_iterator=None) -> None:
        """Write ``state`` (a flax struct / pytree) and the state of ``data_iterator`` (a grain
        iterator, if given) at ``step``; refuse NaN/Inf."""
        # Own copies: on CPU device_get may alias device buffers that the next (donating) step reuses.
        host_state = jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(serialization.to_state_dict(state)))
        bad = nonfinite_leaves(host_state)
        if bad:
            raise CheckpointError(f"refusing to save the state of step {step}: NaN/Inf in {', '.join(bad[:5])}"
                                  f"{' ...' if len(bad) > 5 else ''}")
        meta = dict(meta, step=int(step), checksum=tree_checksum(host_state))
        items = dict(state=ocp.args.StandardSave(host_state), meta=ocp.args.JsonSave(meta))
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self.manager.wait_until_finished()

    def _restore_step(self, step: int, target) -> Tuple[Any, Dict[str, Any]]:
        # The dtypes a fresh state would have on device: a Python int ``step`` is int32 there
        # (int64 only under jax_enable_x64), which is what was saved; np.asarray would say int64.
        template = jax.device_get(serialization.to_state_dict(target))
        abstract = jax.tree.map(
            lambda x: np.zeros(np.shape(x), jax.dtypes.canonicalize_dtype(np.asarray(x).dtype)), template)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        meta = dict(restored["meta"])
        host_state = jax.tree.map(np.asarray, restored["state"])
        if meta.get("step") != step:
            raise CheckpointError(f"metadata says step {meta.get('step')}")
        checksum = tree_checksum(host_state)
        if checksum != meta.get("checksum"):
            raise CheckpointError(f"array checksum {checksum[:12]}... differs from the recorded "
                                  f"{str(meta.get('checksum'))[:12]}... (the data was altered after saving)")
        return serialization.from_state_dict(target, host_state), meta

    def restore_latest(self, target) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
        """``(step, state, meta)`` of the newest readable checkpoint, or None if there is none.

        ``target`` gives the structure, shapes and dtypes (a freshly created state). An
        unreadable checkpoint is reported on stderr, moved aside and skipped; if every
        checkpoint is unreadable, :class:`CheckpointError` lists them.
        """
        failures = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self._restore_step(step, target)
                return step, state, meta
            except Exception as error:  # any read/parse/checksum failure means "corrupt"
                path = os.path.join(self.directory, str(step))
                moved = self._quarantine(step)
                message = (f"checkpoint step {step} at {path} is unreadable or corrupt "
                           f"({type(error).__name__}: {str(error)[:300]}); moved it to {moved} "
                           f"and falling back to the previous checkpoint")
                print(f"WARNING: {message}", file=sys.stderr, flush=True)
                failures.append(message)
        if failures:
            raise CheckpointError("no readable checkpoint left:\n  " + "\n  ".join(failures))
        return None

    def restore_data(self, step: int, data_iterator) -> bool:
        """Set ``data_iterator`` (a grain iterator) to the state saved at ``step``; False when that checkpoint
        has no data state this iterator can take (none saved, another process count or worker count)."""
        import grain

        try:
            self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except Exception as error:  # absent item, missing per-process file, state of another iterator layout
            print(f"data iterator state of checkpoint step {step} not restored ({type(error).__name__}: "
                  f"{str(error)[:200]}); restarting the data at step {step}", file=sys.stderr, flush=True)
            return False
        return True

    def _quarantine(self, step: int) -> str:
        source = os.path.join(self.directory, str(step))
        os.makedirs(self.corrupt_directory, exist_ok=True)
        target = os.path.join(self.corrupt_directory, str(step))
        suffix = 1
        while os.path.exists(target):
            target = os.path.join(self.corrupt_directory, f"{step}.{suffix}")
            suffix += 1
        if jax.process_index() == 0:
            shutil.move(source, target)
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.close()
