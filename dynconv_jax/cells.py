"""KernelWarehouse's kernel cells (Li & Yao, ICML 2024): per-sample kernels assembled from cell mixtures,
the cell-output mixing ('mix'), and the warehouse initializer.

A layer's kernel ``[*k, I/g, O]`` is ``M = groups_spatial * groups_out * groups_in`` cells of shape
``[Oc, Ic, *kc]`` (the warehouse's layout, PyTorch's), mixture ``m = (s * groups_out + o) * groups_in + i``
covering kernel positions ``s`` (the ``(s, *kc)`` block of ``k`` in row-major order), output channels
``[o Oc, (o + 1) Oc)`` and input channels ``[i Ic, (i + 1) Ic)``; each is ``sum_n a[b, m, n] cell_n``
(:func:`assemble_kernels`), the kernel the official ``KWconvNd`` assembles. Both Flax front ends call
these with :func:`dynconv_jax.ops.assembled_conv`; the geometry is a
:class:`dynconv_spec.kernelwarehouse.KWLayer` of the warehouse plan.
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import jax
import jax.numpy as jnp

from dynconv_jax import ops
from dynconv_spec.kernelwarehouse import KWLayer, WarehousePlan


def kernel_shape(layer: KWLayer):
    """The assembled kernel's shape ``(*k, I/g, O)`` (the Flax conv layout)."""
    spec = layer.spec
    return (*spec.kernel_size, spec.in_channels // spec.groups, spec.out_channels)


def assemble_kernels(attention, cells, layer: KWLayer, precision=None):
    """Per-sample kernels ``[B, *k, I/g, O]`` from the cell weights ``attention [B, M, N]`` and the
    warehouse ``cells [N, Oc, Ic, *kc]``."""
    batch, rank = attention.shape[0], len(layer.spec.kernel_size)
    mixtures = jnp.einsum("bmn,nc->bmc", attention, cells.reshape(cells.shape[0], -1), precision=precision)
    mixtures = mixtures.reshape(batch, layer.groups_spatial, layer.groups_out, layer.groups_in, *cells.shape[1:])
    # [B, s, o, i, Oc, Ic, *kc] -> [B, s, *kc, i, Ic, o, Oc]: kernel positions, then I/g, then O
    order = (0, 1, *range(6, 6 + rank), 3, 5, 2, 4)
    return mixtures.transpose(order).reshape(batch, *kernel_shape(layer))


def mix_cells(x, attention, cells, layer: KWLayer, *, strides, padding, dilation, precision=None):
    """The convolution without per-sample kernels ('mix'), for an ungrouped layer: every input block and
    kernel position is convolved with every cell once (``z``), then the cell weights mix those outputs
    (exact by linearity). It costs about ``N * Oc / O`` static convolutions plus the mixing, against
    ``N`` kernels' worth of assembly for the per-sample strategies: it pays only when the output has
    fewer positions than ``O / Oc``, so ``strategy='auto'`` never takes it."""
    if layer.spec.groups != 1:
        raise ValueError(
            f"strategy='mix' of a KernelWarehouse layer needs feature_group_count=1, got "
            f"{layer.spec.groups} (use another strategy)"
        )
    batch, rank = x.shape[0], len(layer.spec.kernel_size)
    cell_out, cell_in, *cell_kernel = cells.shape[1:]
    cols = ops.im2col(x, layer.spec.kernel_size, strides=strides, padding=padding, dilation=dilation)
    out_shape = cols.shape[1 : 1 + rank]
    cols = cols.reshape(batch, -1, layer.groups_spatial, math.prod(cell_kernel), layer.groups_in, cell_in)
    z = jnp.einsum(
        "bqstic,nuct->bqsinu", cols, cells.reshape(cells.shape[0], cell_out, cell_in, -1), precision=precision
    )  # [B, S, s, i, N, Oc]
    a = attention.reshape(batch, layer.groups_spatial, layer.groups_out, layer.groups_in, -1)
    y = jnp.einsum("bqsinu,bsoin->bqou", z, a, precision=precision)  # [B, S, o, Oc]
    return y.reshape(batch, *out_shape, -1)


@functools.lru_cache(maxsize=256)
def _cell_std(plan: WarehousePlan, index: int) -> Tuple[float, ...]:
    """Per cell of warehouse ``index``: ``sqrt(2 / fan_out)`` of the layer it is allocated to."""
    warehouse = plan.warehouses[index]
    std = [0.0] * warehouse.num_cells
    for _, layer in plan.layers:
        if layer.warehouse == index:
            cells = layer.end_cell - layer.start_cell
            fan_out = cells * warehouse.cell_shape[0] * math.prod(warehouse.cell_shape[2:])
            std[layer.start_cell : layer.end_cell] = [math.sqrt(2.0 / fan_out)] * (layer.end_cell - layer.start_cell)
    return tuple(std)


def warehouse_init(plan: WarehousePlan, index: int):
    """Initializer of warehouse ``index`` (``[N, Oc, Ic, *kc]``), the official one: each layer's cells
    ``[start, end)`` kaiming-normal with ``fan_out = (end - start) * Oc * prod(kc)`` (ReLU gain)."""
    warehouse = plan.warehouses[index]
    std = _cell_std(plan, index)

    def init(key, shape, dtype=jnp.float32):
        if tuple(shape) != (warehouse.num_cells, *warehouse.cell_shape):
            raise ValueError(
                f"warehouse {index} has shape {(warehouse.num_cells, *warehouse.cell_shape)}, asked for {tuple(shape)}"
            )
        scale = jnp.asarray(std, dtype).reshape((-1,) + (1,) * (len(shape) - 1))
        return jax.random.normal(key, shape, dtype) * scale

    return init


def assignment_bias_init(layer: KWLayer):
    """Initializer of the attention's fc2 bias (with a basis: ``basis_bias``), ``[M * (N + 1)]``:
    ``layer.initial_assignment_bias()`` (zeros, the official init, unless ``assignment_bias_init`` is set)."""
    values = layer.initial_assignment_bias()

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.asarray(values, dtype).reshape(shape)

    return init


def convolve(x, attention, cells, layer: KWLayer, geometry, dtype, *, strategy: str = "auto", precision=None):
    """``y_b = conv(x_b, assemble(attention_b, cells))`` in ``dtype`` by :func:`dynconv_jax.ops.assembled_conv`:
    the one place both front ends run a KernelWarehouse convolution. ``geometry``: the layer's
    :class:`dynconv_jax.conv_base.ConvGeometry`."""
    x, cells, attention = x.astype(dtype), cells.astype(dtype), attention.astype(dtype)
    conv = dict(strides=geometry.strides, padding=geometry.padding, dilation=geometry.dilation)

    def mix(**kwargs):
        return mix_cells(x, attention, cells, layer, **kwargs)

    return ops.assembled_conv(
        x,
        lambda: assemble_kernels(attention, cells, layer, precision),
        kernel_shape(layer),
        mix=mix,
        groups=geometry.groups,
        strategy=strategy,
        precision=precision,
        **conv,
    )


def check_cells(where: str, cells, layer: KWLayer) -> None:
    """The warehouse array must have the plan's shape ``[N, Oc, Ic, *kc]``."""
    want = (layer.num_cells, *layer.cell_shape)
    if tuple(cells.shape) != want:
        raise ValueError(
            f"{where}: warehouse {layer.warehouse} has shape {tuple(cells.shape)}, the warehouse plan "
            f"{want} (variables of another configuration?)"
        )


def check_layer_geometry(where: str, layer_spec, in_channels: int, out_channels: int, kernel_size, groups: int) -> None:
    """The layer built at a plan's position must have the geometry the plan reserved there."""
    got = (in_channels, out_channels, tuple(kernel_size), groups)
    want = (layer_spec.in_channels, layer_spec.out_channels, tuple(layer_spec.kernel_size), layer_spec.groups)
    if got != want:
        raise ValueError(
            f"{where}: (in, out, kernel_size, groups) {got} differ from the warehouse plan's {want} "
            f"at {layer_spec.path!r}"
        )
