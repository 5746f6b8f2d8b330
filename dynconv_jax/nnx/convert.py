"""Variables between the two Flax APIs: Linen variables into an NNX model, a PyTorch checkpoint into an NNX
model, and the NNX twin of a Linen layer or model.

The other way, an NNX model's state as a Linen variables dict, is :func:`dynconv_jax.variables.linen_variables`
(also ``dynconv_jax.nnx.linen_variables``), which :func:`dynconv_jax.convert.torch_to_flax` and
:func:`~dynconv_jax.convert.flax_to_torch` use wherever they take Linen variables.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from dynconv_jax.convert import torch_to_flax
from dynconv_jax.variables import COLLECTIONS, flat_variables


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
    """Put Linen ``variables`` (``{'params': ..., 'batch_stats': ...}``, e.g. a Linen ``init`` or
    :func:`dynconv_jax.convert.torch_to_flax`) into the NNX ``model`` in place; returns the model.

    Every parameter and batch statistic of the model must be given with its shape, nothing else
    (a ``ValueError`` lists each missing, unexpected and mis-shaped path); values take the model's
    dtypes. Collections other than ``params``/``batch_stats`` are ignored.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from dynconv_jax import DynamicConv as LinenDynamicConv
      >>> from dynconv_jax.nnx import DynamicConv, load_linen_variables
      >>> variables = LinenDynamicConv(8, (3, 3), num_experts=2).init(jax.random.key(1), jnp.ones((1, 8, 8, 4)))
      >>> layer = load_linen_variables(DynamicConv(4, 8, (3, 3), num_experts=2, rngs=nnx.Rngs(0)), variables)
      >>> bool((layer.kernel[...] == variables['params']['kernel']).all())
      True
    """
    targets = flat_variables(model, "load_linen_variables")
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
        raise ValueError(
            f"load_linen_variables: the variables do not match the {type(model).__name__} model "
            f"({len(problems)} problems):\n  " + "\n  ".join(problems)
        )
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
    :func:`dynconv_jax.convert.torch_to_flax`) into the NNX ``model`` in place; returns the model.

    Examples:
      >>> import torch
      >>> from flax import nnx
      >>> from dynconv_jax.nnx import ODConv, load_torch
      >>> from dynconv_torch import ODConv2d
      >>> torch_layer = ODConv2d(4, 8, 3, padding=1, kernel_num=2)       # or a state_dict, or a .pth file
      >>> layer = load_torch(ODConv(4, 8, (3, 3), num_experts=2, rngs=nnx.Rngs(0)), torch_layer)
      >>> bool((layer.kernel[...] == torch_layer.weight.detach().permute(0, 3, 4, 2, 1).numpy()).all())
      True
    """
    return load_linen_variables(model, torch_to_flax(source, model))


def from_linen(module, in_features: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """The NNX twin of a Linen layer or model of ``dynconv_jax`` (same fields, so the same parameter tree).

    ``module``: a :class:`dynconv_jax.CondConv` / ``DynamicConv`` / ``ODConv`` / ``KWConv`` / ``BatchNorm`` or a
    :mod:`dynconv_jax.models` ``ResNet`` / ``MobileNetV2``; ``in_features``: the input channels
    (NNX creates parameters eagerly). Fill it with :func:`load_linen_variables`.

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax import ODConv
      >>> from dynconv_jax.nnx import from_linen
      >>> layer = from_linen(ODConv(features=8, kernel_size=(3, 3), num_experts=2), in_features=4, rngs=nnx.Rngs(0))
      >>> type(layer).__module__, layer.kernel[...].shape
      ('dynconv_jax.nnx.layers', (2, 3, 3, 4, 8))
    """
    # Here: importing dynconv_jax.nnx does not import its models (as dynconv_jax does not import its own).
    from dynconv_jax.nnx import kernelwarehouse, layers, models

    name = type(module).__name__
    fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in ("parent", "name")}
    if name in ("CondConv", "DynamicConv", "ODConv"):
        features = fields.pop("features")
        return getattr(layers, name)(in_features, features, rngs=rngs, **fields)
    if name == "KWConv":
        if fields.pop("warehouse_manager") is not None:
            raise ValueError(
                "from_linen: a KWConv of a model's WarehouseManager has no stand-alone twin; convert the model"
            )
        features = fields.pop("features")
        return kernelwarehouse.KWConv(in_features, features, rngs=rngs, **fields)
    if name == "BatchNorm":
        return layers.BatchNorm(in_features, rngs=rngs, **fields)
    if name in ("ResNet", "MobileNetV2"):
        if fields["in_channels"] != in_features:
            raise ValueError(f"from_linen: {name} has in_channels={fields['in_channels']}, in_features={in_features}")
        return getattr(models, name)(rngs=rngs, **fields)
    raise TypeError(
        f"from_linen: no NNX twin of {name} (layers CondConv, DynamicConv, ODConv, KWConv, BatchNorm; "
        f"models ResNet, MobileNetV2)"
    )
