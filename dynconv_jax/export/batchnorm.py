"""BatchNorm folding for serving the dynamic model itself (every input exact).

:func:`fuse_batchnorm` folds each inference-mode BatchNorm that directly follows a static
or dynamic conv into that conv. With ``s = gamma / sqrt(var + eps)`` and
``t = beta - mean * s``, ``BN(y) = s * y + t``, and ``s * y`` is the same layer with every
expert kernel (and expert bias) scaled by ``s`` on its output channels: the attentions do
not depend on the conv's own weights, and ``f * conv(c * x, W) * s = f * conv(c * x, W * s)``.
The constant ``t`` cannot go into the experts in general (CondConv's sigmoid routing does
not sum to 1), so the BatchNorm stays as a pure shift (scale 1, mean 0, variance
``1 - eps``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynconv_jax import BatchNorm, CondConv, DynamicConv, KWConv, ODConv
from dynconv_jax.variables import is_nnx, linen_variables

# The modules whose calls conv_batchnorm_pairs records: the convs (KWConv only to see what its output feeds: it
# is never folded), and the BatchNorms that may follow one.
CONV_TYPES = (nn.Conv, CondConv, DynamicConv, ODConv, KWConv)
NORM_TYPES = (BatchNorm, nn.BatchNorm)


def _default_input_shape(model, input_shape, where: str) -> Tuple[int, ...]:
    if input_shape is not None:
        return tuple(input_shape)
    in_channels = getattr(model, "in_channels", None)
    if not isinstance(in_channels, int):
        raise ValueError(f"{where}: {type(model).__name__} has no in_channels field; pass input_shape=(1, H, W, C)")
    return (1, 32, 32, in_channels)


def conv_batchnorm_pairs(
    model: nn.Module, variables, input_shape: Optional[Sequence[int]] = None, **apply_kwargs
) -> Tuple[Tuple[Tuple[str, ...], Tuple[str, ...], float], ...]:
    """``((conv_path, bn_path, epsilon), ...)``: every BatchNorm whose input is a conv's output.

    Found by tracing ``model.apply(variables, x, train=False)`` abstractly (``jax.eval_shape``,
    nothing is computed) on an input of ``input_shape`` (default ``(1, 32, 32, model.in_channels)``)
    and matching the array each BatchNorm call receives with the array a conv call returned
    (``flax.linen.Conv``, CondConv, DynamicConv or ODConv). A conv whose output also feeds
    another module is left alone, and so is a KernelWarehouse layer (:class:`~dynconv_jax.KWConv`): its
    kernel is mixed from warehouse cells that other layers share, so it has no kernel of its own to scale
    (its BatchNorm stays; the model stays exact). Paths are module scope paths (``('layer1_0', 'conv1')``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from dynconv_jax import BatchNorm, DynamicConv
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=False, temperature=None):
      ...         x = DynamicConv(8, (3, 3), num_experts=2, name="conv")(x, train=train, temperature=temperature)
      ...         x = BatchNorm(use_running_average=not train, name="bn")(x)
      ...         return nn.Dense(10, name="fc")(x.mean((1, 2)))
      >>> model = Net()
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
      >>> from dynconv_jax.export import conv_batchnorm_pairs
      >>> conv_batchnorm_pairs(model, variables, (1, 16, 16, 3))
      ((('conv',), ('bn',), 1e-05),)
    """
    convs, norms = CONV_TYPES, NORM_TYPES
    calls = []  # (module, its input, its output), in call order; the arrays kept alive for `is`

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, convs + norms) and args:
            calls.append((context.module, args[0], out))
        return out

    shape = _default_input_shape(model, input_shape, "conv_batchnorm_pairs")
    params_dtype = jax.tree_util.tree_leaves(variables["params"])[0].dtype
    apply_kwargs = {"train": False, **apply_kwargs}
    with nn.intercept_methods(record):
        jax.eval_shape(
            lambda v, x: model.apply(v, x, **apply_kwargs), variables, jax.ShapeDtypeStruct(shape, params_dtype)
        )
    pairs = []
    for conv, _, out in calls:
        if not isinstance(conv, convs) or isinstance(conv, KWConv):
            continue
        consumers = [m for m, x, _ in calls if x is out]
        if len(consumers) == 1 and isinstance(consumers[0], norms):
            bn = consumers[0]
            pairs.append((tuple(conv.scope.path), tuple(bn.scope.path), float(bn.epsilon)))
    return tuple(pairs)


def _subtree(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def _replace(tree, path, leaves: Dict[str, Any]):
    """A copy of nested dict ``tree`` with the leaves of the dict at ``path`` updated."""
    tree = dict(tree)
    if not path:
        tree.update(leaves)
        return tree
    tree[path[0]] = _replace(tree[path[0]], path[1:], leaves)
    return tree


def fuse_batchnorm(model: nn.Module, variables, input_shape: Optional[Sequence[int]] = None):
    """Fold every inference-mode BatchNorm that follows a conv into that conv's weights (exact).

    For each pair found by :func:`conv_batchnorm_pairs`, with ``s = scale / sqrt(var + eps)``
    and ``t = bias - mean * s`` (computed in float64): the conv's ``kernel`` (static kernel or
    every expert) and ``bias`` (static or expert bias) are scaled by ``s`` on the output
    channels, and the BatchNorm becomes the shift ``y + t`` (scale 1, mean 0, variance
    ``1 - eps``). The model is unchanged; ``model.apply(fused, x, train=False)`` equals
    ``model.apply(variables, x, train=False)`` for every ``x`` up to float rounding
    (≤ 1e-12 relative in float64, tested for the three layers and the models). Not valid in
    training mode (batch statistics).

    Args:
      model: a Flax (linen) model or layer.
      variables: its ``{'params', 'batch_stats', ...}``, or an NNX module / ``nnx.State`` with the same
        parameter tree (:mod:`dynconv_jax.nnx`: the fused result is then a Linen variables dict).
      input_shape: an input shape to trace the model with (default ``(1, 32, 32, model.in_channels)``).

    Returns the fused variables (a new tree; ``variables`` is not modified).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from dynconv_jax import BatchNorm, DynamicConv
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=False, temperature=None):
      ...         x = DynamicConv(8, (3, 3), num_experts=2, name="conv")(x, train=train, temperature=temperature)
      ...         x = BatchNorm(use_running_average=not train, name="bn")(x)
      ...         return nn.Dense(10, name="fc")(x.mean((1, 2)))
      >>> model = Net()
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
      >>> from dynconv_jax.export import fuse_batchnorm
      >>> x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
      >>> fused = fuse_batchnorm(model, variables, (1, 16, 16, 3))                   # same model, new variables
      >>> bool(jnp.allclose(model.apply(fused, x), model.apply(variables, x), atol=1e-5))
      True
    """
    variables = as_linen_variables(model, variables, "fuse_batchnorm")
    if "params" not in variables:
        raise ValueError(f"fuse_batchnorm: variables have no 'params' collection (keys: {sorted(variables)})")
    try:
        pairs = conv_batchnorm_pairs(model, variables, input_shape)
    except flax.errors.ScopeCollectionNotFound as error:  # e.g. {'params'} alone: the BatchNorms need more
        raise ValueError(
            f"fuse_batchnorm: variables hold the collections {sorted(variables)}, and the model "
            f"reads one more: {error}. Pass all of model.init's variables (with 'batch_stats': "
            f"the running statistics the folding uses)"
        ) from None
    params, stats = variables["params"], variables.get("batch_stats", {})
    for conv_path, bn_path, eps in pairs:
        conv, bn = _subtree(params, conv_path), _subtree(params, bn_path)
        running = _subtree(stats, bn_path)
        if "scale" not in bn or "bias" not in bn:
            continue  # a BatchNorm without scale or bias has no room for the shift
        mean, var = np.asarray(running["mean"], np.float64), np.asarray(running["var"], np.float64)
        s = np.asarray(bn["scale"], np.float64) / np.sqrt(var + eps)
        t = np.asarray(bn["bias"], np.float64) - mean * s
        scaled = {
            name: jnp.asarray(np.asarray(conv[name], np.float64) * s, conv[name].dtype)
            for name in ("kernel", "bias")
            if name in conv
        }
        params = _replace(params, conv_path, scaled)
        params = _replace(
            params, bn_path, {"scale": jnp.ones_like(bn["scale"]), "bias": jnp.asarray(t, bn["bias"].dtype)}
        )
        stats = _replace(
            stats, bn_path, {"mean": jnp.zeros_like(running["mean"]), "var": jnp.full_like(running["var"], 1.0 - eps)}
        )
    fused = dict(variables)
    fused["params"] = params
    if "batch_stats" in variables:
        fused["batch_stats"] = stats
    return fused


def as_linen_variables(model, variables, where: str):
    """``variables`` as a Linen variables dict: an NNX module or ``nnx.State`` of the same parameter tree
    (:mod:`dynconv_jax.nnx`) is read with :func:`dynconv_jax.nnx.linen_variables`; ``model`` must be Linen."""
    if is_nnx(model):
        raise TypeError(
            f"{where}: model is an NNX module ({type(model).__name__}); pass its Linen twin as model "
            f"(same arguments, e.g. dynconv_jax.models.resnet18 for dynconv_jax.nnx.models.resnet18) "
            f"and the NNX module or its nnx.state as variables"
        )
    return linen_variables(variables) if is_nnx(variables) else variables
