"""Preemption: SIGTERM (what Cloud TPU/GPU preemption, Kubernetes and SLURM send before they stop a job) makes the
run save a checkpoint at the next step boundary and stop with :class:`Preempted`, so that ``--resume``
continues from that step; ``python -m train`` then exits with 143 (128 + SIGTERM, as a process ended by the
signal reports) after one line saying where the checkpoint is.

One process: a SIGTERM handler sets a flag that the step loop reads after each step (installed from the main
thread only; elsewhere the signal keeps its handler). Several processes (``--distributed``): JAX's preemption
service, which ``jax.distributed.initialize`` starts and which listens for SIGTERM on every host, agrees on a
step at which all processes stop together (``jax.experimental.multihost_utils.reached_preemption_sync_point``,
what Orbax's ``CheckpointManager.reached_preemption`` calls); every process asks it at every step. The grain
workers ignore SIGTERM (:func:`train.worker_watchdog.worker_init`): a notice sent to every process of the job
must not take the batches away before the checkpoint is written.
"""

from __future__ import annotations

import signal
import sys
import threading

from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):
    """The run stopped at a step boundary after a preemption notice; its checkpoint at that step is on disk."""

    def __init__(self, step: int, total_steps: int, checkpoint_dir: str):
        super().__init__(
            f"preempted (SIGTERM) at step {step}/{total_steps}: the checkpoint of step {step} is in "
            f"{checkpoint_dir}; run the same command with --resume to continue from there"
        )
        self.step = step


class PreemptionNotice:
    """Whether the run must stop at the step just done (:meth:`reached`). Close it (:meth:`close`) to give
    SIGTERM its previous handler back."""

    def __init__(self, distributed: bool):
        self.distributed = distributed
        self.received = False
        self._previous = None
        if not distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)

    def _note(self, signum, frame) -> None:
        if not self.received:
            print("SIGTERM: saving a checkpoint at the end of this step, then stopping", file=sys.stderr, flush=True)
        self.received = True

    def reached(self, step: int) -> bool:
        """True at the step where the run stops for a preemption (every process of the run at the same step)."""
        if self.distributed:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError as error:  # the preemption service is off (jax_enable_preemption_service)
                print(f"WARNING: no preemption notices in this run: {error}", file=sys.stderr, flush=True)
                self.distributed = False
        return self.received

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
