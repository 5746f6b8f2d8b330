"""Measured choice of the per-sample convolution strategy (``strategy='auto'``).

Every strategy of :mod:`dynconv_jax.ops` is exact; which one is fastest depends on the backend,
the device, the shapes and whether the call is differentiated. ``'auto'`` therefore measures:
the first time a layer is traced for a new *problem* — (backend, device kind, input and expert
shapes, strides, padding, dilation, groups, which attentions and bias are present, dtype,
differentiated or not) — each applicable strategy is compiled on its own (outside the caller's
trace) and timed on random data of the same shapes, and the fastest is used. The choice is kept
in memory and in a JSON file, so a problem is measured once per machine:

- the file is ``$DYNCONV_AUTOTUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/dynconv/autotune.json``
  (``~/.cache/dynconv/autotune.json`` without ``XDG_CACHE_HOME``);
- ``DYNCONV_AUTOTUNE=0`` turns measuring off: ``'auto'`` then follows the fixed rules of
  :func:`dynconv_jax.ops.choose_strategy` (as it also does for problems it cannot measure);
- a cache file that cannot be read is moved aside to ``<file>.corrupt`` with a warning, and a
  fresh one is started.

"Differentiated" means the call is traced under ``jax.grad`` / ``jax.vjp`` / ``jax.linearize``
directly (its inputs are linearization tracers): the forward and backward pass are then timed
together. A call traced inside an inner ``jax.jit`` or ``jax.checkpoint`` that is differentiated
only later cannot be told apart from inference and is timed as a forward pass.

In a multi-process run (``jax.process_count() > 1``) only process 0 measures (or reads its cache);
it publishes each choice in ``jax.distributed``'s key-value store and the other processes take it
from there, so every process compiles the same program whatever its own cache holds.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import jax
import jax.numpy as jnp

ENV_SWITCH = "DYNCONV_AUTOTUNE"
ENV_CACHE = "DYNCONV_AUTOTUNE_CACHE"
CACHE_VERSION = 1

# A candidate whose first call takes this many times the best so far is not called again.
_GIVE_UP_FACTOR = 4.0
_REPEATS = 3

_memory: Dict[str, str] = {}


def enabled() -> bool:
    """Whether ``'auto'`` measures (``DYNCONV_AUTOTUNE`` unset or not one of 0/false/off/no)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def cache_path() -> Path:
    """Where measured choices are kept (see the module docstring)."""
    explicit = os.environ.get(ENV_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dynconv" / "autotune.json"


def clear_memory() -> None:
    """Forget the choices held in memory (the file stays): the next lookup reads the file again."""
    _memory.clear()


def problem_key(x_shape, experts_shape, *, dtype: Sequence, strides, padding, dilation, groups, attentions: Sequence[str],
                differentiated: Optional[str], device=None) -> str:
    """The cache key of one problem: a canonical JSON string (readable in the cache file). ``dtype``
    holds the input's and the experts' dtypes."""
    device = device or jax.devices()[0]
    return json.dumps({
        "backend": device.platform, "device_kind": device.device_kind,
        "x": list(x_shape), "experts": list(experts_shape), "dtype": [jnp.dtype(d).name for d in dtype],
        "strides": list(strides), "padding": padding if isinstance(padding, str) else np.asarray(padding).tolist(),
        "dilation": list(dilation), "groups": int(groups), "attentions": sorted(attentions),
        "differentiated": differentiated or "no",
    }, sort_keys=True, separators=(",", ":"))


def _read_cache(path: Path) -> Dict[str, dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as err:
        warnings.warn(f"dynconv autotune: cannot read the cache {path} ({err}); measuring without it")
        return {}
    try:
        data = json.loads(text)
        if not (isinstance(data, dict) and data.get("version") == CACHE_VERSION
                and isinstance(data.get("entries"), dict)):
            raise ValueError(f"expected {{'version': {CACHE_VERSION}, 'entries': {{...}}}}")
        return data["entries"]
    except ValueError as err:
        aside = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, aside)
            where = f"moved it to {aside}"
        except OSError:
            where = "left it in place"
        warnings.warn(f"dynconv autotune: ignoring the unreadable cache {path} ({err}); {where} and start a new one")
        return {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Adds one entry (read-modify-write, atomic rename); a cache that cannot be written only warns."""
    try:
        entries = _read_cache(path)
        entries[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"dynconv autotune: cannot write the cache {path} ({err}); the choice holds for this process only")


def _time_call(compiled, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def measure(candidates: Sequence[str], make_fn: Callable[[str], Callable], args: Sequence[np.ndarray],
            repeats: int = _REPEATS) -> Dict[str, float]:
    """Seconds per call of each candidate (the best of ``repeats`` after one warm-up call).

    ``make_fn(name)`` returns the function to time for strategy ``name``; each is compiled for
    ``args`` on its own. The first candidate is the baseline. One whose warm-up call (allocation and
    first touch included) takes more than ``_GIVE_UP_FACTOR`` times the best so far is not called
    again and keeps that time; one whose first timed call does is not repeated (a losing candidate's
    call can cost far more than compiling it: docs/performance.md, "How 'auto' chooses"). A
    candidate that fails to compile or run is left out (with a warning).
    """
    seconds: Dict[str, float] = {}

    def losing(call_seconds: float) -> bool:
        return bool(seconds) and call_seconds > _GIVE_UP_FACTOR * min(seconds.values())

    for name in candidates:
        try:
            compiled = jax.jit(make_fn(name)).lower(*args).compile()
            best = _time_call(compiled, args)  # warm-up: allocation, first touch
            if not losing(best):
                best = _time_call(compiled, args)
                if not losing(best):
                    for _ in range(repeats - 1):
                        best = min(best, _time_call(compiled, args))
        except Exception as err:  # a strategy XLA cannot run here is not a candidate
            warnings.warn(f"dynconv autotune: strategy {name!r} failed to run ({type(err).__name__}: {err}); skipped")
            continue
        seconds[name] = best
    return seconds


def _distributed_client():
    """The coordination service's client of ``jax.distributed`` (None in a single-process run)."""
    if jax.process_count() == 1:
        return None
    from jax._src import distributed  # the key-value store of jax.distributed's coordination service

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("dynconv autotune: several JAX processes but no jax.distributed client; "
                           "call jax.distributed.initialize() first or set DYNCONV_AUTOTUNE=0")
    return client


def _slot(key: str) -> str:
    return "dynconv_autotune/" + hashlib.sha256(key.encode()).hexdigest()


def _measured_or_cached(key: str, candidates: Sequence[str], fallback: str,
                        measure_fn: Callable[[], Mapping[str, float]]) -> str:
    path = cache_path()
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict) and entry.get("strategy") in candidates:
        return entry["strategy"]
    # Timed eagerly (outside the caller's trace), on one device, with no mesh in view.
    with jax.ensure_compile_time_eval(), jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        seconds = dict(measure_fn())
    if not seconds:
        return fallback
    choice = min(seconds, key=seconds.get)
    _write_cache(path, key, {"strategy": choice, "seconds": seconds, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return choice


def choose(key: str, candidates: Sequence[str], fallback: str,
           measure_fn: Callable[[], Mapping[str, float]]) -> str:
    """The choice for ``key``: from memory, else (process 0) the cache file or ``measure_fn()``.

    ``fallback`` (the rule-based choice, one of ``candidates``) is used when measuring is disabled
    or every candidate failed. In a multi-process run only process 0 looks the choice up or
    measures it; it publishes the choice in ``jax.distributed``'s key-value store, where the other
    processes wait for it (at most ``DYNCONV_AUTOTUNE_TIMEOUT`` seconds, default 600).
    """
    candidates = tuple(candidates)
    if not enabled():
        return fallback
    choice = _memory.get(key)
    if choice is not None:
        return choice
    client = _distributed_client()
    if client is None or jax.process_index() == 0:
        choice = _measured_or_cached(key, candidates, fallback, measure_fn)
        if client is not None:
            client.key_value_set(_slot(key), choice, allow_overwrite=True)
    else:
        timeout_ms = int(1000 * float(os.environ.get("DYNCONV_AUTOTUNE_TIMEOUT", "600")))
        choice = client.blocking_key_value_get(_slot(key), timeout_ms)
    _memory[key] = choice
    return choice


def differentiation(*arrays) -> Optional[str]:
    """How ``arrays`` are being differentiated: ``'reverse'`` when any is traced directly under
    ``jax.grad`` / ``jax.vjp`` / ``jax.linearize``, ``'forward'`` under ``jax.jvp``, else None."""
    from jax._src.interpreters import ad  # the tracer types are not public API

    leaves = jax.tree_util.tree_leaves(arrays)
    if any(isinstance(a, ad.JVPTracer) for a in leaves):
        return "forward"
    if any(isinstance(a, ad.LinearizeTracer) for a in leaves):
        return "reverse"
    return None


def random_like(shapes_dtypes: Sequence[Tuple[Tuple[int, ...], object]], seed: int = 0):
    """Host arrays of standard-normal data, one per ``(shape, dtype)`` (the values do not change the timing)."""
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(shape), dtype=jnp.dtype(dtype)) for shape, dtype in shapes_dtypes]


def local_batch(batch: int) -> int:
    """The per-device batch a strategy runs on under the current mesh (``jax.set_mesh``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or batch % mesh.size:
        return batch
    return batch // mesh.size


