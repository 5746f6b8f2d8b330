"""KernelWarehouse (Li & Yao, ICML 2024; the official OSVAI/KernelWarehouse) as Flax Linen modules.

A layer's kernel is ``M`` cells, each a signed mixture of the ``N`` cells of a warehouse shared by
the layers of one ``sharing_range`` (:mod:`dynconv_spec.kernelwarehouse` plans the warehouses, the
same plan the PyTorch reference builds). Per sample ``b``::

    a_b = fc2(relu(norm1(fc1(GAP(x_b)))))  (then the basis map)    # [M, N + 1]
    a_b[m] /= sum_n |a_b[m, n]| + 1e-3;  a_b = (1 - tau) a_b + tau temp_bias;  drop the zero cell
    y_b = conv(x_b, assemble_m(sum_n a_b[m, n] cell_n)) (+ bias)

The warehouses belong to a :class:`WarehouseManager` module: a model creates one (``name=
'warehouse_manager'``) and gives it to its :class:`KWConv` layers (``warehouse_manager=``), Linen's
module sharing, so the cells are parameters of the manager alone; each layer finds its place in the
plan by its path relative to the manager's parent. A :class:`KWConv` without a manager has a
warehouse of its own. ``temperature`` is the warm-up weight tau (None = 0, traced under jit).
"""

from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence, Tuple, Union

import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype, PrecisionLike

from dynconv_jax import attention, cells, ops
from dynconv_jax.conv_base import check_input, compute_dtype, layer_name, validate_conv_config
from dynconv_jax.convert import torch_module_to_flax
from dynconv_jax.initializers import allow_empty, kaiming_fan_out_dense_init, kaiming_fan_out_normal
from dynconv_jax.norm import BatchNorm
from dynconv_spec.kernelwarehouse import (
    NORMALIZATION_EPS,
    ConvSpec,
    KWLayer,
    KWOptions,
    WarehousePlan,
    single_layer_plan,
)

__all__ = ["KWAttention", "KWConv", "WarehouseManager"]


@functools.lru_cache(maxsize=64)
def _entries_by_flax_path(plan: WarehousePlan) -> Dict[Tuple[str, ...], Tuple[ConvSpec, Optional[KWLayer]]]:
    layers = dict(plan.layers)
    return {torch_module_to_flax(spec.path): (spec, layers.get(spec.path)) for spec in plan.convs}


class WarehouseManager(nn.Module):
    """The warehouses of a :class:`~dynconv_spec.kernelwarehouse.WarehousePlan`: params ``weights/{i}``
    ``[N, Oc, Ic, *kc]`` (the official ``warehouse_manager.weights.{i}``), initialised as the official code
    does (:func:`dynconv_jax.cells.warehouse_init`). Calling it with a warehouse index returns that warehouse.

    Attributes:
      plan: the warehouse plan of the model (e.g. :func:`dynconv_spec.kernelwarehouse.resnet_plan`).
      param_dtype: the dtype of the warehouses.

    Examples:
      >>> from flax import linen as nn
      >>> from dynconv_jax import KWConv, WarehouseManager
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_spec.kernelwarehouse import ConvSpec, KWOptions, plan_warehouses
      >>> convs = [ConvSpec("conv1", 8, 16, (3, 3), 1, "stage0_layer0"),
      ...          ConvSpec("conv2", 16, 16, (3, 3), 1, "stage0_layer1")]
      >>> plan = plan_warehouses(convs, KWOptions(sharing_range=("layer",)))
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=False, temperature=None):
      ...         manager = WarehouseManager(plan, name="warehouse_manager")
      ...         x = KWConv(16, (3, 3), padding=1, warehouse_manager=manager, name="conv1")(x, train, temperature)
      ...         return KWConv(16, (3, 3), padding=1, warehouse_manager=manager, name="conv2")(x, train, temperature)
      >>> variables = Net().init(jax.random.key(0), jnp.ones((2, 6, 6, 8)))
      >>> jax.tree_util.tree_map(jnp.shape, variables["params"]["warehouse_manager"])
      {'weights': {'0': (27, 16, 8, 1, 1)}}
    """

    plan: WarehousePlan
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, index: int):
        """Warehouse ``index`` ``[N, Oc, Ic, *kc]``."""
        return _Warehouses(self.plan, self.param_dtype, name="weights")(index)


class _Warehouses(nn.Module):
    """The ``weights`` of a :class:`WarehouseManager`: one param per warehouse, named by its index (each
    call touches only the warehouse it asks for, so Linen's shape check of an existing param evaluates
    that warehouse's initializer alone)."""

    plan: WarehousePlan
    param_dtype: Dtype

    @nn.compact
    def __call__(self, index: int):
        warehouse = self.plan.warehouses[index]
        return self.param(
            str(index),
            cells.warehouse_init(self.plan, index),
            (warehouse.num_cells, *warehouse.cell_shape),
            self.param_dtype,
        )


class KWAttention(nn.Module):
    """``pooled [B, I] -> [B, M, N]`` cell weights (the official ``Attention``; parameter names ``fc1`` (no
    bias), ``norm1`` (BatchNorm), ``fc2``, with a basis map ``fc3`` and ``basis_bias``).

    Attributes:
      layer: the layer's place in the warehouse plan (sizes, warm-up assignment).
      dtype: the dtype of the computation.
      param_dtype: the dtype of the parameters.
      precision: numerical precision of the dense layers.
    """

    layer: KWLayer
    dtype: Dtype
    param_dtype: Dtype
    precision: PrecisionLike

    @nn.compact
    def __call__(self, pooled, train: bool, tau):
        layer = self.layer

        assignment = cells.assignment_bias_init(layer)

        def dense(n, name, use_bias=True, bias_init=nn.initializers.zeros):
            return nn.Dense(
                n,
                use_bias=use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=allow_empty(kaiming_fan_out_dense_init),
                bias_init=bias_init,
                name=name,
            )

        map_to_cell = None
        if layer.num_basis:
            fc3 = dense(layer.num_nonlocal_cells, "fc3", use_bias=False)
            basis_bias = self.param(
                "basis_bias", assignment, (layer.num_mixtures * layer.cells_per_mixture,), self.param_dtype
            )
            map_to_cell = functools.partial(
                attention.kw_map_to_cell,
                fc3=fc3,
                basis_bias=basis_bias,
                num_local_cells=layer.num_local_cells,
                num_basis=layer.num_basis,
                start_cell=layer.start_cell,
            )
        norm = BatchNorm(use_running_average=not train, dtype=self.dtype, param_dtype=self.param_dtype, name="norm1")
        return attention.kw_attention(
            pooled,
            dense(layer.hidden, "fc1", use_bias=False),
            norm,
            dense(layer.fc2_features, "fc2", use_bias=not layer.num_basis, bias_init=assignment),
            map_to_cell,
            jnp.asarray(layer.temp_bias()),
            tau,
            layer.num_mixtures,
            NORMALIZATION_EPS,
        )


class KWConv(nn.Module):
    """A KernelWarehouse convolution, channels-last, 1-D/2-D/3-D (rank = ``len(kernel_size)``).

    Params: ``attention/fc1/kernel [I, H]``, ``attention/norm1/{scale, bias}`` (batch_stats
    ``attention/norm1/{mean, var}``), ``attention/fc2/{kernel [H, M (N + 1)], bias}`` (with a basis:
    ``fc2`` without bias, ``attention/fc3/kernel``, ``attention/basis_bias``), ``bias [O]`` if ``use_bias``,
    and without a manager ``warehouse_manager/weights/0 [N, Oc, Ic, *kc]``: the official state_dict's
    names by the conversion rules. ``H = max(int(I * reduction), 16)``. Sows ``intermediates/cell_attention
    [B, M, N]``. At a position its manager's plan marks static (the official ``reserve(enabled=False)``),
    the layer is a plain convolution with ``kernel [*k, I/g, O]``.

    Attributes:
      features: output channels O.
      kernel_size, strides, padding, kernel_dilation, feature_group_count: as ``flax.linen.Conv``.
      use_bias: a static output bias (zero-initialised, as the official layer).
      dtype, param_dtype, precision: as ``flax.linen.Conv`` (the attention runs in at least float32).
      strategy: the per-sample convolution (:func:`dynconv_jax.ops.assembled_conv`).
      reduction, cell_num_ratio, cell_inplane_ratio, cell_outplane_ratio, nonlocal_basis_ratio, spatial_partition: the
        warehouse options (:class:`dynconv_spec.kernelwarehouse.KWOptions`) of a layer without a manager; with
        one, the manager's plan holds them (leave these at their defaults).
      assignment_bias_init: likewise, the attention's initial logit of each mixture's warm-up cell (0: the
        official init).
      warehouse_manager: the shared :class:`WarehouseManager` (None: a warehouse of its own).

    Training (``train=True``) normalises the attention with batch statistics (a batch of at least 2)
    and updates ``batch_stats``: pass ``mutable=['batch_stats']``.

    Examples:
      >>> from dynconv_jax import KWConv
      >>> import jax, jax.numpy as jnp
      >>> layer = KWConv(16, (3, 3), padding=1, cell_num_ratio=2.0)
      >>> x = jnp.ones((2, 8, 8, 4))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> layer.apply(variables, x, temperature=0.5).shape
      (2, 8, 8, 16)
    """

    features: int
    kernel_size: Union[int, Sequence[int]]
    strides: Union[int, Sequence[int]] = 1
    padding: ops.PaddingLike = "SAME"
    kernel_dilation: Union[int, Sequence[int]] = 1
    feature_group_count: int = 1
    use_bias: bool = False
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    strategy: str = "auto"
    reduction: float = 0.0625
    cell_num_ratio: float = 1.0
    cell_inplane_ratio: float = 1.0
    cell_outplane_ratio: float = 1.0
    nonlocal_basis_ratio: float = 1.0
    spatial_partition: bool = True
    assignment_bias_init: float = 0.0
    warehouse_manager: Optional[WarehouseManager] = None

    def _options(self) -> KWOptions:
        return KWOptions(
            self.reduction,
            self.cell_num_ratio,
            self.cell_inplane_ratio,
            self.cell_outplane_ratio,
            (),
            self.nonlocal_basis_ratio,
            self.spatial_partition,
            self.assignment_bias_init,
        )

    def _plan_entry(self, where: str, in_channels: int, geometry):
        """``(manager, spec, layer)``: the manager and this layer's place in its plan."""
        manager = self.warehouse_manager
        if manager is None:
            plan = single_layer_plan(
                in_channels, self.features, geometry.kernel_size, geometry.groups, self._options(), where
            )
            manager = WarehouseManager(plan, self.param_dtype, name="warehouse_manager")
            return (manager, *plan.entry("", where))
        if self._options() != KWOptions():
            raise ValueError(f"{where}: warehouse options given to a layer of a WarehouseManager; its plan holds them")
        path = tuple(self.scope.path[len(manager.scope.path) - 1 :])
        entries = _entries_by_flax_path(manager.plan)
        if path not in entries:
            raise ValueError(
                f"{where}: no convolution at {'/'.join(path)!r} in the warehouse plan; it has "
                f"{['/'.join(p) for p in entries]}"
            )
        spec, layer = entries[path]
        cells.check_layer_geometry(where, spec, in_channels, self.features, geometry.kernel_size, geometry.groups)
        return (manager, spec, layer)

    def _static(self, x, geometry, in_channels: int):
        """The plain convolution at a position the plan marks static."""
        kernel = self.param(
            "kernel",
            kaiming_fan_out_normal,
            (*geometry.kernel_size, in_channels // geometry.groups, self.features),
            self.param_dtype,
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        y = ops.static_conv(
            x,
            kernel,
            strides=geometry.strides,
            padding=geometry.padding,
            dilation=geometry.dilation,
            groups=geometry.groups,
            precision=self.precision,
        )
        return self._add_bias(y)

    def _add_bias(self, y):
        if not self.use_bias:
            return y
        return y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)

    @nn.compact
    def __call__(self, x, train: bool = False, temperature=None):
        """``x [B, *S, I] -> [B, *S_out, O]``; ``temperature``: the warm-up weight tau in [0, 1] (None = 0)."""
        where = layer_name(self)
        geometry = validate_conv_config(
            where,
            features=self.features,
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.feature_group_count,
            num_experts=1,
            strategy=self.strategy,
        )
        in_channels = check_input(where, x, geometry)
        manager, _, layer = self._plan_entry(where, in_channels, geometry)
        if layer is None:
            return self._static(x, geometry, in_channels)
        warehouse = manager(layer.warehouse)
        cells.check_cells(where, warehouse, layer)
        dtype = compute_dtype(x, warehouse, self.dtype)
        attn_dtype = attention.attention_dtype(dtype)
        if train and not self.is_initializing():
            attention.check_kw_train_batch(where, x.shape[0])
        tau = attention.kw_warmup_scalar(temperature, where, attn_dtype)
        pooled = attention.global_avg_pool(x, attn_dtype)
        weights = KWAttention(layer, attn_dtype, self.param_dtype, self.precision, name="attention")(pooled, train, tau)
        self.sow("intermediates", "cell_attention", weights)
        y = cells.convolve(
            x, weights, warehouse, layer, geometry, dtype, strategy=self.strategy, precision=self.precision
        )
        return self._add_bias(y)
