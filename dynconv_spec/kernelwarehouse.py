"""KernelWarehouse (Li & Yao, ICML 2024; official code OSVAI/KernelWarehouse): the warehouse plan.

A KernelWarehouse layer splits its kernel ``[O, I/g, *k]`` into ``m`` cells of one shape
``[Oc, Ic, *kc]`` (``kc`` all ones with ``spatial_partition``) and computes every cell as a linear
mixture of the ``n`` cells of a *warehouse* shared by all layers whose names fall in one
``sharing_range``. Everything here is what the official ``Warehouse_Manager`` decides from the
layers' shapes alone — which warehouse each layer uses (``reserve``), the warehouses' cell shapes
and sizes (``store``), and each layer's cells, attention sizes and warm-up assignment
(``allocate``) — so the PyTorch reference and both Flax APIs build the same layers from one
:class:`WarehousePlan`. The architecture tables of the official models (:func:`resnet_convs`,
:func:`mobilenetv2_convs`), their configs (:data:`OFFICIAL_CONFIGS`) and the warm-up schedule
(:func:`warmup_temperature`) are here too. Plain Python: no jax, no torch, no numpy.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .mobilenetv2 import stage_settings
from .resnet import BLOCK_EXPANSION, stage_blocks

KW_CONV = "kernelwarehouse"
"""The conv type name (``conv='kernelwarehouse'``)."""
MIN_HIDDEN = 16
"""The official attention's smallest hidden width (``max(int(in * reduction), 16)``)."""
MIN_BASIS = 16
"""The official smallest basis size when ``nonlocal_basis_ratio < 1``."""
NORMALIZATION_EPS = 1e-3
"""Added to the sum of |attention| of each mixture before dividing by it."""
TEMP_EPOCH = 20
"""The official default of the warm-up length (``main.py --temp_epoch``); the MobileNetV2 configs use 15."""
TEMP_INIT_VALUE = 1.0
"""The official start value of the warm-up (``main.py --temp_init_value``)."""
KW_OPTIONS = (
    "cell_num_ratio",
    "cell_inplane_ratio",
    "cell_outplane_ratio",
    "sharing_range",
    "nonlocal_basis_ratio",
    "spatial_partition",
    "assignment_bias_init",
)
"""Warehouse-level options of a KernelWarehouse model (``conv_options`` of ``conv='kernelwarehouse'``; ``reduction``
is the models' own argument)."""

Ratio = Union[float, Tuple[float, ...]]


# --------------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class KWOptions:
    """The options of the official ``Warehouse_Manager`` (same names and defaults), and this project's
    ``assignment_bias_init`` (0: the official init).

    ``reduction``, ``cell_num_ratio``, ``cell_inplane_ratio``, ``cell_outplane_ratio`` and
    ``spatial_partition`` take one value for every warehouse or a sequence of one value per
    warehouse (in the order the warehouses are first reserved); ``nonlocal_basis_ratio`` is one
    number, as in the official code. ``sharing_range`` is a sequence of name prefixes; a string is
    taken as the official code takes it, character by character (the official configs'
    ``"layer_conv"`` groups the layers as ``('layer', 'conv')`` does).

    Attributes:
      reduction: attention hidden width ``max(int(in * reduction), 16)``.
      cell_num_ratio: warehouse cells / cells the warehouse's layers are split into (the budget:
        1/4×, 1/2×, 1×, 2×, 4×).
      cell_inplane_ratio: cell input channels / gcd of the warehouse's layers' input channels.
      cell_outplane_ratio: cell output channels / gcd of their output channels.
      sharing_range: name parts that are shared (``'stage1_layer2_conv0'`` with ``('layer', 'conv')``
        goes to warehouse ``'stage1_layer_conv'``).
      nonlocal_basis_ratio: below 1, the attention maps the other layers' cells through a basis of
        ``max(int(nonlocal * ratio), 16)`` values.
      spatial_partition: split kernels into cells along the kernel positions too (1×1 cells).
      assignment_bias_init: the initial attention logit of each mixture's warm-up cell: fc2's bias (with a
        basis, ``basis_bias``) starts at this value times the warm-up one-hots instead of the official zeros,
        so that as the warm-up weight tau falls to 0 the attention keeps pointing at those cells and the
        gradient stays near its tau = 1 size (docs/training.md, "KernelWarehouse on the digits: the initial assignment"). A number >= 0.
    """

    reduction: Ratio = 0.0625
    cell_num_ratio: Ratio = 1.0
    cell_inplane_ratio: Ratio = 1.0
    cell_outplane_ratio: Ratio = 1.0
    sharing_range: Union[str, Tuple[str, ...]] = ()
    nonlocal_basis_ratio: float = 1.0
    spatial_partition: Union[bool, Tuple[bool, ...]] = True
    assignment_bias_init: float = 0.0

    def __post_init__(self):
        for name in (
            "reduction",
            "cell_num_ratio",
            "cell_inplane_ratio",
            "cell_outplane_ratio",
            "spatial_partition",
            "sharing_range",
        ):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    def check(self, where: str) -> None:
        """Raise ``ValueError`` naming ``where`` and the option for a value the official code cannot use."""
        for name in ("reduction", "cell_num_ratio", "cell_inplane_ratio", "cell_outplane_ratio"):
            for v in _values(getattr(self, name)):
                if not _is_number(v) or not 0 < v < math.inf:
                    raise ValueError(
                        f"{where}: {name}={getattr(self, name)!r} must be a number > 0 or a "
                        f"sequence of them (one per warehouse)"
                    )
        if not _is_number(self.nonlocal_basis_ratio) or not 0 < self.nonlocal_basis_ratio < math.inf:
            raise ValueError(f"{where}: nonlocal_basis_ratio={self.nonlocal_basis_ratio!r} must be a number > 0")
        if not _is_number(self.assignment_bias_init) or not 0 <= self.assignment_bias_init < math.inf:
            raise ValueError(f"{where}: assignment_bias_init={self.assignment_bias_init!r} must be a number >= 0")
        if not all(isinstance(v, bool) for v in _values(self.spatial_partition)):
            raise ValueError(
                f"{where}: spatial_partition={self.spatial_partition!r} must be a bool or a sequence "
                f"of bools (one per warehouse)"
            )
        sharing = self.sharing_range
        if not isinstance(sharing, (str, tuple)) or not all(isinstance(s, str) for s in sharing):
            raise ValueError(
                f"{where}: sharing_range={sharing!r} must be a sequence of name parts (e.g. "
                f"('layer', 'conv')) or a string"
            )

    def per_warehouse(self, name: str, count: int, where: str) -> tuple:
        """The official ``parse``: option ``name`` as ``count`` values (one value repeated, or exactly ``count``)."""
        value = getattr(self, name)
        values = _values(value)
        if len(values) == 1:
            return values * count
        if len(values) != count:
            raise ValueError(
                f"{where}: {name}={value!r} gives {len(values)} values for {count} warehouses "
                f"(give one value, or one per warehouse)"
            )
        return values


def _values(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def kw_options(where: str, reduction=None, **options) -> KWOptions:
    """:class:`KWOptions` from a model's ``reduction`` (None: 1/16) and ``conv_options``, checked."""
    unknown = sorted(set(options) - set(KW_OPTIONS))
    if unknown:
        raise ValueError(f"{where}: {unknown} are not options of conv={KW_CONV!r}; expected some of {KW_OPTIONS}")
    result = KWOptions(**({} if reduction is None else {"reduction": reduction}), **options)
    result.check(where)
    return result


def fuse_warehouse_name(name: str, sharing_range: Union[str, Sequence[str]]) -> str:
    """The warehouse a layer named ``name`` belongs to: each ``_``-separated part that starts with a
    ``sharing_range`` entry becomes that entry (the last matching one, as the official code)."""
    parts = []
    for part in name.split("_"):
        for shared in sharing_range:
            if part.startswith(shared):
                part = shared
        parts.append(part)
    return "_".join(parts)


# --------------------------------------------------------------------------- the plan
@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One convolution of a model, as the official code reserves it.

    Attributes:
      path: PyTorch module path (``'layer1.0.conv1'``); the Flax path follows the conversion rule
        (``layer1_0/conv1``).
      in_channels, out_channels, kernel_size, groups: its geometry.
      warehouse_name: the name it is reserved under, or None for a static convolution (the
        official ``reserve(..., enabled=False)``).
    """

    path: str
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    groups: int = 1
    warehouse_name: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Warehouse:
    """One warehouse: ``num_cells`` cells of ``cell_shape = (Oc, Ic, *kc)`` (the PyTorch layout)."""

    name: str
    num_cells: int
    cell_shape: Tuple[int, ...]
    reduction: float
    cell_num_ratio: float


@dataclasses.dataclass(frozen=True)
class KWLayer:
    """One KernelWarehouse layer after allocation.

    Its kernel is ``groups_spatial * groups_out * groups_in`` mixtures (mixture index
    ``(s * groups_out + o) * groups_in + i``), each a mixture of the warehouse's ``num_cells`` cells;
    it owns cells ``[start_cell, end_cell)`` of its warehouse (initialised for it, and where the
    warm-up points).

    Attributes:
      spec: the reserved convolution.
      warehouse: index of its warehouse in :attr:`WarehousePlan.warehouses`.
      num_cells, cell_shape: its warehouse's.
      start_cell, end_cell: the cells allocated to it.
      groups_spatial, groups_out, groups_in: how many cells fit along the kernel positions, the output
        and the input channels.
      hidden: attention hidden width.
      num_local_cells, num_basis: with a basis map (``num_basis > 0``), fc2 gives ``num_local_cells +
        num_basis + 1`` values per mixture and fc3 maps the basis to the other layers' cells.
      assigned: per mixture, the cell (``num_cells`` = the zero cell) its warm-up one-hot selects.
      assignment_bias_init: :attr:`KWOptions.assignment_bias_init`.
    """

    spec: ConvSpec
    warehouse: int
    num_cells: int
    cell_shape: Tuple[int, ...]
    start_cell: int
    end_cell: int
    groups_spatial: int
    groups_out: int
    groups_in: int
    hidden: int
    num_local_cells: int
    num_basis: int
    assigned: Tuple[int, ...]
    assignment_bias_init: float = 0.0

    @property
    def num_mixtures(self) -> int:
        return self.groups_spatial * self.groups_out * self.groups_in

    @property
    def cells_per_mixture(self) -> int:
        """Attention values per mixture: the warehouse's cells and the zero cell."""
        return self.num_cells + 1

    @property
    def fc2_features(self) -> int:
        per_mixture = self.num_local_cells + self.num_basis + 1 if self.num_basis else self.cells_per_mixture
        return per_mixture * self.num_mixtures

    @property
    def num_nonlocal_cells(self) -> int:
        return self.num_cells - self.num_local_cells

    def temp_bias(self) -> List[float]:
        """The warm-up target, ``[num_mixtures * (num_cells + 1)]``: one 1 per mixture at its assigned cell."""
        out = [0.0] * (self.num_mixtures * self.cells_per_mixture)
        for m, cell in enumerate(self.assigned):
            out[m * self.cells_per_mixture + cell] = 1.0
        return out

    def initial_assignment_bias(self) -> List[float]:
        """The initial fc2 bias (with a basis: ``basis_bias``), ``[num_mixtures * (num_cells + 1)]``:
        :meth:`temp_bias` times ``assignment_bias_init`` (all zeros, the official init, by default)."""
        return [self.assignment_bias_init * t for t in self.temp_bias()]


@dataclasses.dataclass(frozen=True)
class WarehousePlan:
    """The warehouses and layers of one model (or one stand-alone layer).

    Attributes:
      options: the warehouse options.
      warehouses: in the order the official code creates them (first reservation).
      convs: every reserved convolution, in reservation (construction) order.
      module_order: their paths in module (registration) order, the order cells are allocated in.
      layers: ``(path, KWLayer)`` of the KernelWarehouse layers, in module order.
    """

    options: KWOptions
    warehouses: Tuple[Warehouse, ...]
    convs: Tuple[ConvSpec, ...]
    module_order: Tuple[str, ...]
    layers: Tuple[Tuple[str, KWLayer], ...]

    def entry(self, path: str, where: str = "WarehousePlan") -> Tuple[ConvSpec, Optional[KWLayer]]:
        """``(spec, layer)`` of the convolution at ``path`` (``layer`` None: a static convolution)."""
        for spec in self.convs:
            if spec.path == path:
                return spec, dict(self.layers).get(path)
        raise ValueError(
            f"{where}: no convolution {path!r} in the warehouse plan; it has {[s.path for s in self.convs]}"
        )

    def queue(self, order: str) -> "ConvQueue":
        """The convolutions in ``'reserve'`` or ``'module'`` order, for a model that builds them in that order."""
        paths = [s.path for s in self.convs] if order == "reserve" else list(self.module_order)
        return ConvQueue(self, paths)


class ConvQueue:
    """Hands out a plan's convolutions in a fixed order to a model that builds them in that order
    (PyTorch: reservation order; NNX: module order); every hand-out checks the geometry."""

    def __init__(self, plan: WarehousePlan, paths: Sequence[str]):
        self.plan = plan
        self._paths = list(paths)
        self._next = 0

    def take(
        self, in_channels: int, out_channels: int, kernel_size: Sequence[int], groups: int, where: str
    ) -> Tuple[ConvSpec, Optional[KWLayer]]:
        """The next convolution, which must have this geometry."""
        if self._next >= len(self._paths):
            raise ValueError(
                f"{where}: the model builds more convolutions than its warehouse plan holds ({len(self._paths)})"
            )
        spec, layer = self.plan.entry(self._paths[self._next], where)
        self._next += 1
        got = (in_channels, out_channels, tuple(kernel_size), groups)
        want = (spec.in_channels, spec.out_channels, tuple(spec.kernel_size), spec.groups)
        if got != want:
            raise ValueError(
                f"{where}: the convolution built as {spec.path!r} has (in, out, kernel, groups) "
                f"{got}, the warehouse plan {want}"
            )
        return spec, layer

    def finish(self, where: str) -> None:
        """Raise unless every convolution of the plan was handed out."""
        if self._next != len(self._paths):
            raise ValueError(
                f"{where}: {len(self._paths) - self._next} convolutions of the warehouse plan were "
                f"never built (from {self._paths[self._next]!r})"
            )


def plan_warehouses(
    convs: Sequence[ConvSpec],
    options: KWOptions = KWOptions(),
    module_order: Optional[Sequence[str]] = None,
    where: str = "KernelWarehouse",
) -> WarehousePlan:
    """The official ``reserve`` / ``store`` / ``allocate`` of ``convs`` (in reservation order; cells
    are allocated in ``module_order``, by default the same)."""
    options.check(where)
    convs = tuple(convs)
    module_order = tuple(module_order) if module_order is not None else tuple(s.path for s in convs)
    if sorted(module_order) != sorted(s.path for s in convs) or len(set(module_order)) != len(module_order):
        raise ValueError(f"{where}: module_order must name each convolution once")
    warehouses = store_warehouses(convs, options, where)
    index = {w.name: i for i, w in enumerate(warehouses)}
    by_path = {s.path: s for s in convs}
    ends = [0] * len(warehouses)
    layers = []
    for path in module_order:
        spec = by_path[path]
        if spec.warehouse_name is None:
            continue
        i = index[fuse_warehouse_name(spec.warehouse_name, options.sharing_range)]
        layer = _allocate(spec, i, warehouses[i], ends[i], options, where)
        ends[i] = layer.end_cell
        layers.append((path, layer))
    for end, warehouse in zip(ends, warehouses):
        if end != warehouse.num_cells:
            raise ValueError(
                f"{where}: warehouse {warehouse.name!r} has {warehouse.num_cells} cells but its layers "
                f"are allocated {end} (cell_num_ratio={warehouse.cell_num_ratio} does not divide the "
                f"layers' mixtures evenly; the official code asserts the same)"
            )
    return WarehousePlan(options, warehouses, convs, module_order, tuple(layers))


def _check_spec(spec: ConvSpec, where: str) -> None:
    ints = (spec.in_channels, spec.out_channels, spec.groups, *spec.kernel_size)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in ints) or not spec.kernel_size:
        raise ValueError(f"{where}: convolution {spec.path!r} has a bad geometry {spec}")
    if spec.in_channels % spec.groups or spec.out_channels % spec.groups:
        raise ValueError(
            f"{where}: convolution {spec.path!r}: groups={spec.groups} must divide "
            f"{spec.in_channels} input and {spec.out_channels} output channels"
        )


def store_warehouses(convs: Sequence[ConvSpec], options: KWOptions, where: str) -> Tuple[Warehouse, ...]:
    """The official ``store``: the warehouses of ``convs`` (reservation order) in the order they are first
    reserved, each with its cell shape (gcd of its layers' channels × the ratios) and size."""
    groups: Dict[str, List[ConvSpec]] = {}
    for spec in convs:
        _check_spec(spec, where)
        if spec.warehouse_name is not None:
            groups.setdefault(fuse_warehouse_name(spec.warehouse_name, options.sharing_range), []).append(spec)
    count = len(groups)
    per = {
        name: options.per_warehouse(name, count, where)
        for name in ("reduction", "cell_num_ratio", "cell_inplane_ratio", "cell_outplane_ratio", "spatial_partition")
    }
    out = []
    for i, (name, specs) in enumerate(groups.items()):
        kernel = specs[0].kernel_size
        if any(len(s.kernel_size) != len(kernel) for s in specs):
            raise ValueError(f"{where}: warehouse {name!r} mixes convolutions of different spatial ranks")
        if not per["spatial_partition"][i] and any(s.kernel_size != kernel for s in specs):
            raise ValueError(
                f"{where}: warehouse {name!r} without spatial_partition needs one kernel size, got "
                f"{sorted({s.kernel_size for s in specs})}"
            )
        out_gcd = math.gcd(*(s.out_channels for s in specs))
        in_gcd = math.gcd(*(s.in_channels // s.groups for s in specs))
        cell_in = max(int(in_gcd * per["cell_inplane_ratio"][i]), 1)
        cell_out = max(int(out_gcd * per["cell_outplane_ratio"][i]), 1)
        cell_kernel = (1,) * len(kernel) if per["spatial_partition"][i] else kernel
        mixtures = 0
        for s in specs:
            spatial = 1
            for k, kc in zip(s.kernel_size, cell_kernel):
                spatial = int(spatial * k // kc)
            mixtures += spatial * int(s.out_channels // cell_out * (s.in_channels // s.groups) // cell_in)
        size = max(int(mixtures * per["cell_num_ratio"][i]), 1)
        out.append(
            Warehouse(name, size, (cell_out, cell_in, *cell_kernel), per["reduction"][i], per["cell_num_ratio"][i])
        )
    return tuple(out)


def _allocate(spec: ConvSpec, index: int, warehouse: Warehouse, start: int, options: KWOptions, where: str) -> KWLayer:
    """The official ``init_attention``: the layer's mixtures, attention sizes and warm-up assignment."""
    cell_out, cell_in, *cell_kernel = warehouse.cell_shape
    groups_out = spec.out_channels // cell_out
    groups_in = spec.in_channels // cell_in // spec.groups
    groups_spatial = 1
    for k, kc in zip(spec.kernel_size, cell_kernel):
        groups_spatial = groups_spatial * k // kc
    if (
        groups_out * cell_out != spec.out_channels
        or groups_in * cell_in != spec.in_channels // spec.groups
        or groups_spatial * math.prod(cell_kernel) != math.prod(spec.kernel_size)
    ):
        raise ValueError(
            f"{where}: cells {warehouse.cell_shape} of warehouse {warehouse.name!r} do not tile the "
            f"kernel [{spec.out_channels}, {spec.in_channels // spec.groups}, *{spec.kernel_size}] of "
            f"{spec.path!r} (cell_inplane_ratio / cell_outplane_ratio must give divisors)"
        )
    mixtures = groups_spatial * groups_out * groups_in
    assigned, end = _warmup_assignment(mixtures, start, warehouse.num_cells, warehouse.cell_num_ratio)
    num_local = int(warehouse.cell_num_ratio * mixtures)
    num_basis = 0
    if options.nonlocal_basis_ratio < 1.0:
        num_basis = max(int((warehouse.num_cells - num_local) * options.nonlocal_basis_ratio), MIN_BASIS)
    return KWLayer(
        spec,
        index,
        warehouse.num_cells,
        warehouse.cell_shape,
        start,
        end,
        groups_spatial,
        groups_out,
        groups_in,
        max(int(spec.in_channels * warehouse.reduction), MIN_HIDDEN),
        num_local,
        num_basis,
        tuple(assigned),
        float(options.assignment_bias_init),
    )


def _warmup_assignment(mixtures: int, start: int, num_cells: int, ratio: float) -> Tuple[List[int], int]:
    """The official ``init_temperature``: each mixture's warm-up cell, and the first cell after the layer's.

    With ``ratio >= 1`` mixture ``m`` points at cell ``start + m * int(ratio)``; below 1 only every
    ``1/ratio``-th mixture (on the diagonal pattern of the official code) gets a cell of its own and
    the others point at the zero cell (index ``num_cells``).
    """
    assigned = []
    if ratio >= 1.0:
        step = int(ratio)
        for _ in range(mixtures):
            assigned.append(start)
            start += step
        return assigned, start
    per_cell = int(1.0 / ratio)
    for m in range(mixtures):
        if m % per_cell == (m // per_cell) % per_cell:
            assigned.append(start)
            start += 1
        else:
            assigned.append(num_cells)
    return assigned, start


def single_layer_plan(
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    groups: int = 1,
    options: KWOptions = KWOptions(),
    where: str = "KernelWarehouse",
) -> WarehousePlan:
    """The plan of one stand-alone layer with a warehouse of its own (path ``''``)."""
    spec = ConvSpec("", in_channels, out_channels, tuple(kernel_size), groups, "layer")
    return plan_warehouses((spec,), options, where=where)


# --------------------------------------------------------------------------- the official models
def resnet_convs(
    block: str, layers: Sequence[int], base_width: int = 64, in_channels: int = 3, stem: str = "imagenet"
) -> Tuple[Tuple[ConvSpec, ...], Tuple[str, ...]]:
    """``(convs in reservation order, paths in module order)`` of the official ``KW_ResNet``.

    The stem is static; in each block the convolutions are KernelWarehouse layers named
    ``stage{s}_layer{l}_conv{c}`` (the first block of a stage takes its ``conv1`` from the previous
    stage's warehouse, "handover"), except ResNet-50's first bottleneck ``conv1`` (stage -1: static);
    a downsample shortcut is a KernelWarehouse layer when strided, else static.
    """
    expansion = BLOCK_EXPANSION[block]
    stem_kernel = (7, 7) if stem == "imagenet" else (3, 3)
    reserve = [ConvSpec("conv1", in_channels, base_width, stem_kernel)]
    modules = ["conv1"]
    layer_idx = 0
    for stage, j, inplanes, planes, stride, downsample in stage_blocks(layers, base_width, expansion):
        prefix = f"layer{stage + 1}.{j}"
        block_convs = []
        if j == 0:  # the warehouse handover of the stage's first block
            first = stage - 1 if block == "bottleneck" else max(stage - 1, 0)
            names = [f"stage{first}_layer{layer_idx}_conv0"] + [f"stage{stage}_layer0_conv{c}" for c in (1, 2)]
            if downsample:
                reserve.append(
                    ConvSpec(
                        f"{prefix}.downsample.0",
                        inplanes,
                        planes * expansion,
                        (1, 1),
                        1,
                        f"stage{stage - 1}_layer{layer_idx + 1}_conv0" if stride != 1 else None,
                    )
                )
            static_first = first < 0
            layer_idx = 1
        else:
            names = [f"stage{stage}_layer{layer_idx}_conv{c}" for c in (0, 1, 2)]
            static_first = False
            layer_idx += 1
        if block == "bottleneck":
            widths = [(inplanes, planes, 1), (planes, planes, 3), (planes, planes * expansion, 1)]
        else:
            widths = [(inplanes, planes, 3), (planes, planes, 3)]
        for c, (cin, cout, k) in enumerate(widths):
            name = None if c == 0 and static_first else names[c]
            block_convs.append(ConvSpec(f"{prefix}.conv{c + 1}", cin, cout, (k, k), 1, name))
        reserve.extend(block_convs)
        modules.extend(s.path for s in block_convs)
        if downsample:
            modules.append(f"{prefix}.downsample.0")
    return tuple(reserve), tuple(modules)


def mobilenetv2_convs(
    width_mult: float = 1.0, stem: str = "imagenet", in_channels: int = 3
) -> Tuple[Tuple[ConvSpec, ...], Tuple[str, ...]]:
    """``(convs, paths)`` of the official ``KW_MobileNetV2`` (both orders are the module order).

    Every convolution is a KernelWarehouse layer: the stem ``stage0_conv0``, then per block
    ``stage{s}_layer{l}_{pwconv0, dwconv0, pwconv1}`` with the official stage grouping
    (1, 2, 3, 4, 5, 6, 6) and handover, and the last 1×1 ``stage6_layer{l}_pwconv1``.
    """
    channels, _, stages, last = stage_settings(width_mult, stem)
    convs = [ConvSpec("features.0.0", in_channels, channels, (3, 3), 1, "stage0_conv0")]
    kw_stage = (1, 2, 3, 4, 5, 6, 6)
    layer_idx, index = 0, 1
    for idx, (t, c, n, _) in enumerate(stages):
        for i in range(n):
            handover = i == 0 and idx > 0 and kw_stage[idx] != kw_stage[idx - 1]
            s = kw_stage[idx] - 1 if handover else kw_stage[idx]
            hidden = int(round(channels * t))
            prefix, sub = f"features.{index}.conv", 0
            if t != 1:
                convs.append(
                    ConvSpec(f"{prefix}.0.0", channels, hidden, (1, 1), 1, f"stage{s}_layer{layer_idx}_pwconv0")
                )
                sub = 1
            convs.append(
                ConvSpec(f"{prefix}.{sub}.0", hidden, hidden, (3, 3), hidden, f"stage{s}_layer{layer_idx}_dwconv0")
            )
            convs.append(ConvSpec(f"{prefix}.{sub + 1}", hidden, c, (1, 1), 1, f"stage{s}_layer{layer_idx}_pwconv1"))
            channels, index, layer_idx = c, index + 1, layer_idx + 1
            if handover:
                layer_idx = 0
    convs.append(
        ConvSpec(f"features.{index}.0", channels, last, (1, 1), 1, f"stage{kw_stage[-1]}_layer{layer_idx}_pwconv1")
    )
    return tuple(convs), tuple(s.path for s in convs)


DEFAULT_SHARING = {"resnet": ("layer", "conv"), "mobilenet_v2": ("layer", "pwconv")}
"""``sharing_range`` of the models when ``conv_options`` sets none: the official ``KW_ResNet``'s default, and for
MobileNetV2 (whose official default, None, does not run) the official 1× config's."""


def resnet_plan(
    block: str,
    layers: Sequence[int],
    base_width: int,
    in_channels: int,
    stem: str,
    reduction: Optional[float],
    conv_options,
    where: str = "ResNet",
) -> WarehousePlan:
    """The warehouse plan of a ResNet with ``conv='kernelwarehouse'`` (the official ``KW_ResNet``):
    :func:`resnet_convs` with the options of the model's ``reduction`` and ``conv_options``."""
    options = kw_options(where, reduction, **{"sharing_range": DEFAULT_SHARING["resnet"], **(conv_options or {})})
    convs, order = resnet_convs(block, layers, base_width, in_channels, stem)
    return plan_warehouses(convs, options, order, where)


def mobilenetv2_plan(
    width_mult: float, stem: str, in_channels: int, reduction: Optional[float], conv_options, where: str = "MobileNetV2"
) -> WarehousePlan:
    """The warehouse plan of a MobileNetV2 with ``conv='kernelwarehouse'`` (the official ``KW_MobileNetV2``)."""
    options = kw_options(where, reduction, **{"sharing_range": DEFAULT_SHARING["mobilenet_v2"], **(conv_options or {})})
    convs, order = mobilenetv2_convs(width_mult, stem, in_channels)
    return plan_warehouses(convs, options, order, where)


OFFICIAL_CONFIGS: Dict[str, Dict[str, object]] = {
    "kw1d4x_resnet18": dict(
        model="kw_resnet18",
        reduction=0.0625,
        cell_num_ratio=0.25,
        cell_inplane_ratio=0.5,
        cell_outplane_ratio=0.5,
        sharing_range="layer_conv",
        drop_path=0.0,
        dropout=0.0,
        temp_epoch=TEMP_EPOCH,
    ),
    "kw1d2x_resnet18": dict(
        model="kw_resnet18",
        reduction=0.0625,
        cell_num_ratio=0.5,
        cell_inplane_ratio=0.5,
        cell_outplane_ratio=0.5,
        sharing_range="layer_conv",
        drop_path=0.0,
        dropout=0.0,
        temp_epoch=TEMP_EPOCH,
    ),
    "kw1x_resnet18": dict(
        model="kw_resnet18",
        reduction=0.0625,
        cell_num_ratio=1.0,
        cell_inplane_ratio=1.0,
        cell_outplane_ratio=1.0,
        sharing_range="layer_conv",
        drop_path=0.1,
        dropout=0.0,
        temp_epoch=TEMP_EPOCH,
    ),
    "kw2x_resnet18": dict(
        model="kw_resnet18",
        reduction=0.0625,
        cell_num_ratio=2.0,
        cell_inplane_ratio=1.0,
        cell_outplane_ratio=1.0,
        sharing_range="layer_conv",
        drop_path=0.1,
        dropout=0.0,
        temp_epoch=TEMP_EPOCH,
    ),
    "kw4x_resnet18": dict(
        model="kw_resnet18",
        reduction=0.0625,
        cell_num_ratio=4.0,
        cell_inplane_ratio=1.0,
        cell_outplane_ratio=1.0,
        sharing_range="layer_conv",
        drop_path=0.1,
        dropout=0.0,
        temp_epoch=TEMP_EPOCH,
    ),
    "kw1d2x_resnet50": dict(
        model="kw_resnet50",
        reduction=0.0625,
        cell_num_ratio=0.5,
        cell_inplane_ratio=0.5,
        cell_outplane_ratio=0.5,
        sharing_range="layer_conv",
        nonlocal_basis_ratio=0.0625,
        drop_path=0.1,
        dropout=0.0,
        temp_epoch=TEMP_EPOCH,
    ),
    "kw1x_resnet50": dict(
        model="kw_resnet50",
        reduction=0.0625,
        cell_num_ratio=1.0,
        cell_inplane_ratio=1.0,
        cell_outplane_ratio=1.0,
        sharing_range="layer_conv",
        drop_path=0.1,
        dropout=0.0,
        temp_epoch=TEMP_EPOCH,
    ),
    "kw4x_resnet50": dict(
        model="kw_resnet50",
        reduction=0.0625,
        cell_num_ratio=4.0,
        cell_inplane_ratio=1.0,
        cell_outplane_ratio=1.0,
        sharing_range="layer_conv",
        drop_path=0.1,
        dropout=0.0,
        temp_epoch=TEMP_EPOCH,
    ),
    "kw1x_mobilenetv2_050": dict(
        model="kw_mobilenetv2_050",
        cell_num_ratio=1.0,
        cell_inplane_ratio=1.0,
        cell_outplane_ratio=1.0,
        sharing_range=("layer", "pwconv"),
        drop_path=0.0,
        dropout=0.0,
        temp_epoch=15,
    ),
    "kw4x_mobilenetv2_050": dict(
        model="kw_mobilenetv2_050",
        cell_num_ratio=4.0,
        cell_inplane_ratio=1.0,
        cell_outplane_ratio=1.0,
        sharing_range=("layer",),
        drop_path=0.0,
        dropout=0.0,
        temp_epoch=15,
    ),
    "kw1x_mobilenetv2_100": dict(
        model="kw_mobilenetv2_100",
        cell_num_ratio=1.0,
        cell_inplane_ratio=1.0,
        cell_outplane_ratio=1.0,
        sharing_range=("layer", "pwconv"),
        drop_path=0.0,
        dropout=0.0,
        temp_epoch=15,
    ),
    "kw4x_mobilenetv2_100": dict(
        model="kw_mobilenetv2_100",
        cell_num_ratio=4.0,
        cell_inplane_ratio=1.0,
        cell_outplane_ratio=1.0,
        sharing_range=("layer",),
        drop_path=0.0,
        dropout=0.0,
        temp_epoch=15,
    ),
}
"""The official configs (``configs/*/kw*.json`` of OSVAI/KernelWarehouse): the entry point, its KernelWarehouse
arguments, and the training-only values ``drop_path`` (stochastic depth), ``dropout`` (``main.py``'s default 0
where a config sets none) and ``temp_epoch`` (the warm-up length; ``main.py``'s default 20 where a config sets
none). The MobileNetV2 1/2× models are the separate ``kw1d2x_mobilenetv2_*`` entry points of the official code,
not configs of these."""
OFFICIAL_PARAMS: Dict[str, int] = {
    "kw1d4x_resnet18": 4_031_768,
    "kw1d2x_resnet18": 7_431_044,
    "kw1x_resnet18": 11_932_148,
    "kw2x_resnet18": 23_242_127,
    "kw4x_resnet18": 45_862_085,
    "kw1d2x_resnet50": 17_638_264,
    "kw1x_resnet50": 28_052_310,
    "kw4x_resnet50": 102_015_144,
    "kw1x_mobilenetv2_050": 2_854_522,
    "kw4x_mobilenetv2_050": 4_648_587,
    "kw1x_mobilenetv2_100": 5_168_146,
    "kw4x_mobilenetv2_100": 11_379_382,
}
"""Parameters of the official models (num_classes=1000), measured from the official definitions."""


def config_model_args(config: str) -> Tuple[str, Dict[str, object]]:
    """``(entry point, its KernelWarehouse arguments)`` of an official config (a key of :data:`OFFICIAL_CONFIGS`)."""
    if config not in OFFICIAL_CONFIGS:
        raise ValueError(f"unknown KernelWarehouse config {config!r}; expected one of {sorted(OFFICIAL_CONFIGS)}")
    args = dict(OFFICIAL_CONFIGS[config])
    model = args.pop("model")
    for training_only in ("drop_path", "dropout", "temp_epoch"):
        args.pop(training_only)
    return model, args


def warmup_temperature(
    iteration: int,
    epoch: int,
    iters_per_epoch: int,
    temp_epoch: int = TEMP_EPOCH,
    temp_init_value: float = TEMP_INIT_VALUE,
    temp_end: float = 0.0,
) -> float:
    """The official warm-up (``engine.get_temperature``): τ falls linearly from ``temp_init_value`` to
    ``temp_end`` over the first ``temp_epoch`` epochs; the official loop calls it with the 1-based
    ``iteration`` of the step within ``epoch``, before the step."""
    total = iters_per_epoch * temp_epoch
    current = iters_per_epoch * epoch + iteration
    return temp_end + max(0.0, (temp_init_value - temp_end) * ((total - current) / max(1.0, total)))
