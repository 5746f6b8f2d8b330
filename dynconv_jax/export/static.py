"""Static export: a dynamic convolution as a plain ``flax.linen.Conv``.

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
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynconv_jax import cells, ops
from dynconv_jax.condconv import CondConv
from dynconv_jax.conv_base import validate_conv_config
from dynconv_jax.dynamic_conv import DynamicConv
from dynconv_jax.inspect import ATTENTION_NAMES
from dynconv_jax.kernelwarehouse import KWConv
from dynconv_jax.odconv import ODConv
from dynconv_spec.kernelwarehouse import single_layer_plan


class StaticExport(NamedTuple):
    """A plain conv and its variables: ``module.apply(variables, x)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import ODConv
      >>> layer = ODConv(features=8, kernel_size=(3, 3), num_experts=3)
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> from dynconv_jax.export import StaticExport, export_static
      >>> exported = export_static(layer, variables, x)
      >>> isinstance(exported, StaticExport), type(exported.module).__name__, sorted(exported.variables['params'])
      (True, 'Conv', ['kernel'])
    """

    module: nn.Conv
    variables: Dict[str, Any]


class AverageExport(NamedTuple):
    """An approximate static conv from averaged routing, with its measured error.

    ``relative_error`` is ``max|y_static - y_dynamic| / max|y_dynamic|`` over the whole
    calibration set (maxima over every sample, position and channel).
    ``attentions`` are the averaged attentions that were folded (``reduce='attention'``)
    or None (``reduce='kernel'``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import ODConv
      >>> layer = ODConv(features=8, kernel_size=(3, 3), num_experts=3)
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> from dynconv_jax.export import AverageExport, export_average
      >>> result = export_average(layer, variables, jax.random.normal(jax.random.key(2), (16, 8, 8, 4)))
      >>> isinstance(result, AverageExport), result.module.apply(result.variables, x).shape
      (True, (1, 8, 8, 8))
    """

    module: nn.Conv
    variables: Dict[str, Any]
    relative_error: float
    attentions: Optional[Dict[str, jax.Array]]


def _check_layer(module) -> None:
    if not isinstance(module, (CondConv, DynamicConv, ODConv)):
        raise TypeError(
            f"export expects a dynconv_jax CondConv, DynamicConv or ODConv module, got {type(module).__name__}"
        )


def _export_kernelwarehouse(module: KWConv, variables, x, temperature) -> StaticExport:
    """A stand-alone :class:`~dynconv_jax.KWConv` for one sample: its kernel assembled from the warehouse
    cells with the cell attention of ``x`` (the layer's own maths, :func:`dynconv_jax.cells.assemble_kernels`)."""
    if module.warehouse_manager is not None:
        raise ValueError(
            "export_static: a KWConv of a model's WarehouseManager shares its warehouse with other "
            "layers; export the stand-alone layer, or the whole model with to_stablehlo (exact at "
            "any batch)"
        )
    geometry = validate_conv_config(
        "export_static",
        features=module.features,
        kernel_size=module.kernel_size,
        strides=module.strides,
        padding=module.padding,
        kernel_dilation=module.kernel_dilation,
        feature_group_count=module.feature_group_count,
        num_experts=1,
        strategy=module.strategy,
    )
    plan = single_layer_plan(
        x.shape[-1], module.features, geometry.kernel_size, geometry.groups, module._options(), "export_static"
    )
    _, layer = plan.entry("", "export_static")
    _, state = module.apply(variables, x, train=False, temperature=temperature, mutable=["intermediates"])
    cell_attention = state["intermediates"]["cell_attention"][0]
    warehouse = variables["params"]["warehouse_manager"]["weights"]["0"]
    kernel = cells.assemble_kernels(cell_attention.astype(warehouse.dtype), warehouse, layer)[0]
    return _make_export(module, kernel[None], kernel, variables["params"].get("bias"))


def layer_attentions(intermediates: Mapping[str, Any]) -> Dict[str, jax.Array]:
    """The attentions one layer sowed, from its ``intermediates`` collection.

    ``intermediates`` is the layer's own collection (``state['intermediates']`` after
    ``layer.apply(..., mutable=['intermediates'])``): leaves are tuples of sown values.
    Returns ``{name: array [B, ...]}`` for the names in :data:`ATTENTION_NAMES` that are
    present (skipped ODConv attentions are absent and mean the constant 1).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import ODConv
      >>> layer = ODConv(features=8, kernel_size=(3, 3), num_experts=3)
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> from dynconv_jax.export import layer_attentions
      >>> _, state = layer.apply(variables, x, mutable=['intermediates'])
      >>> sorted((name, a.shape) for name, a in layer_attentions(state['intermediates']).items())
      [('channel_attention', (1, 4)), ('filter_attention', (1, 8)), ('kernel_attention', (1, 3)), ('spatial_attention', (1, 3, 3))]
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

    Examples:
      >>> import jax.numpy as jnp
      >>> from dynconv_jax.export import fold_attentions
      >>> experts = jnp.stack([jnp.ones((1, 1, 2, 2)), 3 * jnp.ones((1, 1, 2, 2))])    # [K, *k, Cin, Cout]
      >>> kernel, bias = fold_attentions(experts, {"kernel_attention": jnp.array([0.5, 0.5])})
      >>> kernel.shape, float(kernel[0, 0, 0, 0]), bias
      ((1, 1, 2, 2), 2.0, None)
    """
    a = attentions["kernel_attention"]

    def batched(name):
        value = attentions.get(name)
        return None if value is None else value[None].astype(experts.dtype)

    kernel = ops.aggregate_kernels(
        experts,
        a[None].astype(experts.dtype),
        batched("spatial_attention"),
        batched("channel_attention"),
        batched("filter_attention"),
        groups=groups,
    )[0]
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
      module: a ``CondConv``, ``DynamicConv``, ``ODConv`` or stand-alone ``KWConv`` (its kernel assembled
        from the warehouse cells; ``temperature``: the warm-up weight tau).
      variables: its variables (``params``, and ``batch_stats`` for ODConv).
      x: one sample, ``[1, *S, Cin]`` or ``[*S, Cin]``.
      temperature: the attention temperature to export at (None: the layer's default).
      routing_weights: ``[1, K]`` for a CondConv with ``external_routing``.

    Returns a :class:`StaticExport` ``(module, variables)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import ODConv
      >>> layer = ODConv(features=8, kernel_size=(3, 3), num_experts=3)
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> from dynconv_jax.export import export_static
      >>> conv, conv_variables = export_static(layer, variables, x)          # a plain flax nn.Conv
      >>> y = conv.apply(conv_variables, x)
      >>> float(jnp.abs(y - layer.apply(variables, x)).max()) < 1e-5         # exact for this input
      True
    """
    if isinstance(module, KWConv):
        rank = 1 if isinstance(module.kernel_size, int) else len(module.kernel_size)
    else:
        _check_layer(module)
        rank = variables["params"]["kernel"].ndim - 3
    if x.ndim == rank + 1:
        x = x[None]
    if x.ndim != rank + 2 or x.shape[0] != 1:
        raise ValueError(
            f"export_static: x has shape {x.shape}; expected one sample [1, *S, Cin] or [*S, Cin] with "
            f"{rank} spatial dimension(s) (use export_average for a calibration set)"
        )
    if isinstance(module, KWConv):
        return _export_kernelwarehouse(module, variables, x, temperature)
    experts = variables["params"]["kernel"]
    _, attentions = _apply_for_attentions(module, variables, x, temperature, routing_weights)
    one = {name: value[0] for name, value in attentions.items()}
    kernel, bias = fold_attentions(
        experts, one, groups=module.feature_group_count, expert_bias=variables["params"].get("bias")
    )
    return _make_export(module, experts, kernel, bias)


def export_average(
    module,
    variables,
    calibration_x,
    *,
    reduce: str = "attention",
    batch_size: int = 128,
    temperature: Optional[float] = None,
    routing_weights=None,
) -> AverageExport:
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
      module: as for :func:`export_static`.
      variables: as for :func:`export_static`.
      temperature: as for :func:`export_static`.
      calibration_x: ``[N, *S, Cin]``.
      reduce: ``'attention'`` or ``'kernel'``.
      batch_size: calibration samples per forward pass (``reduce='kernel'`` holds
        ``batch_size`` folded kernels in memory at once).
      routing_weights: ``[N, K]`` for a CondConv with ``external_routing``.

    Returns an :class:`AverageExport` ``(module, variables, relative_error, attentions)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import ODConv
      >>> layer = ODConv(features=8, kernel_size=(3, 3), num_experts=3)
      >>> x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
      >>> variables = layer.init(jax.random.key(1), x)
      >>> from dynconv_jax.export import export_average
      >>> calibration = jax.random.normal(jax.random.key(2), (16, 8, 8, 4))
      >>> result = export_average(layer, variables, calibration, reduce="attention")
      >>> result.relative_error > 0, result.attentions['kernel_attention'].shape    # an approximation; its error
      (True, (3,))
    """
    _check_layer(module)
    _check_calibration(variables, calibration_x, reduce)
    n = calibration_x.shape[0]
    batches = [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    outputs, means = _mean_routing(module, variables, calibration_x, batches, reduce, temperature, routing_weights)
    export = _fold_means(module, variables, means, reduce)
    relative_error = _relative_error(export, calibration_x, batches, outputs)
    return AverageExport(export.module, export.variables, relative_error, means if reduce == "attention" else None)


def _check_calibration(variables, calibration_x, reduce: str) -> None:
    if reduce not in ("attention", "kernel"):
        raise ValueError(f"export_average: reduce={reduce!r}; expected 'attention' or 'kernel'")
    experts = variables["params"]["kernel"]
    if calibration_x.ndim != experts.ndim - 1 or calibration_x.shape[0] == 0:
        raise ValueError(
            f"export_average: calibration_x has shape {calibration_x.shape}; expected [N, *S, Cin] with N >= 1 "
            f"and {experts.ndim - 3} spatial dimension(s)"
        )


def _batch_sums(module, variables, attentions: Dict[str, jax.Array], reduce: str) -> Dict[str, jax.Array]:
    """One batch's attentions summed over its samples (``reduce='attention'``), or its folded kernels and
    biases summed (``reduce='kernel'``)."""
    if reduce == "attention":
        return {name: value.sum(axis=0) for name, value in attentions.items()}
    experts, expert_bias = variables["params"]["kernel"], variables["params"].get("bias")
    groups = module.feature_group_count
    fold = jax.vmap(lambda att: fold_attentions(experts, att, groups=groups, expert_bias=expert_bias))
    kernels, biases = fold(attentions)
    summed = {"kernel": kernels.sum(axis=0)}
    if biases is not None:
        summed["bias"] = biases.sum(axis=0)
    return summed


def _mean_routing(module, variables, calibration_x, batches, reduce: str, temperature, routing_weights):
    """``(outputs, means)``: the layer's output on each batch, and the means over the calibration set of
    what :func:`_batch_sums` sums."""
    outputs, sums = [], {}
    for sl in batches:
        rw = None if routing_weights is None else routing_weights[sl]
        y, attentions = _apply_for_attentions(module, variables, calibration_x[sl], temperature, rw)
        outputs.append(y)
        summed = _batch_sums(module, variables, attentions, reduce)
        sums = summed if not sums else {name: sums[name] + value for name, value in summed.items()}
    n = calibration_x.shape[0]
    return outputs, {name: value / n for name, value in sums.items()}


def _fold_means(module, variables, means: Dict[str, jax.Array], reduce: str) -> StaticExport:
    experts = variables["params"]["kernel"]
    if reduce == "kernel":
        return _make_export(module, experts, means["kernel"], means.get("bias"))
    kernel, bias = fold_attentions(
        experts, means, groups=module.feature_group_count, expert_bias=variables["params"].get("bias")
    )
    return _make_export(module, experts, kernel, bias)


def _relative_error(export: StaticExport, calibration_x, batches, outputs) -> float:
    """``max|y_static - y_dynamic| / max|y_dynamic|`` over the calibration set."""
    max_diff, max_ref = 0.0, 0.0
    for sl, y in zip(batches, outputs):
        y_static = export.module.apply(export.variables, calibration_x[sl])
        max_diff = max(max_diff, float(jnp.max(jnp.abs(y_static - y))))
        max_ref = max(max_ref, float(jnp.max(jnp.abs(y))))
    if max_ref > 0:
        return max_diff / max_ref
    return 0.0 if max_diff == 0 else float("inf")
