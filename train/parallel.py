"""Data parallelism with JAX's sharding API: one 'data' mesh axis over every device of every
process; the global batch is split over it, parameters and optimiser state are replicated.

Under ``jax.jit`` with these shardings, reductions over the batch (the loss mean, BatchNorm's
batch mean and variance) are global: XLA inserts the cross-device all-reduces, so the result
equals single-device training on the same global batch up to float summation order.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, Future

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def initialize(distributed: bool) -> None:
    """Multi-host: ``jax.distributed.initialize()`` with the coordinator, process count and id of the
    environment: SLURM and Cloud TPU are detected by JAX; by hand, JAX_COORDINATOR_ADDRESS (read by JAX)
    with JAX_NUM_PROCESSES and JAX_PROCESS_ID (read here: JAX itself does not read these two).
    Collectives between CPU processes go through gloo (the setting only concerns the CPU backend, so
    GPU and TPU runs are unaffected)."""
    if not distributed:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    for name, variable in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        text = os.environ.get(variable, "").strip()
        if text:
            try:
                kwargs[name] = int(text)
            except ValueError:
                raise ValueError(f"--distributed: environment variable {variable}={text!r} is not an integer") from None
    jax.distributed.initialize(**kwargs)


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def under_mesh(mesh: Mesh, fn):
    """``fn`` called (and so traced) with ``mesh`` set (``jax.set_mesh``): what lets per-sample code see
    the mesh, e.g. ``dynconv_jax.ops``' 'map' strategy, which then maps each device over its own
    samples instead of gathering the batch (see docs/performance.md)."""

    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return call


def abstract(tree):
    """``jax.ShapeDtypeStruct`` of each leaf of ``tree`` (arrays, or their shapes from ``jax.eval_shape``),
    strongly typed like the arrays :func:`replicate` and :func:`global_batch` make (``jax.eval_shape``
    marks a Python scalar's result weakly typed). No sharding: a step jitted with ``in_shardings`` is
    lowered with those."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), tree)


def compile_ahead(compiler: Executor, mesh: Mesh, jitted, *abstract_args) -> "Future[jax.stages.Compiled]":
    """Lower ``jitted`` (with its ``in_shardings``) for ``abstract_args`` (see :func:`abstract`) here,
    with ``mesh`` set as in :func:`under_mesh`, and compile it in a thread of ``compiler``: XLA compiles
    without holding the GIL, so several programs compile at once while this thread goes on. The compiled program,
    called with arrays of other shapes, dtypes or shardings, raises instead of compiling again."""
    with jax.set_mesh(mesh):
        lowered = jitted.lower(*abstract_args)
    return compiler.submit(lowered.compile)


def replicate(tree, sharding: NamedSharding):
    """A pytree with the same values in every process -> global ``jax.Array``s with ``sharding`` (replicated).

    ``jax.device_put`` refuses a sharding over devices of other processes for an array already on a
    device, so each leaf is rebuilt from its host copy (PRNG keys through their key data)."""

    def put(leaf):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
        host = np.asarray(jnp.asarray(leaf))  # a Python scalar takes JAX's dtype, as with device_put
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def global_batch(sharding: NamedSharding, *local_arrays):
    """This process's slices of the global batch -> global ``jax.Array``s sharded on 'data'."""
    return tuple(jax.make_array_from_process_local_data(sharding, np.asarray(a)) for a in local_arrays)


def any_process_failed(failed: bool) -> bool:
    """Whether process 0 reports a failure (``failed`` on process 0), told to every process: a collective, so
    every process calls it at the same point (one process alone raising would leave the others waiting)."""
    return bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
