"""The grain workers' guard against orphaning: a SIGKILLed or preempted training process leaves no worker
processes behind (grain's workers otherwise wait for a stop signal that never comes)."""
from __future__ import annotations

import os
import threading
import time


def exit_with_parent(worker_index: int, worker_count: int) -> None:
    """grain worker init (``worker_init_fn``): exit when the training process dies."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name=f"exit-with-parent-{worker_index}/{worker_count}").start()
