"""The grain workers' watchdogs, both ways: a dead training process leaves no worker behind, a dead worker never
leaves the training process waiting.

* In each worker, :func:`worker_init` (grain's ``worker_init_fn``): a SIGKILLed training process leaves no worker
  processes behind (grain's workers otherwise wait for a stop signal that never comes), and SIGTERM, a
  preemption notice, is left to the training process.
* In the training process, :class:`WatchedIterator` wraps the grain iterator: when a worker dies, ``next()``
  raises :class:`WorkerDied` naming the process, how it died (its exit status or signal) and the likely cause,
  within about a second. grain itself notices a worker that dies while it runs (its error is given the same
  explanation here), but not one that dies while it starts: the training process then waits forever inside
  ``multiprocessing``, writing the pickled pipeline into the pipe of a worker that will never read it (a
  script without an ``if __name__ == '__main__':`` guard, whose workers stop as they re-import it; an import
  error or an out-of-memory kill in a starting worker). While the training process waits for a batch, the
  watchdog looks for a child process that has exited with a failure and was not reaped (``os.waitid`` with
  ``WNOWAIT`` reads its status and leaves it to ``multiprocessing``). This needs Linux's ``/proc``; elsewhere
  only grain's own check remains.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import threading
import time
from typing import Optional, Set

import grain

POLL_SECONDS = 0.5  # how long next() waits for a batch before it looks for a dead worker (then again, and again)
# grain's error for a worker that died while it ran (grain/_src/python/dataset/transformations/process_prefetch.py).
_GRAIN_WORKER_EXIT = re.compile(r"Worker process was terminated unexpectedly with exit code (-?\d+)")
MAIN_GUARD_HINT = (
    "A script that starts data workers (--data_workers > 0, Pipeline(workers=...)) must run its code under "
    "`if __name__ == '__main__':`: each worker starts by importing the main module again, and one that runs the "
    "pipeline at import stops with 'An attempt has been made to start a new process before the current process "
    "has finished its bootstrapping phase'"
)


class WorkerDied(RuntimeError):
    """A grain data worker process died; the message names it, how it died and the likely cause."""


def worker_init(worker_index: int, worker_count: int) -> None:
    """grain's ``worker_init_fn``: :func:`exit_with_parent`, and SIGTERM ignored. A preemption notice sent to
    every process of the job (SLURM, a shutting-down VM) must not end the workers before the training process
    has saved its checkpoint (:mod:`train.preemption`); they stop when it stops them, or when it ends."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent(worker_index, worker_count)


def exit_with_parent(worker_index: int, worker_count: int) -> None:
    """Exit this worker when the training process dies."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name=f"exit-with-parent-{worker_index}/{worker_count}").start()


def child_processes() -> Set[int]:
    """The process ids of this process's children, running or dead (Linux ``/proc``; empty elsewhere)."""
    me, children = str(os.getpid()).encode(), set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # it ended meanwhile
            continue
        if stat.rsplit(b")", 1)[-1].split()[1:2] == [me]:  # 'pid (comm) state ppid ...'
            children.add(int(entry))
    return children


def how_it_ended(returncode: int) -> str:
    """A process's end in words, from its return code as ``multiprocessing`` gives it (-N: signal N)."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


def dead_child(exclude: Set[int]) -> Optional[tuple]:
    """``(pid, returncode)`` of a child process (not in ``exclude``) that ended with a failure and was not
    reaped yet, else None. Its status is read without reaping it (``WNOWAIT``): ``multiprocessing`` still
    collects it."""
    if not hasattr(os, "waitid"):
        return None
    for pid in sorted(child_processes() - exclude):
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped meanwhile
            continue
        if info is None:  # still running
            continue
        returncode = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        if returncode != 0:
            return pid, returncode
    return None


class WatchedIterator(grain.DatasetIterator):
    """A grain iterator whose ``next()`` raises :class:`WorkerDied` when one of its worker processes dies,
    instead of waiting for it forever (see the module doc). ``get_state``/``set_state``/``close`` are the
    wrapped iterator's; its ``next()`` runs in a thread of its own, so that the caller can look for dead
    workers while it waits."""

    def __init__(self, parent: grain.DatasetIterator, what: str = "data"):
        super().__init__(parent)
        self._source = parent  # grain keeps it as a private attribute of its own
        self._what, self._delivered, self._death = what, 0, None
        self._existing = child_processes()  # children from before this iterator: not its workers
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._fetch, daemon=True, name=f"grain-{what}-fetch").start()

    def _fetch(self) -> None:
        while self._requests.get():
            try:
                self._replies.put((True, next(self._source)))
            except BaseException as error:  # handed to the caller, StopIteration included
                self._replies.put((False, error))

    def __next__(self):
        if self._death is not None:
            raise self._death
        self._requests.put(True)
        while True:
            try:
                ok, value = self._replies.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                dead = dead_child(self._existing)
                if dead is not None:
                    self._death = self._died(*dead)
                    raise self._death from None
        if ok:
            self._delivered += 1
            return value
        match = _GRAIN_WORKER_EXIT.search(str(value)) if isinstance(value, RuntimeError) else None
        if match:
            self._death = self._died(None, int(match.group(1)))
            raise self._death from value
        raise value

    def _died(self, pid: Optional[int], returncode: int) -> WorkerDied:
        process = "a grain data worker process" + (f" (pid {pid})" if pid is not None else "")
        message = (
            f"{process} of the {self._what} batches {how_it_ended(returncode)} after {self._delivered} "
            f"batch(es) had been delivered"
        )
        if returncode == -signal.SIGKILL:
            message += "; SIGKILL comes from the kernel's out-of-memory killer (see `dmesg`) or from a kill -9"
        elif self._delivered == 0 and returncode > 0:  # it stopped as it started: its traceback is above
            message += f" (its traceback is printed above). {MAIN_GUARD_HINT}"
        return WorkerDied(message + "; stopped")

    def get_state(self):
        return self._source.get_state()

    def set_state(self, state) -> None:
        self._source.set_state(state)

    def close(self) -> None:
        """Stop the fetching thread and the workers. After a worker died, grain's own close may wait forever
        (for its thread that is starting the dead worker): it runs in a daemon thread, and the workers it does
        not stop exit with this process (:func:`exit_with_parent`)."""
        if self._closed:
            return
        self._requests.put(False)
        if self._death is None:
            super().close()
            return
        self._closed = True
        threading.Thread(target=self._close_quietly, daemon=True, name=f"grain-{self._what}-close").start()

    def _close_quietly(self) -> None:
        try:
            self._source.close()
        except Exception:  # noqa: BLE001 - the worker's death is the error reported
            pass

    def __str__(self) -> str:
        return f"WatchedIterator({self._what})"
