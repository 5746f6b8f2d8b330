"""The parity case registry: which PyTorch reference is compared with which Flax twin.

A :class:`Case` names one configuration. The harness (:mod:`parity.harness`) builds both
sides, converts the PyTorch weights into the Flax template with
:func:`dynconv_jax.convert.torch_to_flax`, and compares forward passes, running statistics,
gradients and SGD trajectories. Case format (for modules that add cases, such as
``parity/efficientnet_cases.py``, which ``python -m parity`` imports when it exists)::

    from parity.cases import Case, register

    register(Case(
        name="efficientnet_cc/b0_4e-tiny",   # unique; '<family>/<config>'
        family="efficientnet_cc",            # selects with --families / --models
        make_torch=lambda: TorchModel(...),  # float32 torch.nn.Module (the harness casts it);
                                             # every dropout 0 (parity cannot share masks)
        make_flax=lambda dtype, precision: FlaxModel(..., dtype=dtype, param_dtype=dtype,
                                                     precision=precision),
        input_shape=(2, 3, 32, 32),          # NCHW; the Flax side gets NHWC
        temperature=None,                    # passed as apply(temperature=) / set_temperature
        quick=True,                          # part of --quick and of the pytest subset
    ))

The Flax module is called as ``apply(variables, x, train=..., temperature=...)`` (DESIGN.md);
``temperature`` is only passed when the case sets one. Importing this module imports neither
torch model code nor Flax model code: factories run only when a case is run.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from dynconv_spec import CONV_MODELS, CONV_TYPES, KW_CONV

CHECKS = ("checkpoint", "forward_eval", "forward_train", "running_stats", "grad_input", "grad_params", "sgd", "adamw")
#: The checks a case runs unless it names its own (``adamw`` runs where a case asks for it).
CASE_CHECKS = tuple(c for c in CHECKS if c != "adamw")


@dataclasses.dataclass(frozen=True)
class Case:
    """One PyTorch-vs-Flax configuration (see the module docstring for the format)."""

    name: str
    family: str
    make_torch: Callable[[], Any]
    make_flax: Callable[[Any, Any], Any]
    input_shape: Tuple[int, ...]
    temperature: Optional[float] = None
    quick: bool = False
    checks: Tuple[str, ...] = CASE_CHECKS
    #: Per-dtype overrides of the harness tolerances, e.g. ``{"float64": {"grad": 1e-10}}``
    #: (kinds: forward, grad, train); used by model cases, whose train-mode BatchNorms amplify
    #: rounding (the measured reason is in docs/conversion_parity.md).
    tolerances: Optional[Dict[str, Dict[str, float]]] = None
    #: SGD learning rate of the ``sgd`` check (default: the harness's SGDConfig.lr).
    sgd_lr: Optional[float] = None
    #: Optimizer steps of the training checks (``--steps`` overrides it).
    train_steps: int = 20
    #: At most this many training steps per dtype, e.g. ``{"float32": 1}``.
    train_max_steps: Optional[Dict[str, int]] = None
    #: Training data: None draws a fresh random batch every step; n cycles through n fixed batches
    #: (n = 1: full-batch training on one batch, which converges; model cases, see
    #: docs/conversion_parity.md, "Whole training runs").
    train_batches: Optional[int] = None
    #: The dtypes this case runs in the default ``python -m parity`` run (``--full`` runs every dtype;
    #: ``()``: only with ``--full``).
    default: Tuple[str, ...] = ("float64", "float32")

    def __post_init__(self):
        unknown = set(self.checks) - set(CHECKS)
        if unknown:
            raise ValueError(f"case {self.name!r}: unknown checks {sorted(unknown)}; expected a subset of {CHECKS}")


CASES: Dict[str, Case] = {}
#: Modules that register further cases when present (owned by other engineers).
EXTENSIONS = ("parity.efficientnet_cases",)


def load_extensions() -> List[str]:
    """Import the optional case modules that exist; returns the names imported."""
    loaded = []
    for name in EXTENSIONS:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
            loaded.append(name)
    return loaded


def register(case: Case) -> Case:
    """Add ``case`` to the registry (names are unique)."""
    if case.name in CASES:
        raise ValueError(f"parity case {case.name!r} is registered twice")
    CASES[case.name] = case
    return case


def select(
    families: Optional[Iterable[str]] = None, quick: bool = False, match: Optional[str] = None, full: bool = True
) -> List[Case]:
    """Registered cases, filtered by family, the quick flag, a substring of the name and, unless
    ``full``, by being part of the default run (a non-empty ``default``)."""
    families = None if families is None else set(families)
    return [
        c
        for c in CASES.values()
        if (families is None or c.family in families)
        and (c.quick or not quick)
        and (full or c.default)
        and (match is None or match in c.name)
    ]


# ----------------------------------------------------------------------------- layers

LAYER_FAMILIES = ("condconv", "dynamic", "odconv", KW_CONV)


def _flax_padding(padding):
    """PyTorch ``padding`` (int or 'same'/'valid') as the Flax layers take it."""
    return padding.upper() if isinstance(padding, str) else padding


def layer_case(
    family: str,
    in_ch: int,
    out_ch: int,
    k: int,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    experts=4,
    bias=None,
    temperature=None,
    strategy="auto",
    size=7,
    batch=3,
    quick=False,
    attention_norm="batch",
    tag="",
    default=("float64", "float32"),
) -> Case:
    """A CondConv / DynamicConv / ODConv layer case: ``dynconv_torch`` layer vs ``dynconv_jax`` layer
    (``attention_norm``: ODConv's, see :class:`dynconv_jax.ODConv`)."""
    if attention_norm != "batch" and family != "odconv":
        raise ValueError(f"layer_case: attention_norm={attention_norm!r} is an ODConv option, not {family}'s")
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def make_torch():
        import dynconv_torch as dt

        if family == "condconv":
            return dt.CondConv2d(in_ch, out_ch, k, num_experts=experts, bias=bool(bias), routing_dropout=0.0, **conv)
        if family == "dynamic":
            return dt.DynamicConv2d(in_ch, out_ch, k, num_experts=experts, bias=bias is not False, **conv)
        return dt.ODConv2d(in_ch, out_ch, k, num_experts=experts, attention_norm=attention_norm, **conv)

    def make_flax(dtype, precision):
        import dynconv_jax as dj

        kw = dict(
            features=out_ch,
            kernel_size=(k, k),
            strides=stride,
            padding=_flax_padding(padding),
            kernel_dilation=dilation,
            feature_group_count=groups,
            num_experts=experts,
            strategy=strategy,
            dtype=dtype,
            param_dtype=dtype,
            precision=precision,
        )
        if family == "condconv":
            return dj.CondConv(use_bias=bool(bias), routing_dropout=0.0, **kw)
        if family == "dynamic":
            return dj.DynamicConv(use_bias=bias is not False, **kw)
        return dj.ODConv(attention_norm=attention_norm, **kw)

    desc = f"i{in_ch}o{out_ch}k{k}s{stride}p{padding}d{dilation}g{groups}K{experts}"
    if bias is not None:
        desc += f"-bias{int(bias)}"
    if temperature is not None:
        desc += f"-T{temperature:g}"
    if strategy != "auto":
        desc += f"-{strategy}"
    if attention_norm != "batch":
        desc += f"-{attention_norm}norm"
    if batch != 3:
        desc += f"-B{batch}"
    return Case(
        name=f"{family}/{desc}{tag}",
        family=family,
        make_torch=make_torch,
        make_flax=make_flax,
        input_shape=(batch, in_ch, size, size),
        temperature=temperature,
        quick=quick,
        default=tuple(default),
    )


#: ``Case.default`` values: both dtypes, float64 only, only with ``--full``.
BOTH, FLOAT64, FULL_ONLY = ("float64", "float32"), ("float64",), ()
#: The layer grid: (kwargs, quick, default). Covers stride, padding modes, dilation, groups, depthwise,
#: 1x1 kernels (ODConv's spatial skip), a single expert (its kernel-attention skip), bias on/off
#: and a temperature. The default run takes the quick cases in both dtypes and the asymmetric
#: padding of an even kernel in float64 (the time budget: docs/conversion_parity.md).
LAYER_GRID = (
    (dict(in_ch=8, out_ch=16, k=3, padding=1), True, BOTH),
    (dict(in_ch=8, out_ch=12, k=3, stride=2, padding=1, groups=2, temperature=3.0), True, BOTH),
    (dict(in_ch=8, out_ch=8, k=3, padding=1, groups=8), True, BOTH),  # depthwise (ODConv: no filter attention)
    (dict(in_ch=6, out_ch=10, k=1), False, FULL_ONLY),  # 1x1 (ODConv: no spatial attention)
    (dict(in_ch=8, out_ch=8, k=3, padding=2, dilation=2, experts=1), False, FULL_ONLY),
    (dict(in_ch=5, out_ch=7, k=3, padding="same", experts=2), False, FULL_ONLY),
    (dict(in_ch=8, out_ch=16, k=5, stride=2, padding="valid", experts=3), False, FULL_ONLY),
    (dict(in_ch=4, out_ch=6, k=1, experts=1), False, FULL_ONLY),  # ODConv's plain-conv fast path
    (dict(in_ch=6, out_ch=8, k=4, padding="same", experts=2), False, FLOAT64),  # even kernel: 'same' pads (1, 2)
)


def kw_layer_case(
    in_ch: int,
    out_ch: int,
    k: int,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    bias=False,
    temperature=None,
    strategy="auto",
    rank=2,
    size=7,
    batch=3,
    quick=False,
    default=("float64", "float32"),
    **options,
) -> Case:
    """A KernelWarehouse layer case: ``dynconv_torch.KWConv{rank}d`` (a warehouse of its own, ``options`` of
    :class:`dynconv_spec.kernelwarehouse.KWOptions`) vs ``dynconv_jax.KWConv``; ``temperature`` is the
    warm-up weight tau."""
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def make_torch():
        import dynconv_torch as dt

        return (dt.KWConv1d, dt.KWConv2d, dt.KWConv3d)[rank - 1](in_ch, out_ch, k, bias=bias, **conv, **options)

    def make_flax(dtype, precision):
        import dynconv_jax as dj

        return dj.KWConv(
            out_ch,
            (k,) * rank,
            strides=stride,
            padding=_flax_padding(padding),
            kernel_dilation=dilation,
            feature_group_count=groups,
            use_bias=bias,
            strategy=strategy,
            dtype=dtype,
            param_dtype=dtype,
            precision=precision,
            **options,
        )

    desc = f"i{in_ch}o{out_ch}k{k}s{stride}p{padding}d{dilation}g{groups}" + (f"-{rank}d" if rank != 2 else "")
    desc += "".join(
        f"-{name}{value:g}" if not isinstance(value, bool) else f"-{name}{int(value)}"
        for name, value in sorted(options.items())
    )
    if bias:
        desc += "-bias1"
    if temperature is not None:
        desc += f"-T{temperature:g}"
    if strategy != "auto":
        desc += f"-{strategy}"
    return Case(
        name=f"{KW_CONV}/{desc}",
        family=KW_CONV,
        make_torch=make_torch,
        make_flax=make_flax,
        input_shape=(batch, in_ch, *(size,) * rank),
        temperature=temperature,
        quick=quick,
        default=tuple(default),
    )


#: The KernelWarehouse layer grid: (kwargs, quick, default). Budgets 1×, 4×, 1/2× (the diagonal warm-up
#: assignment), a depthwise layer with split cells (go = gi = 2, so a cell-order bug keeps its shapes),
#: tau 0.3 (the warm-up blend, where swapped weights would differ), 1-D, 3-D, whole-kernel cells
#: (spatial_partition=False) and a bias; every strategy with --full.
KW_LAYER_GRID = (
    (
        dict(in_ch=8, out_ch=8, k=3, padding=1, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5, temperature=0.3),
        True,
        BOTH,
    ),
    (dict(in_ch=8, out_ch=12, k=3, stride=2, padding=1, groups=2, cell_num_ratio=4.0, temperature=0.7), True, BOTH),
    (
        dict(in_ch=8, out_ch=8, k=3, padding=1, groups=8, cell_num_ratio=0.5, cell_outplane_ratio=0.5, bias=True),
        True,
        BOTH,
    ),
    (dict(in_ch=6, out_ch=10, k=1, cell_num_ratio=2.0), False, FULL_ONLY),
    (dict(in_ch=8, out_ch=8, k=3, padding=2, dilation=2, spatial_partition=False, temperature=0.5), False, FULL_ONLY),
    (dict(in_ch=6, out_ch=8, k=3, padding=1, rank=1, size=9, temperature=0.5), False, FLOAT64),
    (
        dict(in_ch=4, out_ch=8, k=3, stride=2, padding=1, rank=3, size=5, cell_num_ratio=2.0, temperature=0.5),
        False,
        FLOAT64,
    ),
)


def _register_kw_layers(strategies):
    for kwargs, quick, default in KW_LAYER_GRID:
        register(kw_layer_case(quick=quick, default=default, **kwargs))
    for strategy in strategies:
        if strategy == "pointwise":
            register(kw_layer_case(6, 10, 1, stride=2, strategy=strategy, temperature=0.5, default=FULL_ONLY))
        elif strategy != "vmap":  # 'mix' needs an ungrouped layer
            register(
                kw_layer_case(
                    8,
                    16,
                    3,
                    stride=2,
                    padding=1,
                    groups=1 if strategy == "mix" else 2,
                    strategy=strategy,
                    temperature=0.5,
                    default=FULL_ONLY,
                )
            )


def _register_layers():
    from dynconv_jax.ops import STRATEGIES  # the exact per-sample conv strategies

    _register_kw_layers(STRATEGIES)
    for family in LAYER_FAMILIES[:-1]:
        for kwargs, quick, default in LAYER_GRID:
            register(layer_case(family, quick=quick, default=default, **kwargs))
        if family == "odconv":  # the attention LayerNorm / no normalisation, on a training batch of one
            for norm in ("layer", "none"):
                register(
                    layer_case(
                        family,
                        8,
                        12,
                        3,
                        stride=2,
                        padding=1,
                        groups=2,
                        temperature=3.0,
                        batch=1,
                        attention_norm=norm,
                        default=FLOAT64,
                    )
                )
        bias = {"condconv": True, "dynamic": False}.get(family)
        if bias is not None:
            register(layer_case(family, 8, 16, 3, padding=1, bias=bias, default=FULL_ONLY))
        for strategy in STRATEGIES:  # every strategy must equal the PyTorch reference too (--full)
            if strategy == "pointwise":  # 1x1 kernels only
                register(layer_case(family, 6, 10, 1, stride=2, strategy=strategy, default=FULL_ONLY))
            elif strategy != "vmap":
                register(
                    layer_case(family, 8, 16, 3, stride=2, padding=1, groups=2, strategy=strategy, default=FULL_ONLY)
                )


# ----------------------------------------------------------------------------- models

#: The conv-selectable models of the registry (dynconv_spec.CONV_MODELS) but ResNet-101, whose
#: blocks are ResNet-50's (only the stage depth differs) at twice the depth and cost.
MODEL_FAMILIES = tuple(name for name in CONV_MODELS if name != "resnet101")
#: Model tolerances (relative, see parity.harness) where they differ from the layer ones: a deep
#: network of train-mode BatchNorms (and ODConv's attention BatchNorm over the batch only)
#: amplifies rounding; these bounds are a small multiple of the worst measured torch-vs-JAX error
#: (docs/conversion_parity.md). float32 rows also pass below FLOAT32_NOISE_FACTOR x their noise floor.
MODEL_TOLERANCES = {
    "float64": {"forward": 1e-11, "grad": 1e-9, "train": 1e-9},
    "float32": {"forward": 1e-4, "grad": 2e-3, "train": 2e-2},
}
#: Whole training runs (docs/conversion_parity.md, "Whole training runs"): 100 steps of SGD
#: (momentum 0.9, weight decay 1e-2) at lr 1e-4 on one fixed batch (full-batch training, which
#: converges). With a fresh random batch every step, or at lr 1e-3, the tiny full-depth models train
#: chaotically: a tiny change of the weights grows to O(1) in PyTorch alone (measured with
#: ``python -m parity.sensitivity``, docs/conversion_parity.md), so no port could match a trajectory there.
MODEL_TRAIN = dict(sgd_lr=1e-4, train_steps=100, train_batches=1)
#: Attention temperature of the model cases. ODConv runs at T = 30 (the initial temperature of
#: the annealing schedule): in train mode each ODConv's attention BatchNorm normalizes [B, A]
#: pooled features over the batch only, which amplifies rounding, and at lower T that compounds
#: over the layers (measured in docs/conversion_parity.md). KernelWarehouse's is its warm-up
#: weight tau in [0, 1]: 0.3 mixes the attention and the one-hot warm-up target.
MODEL_TEMPERATURE = {"static": None, "condconv": 2.0, "dynamic": 2.0, "odconv": 30.0, KW_CONV: 0.3}
#: Tiny sizes: the full depth of each architecture, narrow channels, CIFAR stem, 16x16 inputs.
MODEL_SIZE = {
    "resnet18": dict(base_width=8),
    "resnet34": dict(base_width=8),
    "resnet50": dict(base_width=8),
    "mobilenet_v2": dict(width_mult=0.25),
}


def model_case(
    family: str,
    conv: str,
    *,
    num_experts=4,
    stem="cifar",
    temperature=None,
    size=16,
    batch=8,
    quick=False,
    default=("float64", "float32"),
    checks=CASE_CHECKS,
    train=None,
    **extra,
) -> Case:
    """A whole-model case: ``dynconv_torch.models.<family>`` vs ``dynconv_jax.models.<family>``
    (dropout 0, 10 classes), trained as ``train`` (default :data:`MODEL_TRAIN`)."""
    kwargs = dict(
        conv=conv,
        num_experts=num_experts,
        num_classes=10,
        stem=stem,
        dropout=0.0,
        **{**MODEL_SIZE.get(family, {}), **extra},
    )

    def make_torch():
        import dynconv_torch.models as tm

        return tm.create_model(family, **kwargs)

    def make_flax(dtype, precision):
        import dynconv_jax.models as jm

        return jm.create_model(family, dtype=dtype, param_dtype=dtype, precision=precision, **kwargs)

    named = dict(extra)
    named.update(named.pop("conv_options", {}))
    desc = "-".join(f"{k}{v}" for k, v in sorted(named.items()))
    experts = "" if conv == KW_CONV else f"-K{num_experts}"  # KernelWarehouse has no experts
    name = (
        f"{family}/{conv}{experts}-{stem}"
        + (f"-{desc}" if desc else "")
        + (f"-T{temperature:g}" if temperature is not None else "")
    )
    return Case(
        name=name,
        family=family,
        make_torch=make_torch,
        make_flax=make_flax,
        input_shape=(batch, 3, size, size),
        temperature=temperature,
        quick=quick,
        default=tuple(default),
        checks=tuple(checks),
        tolerances=MODEL_TOLERANCES,
        **(MODEL_TRAIN if train is None else train),
    )


#: The model case of the default run (float64: 100 SGD and 100 AdamW steps); its float32 rows and every
#: other model case run with --full (both dtypes; docs/conversion_parity.md, "What the default run proves",
#: measures the time each costs).
DEFAULT_MODEL = ("resnet18", "odconv")


def _register_models():
    for family in MODEL_FAMILIES:
        for conv in CONV_TYPES:
            flagship = (family, conv) == DEFAULT_MODEL
            register(
                model_case(
                    family,
                    conv,
                    quick=family in ("resnet18", "mobilenet_v2"),
                    temperature=MODEL_TEMPERATURE[conv],
                    checks=CHECKS if flagship else CASE_CHECKS,
                    default=FLOAT64 if flagship else FULL_ONLY,
                )
            )
    # the ImageNet stem (7x7/2 conv + max-pool) once, with ODConv as the official models
    register(
        model_case(
            "resnet18", "odconv", stem="imagenet", size=32, temperature=MODEL_TEMPERATURE["odconv"], default=FULL_ONLY
        )
    )
    # KernelWarehouse at the official ResNet-50 1/2x config's options: split cells, the basis map
    register(
        model_case(
            "resnet50",
            KW_CONV,
            temperature=MODEL_TEMPERATURE[KW_CONV],
            default=FULL_ONLY,
            conv_options=dict(
                cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5, nonlocal_basis_ratio=0.0625
            ),
        )
    )


_register_layers()
_register_models()
