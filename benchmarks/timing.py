"""Timing, environment and result-writing helpers shared by the benchmark suites."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence


def median_times(
    candidates: Dict[str, Callable[[], object]],
    *,
    repeats: int,
    min_time: float = 0.0,
    sync: Callable[[object], object],
) -> Dict[str, float]:
    """Median wall time (seconds) of each zero-argument callable.

    Every candidate is warmed up first (compilation, allocator). Then the candidates
    are run in interleaved rounds (A B C A B C ...), so that load from other
    processes hits all of them alike; ``sync`` blocks until a result is ready
    (``jax.block_until_ready``, ``torch.cuda.synchronize``). Stops after
    ``repeats`` rounds, or later if ``min_time`` seconds have not passed.
    """
    for fn in candidates.values():
        sync(fn())
    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start < min_time and rounds < 10 * repeats):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            sync(fn())
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(values) for name, values in samples.items()}


def _cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Device, versions and date, recorded with every result file."""
    import jax

    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_device": str(jax.devices()[0].device_kind),
        # strategy='auto' follows fixed rules (ops.choose_strategy); a suite that runs a plan says so itself.
        "strategy_auto": "fixed rules",
        # The machine's load when the file is written (1, 5, 15 min): a busy machine slows every timing.
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        env["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        env["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except ImportError:
        env["torch"] = None
    env["device"] = (
        env["jax_device"]
        if env["jax_backend"] != "cpu"
        else f"cpu ({env['cpu_model']}, {env['cpus_usable']} of {os.cpu_count()} cores usable)"
    )
    return env


def device_tag(env: dict) -> str:
    """A file-name-safe device name, e.g. ``cpu`` or ``NVIDIA_H100_80GB_HBM3``."""
    if env["jax_backend"] == "cpu":
        return "cpu"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in env["jax_device"])


def fmt_ms(seconds: Optional[float]) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.2f}"


def fmt_ratio(num: Optional[float], den: Optional[float]) -> str:
    return "–" if num is None or den is None or den == 0 else f"{num / den:.2f}×"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    out_dir: str, name: str, env: dict, payload: dict, markdown: str, tag: Optional[str] = None
) -> List[str]:
    """Write ``<name>_<tag>.json`` and ``.md`` (``tag``: default :func:`device_tag`); returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{name}_{tag or device_tag(env)}")
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, **payload}, f, indent=1)
    header = (
        f"# {name} benchmark — {env['device']}\n\n"
        f"{env['date_utc']}; jax {env['jax']} ({env['jax_backend']}), torch {env.get('torch')} "
        f"({env.get('torch_device')}, {env.get('torch_threads')} threads), python {env['python']}, "
        f"{env['cpu_count']} CPU cores, load average {env.get('load_average')} (1/5/15 min) at the end; "
        f"strategy='auto': {env['strategy_auto']}.\n\n"
    )
    with open(stem + ".md", "w") as f:
        f.write(header + markdown + "\n")
    return [stem + ".json", stem + ".md"]


def synced(run, sync):
    """``run`` followed by ``sync`` of its result (what a timing must wait for: JAX's async dispatch, CUDA)."""
    return lambda: sync(run())
