"""Turn a dynamic convolution into a plain ``flax.linen.Conv``.

A dynamic convolution (CondConv, Yang et al., NeurIPS 2019; DynamicConv, Chen et al.,
CVPR 2020; ODConv, Li et al., ICLR 2022) computes, for each sample ``b``
(see :mod:`dynconv_jax.ops`)::

    y_b = f_b * conv(c_b * x_b, sum_k a[b,k] * s_b * W_k) + sum_k a[b,k] * bias_k

For one fixed sample every attention is a constant, and each one folds into the
kernel exactly:

* kernel attention ``a [K]`` and spatial attention ``s [*k]``: the aggregated kernel
  ``sum_k a_k * s * W_k`` (as the layer itself computes it);
* channel attention ``c [Cin]``: ``conv(c * x, W) = conv(x, W')`` with
  ``W'[..., i, o] = W[..., i, o] * c[group(o) * Cin/g + i]`` — every input channel
  belongs to exactly one group, so this holds for any ``feature_group_count``; zero
  padding commutes with the scaling (``c * 0 = 0``);
* filter attention ``f [Cout]``: scales the kernel's output channels (not the bias: the
  expert bias is added after ``f`` in the maths above);
* the expert bias: ``sum_k a_k * bias_k`` becomes the conv bias.

:func:`export_static` does this for one given input and returns a conv whose output
equals the dynamic layer's on *that* input up to float rounding (the tests check
≤ 1e-12 relative in float64). :func:`export_average` folds attentions averaged over a
calibration set: an *approximation* for every input, whose error it measures.

For serving the dynamic model itself (every input exact):

* :func:`fuse_batchnorm` folds each inference-mode BatchNorm that directly follows a static
  or dynamic conv into that conv. With ``s = gamma / sqrt(var + eps)`` and
  ``t = beta - mean * s``, ``BN(y) = s * y + t``, and ``s * y`` is the same layer with every
  expert kernel (and expert bias) scaled by ``s`` on its output channels: the attentions do
  not depend on the conv's own weights, and ``f * conv(c * x, W) * s = f * conv(c * x, W * s)``.
  The constant ``t`` cannot go into the experts in general (CondConv's sigmoid routing does
  not sum to 1), so the BatchNorm stays as a pure shift (scale 1, mean 0, variance
  ``1 - eps``).
* :func:`to_stablehlo` serialises the inference function with ``jax.export`` and a symbolic
  batch size; :func:`load_stablehlo` runs it without the model's Python code.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dynconv_jax import ops
from dynconv_jax.inspect import ATTENTION_NAMES


class StaticExport(NamedTuple):
    """A plain conv and its variables: ``module.apply(variables, x)``."""

    module: nn.Conv
    variables: Dict[str, Any]


class AverageExport(NamedTuple):
    """An approximate static conv from averaged routing, with its measured error.

    ``relative_error`` is ``max|y_static - y_dynamic| / max|y_dynamic|`` over the whole
    calibration set (maxima over every sample, position and channel).
    ``attentions`` are the averaged attentions that were folded (``reduce='attention'``)
    or None (``reduce='kernel'``).
    """

    module: nn.Conv
    variables: Dict[str, Any]
    relative_error: float
    attentions: Optional[Dict[str, jax.Array]]


def _check_layer(module) -> None:
    # Imported here: the layer modules import ops, and export is optional for them.
    from dynconv_jax import CondConv, DynamicConv, ODConv

    if not isinstance(module, (CondConv, DynamicConv, ODConv)):
        raise TypeError(
            f"export expects a dynconv_jax CondConv, DynamicConv or ODConv module, got {type(module).__name__}"
        )


def layer_attentions(intermediates: Mapping[str, Any]) -> Dict[str, jax.Array]:
    """The attentions one layer sowed, from its ``intermediates`` collection.

    ``intermediates`` is the layer's own collection (``state['intermediates']`` after
    ``layer.apply(..., mutable=['intermediates'])``): leaves are tuples of sown values.
    Returns ``{name: array [B, ...]}`` for the names in :data:`ATTENTION_NAMES` that are
    present (skipped ODConv attentions are absent and mean the constant 1).
    """
    out = {}
    for name in ATTENTION_NAMES:
        if name in intermediates:
            sown = intermediates[name]
            if len(sown) != 1:
                raise ValueError(
                    f"intermediates[{name!r}] holds {len(sown)} sown values; export needs a layer applied once"
                )
            out[name] = sown[0]
    if "kernel_attention" not in out:
        raise ValueError(
            f"no 'kernel_attention' in intermediates (keys: {sorted(intermediates)}): pass the layer's own "
            "collection from apply(..., mutable=['intermediates'])"
        )
    return out


def fold_attentions(experts, attentions: Mapping[str, jax.Array], *, groups: int = 1, expert_bias=None):
    """Fold one sample's attentions into a static kernel and bias (exact; see module docstring).

    Args:
      experts: ``[K, *k, Cin/g, Cout]``.
      attentions: ``kernel_attention [K]`` and optionally ``spatial_attention [*k]``,
        ``channel_attention [Cin]``, ``filter_attention [Cout]`` (no batch axis).
      groups: the layer's ``feature_group_count``.
      expert_bias: ``[K, Cout]`` or None.

    Returns ``(kernel [*k, Cin/g, Cout], bias [Cout] or None)``.
    """
    a = attentions["kernel_attention"]

    def batched(name):
        value = attentions.get(name)
        return None if value is None else value[None].astype(experts.dtype)

    kernel = ops.aggregate_kernels(experts, a[None].astype(experts.dtype), batched("spatial_attention"),
                                   batched("channel_attention"), batched("filter_attention"), groups=groups)[0]
    bias = None if expert_bias is None else a.astype(expert_bias.dtype) @ expert_bias
    return kernel, bias


def _static_conv_module(module, kernel_size, use_bias: bool) -> nn.Conv:
    return nn.Conv(
        features=module.features,
        kernel_size=kernel_size,
        strides=module.strides,
        padding=module.padding,
        kernel_dilation=module.kernel_dilation,
        feature_group_count=module.feature_group_count,
        use_bias=use_bias,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        precision=module.precision,
    )


def _make_export(module, experts, kernel, bias) -> StaticExport:
    conv = _static_conv_module(module, tuple(experts.shape[1:-2]), bias is not None)
    params = {"kernel": kernel}
    if bias is not None:
        params["bias"] = bias
    return StaticExport(conv, {"params": params})


def _apply_for_attentions(module, variables, x, temperature, routing_weights):
    kwargs = {"train": False, "temperature": temperature}
    if routing_weights is not None:
        kwargs["routing_weights"] = routing_weights
    y, state = module.apply(variables, x, mutable=["intermediates"], **kwargs)
    return y, layer_attentions(state["intermediates"])


def export_static(module, variables, x, *, temperature: Optional[float] = None, routing_weights=None) -> StaticExport:
    """Exact static export of a dynamic conv layer for ONE input.

    Runs the layer on ``x`` in inference mode (``train=False``: no routing dropout,
    ODConv's attention BatchNorm uses its running statistics), folds the resulting
    attentions into a single kernel (see :func:`fold_attentions`) and returns a plain
    ``flax.linen.Conv`` with the layer's strides, padding, dilation and groups.

    Exact only for this ``x`` (and this ``temperature`` / ``routing_weights``): its
    output equals ``module.apply(variables, x, train=False)`` up to float rounding
    (≤ 1e-12 relative in float64, tested). For any other input the routing differs
    and the static conv is wrong; it is never exact in train mode either (dropout on
    CondConv's routing input, batch statistics in ODConv's attention BN).

    Args:
      module: a ``CondConv``, ``DynamicConv`` or ``ODConv``.
      variables: its variables (``params``, and ``batch_stats`` for ODConv).
      x: one sample, ``[1, *S, Cin]`` or ``[*S, Cin]``.
      temperature: the attention temperature to export at (None: the layer's default).
      routing_weights: ``[1, K]`` for a CondConv with ``external_routing``.

    Returns a :class:`StaticExport` ``(module, variables)``.
    """
    _check_layer(module)
    experts = variables["params"]["kernel"]
    rank = experts.ndim - 3
    if x.ndim == rank + 1:
        x = x[None]
    if x.ndim != rank + 2 or x.shape[0] != 1:
        raise ValueError(
            f"export_static: x has shape {x.shape}; expected one sample [1, *S, Cin] or [*S, Cin] with "
            f"{rank} spatial dimension(s) (use export_average for a calibration set)"
        )
    _, attentions = _apply_for_attentions(module, variables, x, temperature, routing_weights)
    one = {name: value[0] for name, value in attentions.items()}
    kernel, bias = fold_attentions(experts, one, groups=module.feature_group_count,
                                   expert_bias=variables["params"].get("bias"))
    return _make_export(module, experts, kernel, bias)


def export_average(module, variables, calibration_x, *, reduce: str = "attention", batch_size: int = 128,
                   temperature: Optional[float] = None, routing_weights=None) -> AverageExport:
    """APPROXIMATE static export from the routing averaged over a calibration set.

    Runs the layer on every calibration sample (inference mode), averages over the
    samples and folds the result into one static conv:

    * ``reduce='attention'``: average each attention over the set, then fold (as
      :func:`export_static` does for one sample);
    * ``reduce='kernel'``: fold each sample's attentions, then average the folded
      kernels and biases — the mean effective kernel. For CondConv and DynamicConv
      (kernel attention only) both give the same conv; for ODConv they differ, since
      the attentions multiply.

    No static conv reproduces a dynamic conv on varied inputs: the returned conv is an
    approximation, and ``relative_error`` (``max|y_static - y_dynamic| / max|y_dynamic|``
    over the whole calibration set) measures how good it is there. Expect larger errors
    on inputs unlike the calibration set.

    Args:
      module, variables, temperature: as for :func:`export_static`.
      calibration_x: ``[N, *S, Cin]``.
      reduce: ``'attention'`` or ``'kernel'``.
      batch_size: calibration samples per forward pass (``reduce='kernel'`` holds
        ``batch_size`` folded kernels in memory at once).
      routing_weights: ``[N, K]`` for a CondConv with ``external_routing``.

    Returns an :class:`AverageExport` ``(module, variables, relative_error, attentions)``.
    """
    _check_layer(module)
    if reduce not in ("attention", "kernel"):
        raise ValueError(f"export_average: reduce={reduce!r}; expected 'attention' or 'kernel'")
    experts = variables["params"]["kernel"]
    expert_bias = variables["params"].get("bias")
    groups = module.feature_group_count
    n = calibration_x.shape[0]
    if calibration_x.ndim != experts.ndim - 1 or n == 0:
        raise ValueError(
            f"export_average: calibration_x has shape {calibration_x.shape}; expected [N, *S, Cin] with N >= 1 "
            f"and {experts.ndim - 3} spatial dimension(s)"
        )
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

    outputs, sums = [], {}
    for sl in batches:
        rw = None if routing_weights is None else routing_weights[sl]
        y, attentions = _apply_for_attentions(module, variables, calibration_x[sl], temperature, rw)
        outputs.append(y)
        if reduce == "attention":
            summed = {name: value.sum(axis=0) for name, value in attentions.items()}
        else:
            fold = jax.vmap(lambda att: fold_attentions(experts, att, groups=groups, expert_bias=expert_bias))
            kernels, biases = fold(attentions)
            summed = {"kernel": kernels.sum(axis=0)}
            if biases is not None:
                summed["bias"] = biases.sum(axis=0)
        sums = summed if not sums else {name: sums[name] + value for name, value in summed.items()}
    means = {name: value / n for name, value in sums.items()}

    if reduce == "attention":
        kernel, bias = fold_attentions(experts, means, groups=groups, expert_bias=expert_bias)
        export = _make_export(module, experts, kernel, bias)
    else:
        export = _make_export(module, experts, means["kernel"], means.get("bias"))

    max_diff, max_ref = 0.0, 0.0
    for sl, y in zip(batches, outputs):
        y_static = export.module.apply(export.variables, calibration_x[sl])
        max_diff = max(max_diff, float(jnp.max(jnp.abs(y_static - y))))
        max_ref = max(max_ref, float(jnp.max(jnp.abs(y))))
    if max_ref > 0:
        relative_error = max_diff / max_ref
    else:
        relative_error = 0.0 if max_diff == 0 else float("inf")
    return AverageExport(export.module, export.variables, relative_error,
                         means if reduce == "attention" else None)


# --------------------------------------------------------------------------- BatchNorm folding
def _conv_types():
    from dynconv_jax import CondConv, DynamicConv, KWConv, ODConv

    return (nn.Conv, CondConv, DynamicConv, ODConv, KWConv)  # KWConv: recorded to be refused


def _refuse_kernelwarehouse(modules, where: str) -> None:
    """KernelWarehouse layers are not folded yet: a clear error instead of a model left half-folded."""
    from dynconv_jax import KWConv

    if any(isinstance(m, KWConv) for m in modules):
        raise ValueError(f"{where}: the model has KernelWarehouse layers (KWConv), whose BatchNorms are not folded "
                         f"yet; export it unfolded (to_stablehlo(..., fuse_bn=False) is exact at any batch)")


def _norm_types():
    from dynconv_jax.norm import BatchNorm

    return (BatchNorm, nn.BatchNorm)


def _default_input_shape(model, input_shape, where: str) -> Tuple[int, ...]:
    if input_shape is not None:
        return tuple(input_shape)
    in_channels = getattr(model, "in_channels", None)
    if not isinstance(in_channels, int):
        raise ValueError(f"{where}: {type(model).__name__} has no in_channels field; pass input_shape=(1, H, W, C)")
    return (1, 32, 32, in_channels)


def conv_batchnorm_pairs(model: nn.Module, variables, input_shape: Optional[Sequence[int]] = None,
                         **apply_kwargs) -> Tuple[Tuple[Tuple[str, ...], Tuple[str, ...], float], ...]:
    """``((conv_path, bn_path, epsilon), ...)``: every BatchNorm whose input is a conv's output.

    Found by tracing ``model.apply(variables, x, train=False)`` abstractly (``jax.eval_shape``,
    nothing is computed) on an input of ``input_shape`` (default ``(1, 32, 32, model.in_channels)``)
    and matching the array each BatchNorm call receives with the array a conv call returned
    (``flax.linen.Conv``, CondConv, DynamicConv or ODConv). A conv whose output also feeds
    another module is left alone. Paths are module scope paths (``('layer1_0', 'conv1')``).
    """
    convs, norms = _conv_types(), _norm_types()
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
        jax.eval_shape(lambda v, x: model.apply(v, x, **apply_kwargs), variables,
                       jax.ShapeDtypeStruct(shape, params_dtype))
    _refuse_kernelwarehouse([module for module, _, _ in calls], "conv_batchnorm_pairs / fuse_batchnorm")
    pairs = []
    for conv, _, out in calls:
        if not isinstance(conv, convs):
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
    """
    variables = _linen_variables(model, variables, "fuse_batchnorm")
    if "params" not in variables:
        raise ValueError(f"fuse_batchnorm: variables have no 'params' collection (keys: {sorted(variables)})")
    params, stats = variables["params"], variables.get("batch_stats", {})
    for conv_path, bn_path, eps in conv_batchnorm_pairs(model, variables, input_shape):
        conv, bn = _subtree(params, conv_path), _subtree(params, bn_path)
        running = _subtree(stats, bn_path)
        if "scale" not in bn or "bias" not in bn:
            continue  # a BatchNorm without scale or bias has no room for the shift
        mean, var = np.asarray(running["mean"], np.float64), np.asarray(running["var"], np.float64)
        s = np.asarray(bn["scale"], np.float64) / np.sqrt(var + eps)
        t = np.asarray(bn["bias"], np.float64) - mean * s
        scaled = {name: jnp.asarray(np.asarray(conv[name], np.float64) * s, conv[name].dtype)
                  for name in ("kernel", "bias") if name in conv}
        params = _replace(params, conv_path, scaled)
        params = _replace(params, bn_path, {"scale": jnp.ones_like(bn["scale"]),
                                            "bias": jnp.asarray(t, bn["bias"].dtype)})
        stats = _replace(stats, bn_path, {"mean": jnp.zeros_like(running["mean"]),
                                          "var": jnp.full_like(running["var"], 1.0 - eps)})
    fused = dict(variables)
    fused["params"] = params
    if "batch_stats" in variables:
        fused["batch_stats"] = stats
    return fused


def _linen_variables(model, variables, where: str):
    """``variables`` as a Linen variables dict: an NNX module or ``nnx.State`` of the same parameter tree
    (:mod:`dynconv_jax.nnx`) is read with :func:`dynconv_jax.nnx.linen_variables`; ``model`` must be Linen."""
    from dynconv_jax.nnx.convert import is_nnx, linen_variables

    if is_nnx(model):
        raise TypeError(f"{where}: model is an NNX module ({type(model).__name__}); pass its Linen twin as model "
                        f"(same arguments, e.g. dynconv_jax.models.resnet18 for dynconv_jax.nnx.models.resnet18) "
                        f"and the NNX module or its nnx.state as variables")
    return linen_variables(variables) if is_nnx(variables) else variables


# What a model raises when its variables or its input do not fit it (flax's scope errors are FlaxErrors).
_MODEL_FIT_ERRORS = (ValueError, TypeError, flax.errors.FlaxError)


def _variables_mismatch(model, variables, x_spec) -> Optional[str]:
    """The first difference between ``variables`` and the tree ``model.init`` makes for an input like
    ``x_spec`` (a missing or unexpected path, or both shapes of one), or None when there is none or the
    model cannot be initialised on that input (then the input is what does not fit)."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    try:
        expected = flax.core.unfreeze(jax.eval_shape(lambda x: model.init(rngs, x, train=False), x_spec))
    except _MODEL_FIT_ERRORS:
        return None
    if not isinstance(variables, Mapping):
        return f"variables are a {type(variables).__name__}, not a variables dict"
    want = flax.traverse_util.flatten_dict(expected, sep="/")
    have = {path: tuple(np.shape(leaf))
            for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(variables)), sep="/").items()
            if path.split("/")[0] in expected}
    for path, leaf in want.items():
        if path not in have:
            return f"{path} is missing from variables"
        if have[path] != tuple(leaf.shape):
            return f"{path} has shape {have[path]} in variables, {tuple(leaf.shape)} for this input"
    for path in have:
        if path not in want:
            return f"variables hold {path}, which the model does not have"
    return None


# --------------------------------------------------------------------------- StableHLO
def _check_serving_shape(input_shape, where: str) -> Tuple[Optional[int], ...]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if (shape is None or len(shape) < 2 or not (shape[0] is None or (isinstance(shape[0], int) and shape[0] > 0))
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:])):
        raise ValueError(f"{where}: input_shape={input_shape!r}; expected (None or batch, *spatial, channels) "
                         "with positive ints after the batch, e.g. (None, 32, 32, 3)")
    return shape


def to_stablehlo(model: nn.Module, variables, input_shape: Sequence[Optional[int]],
                 temperature: Optional[float] = None, *, fuse_bn: bool = True, dtype=jnp.float32,
                 platforms: Optional[Sequence[str]] = None) -> bytes:
    """Serialise ``model.apply(variables, x, train=False, temperature=temperature)`` for serving.

    Uses ``jax.export``: the result is a StableHLO module with the weights embedded as
    constants; :func:`load_stablehlo` runs it with no model code. A ``None`` batch in
    ``input_shape`` becomes a symbolic dimension, so one file serves every batch size.

    Args:
      model: a Flax (linen) model or dynamic layer (inference: ``train=False``). An NNX model is
        exported through its Linen twin: pass the Linen model here and the NNX module as ``variables``.
      variables: its variables, or an NNX module / ``nnx.State`` with the same parameter tree.
      input_shape: ``(None, *spatial, channels)`` (or a fixed batch size instead of None).
      temperature: the attention temperature baked in (None: the layers' default).
      fuse_bn: fold BatchNorms into the preceding convs first (:func:`fuse_batchnorm`).
      dtype: the input dtype.
      platforms: lowering platforms, e.g. ``('cpu', 'cuda')`` (default: the current backend).

    Returns the serialised module (bytes: a header and a checksum, then ``jax.export``'s payload).
    """
    shape = _check_serving_shape(input_shape, "to_stablehlo")
    variables = _linen_variables(model, variables, "to_stablehlo")
    concrete = (1,) + shape[1:]
    one_sample = jax.ShapeDtypeStruct(concrete, dtype)
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False, temperature=temperature), variables, one_sample)
    except _MODEL_FIT_ERRORS as error:
        mismatch = _variables_mismatch(model, variables, one_sample)
        if mismatch:
            raise ValueError(f"to_stablehlo: variables and input_shape={tuple(input_shape)!r} do not fit together "
                             f"in {type(model).__name__}: {mismatch}") from error
        raise ValueError(f"to_stablehlo: input_shape={tuple(input_shape)!r} does not fit "
                         f"{type(model).__name__}: {error}") from error
    if fuse_bn:
        variables = fuse_batchnorm(model, variables, concrete)
    batch = jax.export.symbolic_shape("batch") if shape[0] is None else (shape[0],)
    spec = jax.ShapeDtypeStruct(tuple(batch) + shape[1:], dtype)

    def serve(x):
        return model.apply(variables, x, train=False, temperature=temperature)

    exported = jax.export.export(jax.jit(serve), platforms=platforms)(spec)
    payload = bytes(exported.serialize())
    return STABLEHLO_MAGIC + hashlib.sha256(payload).digest() + payload


# A serialised export: this header, the SHA-256 of the jax.export payload, the payload. The
# digest catches a corrupted weight, which the payload's own format would load silently.
STABLEHLO_MAGIC = b"dynconv.stablehlo.v1\n"


def load_stablehlo(blob: Union[bytes, bytearray, str, os.PathLike]) -> Callable[[jax.Array], jax.Array]:
    """A jitted callable ``x -> model output`` from :func:`to_stablehlo` bytes or a file holding them.

    Needs neither the model's code nor its variables (they are in the module). Raises
    ValueError for a file or bytes that are not such an export or whose checksum does not
    match (corrupted).
    """
    source = "blob"
    if isinstance(blob, (str, os.PathLike)):
        source = os.fspath(blob)
        with open(source, "rb") as f:
            blob = f.read()
    if not isinstance(blob, (bytes, bytearray)):
        raise TypeError(f"load_stablehlo: expected bytes or a path, got {type(blob).__name__}")
    header = len(STABLEHLO_MAGIC)
    if bytes(blob[:header]) != STABLEHLO_MAGIC:
        raise ValueError(f"load_stablehlo: {source} is not a dynconv StableHLO export (it does not start with "
                         f"{STABLEHLO_MAGIC!r}); write one with dynconv_jax.export.to_stablehlo")
    digest, payload = bytes(blob[header:header + 32]), bytes(blob[header + 32:])
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(f"load_stablehlo: {source} is corrupted (its SHA-256 checksum does not match; "
                         f"{len(blob)} bytes)")
    try:
        exported = jax.export.deserialize(bytearray(payload))
    except Exception as error:  # flatbuffers / MLIR raise assorted types on corrupt input
        raise ValueError(f"load_stablehlo: {source} is not a serialised jax.export module "
                         f"(corrupt or another format): {type(error).__name__}: {error}") from error
    return jax.jit(exported.call)
