"""An NNX module's variables as a Linen variables dict: what the converter, the exports and
:mod:`dynconv_jax.nnx.convert` share.

The NNX modules of :mod:`dynconv_jax.nnx` have the Linen modules' parameter paths, so the Linen
``params`` collection is ``nnx.state(model, nnx.Param)`` as a plain nested dict and
``batch_stats`` is ``nnx.state(model, nnx.BatchStat)``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

from flax import nnx

# Linen collection -> NNX variable type
COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}

Path = Tuple[str, ...]


def flat_variables(model_or_state, where: str) -> Dict[Tuple[str, Path], nnx.Variable]:
    """``{(collection, path): Variable}`` for the Param and BatchStat variables."""
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state)
    elif isinstance(model_or_state, nnx.State):
        state = model_or_state
    else:
        raise TypeError(f"{where}: expected an nnx.Module or nnx.State, got {type(model_or_state).__name__}")
    out = {}
    for path, var in nnx.to_flat_state(state):
        for collection, var_type in COLLECTIONS.items():
            if isinstance(var, var_type):
                out[(collection, tuple(str(p) for p in path))] = var
    return out


def _nest(flat: Mapping[Tuple[str, Path], Any]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {collection: {} for collection in COLLECTIONS}
    for (collection, path), value in flat.items():
        node = out[collection]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def is_nnx(obj) -> bool:
    """Whether ``obj`` is an NNX module or state (what :func:`linen_variables` takes)."""
    return isinstance(obj, (nnx.Module, nnx.State))


def linen_variables(model_or_state) -> Dict[str, Dict[str, Any]]:
    """``{'params': ..., 'batch_stats': ...}`` (nested dicts of arrays) of an NNX module or its ``nnx.state``.

    ``batch_stats`` is ``{}`` for a model without BatchNorm. Other variable types (RNG state,
    intermediates) are left out, as Linen keeps them out of these collections.

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx import ODConv, linen_variables
      >>> variables = linen_variables(ODConv(4, 8, (3, 3), num_experts=2, rngs=nnx.Rngs(0)))
      >>> sorted(variables), variables['params']['kernel'].shape      # the Linen layer's tree
      (['batch_stats', 'params'], (2, 3, 3, 4, 8))
    """
    return _nest({key: var.get_value() for key, var in flat_variables(model_or_state, "linen_variables").items()})
