"""Variables between the two Flax APIs: an NNX model's state as a Linen variables dict and back.

The NNX modules of :mod:`dynconv_jax.nnx` have the Linen modules' parameter paths, so the Linen
``params`` collection is ``nnx.state(model, nnx.Param)`` as a plain nested dict and
``batch_stats`` is ``nnx.state(model, nnx.BatchStat)``. :func:`dynconv_jax.convert.torch_to_flax`
and :func:`~dynconv_jax.convert.flax_to_torch` accept an NNX module or its state wherever they
take Linen variables (through :func:`linen_variables`).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax.numpy as jnp
from flax import nnx

# Linen collection -> NNX variable type
COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}

Path = Tuple[str, ...]


def _flat(model_or_state, where: str) -> Dict[Tuple[str, Path], nnx.Variable]:
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
    """
    return _nest({key: var.get_value() for key, var in _flat(model_or_state, "linen_variables").items()})


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """Put Linen ``variables`` (``{'params': ..., 'batch_stats': ...}``, e.g. a Linen ``init`` or
    :func:`dynconv_jax.convert.torch_to_flax`) into the NNX ``model`` in place; returns the model.

    Every parameter and batch statistic of the model must be given with its shape, nothing else
    (a ``ValueError`` lists each missing, unexpected and mis-shaped path); values take the model's
    dtypes. Collections other than ``params``/``batch_stats`` are ignored.
    """
    targets = _flat(model, "load_linen_variables")
    given = {}
    for collection in COLLECTIONS:
        stack = [((), variables.get(collection) or {})]
        while stack:
            path, node = stack.pop()
            for key, value in node.items():
                if isinstance(value, Mapping):
                    stack.append((path + (str(key),), value))
                else:
                    given[(collection, path + (str(key),))] = value
    problems = []
    for key in sorted(set(targets) - set(given)):
        problems.append(f"missing: {key[0]}:{'/'.join(key[1])} {list(targets[key].get_value().shape)}")
    for key in sorted(set(given) - set(targets)):
        problems.append(f"unexpected: {key[0]}:{'/'.join(key[1])} is not in the NNX model")
    for key in sorted(set(given) & set(targets)):
        want, got = tuple(targets[key].get_value().shape), tuple(jnp.shape(given[key]))
        if want != got:
            problems.append(f"wrong shape: {key[0]}:{'/'.join(key[1])} {list(got)}, the model has {list(want)}")
    if problems:
        raise ValueError(f"load_linen_variables: the variables do not match the {type(model).__name__} model "
                         f"({len(problems)} problems):\n  " + "\n  ".join(problems))
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        for collection, var_type in COLLECTIONS.items():
            if isinstance(var, var_type):
                key = (collection, tuple(str(p) for p in path))
                var.set_value(jnp.asarray(given[key], var.get_value().dtype))
    nnx.update(model, state)
    return model


def load_torch(model: nnx.Module, source) -> nnx.Module:
    """Load a PyTorch checkpoint (a state_dict, ``nn.Module``, ``.pt``/``.pth``/``.safetensors`` path; see
    :func:`dynconv_jax.convert.torch_to_flax`) into the NNX ``model`` in place; returns the model."""
    from dynconv_jax.convert import torch_to_flax

    return load_linen_variables(model, torch_to_flax(source, model))


def from_linen(module, in_features: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """The NNX twin of a Linen layer or model of ``dynconv_jax`` (same fields, so the same parameter tree).

    ``module``: a :class:`dynconv_jax.CondConv` / ``DynamicConv`` / ``ODConv`` / ``KWConv`` / ``BatchNorm`` or a
    :mod:`dynconv_jax.models` ``ResNet`` / ``MobileNetV2``; ``in_features``: the input channels
    (NNX creates parameters eagerly). Fill it with :func:`load_linen_variables`.
    """
    import dataclasses

    from dynconv_jax.nnx import kernelwarehouse, layers, models

    name = type(module).__name__
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in ("parent", "name")}
    if name in ("CondConv", "DynamicConv", "ODConv"):
        features = fields.pop("features")
        return getattr(layers, name)(in_features, features, rngs=rngs, **fields)
    if name == "KWConv":
        if fields.pop("warehouse_manager") is not None:
            raise ValueError("from_linen: a KWConv of a model's WarehouseManager has no stand-alone twin; convert "
                             "the model")
        features = fields.pop("features")
        return kernelwarehouse.KWConv(in_features, features, rngs=rngs, **fields)
    if name == "BatchNorm":
        return layers.BatchNorm(in_features, rngs=rngs, **fields)
    if name in ("ResNet", "MobileNetV2"):
        if fields["in_channels"] != in_features:
            raise ValueError(f"from_linen: {name} has in_channels={fields['in_channels']}, in_features={in_features}")
        return getattr(models, name)(rngs=rngs, **fields)
    raise TypeError(f"from_linen: no NNX twin of {name} (layers CondConv, DynamicConv, ODConv, KWConv, BatchNorm; "
                    f"models ResNet, MobileNetV2)")
