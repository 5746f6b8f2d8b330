"""KernelWarehouse (Li & Yao, ICML 2024), the PyTorch reference of the official OSVAI/KernelWarehouse.

A layer's kernel ``[O, I/g, *k]`` is split into ``M = groups_spatial * groups_out * groups_in`` cells
of one shape ``[Oc, Ic, *kc]``; each cell is a linear mixture of the ``N`` cells of a warehouse
shared by the layers of one ``sharing_range``. Per sample ``b``::

    h_b = relu(norm1(fc1(GAP(x_b))))                               # fc1 without bias, BatchNorm1d
    a_b = fc2(h_b)  (then, with a basis, map_to_cell)              # [M, N + 1]
    a_b[m] = a_b[m] / (sum_n |a_b[m, n]| + 1e-3)                   # signed weights
    a_b = (1 - tau) * a_b + tau * temp_bias                        # the warm-up, tau 1 -> 0
    W_b = assemble_m(sum_n a_b[m, n] * cell_n)                     # the last ("zero") cell dropped
    y_b = conv(x_b, W_b) (+ bias)

:class:`WarehouseManager` has the official ``Warehouse_Manager``'s ``reserve`` / ``store`` /
``allocate`` and its state (``weights.{i}``), whose sizes and cell allocation come from
:mod:`dynconv_spec.kernelwarehouse`, the plan the Flax layers build too. ``KWConv1d/2d/3d`` and
``KWLinear`` take the official arguments; without a manager a layer has a warehouse of its own
(``warehouse_manager.weights.0``). State dicts are the official ones key for key, so the released
checkpoints load with ``strict=True``. The warm-up ``tau`` is the layer's ``temperature``
(``update_temperature``, :func:`dynconv_torch.set_temperature`), 0 by default as the official code
starts; it is not in the state dict.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynconv_spec.kernelwarehouse import (
    NORMALIZATION_EPS,
    ConvSpec,
    KWLayer,
    KWOptions,
    WarehousePlan,
    fuse_warehouse_name,
    plan_warehouses,
    store_warehouses,
)

from .functional import check_input, conv_padding, int_tuple, positive_int

__all__ = ["KWAttention", "KWConv1d", "KWConv2d", "KWConv3d", "KWLinear", "WarehouseManager", "check_kw_temperature"]


def check_kw_temperature(temperature, where: str) -> float:
    """The warm-up weight tau as a float in [0, 1] (the official schedule runs from 1 to 0)."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: temperature (the warm-up weight tau) must be a number in [0, 1], got {temperature!r}"
        ) from None
    if not 0.0 <= t <= 1.0:
        raise ValueError(
            f"{where}: temperature (the warm-up weight tau) must be in [0, 1], got {temperature!r}; "
            f"KernelWarehouse blends (1 - tau) * attention + tau * one-hot, it does not divide by T"
        )
    return t


class KWAttention(nn.Module):
    """The official ``Attention``: ``[B, I, *S] -> [B * M, N]`` cell weights (the zero cell dropped).

    Parameters (official names): ``fc1`` (no bias), ``norm1`` (BatchNorm1d), ``fc2`` (bias, or none
    with a basis), ``fc3`` and ``basis_bias`` (only with ``nonlocal_basis_ratio < 1``).
    ``temp_bias`` (the warm-up target) is a buffer outside the state dict.

    Examples:
      >>> import torch
      >>> from dynconv_spec.kernelwarehouse import single_layer_plan
      >>> from dynconv_torch import KWAttention
      >>> layer = single_layer_plan(8, 16, (3, 3)).layers[0][1]        # 9 mixtures of 9 cells
      >>> KWAttention(layer).eval()(torch.randn(2, 8, 5, 5), 0.0).shape  # x, warm-up tau
      torch.Size([18, 9])
    """

    def __init__(self, layer: KWLayer, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.layer = layer
        self.fc1 = nn.Linear(layer.spec.in_channels, layer.hidden, bias=False, **factory)
        self.norm1 = nn.BatchNorm1d(layer.hidden, **factory)
        self.fc2 = nn.Linear(layer.hidden, layer.fc2_features, bias=not layer.num_basis, **factory)
        if layer.num_basis:
            self.fc3 = nn.Linear(layer.num_basis, layer.num_nonlocal_cells, bias=False, **factory)
            self.basis_bias = nn.Parameter(torch.zeros(layer.num_mixtures * layer.cells_per_mixture, **factory))
        self.register_buffer("temp_bias", torch.tensor(layer.temp_bias(), **factory), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: every Linear kaiming_normal (fan_out, relu) with zero bias (fc2: see
        ``assignment_bias_init``); BatchNorm 1 and 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_running_stats()
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # fc2's bias (with a basis, basis_bias) starts at the warm-up one-hots times assignment_bias_init:
        # zeros, the official init, unless that option is set (dynconv_spec.kernelwarehouse.KWOptions).
        bias = self.basis_bias if self.layer.num_basis else self.fc2.bias
        with torch.no_grad():
            bias.copy_(torch.tensor(self.layer.initial_assignment_bias(), dtype=bias.dtype))

    def map_to_cell(self, x: Tensor) -> Tensor:
        """``[B, M * (L + basis + 1)] -> [B, M * (N + 1)]``: the basis mapped to the other layers' cells by
        fc3, the layer's own ``L`` cells placed at its position in the warehouse, plus ``basis_bias``."""
        layer = self.layer
        x = x.reshape(-1, layer.num_local_cells + layer.num_basis + 1)
        local, nonlocal_, zero = x[:, : layer.num_local_cells], x[:, layer.num_local_cells : -1], x[:, -1:]
        nonlocal_ = self.fc3(nonlocal_)
        start = layer.start_cell
        x = torch.cat([nonlocal_[:, :start], local, nonlocal_[:, start:], zero], dim=1)
        return x.reshape(-1, layer.num_mixtures * layer.cells_per_mixture) + self.basis_bias.reshape(1, -1)

    def forward(self, x: Tensor, temperature: float) -> Tensor:
        pooled = x.reshape(*x.shape[:2], -1).mean(dim=-1)  # [B, I]
        h = F.relu(self.norm1(self.fc1(pooled)))
        logits = self.fc2(h)
        if self.layer.num_basis:
            logits = self.map_to_cell(logits)
        a = logits.reshape(-1, self.layer.cells_per_mixture)  # [B * M, N + 1]
        a = a / (torch.sum(torch.abs(a), dim=1).view(-1, 1) + NORMALIZATION_EPS)
        a = (1.0 - temperature) * a.reshape(x.shape[0], -1) + temperature * self.temp_bias.view(1, -1)
        return a.reshape(-1, self.layer.cells_per_mixture)[:, :-1]


class _KWConvNd(nn.Module):
    """A KernelWarehouse convolution (``KWConv1d/2d/3d``); see the module docstring for the maths.

    Arguments as the official ``KWconvNd``: ``in_planes, out_planes, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, bias=False, warehouse_id=None, warehouse_manager=None`` (``padding`` also
    'same' / 'valid'). A layer made by :meth:`WarehouseManager.reserve` has its manager's warehouse
    and gets its attention at :meth:`WarehouseManager.allocate`. Without a manager the layer is
    complete at once, with a warehouse of its own built from the keyword-only options of
    :class:`~dynconv_spec.kernelwarehouse.KWOptions` (``reduction``, ``cell_num_ratio``, ...).

    State dict: ``attention.{fc1.weight, norm1.*, fc2.weight, fc2.bias}`` (with a basis
    ``attention.fc3.weight``, ``attention.basis_bias`` and no ``fc2.bias``), ``bias [O]`` when
    ``bias``, and for a stand-alone layer ``warehouse_manager.weights.0 [N, Oc, Ic, *kc]``.
    """

    dimension = 2

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        warehouse_id: Optional[int] = None,
        warehouse_manager: Optional["WarehouseManager"] = None,
        *,
        temperature: float = 0.0,
        device=None,
        dtype=None,
        **options,
    ):
        super().__init__()
        where = (
            f"{type(self).__name__}(in_planes={in_planes!r}, out_planes={out_planes!r}, kernel_size={kernel_size!r})"
        )
        positive_int(in_planes, "in_planes", where)
        positive_int(out_planes, "out_planes", where)
        positive_int(groups, "groups", where)
        if in_planes % groups or out_planes % groups:
            raise ValueError(f"{where}: groups={groups} must divide in_planes={in_planes} and out_planes={out_planes}")
        rank = self.dimension
        self.in_planes, self.out_planes, self.groups = in_planes, out_planes, groups
        self.kernel_size = int_tuple(kernel_size, "kernel_size", where, 1, rank)
        self.stride = int_tuple(stride, "stride", where, 1, rank)
        self.dilation = int_tuple(dilation, "dilation", where, 1, rank)
        self.padding = conv_padding(padding, self.stride, where)
        self.temperature = check_kw_temperature(temperature, where)
        self._factory = {"device": device, "dtype": dtype}
        self.bias = nn.Parameter(torch.zeros(out_planes, **self._factory)) if bias else None
        self.layer: Optional[KWLayer] = None
        if warehouse_manager is None:  # stand-alone: a warehouse of its own
            if warehouse_id is not None:
                raise ValueError(f"{where}: warehouse_id={warehouse_id!r} without a warehouse_manager")
            manager = WarehouseManager(**options)
            self.warehouse_manager = manager
            self.warehouse_id = manager.register(self, "layer")
            manager.store(**self._factory)
            manager.allocate(self)
        else:
            if options:
                raise ValueError(
                    f"{where}: {sorted(options)} are options of the warehouse manager, not of a layer it reserves"
                )
            self._manager = (warehouse_manager,)  # a tuple: not registered, the model owns the manager
            self.warehouse_id = warehouse_id

    @property
    def manager(self) -> "WarehouseManager":
        """The warehouse manager whose cells this layer mixes."""
        owned = dict(self.named_children()).get("warehouse_manager")
        return owned if owned is not None else self._manager[0]

    @property
    def in_channels(self) -> int:
        return self.in_planes

    @property
    def out_channels(self) -> int:
        return self.out_planes

    def spec(self, path: str, warehouse_name: Optional[str]) -> ConvSpec:
        """This layer's geometry as the plan's :class:`~dynconv_spec.kernelwarehouse.ConvSpec`."""
        return ConvSpec(path, self.in_planes, self.out_planes, tuple(self.kernel_size), self.groups, warehouse_name)

    def init_attention(self, layer: KWLayer) -> None:
        """Build the attention for this layer's place in the plan (the official ``init_attention``)."""
        self.layer = layer
        self.attention = KWAttention(layer, **self._factory)

    def update_temperature(self, temperature: float) -> None:
        """Set the warm-up weight tau in [0, 1] (official name; a plain attribute, not in the state dict)."""
        self.temperature = check_kw_temperature(temperature, self._where())

    def _where(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        s = f"{self.in_planes}, {self.out_planes}, kernel_size={tuple(self.kernel_size)}, stride={tuple(self.stride)}"
        if self.padding not in (0, (0,) * self.dimension):
            s += f", padding={self.padding!r}"
        if tuple(self.dilation) != (1,) * self.dimension:
            s += f", dilation={tuple(self.dilation)}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.layer is not None:
            s += f", warehouse={self.layer.warehouse}, mixtures={self.layer.num_mixtures}, cells={self.layer.num_cells}"
        return s + (f", temperature={self.temperature}" if self.temperature else "")

    def cell_attention(self, x: Tensor) -> Tensor:
        """The cell weights ``[B, M, N]`` for ``x`` (in training mode this updates norm1's running statistics)."""
        return self._attention(x).reshape(x.shape[0], self.layer.num_mixtures, self.layer.num_cells)

    def _attention(self, x: Tensor) -> Tensor:
        if self.layer is None:
            raise ValueError(
                f"{self._where()}: the layer has no attention yet; call its warehouse manager's store() "
                f"and allocate(model) after building the model"
            )
        check_input(x, self.in_planes, self._where(), self.attention.fc1.weight.dtype, rank=self.dimension)
        if self.training and x.shape[0] == 1:
            raise ValueError(
                f"{self._where()}: got a batch of one sample in training mode; the attention's "
                f"BatchNorm1d normalises over the batch and needs more than one sample. Use a batch "
                f"of at least 2, or call .eval() to use the running statistics."
            )
        return self.attention(x, self.temperature)

    def assemble(self, attention: Tensor, batch: int) -> Tensor:
        """Per-sample kernels ``[B * O, I/g, *k]`` from the cell weights ``[B * M, N]`` (official order)."""
        layer = self.layer
        cells = self.manager.take_cell(self.warehouse_id).reshape(layer.num_cells, -1)
        kernels = torch.mm(attention, cells).reshape(
            batch, layer.groups_spatial, layer.groups_out, layer.groups_in, *layer.cell_shape
        )
        kernels = kernels.permute(0, 2, 4, 3, 5, 1, *range(6, 6 + self.dimension))
        return kernels.reshape(-1, self.in_planes // self.groups, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, I, *S] -> [B, O, *S_out]``."""
        batch = x.shape[0]
        kernels = self.assemble(self._attention(x), batch)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dimension - 1]
        out = conv(
            x.reshape(1, -1, *x.shape[2:]), kernels, None, self.stride, self.padding, self.dilation, self.groups * batch
        )
        out = out.view(batch, self.out_planes, *out.shape[2:])
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, *([1] * self.dimension))
        return out


class KWConv1d(_KWConvNd):
    """KernelWarehouse 1-D convolution, ``[B, I, L]`` (arguments as :class:`KWConv2d`).

    Examples:
      >>> import torch
      >>> from dynconv_torch import KWConv1d
      >>> KWConv1d(8, 16, 3, padding=1)(torch.randn(2, 8, 10)).shape
      torch.Size([2, 16, 10])
    """

    dimension = 1


class KWConv2d(_KWConvNd):
    """KernelWarehouse 2-D convolution (official ``KWConv2d``), NCHW.

    Examples:
      >>> import torch
      >>> from dynconv_torch import KWConv2d
      >>> layer = KWConv2d(8, 16, 3, padding=1, cell_num_ratio=2.0)   # a warehouse of its own
      >>> layer(torch.randn(2, 8, 10, 10)).shape
      torch.Size([2, 16, 10, 10])
    """

    dimension = 2


class KWConv3d(_KWConvNd):
    """KernelWarehouse 3-D convolution, ``[B, I, D, H, W]`` (arguments as :class:`KWConv2d`).

    Examples:
      >>> import torch
      >>> from dynconv_torch import KWConv3d
      >>> KWConv3d(4, 8, 3, padding=1)(torch.randn(2, 4, 5, 5, 5)).shape
      torch.Size([2, 8, 5, 5, 5])
    """

    dimension = 3


class KWLinear(nn.Module):
    """The official ``KWLinear``: a :class:`KWConv1d` with a 1-wide kernel over ``[..., in_planes]``
    (its state under ``conv.``); ``kernel_size`` defaults to 1 here, the other arguments are
    :class:`KWConv1d`'s.

    Examples:
      >>> import torch
      >>> from dynconv_torch import KWLinear
      >>> KWLinear(12, 5)(torch.randn(2, 3, 12)).shape
      torch.Size([2, 3, 5])
    """

    dimension = 1

    def __init__(self, in_planes: int, out_planes: int, kernel_size=1, *args, **kwargs):
        super().__init__()
        self.conv = KWConv1d(in_planes, out_planes, kernel_size, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = self.conv(x.reshape(shape[0], -1, shape[-1]).transpose(1, 2))
        return x.transpose(1, 2).reshape(*shape[:-1], -1)


_LAYERS = {"conv1d": KWConv1d, "conv2d": KWConv2d, "conv3d": KWConv3d, "linear": KWLinear}
_STATIC = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d, "linear": nn.Linear}


class WarehouseManager(nn.Module):
    """The official ``Warehouse_Manager``: reserves KernelWarehouse layers, then stores their warehouses
    (``weights.{i}``, ``[N, Oc, Ic, *kc]``) and allocates cells and attentions.

    Arguments: the options of :class:`~dynconv_spec.kernelwarehouse.KWOptions` (official names
    and defaults, and this project's ``assignment_bias_init``; ``norm_layer`` is always ``nn.BatchNorm1d``).
    The sizes come from :func:`dynconv_spec.kernelwarehouse.plan_warehouses`; :attr:`plan` holds the result after
    :meth:`allocate`.

    A network that owns the manager registers it as a submodule, as the official models do.

    Examples:
      >>> import torch
      >>> from torch import nn
      >>> from dynconv_torch import WarehouseManager
      >>> manager = WarehouseManager(cell_num_ratio=1, sharing_range=("layer",))
      >>> net = nn.Sequential(manager.reserve(8, 16, 3, padding=1, warehouse_name="stage0_layer0"),
      ...                     manager.reserve(16, 16, 3, padding=1, warehouse_name="stage0_layer1"))
      >>> manager.store(); manager.allocate(net)
      >>> net(torch.randn(2, 8, 6, 6)).shape
      torch.Size([2, 16, 6, 6])
    """

    def __init__(
        self,
        reduction=0.0625,
        cell_num_ratio=1,
        cell_inplane_ratio=1,
        cell_outplane_ratio=1,
        sharing_range=(),
        nonlocal_basis_ratio=1,
        spatial_partition=True,
        assignment_bias_init=0.0,
    ):
        super().__init__()
        self.options = KWOptions(
            reduction,
            cell_num_ratio,
            cell_inplane_ratio,
            cell_outplane_ratio,
            sharing_range,
            nonlocal_basis_ratio,
            spatial_partition,
            assignment_bias_init,
        )
        self.options.check("WarehouseManager")
        self._reserved: List[Tuple[nn.Module, str]] = []  # (layer, warehouse name), reservation order
        self._names: Dict[str, int] = {}  # fused warehouse name -> index
        self.plan: Optional[WarehousePlan] = None

    def register(self, layer: "_KWConvNd", warehouse_name: str) -> int:
        """Record ``layer`` under ``warehouse_name``; returns its warehouse index."""
        if self.plan is not None or hasattr(self, "weights"):
            raise ValueError("WarehouseManager: reserve() after store(): the warehouses are already sized")
        fused = fuse_warehouse_name(warehouse_name, self.options.sharing_range)
        self._names.setdefault(fused, len(self._names))
        self._reserved.append((layer, warehouse_name))
        return self._names[fused]

    def reserve(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size=1,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        warehouse_name: str = "default",
        enabled: bool = True,
        layer_type: str = "conv2d",
    ):
        """A layer without weights that will mix the cells of warehouse ``warehouse_name`` (fused by
        ``sharing_range``); ``enabled=False`` gives the plain PyTorch layer instead (official semantics)."""
        if layer_type not in _LAYERS:
            raise ValueError(f"WarehouseManager.reserve: layer_type={layer_type!r}; expected one of {tuple(_LAYERS)}")
        if not enabled:
            if layer_type == "linear":
                return nn.Linear(in_planes, out_planes, bias=bias)
            return _STATIC[layer_type](
                in_planes,
                out_planes,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=bias,
            )
        layer = _LAYERS[layer_type](
            in_planes,
            out_planes,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            warehouse_manager=self,
        )
        conv = layer.conv if layer_type == "linear" else layer
        conv.warehouse_id = self.register(conv, warehouse_name)
        return layer

    def _specs(self, paths: Dict[int, str]) -> Tuple[ConvSpec, ...]:
        return tuple(
            layer.spec(paths.get(id(layer), f"<reserved {i}>"), name) for i, (layer, name) in enumerate(self._reserved)
        )

    def store(self, device=None, dtype=None) -> None:
        """Create the warehouses (``torch.randn``, re-initialised per layer by :meth:`allocate`)."""
        if not self._reserved:
            raise ValueError("WarehouseManager.store: no layer was reserved")
        warehouses = store_warehouses(self._specs({}), self.options, "WarehouseManager.store")
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(w.num_cells, *w.cell_shape, device=device, dtype=dtype)) for w in warehouses]
        )

    @torch.no_grad()
    def allocate(self, network: nn.Module) -> None:
        """Give every reserved layer of ``network`` its cells and attention, in module order, and
        initialise its cells (kaiming_normal, fan_out, as the official code)."""
        if not hasattr(self, "weights"):
            raise ValueError("WarehouseManager.allocate: call store() first")
        paths = {id(m): name for name, m in network.named_modules() if isinstance(m, _KWConvNd)}
        reserved = {id(layer) for layer, _ in self._reserved}
        missing = [i for i, (layer, _) in enumerate(self._reserved) if id(layer) not in paths]
        if missing:
            raise ValueError(f"WarehouseManager.allocate: {len(missing)} reserved layers are not in the network")
        order = [name for name, m in network.named_modules() if id(m) in reserved]
        plan = plan_warehouses(self._specs(paths), self.options, order, where="WarehouseManager.allocate")
        layers = dict(plan.layers)
        for name, m in network.named_modules():
            if id(m) in reserved:
                layer = layers[name]
                m.init_attention(layer)
                cells = self.weights[layer.warehouse][layer.start_cell : layer.end_cell]
                nn.init.kaiming_normal_(cells.view(-1, *cells.shape[2:]), mode="fan_out", nonlinearity="relu")
        self.plan = plan

    def take_cell(self, warehouse_idx: int) -> Tensor:
        """Warehouse ``warehouse_idx`` (official name)."""
        return self.weights[warehouse_idx]
