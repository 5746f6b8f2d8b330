"""Argument validation shared by the models of both frameworks.

Every check raises ``ValueError`` naming the model (``where``) and the argument, before any
layer is built, so a bad ``conv=`` or ``conv_options=`` fails the same way in PyTorch and JAX.
"""

from __future__ import annotations

import math
from typing import Any, Collection, Dict, Mapping, Optional, Sequence

CONV_TYPES = ("static", "condconv", "dynamic", "odconv", "kernelwarehouse")
"""The convolution a model's blocks use: ``conv='static'|'condconv'|'dynamic'|'odconv'|'kernelwarehouse'``."""
REDUCTION_TYPES = ("dynamic", "odconv", "kernelwarehouse")
"""Conv types with an attention reduction ratio (``reduction=``)."""
STEMS = ("imagenet", "cifar")
"""``stem='imagenet'`` (stride-4 stem of the ImageNet nets) or ``'cifar'`` (stride 1, for 32×32 inputs)."""
RESERVED_CONV_OPTIONS = frozenset(
    {
        "in_channels",
        "out_channels",
        "in_planes",
        "out_planes",
        "features",
        "in_features",
        "out_features",
        "kernel_size",
        "stride",
        "strides",
        "padding",
        "dilation",
        "kernel_dilation",
        "groups",
        "feature_group_count",
        "num_experts",
        "kernel_num",
        "reduction",
        "external_routing",
        "strategy",
        "dtype",
        "param_dtype",
        "precision",
        "name",
        "parent",
        "rngs",
    }
)
"""Layer arguments a model sets itself, in either framework's spelling: ``conv_options`` may not set them (shapes,
the expert count, the reduction, how the layer computes; ``external_routing`` because a ResNet or MobileNetV2
block has no routing to feed the layer)."""
OFFICIAL_ODCONV_SPELLINGS = {
    "in_planes": "in_channels",
    "out_planes": "out_channels",
    "kernel_num": "num_experts",
    "min_channel": "min_channels",
}
"""The official OSVAI/ODConv spelling of an argument -> this library's spelling (``nn.Conv2d``'s and timm's),
the one of every generic API (layers, models, ``conv_options``, tools) in both frameworks. The official
spellings are taken only where the official code is mirrored: ``dynconv_torch.ODConv2d`` and the
``od_*`` entry points (see :func:`one_spelling`)."""
ATTENTION_NORMS = ("batch", "layer", "none")
"""ODConv's attention normalisation (``attention_norm``): ``'batch'`` is the official BatchNorm (normalised over
the batch: a training batch needs >= 2 samples); ``'layer'`` a LayerNorm over the attention width A (per sample:
batch-1 training works); ``'none'`` no normalisation. Only ``'batch'`` has the official parameters
(docs/training.md)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_num_classes(num_classes: int, where: str, *, allow_zero: bool = False) -> None:
    """The classifier width: an int >= 1 (>= 0 with ``allow_zero``: 0 drops the classifier).

    Examples:
      >>> from dynconv_spec import check_num_classes
      >>> check_num_classes(0, "EfficientNet", allow_zero=True)   # 0: the pooled features, no classifier
      >>> check_num_classes(0, "resnet18")
      Traceback (most recent call last):
      ValueError: resnet18: num_classes=0 must be an int >= 1
    """
    low = 0 if allow_zero else 1
    if not _is_int(num_classes) or num_classes < low:
        raise ValueError(f"{where}: num_classes={num_classes!r} must be an int >= {low}")


def check_rate(value: float, name: str, where: str) -> None:
    """A dropout-like probability in [0, 1).

    Examples:
      >>> from dynconv_spec import check_rate
      >>> check_rate(0.2, "dropout", "resnet18")
      >>> check_rate(1.0, "dropout", "resnet18")
      Traceback (most recent call last):
      ValueError: resnet18: dropout=1.0 must be in [0, 1)
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{where}: {name}={value!r} must be in [0, 1)")


def one_spelling(where: str, official: str, official_value: Any, value: Any, default: Any = None) -> Any:
    """The argument given under its official ODConv name ``official`` or this library's name
    (:data:`OFFICIAL_ODCONV_SPELLINGS`), ``default`` if neither; a ``ValueError`` if both are given.

    Examples:
      >>> from dynconv_spec import one_spelling
      >>> one_spelling("od_resnet18", "kernel_num", 4, None)      # kernel_num=4 given
      4
      >>> one_spelling("od_resnet18", "kernel_num", None, None, 1)  # neither: the default
      1
      >>> one_spelling("od_resnet18", "kernel_num", 4, 4)
      Traceback (most recent call last):
      ...
      ValueError: od_resnet18: kernel_num=4 and num_experts=4 are two spellings of one argument ...
    """
    name = OFFICIAL_ODCONV_SPELLINGS[official]
    if official_value is not None and value is not None:
        raise ValueError(
            f"{where}: {official}={official_value!r} and {name}={value!r} are two spellings of one "
            f"argument ({official} is the official ODConv name, {name} this library's); give one"
        )
    if official_value is not None:
        return official_value
    return default if value is None else value


def check_conv_args(
    conv: str,
    num_experts: int,
    reduction: Optional[float],
    conv_options: Optional[Mapping[str, Any]],
    where: str,
    accepted: Optional[Mapping[str, Collection[str]]] = None,
) -> Dict[str, Any]:
    """Validate the conv-type arguments of a model; returns ``conv_options`` as a new dict.

    Args:
      conv: one of :data:`CONV_TYPES`.
      num_experts: experts per dynamic layer, an int >= 1.
      reduction: attention reduction ratio in (0, 1], only for :data:`REDUCTION_TYPES`; None keeps
        the layer's default.
      conv_options: further keyword arguments of every dynamic layer; none with ``conv='static'``
        and none of :data:`RESERVED_CONV_OPTIONS`.
      where: the model's name, for the messages.
      accepted: the option names each dynamic conv type's layer takes in the calling framework
        (``{'condconv': {...}, ...}``); an option outside them is rejected here, by name, instead
        of as a ``TypeError`` from the first layer built.

    Examples:
      >>> from dynconv_spec import check_conv_args
      >>> check_conv_args("odconv", 4, 0.0625, {"attention_bn_init": 1.0}, "resnet18")
      {'attention_bn_init': 1.0}
      >>> check_conv_args("static", 4, None, {"kernel_size": 5}, "resnet18")
      Traceback (most recent call last):
      ValueError: resnet18: conv_options={'kernel_size': 5} given with conv='static' (they are dynamic-layer options)
    """
    if conv not in CONV_TYPES:
        raise ValueError(f"{where}: conv={conv!r} is not a conv type; expected one of {CONV_TYPES}")
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"{where}: num_experts={num_experts!r} must be a positive int")
    if reduction is not None:
        if conv not in REDUCTION_TYPES:
            raise ValueError(
                f"{where}: reduction={reduction!r} applies to conv in {REDUCTION_TYPES}, not conv={conv!r}"
            )
        if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or not 0.0 < reduction <= 1.0:
            raise ValueError(f"{where}: reduction={reduction!r} must be a number in (0, 1]")
    if conv_options is not None and not isinstance(conv_options, Mapping):
        raise ValueError(f"{where}: conv_options={conv_options!r} must be a mapping of layer options")
    options = dict(conv_options or {})
    if options and conv == "static":
        raise ValueError(f"{where}: conv_options={options} given with conv='static' (they are dynamic-layer options)")
    reserved = sorted(RESERVED_CONV_OPTIONS & set(options))
    if reserved:
        raise ValueError(
            f"{where}: conv_options may not set {reserved}; the model sets them "
            "(use num_experts=, reduction= and the model's own arguments)"
        )
    official = sorted(set(options) & set(OFFICIAL_ODCONV_SPELLINGS))
    if official:
        generic = [OFFICIAL_ODCONV_SPELLINGS[name] for name in official]
        raise ValueError(
            f"{where}: conv_options {official} use the official ODConv spelling, which only ODConv2d "
            f"and the od_* entry points take; the models take {generic}"
        )
    if accepted is not None and conv != "static":
        unknown = sorted(set(options) - set(accepted[conv]))
        if unknown:
            allowed = sorted(set(accepted[conv]) - RESERVED_CONV_OPTIONS)
            raise ValueError(
                f"{where}: conv_options {unknown} are not options of the conv={conv!r} layer; "
                f"expected some of {allowed}"
            )
    return options


def check_model_args(
    where: str,
    conv: str,
    num_experts: int,
    reduction: Optional[float],
    conv_options: Optional[Mapping[str, Any]],
    stem: str,
    dropout: float,
    num_classes: int,
    accepted: Optional[Mapping[str, Collection[str]]] = None,
) -> Dict[str, Any]:
    """Validate the arguments every conv-selectable model (ResNet, MobileNetV2) shares; returns ``conv_options``.

    Examples:
      >>> from dynconv_spec import check_model_args
      >>> check_model_args("resnet18", conv="dynamic", num_experts=4, reduction=None, conv_options=None,
      ...                  stem="cifar", dropout=0.1, num_classes=10)
      {}
    """
    options = check_conv_args(conv, num_experts, reduction, conv_options, where, accepted)
    check_num_classes(num_classes, where)
    if stem not in STEMS:
        raise ValueError(f"{where}: stem={stem!r}; expected one of {STEMS}")
    check_rate(dropout, "dropout", where)
    return options


def check_resnet_args(block: str, layers: Sequence[int], base_width: int) -> None:
    """Validate the ResNet architecture arguments (see :mod:`dynconv_spec.resnet`).

    Examples:
      >>> from dynconv_spec import check_resnet_args
      >>> check_resnet_args("basic", (2, 2, 2, 2), 64)
      >>> check_resnet_args("basic", (2, 2, 2), 64)
      Traceback (most recent call last):
      ValueError: ResNet: layers=(2, 2, 2) must give the blocks (ints >= 1) of 4 stages
    """
    from .resnet import BLOCK_EXPANSION

    if block not in BLOCK_EXPANSION:
        raise ValueError(f"ResNet: block={block!r}; expected one of {tuple(BLOCK_EXPANSION)}")
    if len(layers) != 4 or not all(_is_int(n) and n >= 1 for n in layers):
        raise ValueError(f"ResNet: layers={tuple(layers)} must give the blocks (ints >= 1) of 4 stages")
    if not _is_int(base_width) or base_width < 1:
        raise ValueError(f"ResNet: base_width={base_width!r} must be a positive int")


def check_width_mult(width_mult: float) -> None:
    """MobileNetV2's ``width_mult`` must be a positive number.

    Examples:
      >>> from dynconv_spec import check_width_mult
      >>> check_width_mult(0.5)
      >>> check_width_mult(0)
      Traceback (most recent call last):
      ValueError: MobileNetV2: width_mult=0 must be positive
    """
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not width_mult > 0:
        raise ValueError(f"MobileNetV2: width_mult={width_mult!r} must be positive")


def check_attention_norm(where: str, norm: str, bn_init: float) -> None:
    """ODConv's ``attention_norm`` must be one of :data:`ATTENTION_NORMS`; ``attention_bn_init`` (the
    initial scale of that normalisation) a finite number > 0.

    Examples:
      >>> from dynconv_spec import check_attention_norm
      >>> check_attention_norm("ODConv", "layer", 0.1)
      >>> check_attention_norm("ODConv", "group", 0.1)
      Traceback (most recent call last):
      ValueError: ODConv: attention_norm='group': expected one of ('batch', 'layer', 'none')
    """
    if norm not in ATTENTION_NORMS:
        raise ValueError(f"{where}: attention_norm={norm!r}: expected one of {ATTENTION_NORMS}")
    if isinstance(bn_init, bool) or not (isinstance(bn_init, (int, float)) and 0 < bn_init < math.inf):
        raise ValueError(
            f"{where}: attention_bn_init={bn_init!r} must be a finite number > 0 "
            "(the initial normalisation scale; 0 blocks every gradient through the relu)"
        )


# --------------------------------------------------------------------------- layer arguments
TEMPERATURE_FLOOR = 1e-6
"""The smallest attention temperature the layers of both frameworks use. A concrete T below it is refused (at
T = 1e-6 the attention is already hard routing, and a much smaller T rounds to 0 or overflows ``logits / T`` in
float32); a traced T (JAX, under ``jit``) cannot be checked, so one below the floor, or NaN, is raised to it."""
MAX_EXPERT_BANK_PARAMETERS = 2**31 - 1
"""The largest expert bank ``[K, *kernel, I/g, O]`` one layer may hold: 2**31 - 1 parameters (8 GiB in float32).
The largest bank of the registered models at K = 8 holds ~19 M; a count past the limit is a mistake
(``num_experts=10**9``) refused before anything is allocated, instead of an out-of-memory error from XLA or
PyTorch that names no layer."""


def check_temperature(temperature: Any, where: str) -> float:
    """A concrete attention temperature T as a float: a real number (not a bool), finite, and at least
    :data:`TEMPERATURE_FLOOR`. ``temperature`` is anything ``float()`` reads (a Python, NumPy, JAX or
    torch scalar); ``where`` names the layer.

    Examples:
      >>> from dynconv_spec import check_temperature
      >>> check_temperature(30, "ODConv 'conv1'")
      30.0
      >>> check_temperature(0.0, "ODConv 'conv1'")
      Traceback (most recent call last):
      ...
      ValueError: ODConv 'conv1': temperature=0.0 must be finite and > 0
    """
    dtype = str(getattr(temperature, "dtype", ""))  # NumPy, JAX and torch scalars have one
    if isinstance(temperature, bool) or dtype.endswith("bool"):
        raise ValueError(
            f"{where}: temperature={temperature!r} is a bool; pass a positive number (T = 1 is the default)"
        )
    try:
        if "complex" in dtype or isinstance(temperature, complex):
            raise TypeError
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: temperature={temperature!r} must be a positive number (a Python, NumPy or framework scalar)"
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where}: temperature={temperature!r} must be finite and > 0")
    if value < TEMPERATURE_FLOOR * (1 - 2**-8):  # the floor rounded to float32 or bfloat16 passes
        raise ValueError(
            f"{where}: temperature={temperature!r} is below {TEMPERATURE_FLOOR:g}, the smallest temperature the "
            f"layers support (dynconv_spec.TEMPERATURE_FLOOR): the attention is already hard routing there, and "
            f"a smaller T rounds to 0 or overflows logits / T in float32"
        )
    return value


def check_expert_bank(where: str, shape: Sequence[int]) -> None:
    """Refuse an expert bank of more than :data:`MAX_EXPERT_BANK_PARAMETERS` parameters, naming the layer.

    ``shape``: the bank's shape with the expert count K first (either framework's layout).

    Examples:
      >>> from dynconv_spec import check_expert_bank
      >>> check_expert_bank("CondConv 'conv1'", (4, 3, 3, 64, 64))          # 147,456 parameters: fine
      >>> check_expert_bank("CondConv 'conv1'", (10**9, 3, 3, 64, 64))
      Traceback (most recent call last):
      ...
      ValueError: CondConv 'conv1': the expert bank [1000000000, 3, 3, 64, 64] (num_experts=1000000000) ...
    """
    count = math.prod(shape)
    if count > MAX_EXPERT_BANK_PARAMETERS:
        raise ValueError(
            f"{where}: the expert bank {list(shape)} (num_experts={shape[0]}) would hold {count:.3g} parameters, "
            f"{count * 4 / 2**30:.3g} GiB in float32; one layer may hold at most 2**31 - 1 "
            f"(dynconv_spec.MAX_EXPERT_BANK_PARAMETERS). Is num_experts or a channel count a typo?"
        )
