"""KernelWarehouse (Li & Yao, ICML 2024) as ``flax.nnx`` Modules on the Linen layers' core.

Same maths (:func:`dynconv_jax.attention.kw_attention`, :mod:`dynconv_jax.cells`) and parameter tree as
:mod:`dynconv_jax.kernelwarehouse`. A model's :class:`WarehouseManager` holds the warehouses
(``nnx.Param`` s under ``warehouse_manager/weights/{i}``) and the model passes it to its layers when it
calls them (``layer(x, temperature, warehouse_manager=...)``): NNX stores a variable referenced from
several modules at its first path in sorted order, so a reference held by every layer would put the
warehouses under the first layer's path instead of the manager's, which the Linen tree, the PyTorch
state_dict and the converter name ``warehouse_manager.weights.{i}``. A :class:`KWConv` built without a
plan place has a manager, and a warehouse, of its own.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, PrecisionLike

from dynconv_jax import attention, cells, conv_base, ops
from dynconv_jax.initializers import allow_empty, kaiming_fan_out_dense_init
from dynconv_jax.nnx.layers import BatchNorm, _attention_dtype, _linear, _sow
from dynconv_spec.kernelwarehouse import NORMALIZATION_EPS, KWLayer, KWOptions, WarehousePlan, single_layer_plan

__all__ = ["KWAttention", "KWConv", "WarehouseManager"]


class WarehouseManager(nnx.Module):
    """The warehouses of a :class:`~dynconv_spec.kernelwarehouse.WarehousePlan`: ``weights`` (an
    ``nnx.List`` of ``nnx.Param`` ``[N, Oc, Ic, *kc]``), initialised as the official code; calling it
    with an index returns that warehouse (the Linen :class:`dynconv_jax.kernelwarehouse.WarehouseManager`).

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx import WarehouseManager
      >>> from dynconv_spec.kernelwarehouse import ConvSpec, plan_warehouses
      >>> plan = plan_warehouses([ConvSpec("conv", 8, 16, (3, 3), 1, "layer")])
      >>> WarehouseManager(plan, rngs=nnx.Rngs(0))(0).shape
      (9, 16, 8, 1, 1)
    """

    def __init__(self, plan: WarehousePlan, *, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.plan = plan
        self.weights = nnx.List(
            [
                nnx.Param(cells.warehouse_init(plan, i)(rngs.params(), (w.num_cells, *w.cell_shape), param_dtype))
                for i, w in enumerate(plan.warehouses)
            ]
        )

    def __call__(self, index: int):
        return self.weights[index][...]


class KWAttention(nnx.Module):
    """``pooled [B, I] -> [B, M, N]`` cell weights: ``fc1`` (no bias), ``norm1``, ``fc2`` and, with a basis
    map, ``fc3`` and ``basis_bias`` (the Linen :class:`dynconv_jax.kernelwarehouse.KWAttention`)."""

    def __init__(
        self, layer: KWLayer, *, dtype: Optional[Dtype], param_dtype: Dtype, precision: PrecisionLike, rngs: nnx.Rngs
    ):
        assignment = cells.assignment_bias_init(layer)

        def linear(n_in, n_out, use_bias=True, bias_init=nnx.initializers.zeros):
            return _linear(
                n_in,
                n_out,
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                precision=precision,
                kernel_init=allow_empty(kaiming_fan_out_dense_init),
                bias_init=bias_init,
                rngs=rngs,
            )

        self.layer = layer
        self.fc1 = linear(layer.spec.in_channels, layer.hidden, use_bias=False)
        self.norm1 = BatchNorm(layer.hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = linear(layer.hidden, layer.fc2_features, use_bias=not layer.num_basis, bias_init=assignment)
        if layer.num_basis:
            self.fc3 = linear(layer.num_basis, layer.num_nonlocal_cells, use_bias=False)
            self.basis_bias = nnx.Param(assignment(None, (layer.num_mixtures * layer.cells_per_mixture,), param_dtype))
        else:
            self.fc3 = nnx.data(None)
            self.basis_bias = nnx.data(None)

    def __call__(self, pooled, tau):
        layer = self.layer
        map_to_cell = None
        if layer.num_basis:
            map_to_cell = functools.partial(
                attention.kw_map_to_cell,
                fc3=self.fc3,
                basis_bias=self.basis_bias[...],
                num_local_cells=layer.num_local_cells,
                num_basis=layer.num_basis,
                start_cell=layer.start_cell,
            )
        return attention.kw_attention(
            pooled,
            self.fc1,
            self.norm1,
            self.fc2,
            map_to_cell,
            jnp.asarray(layer.temp_bias()),
            tau,
            layer.num_mixtures,
            NORMALIZATION_EPS,
        )


class KWConv(nnx.Module):
    """KernelWarehouse convolution as an NNX Module, channels-last, 1-D/2-D/3-D.

    State: the Linen :class:`dynconv_jax.kernelwarehouse.KWConv` tree (``attention/...``, ``bias`` if
    ``use_bias``, and for a layer without a plan place ``warehouse_manager/weights/0``). Sows
    ``cell_attention [B, M, N]``. A new layer is in training mode (the attention BatchNorm uses batch
    statistics and needs a batch of at least 2); ``eval()`` uses the running statistics.

    Attributes (beyond ``flax.nnx.Conv``'s and ``strategy``):
      reduction, cell_num_ratio, cell_inplane_ratio, cell_outplane_ratio, nonlocal_basis_ratio, spatial_partition: the
        warehouse options of a layer with a warehouse of its own.
      assignment_bias_init: likewise, the attention's initial logit of each mixture's warm-up cell (0: the
        official init).
      layer: the layer's place in a model's warehouse plan (``plan.layers``); the model then passes its
        :class:`WarehouseManager` at every call. None: a warehouse of its own.

    Examples:
      >>> from flax import nnx
      >>> from dynconv_jax.nnx import KWConv
      >>> import jax.numpy as jnp
      >>> layer = KWConv(4, 16, (3, 3), padding=1, cell_num_ratio=2.0, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 8, 8, 4)), temperature=0.5).shape
      (2, 8, 8, 16)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Union[int, Sequence[int]],
        strides: Union[int, Sequence[int]] = 1,
        *,
        padding: ops.PaddingLike = "SAME",
        kernel_dilation: Union[int, Sequence[int]] = 1,
        feature_group_count: int = 1,
        use_bias: bool = False,
        dtype: Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        strategy: str = "auto",
        reduction: float = 0.0625,
        cell_num_ratio: float = 1.0,
        cell_inplane_ratio: float = 1.0,
        cell_outplane_ratio: float = 1.0,
        nonlocal_basis_ratio: float = 1.0,
        spatial_partition: bool = True,
        assignment_bias_init: float = 0.0,
        layer: Optional[KWLayer] = None,
        rngs: nnx.Rngs,
    ):
        where = f"KWConv(in_features={in_features!r}, out_features={out_features!r}, kernel_size={kernel_size!r})"
        geometry = conv_base.validate_conv_config(
            where,
            features=out_features,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
            num_experts=1,
            strategy=strategy,
            features_arg="out_features",
        )
        options = KWOptions(
            reduction,
            cell_num_ratio,
            cell_inplane_ratio,
            cell_outplane_ratio,
            (),
            nonlocal_basis_ratio,
            spatial_partition,
            assignment_bias_init,
        )
        if layer is None:
            plan = single_layer_plan(
                in_features, out_features, geometry.kernel_size, feature_group_count, options, where
            )
            self.warehouse_manager = WarehouseManager(plan, param_dtype=param_dtype, rngs=rngs)
            layer = dict(plan.layers)[""]
        else:
            if options != KWOptions():
                raise ValueError(f"{where}: warehouse options given to a layer of a model's plan; the plan holds them")
            self.warehouse_manager = nnx.data(None)
        cells.check_layer_geometry(
            where, layer.spec, in_features, out_features, geometry.kernel_size, feature_group_count
        )
        self.where, self.geometry, self.layer = where, geometry, layer
        self.in_features, self.out_features, self.use_bias = in_features, out_features, use_bias
        self.strategy, self.dtype, self.precision = strategy, dtype, precision
        self.attention = KWAttention(
            layer, dtype=_attention_dtype(dtype), param_dtype=param_dtype, precision=precision, rngs=rngs
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else nnx.data(None)

    def __call__(self, x, temperature=None, warehouse_manager: Optional[WarehouseManager] = None):
        """``x [B, *S, I] -> [B, *S_out, O]``; ``temperature``: the warm-up weight tau in [0, 1] (None = 0);
        ``warehouse_manager``: the model's (required iff the layer was built with a plan place)."""
        if (warehouse_manager is None) == (self.warehouse_manager is None):
            raise ValueError(
                f"{self.where}: "
                + (
                    "a layer with a warehouse of its own takes no warehouse_manager"
                    if warehouse_manager is not None
                    else "a layer of a model's plan needs the model's warehouse_manager"
                )
            )
        manager = warehouse_manager if warehouse_manager is not None else self.warehouse_manager
        in_channels = conv_base.check_input(self.where, x, self.geometry)
        if in_channels != self.in_features:
            raise ValueError(
                f"{self.where}: input shape {tuple(x.shape)} has {in_channels} channels, but the layer "
                f"was built with in_features={self.in_features}"
            )
        warehouse = manager(self.layer.warehouse)
        cells.check_cells(self.where, warehouse, self.layer)
        dtype = conv_base.compute_dtype(x, warehouse, self.dtype)
        attn_dtype = attention.attention_dtype(dtype)
        if not self.attention.norm1.use_running_average:
            attention.check_kw_train_batch(self.where, x.shape[0])
        tau = attention.kw_warmup_scalar(temperature, self.where, attn_dtype)
        weights = self.attention(attention.global_avg_pool(x, attn_dtype), tau)
        _sow(self, "cell_attention", weights)
        y = cells.convolve(
            x, weights, warehouse, self.layer, self.geometry, dtype, strategy=self.strategy, precision=self.precision
        )
        return y if self.bias is None else y + self.bias[...].astype(y.dtype)
