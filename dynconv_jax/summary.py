"""Parameters and multiply-adds of the models, per conv type, beside the static baseline.

``python -m dynconv_jax.summary`` prints the table of ``docs/models.md``: ResNet-18/50 and
MobileNetV2 at 224×224 (ImageNet) and their CIFAR variants at 32×32, each with static,
CondConv (Yang et al., NeurIPS 2019), DynamicConv (Chen et al., CVPR 2020), ODConv
(Li et al., ICLR 2022) and KernelWarehouse (Li & Yao, ICML 2024) convolutions.

Everything is counted from the Flax model itself: parameters from its ``params`` (running
statistics excluded, as PyTorch's ``parameters()``), multiply-adds (MACs) by an analytic
per-layer count over the layers the model actually calls (recorded with
``flax.linen.intercept_methods`` during ``jax.eval_shape``, so nothing is computed):

* static conv: ``out_elements × prod(k) × C_in / groups``; Dense: ``batch × in × out``;
* dynamic layer, per sample: the same conv MACs, plus
  - kernel aggregation ``K × E`` (E = ``prod(k) × C_in/groups × C_out``, the kernel size),
    none for ODConv's skipped kernel attention (K = 1), plus ``E`` for ODConv's spatial
    attention, plus ``K × C_out`` for an expert bias; KernelWarehouse: ``N × E`` (every cell of
    the kernel mixes the warehouse's ``N`` cells);
  - attention: global average pooling (``H × W × C_in`` additions, counted as MACs), every
    attention matrix ``in × out`` (its params), the attention BatchNorm (one MAC per
    channel), and ODConv's channel / filter attention products (one MAC per input / output
    element);
* not counted (the torchvision / paper convention): BatchNorm and activations of the main
  path (foldable), pooling, residual additions, softmax / sigmoid.

``--xla-check`` compares the analytic count with XLA's cost analysis of the compiled model
(``flops / 2``). XLA skips the kernel taps that fall on zero padding, so the check uses
``count_macs(..., padded_taps=False)``; XLA also counts the element-wise work, so it sits a
little above.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.traverse_util import flatten_dict
from jax import lax

from dynconv_jax import CondConv, DynamicConv, KWConv, ODConv, models, ops
from dynconv_spec import CONV_MODELS

DYNAMIC_LAYERS = (CondConv, DynamicConv, ODConv, KWConv)


@dataclasses.dataclass
class MacCount:
    """Multiply-adds of one forward pass, split by where they are spent."""

    conv: int = 0  # convolutions and the classifier (static, or the per-sample dynamic conv)
    attention: int = 0  # GAP, attention FCs and BN, channel / filter attention products
    aggregation: int = 0  # per-sample kernel (and expert-bias) aggregation

    @property
    def total(self) -> int:
        return self.conv + self.attention + self.aggregation


def count_params(variables: Mapping[str, Any]) -> int:
    """Trainable parameters: every leaf of ``variables['params']`` (batch_stats excluded)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(variables["params"]))


def _ints(value, rank: int) -> Tuple[int, ...]:
    """flax.linen.Conv's strides / dilation field (None, an int or a sequence) as ``rank`` ints."""
    if value is None:
        return (1,) * rank
    return (value,) * rank if isinstance(value, int) else tuple(value)


def _taps(in_size: int, out_size: int, kernel: int, stride: int, pad_lo: int, dilation: int) -> int:
    """Σ over the output positions of one axis of the kernel taps that land inside the input."""
    return sum(1 for o in range(out_size) for t in range(kernel) if 0 <= o * stride - pad_lo + t * dilation < in_size)


def _conv_macs(module: nn.Module, x_shape: Tuple[int, ...], y_shape: Tuple[int, ...], padded_taps: bool) -> int:
    """MACs of the convolution of an ``nn.Conv``-like module: ``B × C_out × C_in/g × taps``.

    ``taps`` is ``out_positions × prod(k)`` with ``padded_taps`` (the usual convention), else only
    the taps that land inside the input (zero padding skipped, as XLA's cost analysis counts).
    """
    kernel_size = tuple(module.kernel_size)
    rank = len(kernel_size)
    in_per_group = x_shape[-1] // module.feature_group_count
    if padded_taps:
        return math.prod(y_shape) * math.prod(kernel_size) * in_per_group
    strides, dilation = _ints(module.strides, rank), _ints(module.kernel_dilation, rank)
    padding = ops.normalize_padding(module.padding, rank)
    if isinstance(padding, str):
        window = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
        padding = lax.padtype_to_pads(x_shape[1:-1], window, strides, padding)
    taps = math.prod(
        _taps(i, o, k, s, p[0], d)
        for i, o, k, s, p, d in zip(x_shape[1:-1], y_shape[1:-1], kernel_size, strides, padding, dilation)
    )
    return y_shape[0] * y_shape[-1] * in_per_group * taps


def _subtree(tree: Mapping, path: Sequence[str]) -> Mapping:
    for name in path:
        tree = tree[name]
    return tree


def _dynamic_layer_macs(
    module: nn.Module,
    params: Mapping,
    x_shape: Tuple[int, ...],
    y_shape: Tuple[int, ...],
    padded_taps: bool,
    cell_attention: Optional[Tuple[int, ...]] = None,
) -> MacCount:
    """MACs of one CondConv / DynamicConv / ODConv / KernelWarehouse call (see the module docstring for the
    rules; ``cell_attention``: the shape of a KernelWarehouse layer's sown ``[B, M, N]`` cell weights)."""
    batch = x_shape[0]
    count = MacCount(conv=_conv_macs(module, x_shape, y_shape, padded_taps))
    attention = params.get("attention", params.get("routing_fn", {}))
    if isinstance(module, KWConv):  # cells [B, M, N]: every one of the M cells mixes N warehouse cells
        taps = math.prod((module.kernel_size,) if isinstance(module.kernel_size, int) else module.kernel_size)
        kernel_elements = taps * x_shape[-1] // module.feature_group_count * y_shape[-1]
        num_experts = cell_attention[-1]
    else:
        experts = params["kernel"]  # [K, *k, I/g, O]
        num_experts, kernel_elements = experts.shape[0], math.prod(experts.shape[1:])
    if not isinstance(module, ODConv) or "kernel_fc" in attention:
        count.aggregation += batch * num_experts * kernel_elements
    if "spatial_fc" in attention:
        count.aggregation += batch * kernel_elements
    if "bias" in params:  # expert bias [K, O]
        count.aggregation += batch * math.prod(params["bias"].shape)
    count.attention += math.prod(x_shape)  # global average pooling
    for path, leaf in flatten_dict(attention).items():
        if path[-1] == "kernel":
            count.attention += batch * math.prod(leaf.shape)
        elif path[-1] == "scale":  # attention BatchNorm, folded to one MAC per channel
            count.attention += batch * math.prod(leaf.shape)
    if "channel_fc" in attention:
        count.attention += math.prod(x_shape)
    if "filter_fc" in attention:
        count.attention += math.prod(y_shape)
    return count


def count_macs(
    model: nn.Module,
    variables: Mapping[str, Any],
    x_shape: Sequence[int],
    dtype=jnp.float32,
    *,
    padded_taps: bool = True,
    **apply_kwargs,
) -> MacCount:
    """Analytic MACs of ``model.apply(variables, x, **apply_kwargs)`` for an input of ``x_shape``.

    ``variables`` may be the ``jax.eval_shape`` of ``model.init``; nothing is computed.
    ``padded_taps=False`` leaves out the kernel taps on zero padding (XLA's convention).
    """
    calls: List[Tuple[nn.Module, Tuple[str, ...], tuple, tuple]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense) + DYNAMIC_LAYERS):
            calls.append((module, tuple(module.scope.path), tuple(args[0].shape), tuple(out.shape)))
        return out

    def run(v, x):
        with nn.intercept_methods(record):
            return model.apply(v, x, mutable=["batch_stats", "intermediates"], **apply_kwargs)

    _, state = jax.eval_shape(run, variables, jax.ShapeDtypeStruct(tuple(x_shape), dtype))
    dynamic_paths = [path for module, path, _, _ in calls if isinstance(module, DYNAMIC_LAYERS)]
    total = MacCount()
    for module, path, x_in, y_out in calls:
        params = _subtree(variables["params"], path)
        if isinstance(module, KWConv) and "attention" not in params:  # a static position of the warehouse plan
            total.conv += _conv_macs(module, x_in, y_out, padded_taps)
        elif isinstance(module, DYNAMIC_LAYERS):
            cells = (
                _subtree(state.get("intermediates", {}), path).get("cell_attention")
                if isinstance(module, KWConv)
                else None
            )
            part = _dynamic_layer_macs(
                module, params, x_in, y_out, padded_taps, None if cells is None else tuple(cells[0].shape)
            )
            total.conv += part.conv
            total.attention += part.attention
            total.aggregation += part.aggregation
        elif any(path[: len(p)] == p for p in dynamic_paths):
            continue  # a submodule of a dynamic layer: counted from that layer's params above
        elif isinstance(module, nn.Conv):
            total.conv += _conv_macs(module, x_in, y_out, padded_taps)
        else:
            total.conv += math.prod(y_out) * x_in[-1]
    return total


def xla_macs(model: nn.Module, variables: Mapping[str, Any], x_shape: Sequence[int], dtype=jnp.float32) -> float:
    """Half of XLA's ``flops`` for the compiled eval-mode forward (convs and dots count 2 per MAC)."""
    x = jax.ShapeDtypeStruct(tuple(x_shape), dtype)
    compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returns one dict per computation
        analysis = analysis[0]
    return analysis["flops"] / 2


@dataclasses.dataclass
class Row:
    model: str
    conv: str
    resolution: int
    params: int
    macs: MacCount


#: The models :func:`build` makes: the registry's conv-selectable ones (they share one signature).
MODEL_NAMES = CONV_MODELS


def build(model_name: str, conv: str, num_experts: int, stem: str, num_classes: int) -> nn.Module:
    """The model ``model_name`` ('resnet18', 'resnet50', 'mobilenet_v2', ...) of ``dynconv_jax.models``."""
    if model_name not in MODEL_NAMES:
        raise ValueError(f"model {model_name!r}: expected one of {', '.join(MODEL_NAMES)}")
    return models.create_model(model_name, conv=conv, num_experts=num_experts, stem=stem, num_classes=num_classes)


def measure(
    model_name: str,
    conv: str,
    *,
    num_experts: int = 4,
    stem: str = "imagenet",
    resolution: int = 224,
    num_classes: int = 1000,
) -> Row:
    """Parameters and analytic MACs of one model for a single ``resolution``² RGB image."""
    model = build(model_name, conv, num_experts, stem, num_classes)
    x_shape = (1, resolution, resolution, 3)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x_shape)))
    return Row(model_name, conv, resolution, count_params(variables), count_macs(model, variables, x_shape))


def format_table(rows: Sequence[Row]) -> str:
    """A Markdown table; ratios are to the static row of the same model and resolution."""
    static = {(r.model, r.resolution): r for r in rows if r.conv == "static"}
    lines = [
        "| model | input | conv | params | × static | MACs | × static | attention MACs | aggregation MACs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = static.get((r.model, r.resolution))
        p_ratio = f"{r.params / base.params:.2f}" if base else "–"
        m_ratio = f"{r.macs.total / base.macs.total:.3f}" if base else "–"
        lines.append(
            f"| {r.model} | {r.resolution}² | {r.conv} | {r.params / 1e6:.2f} M | {p_ratio} | "
            f"{r.macs.total / 1e6:.1f} M | {m_ratio} | {r.macs.attention / 1e6:.2f} M | "
            f"{r.macs.aggregation / 1e6:.2f} M |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dynconv_jax.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=["resnet18", "resnet50", "mobilenet_v2"],
        choices=MODEL_NAMES,
        metavar="MODEL",
        help="models to count (default: resnet18 resnet50 mobilenet_v2)",
    )
    parser.add_argument(
        "--convs",
        nargs="+",
        default=list(models.CONV_TYPES),
        choices=models.CONV_TYPES,
        metavar="CONV",
        help=f"conv types to count (default: all of {' '.join(models.CONV_TYPES)})",
    )
    parser.add_argument("--num-experts", type=int, default=4, help="experts K of the dynamic convs (default: 4)")
    parser.add_argument("--no-cifar", action="store_true", help="skip the CIFAR (32×32, 10 classes) variants")
    parser.add_argument(
        "--xla-check",
        metavar="MODEL",
        choices=MODEL_NAMES,
        help="cross-check the analytic MACs of "
        "MODEL (static and every --convs type, ImageNet 224²) against XLA's cost analysis (compiles; "
        "slow on CPU)",
    )
    args = parser.parse_args(argv)
    if args.num_experts < 1:
        parser.error(f"--num-experts {args.num_experts}: must be >= 1")  # exit 2, before any model is built
    settings = [("imagenet", 224, 1000)] + ([] if args.no_cifar else [("cifar", 32, 10)])
    rows = [
        measure(m, c, num_experts=args.num_experts, stem=stem, resolution=res, num_classes=classes)
        for stem, res, classes in settings
        for m in args.models
        for c in args.convs
    ]
    print(
        f"Parameters and multiply-adds (MACs) for one image, num_experts={args.num_experts} "
        "(CIFAR rows: stem='cifar', 10 classes).\n"
    )
    print(format_table(rows))
    if args.xla_check:
        print(
            f"\nAnalytic vs XLA cost analysis ({args.xla_check}, 224², batch 1). Both leave out kernel taps on "
            "zero padding here (padded_taps=False); XLA also counts element-wise work.\n"
        )
        print("| conv | analytic MACs (no padding taps) | XLA flops / 2 | XLA / analytic |\n|---|---:|---:|---:|")
        for conv in args.convs:
            model = build(args.xla_check, conv, args.num_experts, "imagenet", 1000)
            x_shape = (1, 224, 224, 3)
            variables = model.init(jax.random.key(0), jnp.zeros(x_shape))
            analytic = count_macs(model, variables, x_shape, padded_taps=False).total
            xla = xla_macs(model, variables, x_shape)
            print(f"| {conv} | {analytic / 1e6:.1f} M | {xla / 1e6:.1f} M | {xla / analytic:.4f} |")


if __name__ == "__main__":
    main()
