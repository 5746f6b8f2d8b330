"""The run folder (``--workdir``): checked before anything is written, written by one run at a time, its JSON
files replaced in one step.

* :func:`check_workdir`: a path under a file, or in a folder that cannot be written, is a usage error naming
  ``--workdir`` before the run starts (it used to be an ``OSError`` traceback).
* :class:`WorkdirLock`: an exclusive lock (``fcntl.flock`` on ``<workdir>/.lock``) held while a run writes the
  folder; a second run is refused, naming the holder (pid, host, start time). Orbax assumes one writer: two
  runs at once interleaved ``metrics.csv``, mixed the checkpoints of both or failed inside Orbax. The kernel
  releases the lock when its process ends, however it ends, so the lock of a dead run is never stale. A file
  system without locks (some network and FUSE file systems) is said so on stderr, and the run goes on unlocked.
* :func:`write_json`: ``config.json`` and ``summary.json`` are written to a temporary file and renamed over the
  old one; a failed write (a full disk) removes the temporary, leaves the old file as it was and raises
  :class:`WorkdirError` in one line. ``summary.json`` is strict JSON: a value that is not finite is ``null``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import socket
import sys
import time
from typing import Any, Dict, Optional

from dynconv_spec.paths import check_output_dir
from train.config import Config, UsageError, from_json

LOCK_NAME = ".lock"
# Fields that may differ between a run and its resumption (they do not change the maths).
RUNTIME_FIELDS = (
    "resume",
    "workdir",
    "progress",
    "log_every_steps",
    "tensorboard",
    "export",
    "distributed",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "data_dir",
    "data_workers",
    "allow_restart",
)
# What flock raises on a file system that has no locks.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL)


class WorkdirError(RuntimeError):
    """A file of the run folder could not be written (a full disk, a folder made read-only meanwhile); what
    was saved before is untouched."""


def check_workdir(workdir: str) -> None:
    """Refuse (:class:`~train.config.UsageError`) a ``--workdir`` that is a file, lies under a file, or cannot
    be created or written; nothing is created here."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UsageError(f"--workdir={workdir!r} is a file, not a directory; choose a directory for the run")
    try:
        check_output_dir(workdir, "--workdir")
    except ValueError as error:
        raise UsageError(str(error)) from None


def _os_failure(what: str, error: OSError) -> WorkdirError:
    full = " (disk full)" if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return WorkdirError(f"could not write {what}{full}: {error.strerror or error}")


class WorkdirLock:
    """The exclusive lock of a run folder, held from :meth:`acquire` to :meth:`release` (or the end of the
    process). The lock file records the holder for the message a second run gets."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`~train.config.UsageError` naming the run that holds it."""
        import fcntl  # POSIX only, like the lock

        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise _os_failure(self.path, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise UsageError(
                f"--workdir={os.path.dirname(self.path)!r} is in use by another run ({holder}): two runs writing one "
                f"folder mix their checkpoints and metrics. Wait for it to end, stop it, or choose another "
                f"--workdir"
            ) from None
        except OSError as error:
            if error.errno not in _NO_LOCKS:
                os.close(fd)
                raise _os_failure(self.path, error) from None
            print(
                f"WARNING: {self.path}: this file system has no locks ({error.strerror}); make sure that no "
                f"other run writes this folder",
                file=sys.stderr,
                flush=True,
            )
        self._fd = fd
        self._record_holder(fd)

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return (
                f"pid {holder['pid']} on host {holder['host']}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))}"
            )
        except (OSError, ValueError, KeyError, TypeError):
            return "its lock file names no holder"

    def _record_holder(self, fd: int) -> None:
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": round(time.time())}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text, 0)
        except OSError as error:
            self.release()
            raise _os_failure(self.path, error) from None

    def release(self) -> None:
        """Give the lock back (closing the file releases it; the file stays: removing it would race with a
        run that opened it meanwhile)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_json(path: str, text: str) -> None:
    """``path`` replaced by ``text`` in one step: readers (the other processes of a multi-process run) never see
    it half written, and a failed write leaves the old file and no temporary (:class:`WorkdirError`)."""
    partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
    try:
        with open(partial, "w") as f:
            f.write(text)
        os.replace(partial, path)
    except OSError as error:
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise _os_failure(path, error) from None


def check_resumable(workdir: str, config: Config) -> None:
    """Refuse a ``--resume`` whose configuration differs from ``workdir/config.json`` in a field that changes
    the maths (anything but :data:`RUNTIME_FIELDS`)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = from_json(f.read(), path)
    diff = [
        f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(config, f.name)!r}"
        for f in dataclasses.fields(Config)
        if f.name not in RUNTIME_FIELDS and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if diff:
        raise UsageError(
            f"--resume: the configuration differs from the one saved in {path} "
            f"({'; '.join(diff)}); an exact resume needs the same configuration"
        )


def write_config(workdir: str, config: Config) -> None:
    """``workdir/config.json`` (:func:`write_json`)."""
    write_json(os.path.join(workdir, "config.json"), config.to_json())


def strict(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None (JSON ``null``), in dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_summary(workdir: str, summary: Dict[str, Any]) -> None:
    """``workdir/summary.json``: strict JSON (:func:`strict`), written by :func:`write_json`."""
    write_json(os.path.join(workdir, "summary.json"), json.dumps(strict(summary), indent=2, allow_nan=False))


def read_summary(workdir: str) -> Optional[Dict[str, Any]]:
    """``workdir/summary.json`` as a dict, or None when there is none or it is not a JSON object."""
    try:
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None
