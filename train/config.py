"""Training configuration: one frozen dataclass, kept apart from the code that uses it.

``Config()`` is the documented default run (a dynamic ResNet-18 on the embedded digits).
Override any field from the command line with ``--key=value`` (see :func:`parse_args`);
:meth:`Config.validate` rejects bad values with a message that names the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Optional, Sequence, Tuple

from dynconv_spec import ATTENTION_NORMS, CONV_MODELS, CONV_TYPES, KW_CONV

MODELS = CONV_MODELS  # the registered models that take conv= (dynconv_spec.registry)
CONVS = CONV_TYPES
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant", "step")
AUGMENTS = ("auto", "none", "crop", "crop_flip")
PREPROCESSES = ("auto", "imagenet", "cifar", "none")
STEMS = ("auto", "imagenet", "cifar")
DTYPES = ("float32", "bfloat16", "float64")


class UsageError(ValueError):
    """A bad option or an unusable combination of options / workdir state; printed without traceback."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of a training run. Defaults: the main command's digits run."""

    # Data (train/data.py).
    dataset: str = "digits"             # 'digits' (embedded), 'imagefolder' or a TFDS name with 'image' and 'label'
    data_dir: Optional[str] = None      # imagefolder: ROOT of ROOT/<split>/<class>/*.jpg; TFDS: its data_dir
    train_split: str = "train"
    eval_split: str = "test"
    preprocess: str = "auto"            # auto: cifar for digits and small fixed-size TFDS images, else imagenet
    image_size: Optional[int] = None    # imagenet preprocessing: output side (None: 224); others: native size
    augment: str = "auto"               # auto: crop for digits, crop_flip otherwise
    crop_padding: Optional[int] = None  # cifar preprocessing: None = 1 pixel for digits, 4 otherwise
    data_workers: int = 0               # grain worker processes decoding and augmenting (0: in this process)
    # Model (dynconv_jax.models).
    model: str = "resnet18"
    conv: str = "dynamic"              # default: DY-CNN (odconv compiles 2.5x slower on CPU)
    num_experts: int = 4
    stem: str = "auto"                  # auto: 'cifar' for images up to 64 px, else 'imagenet'
    base_width: int = 16                # ResNet width of the first stage (64 in the paper)
    width_mult: float = 1.0             # MobileNetV2 width multiplier
    dropout: Optional[float] = None     # dropout before the classifier (None: the model's default)
    attention_bn_init: Optional[float] = None  # odconv: initial attention-BN scale (None: layer's 0.1; official 1.0)
    attention_norm: str = "batch"       # odconv: 'batch' (the official BatchNorm) | 'layer' | 'none'
    # Optimisation.
    batch_size: int = 64                # global batch, split over all devices of all processes
    num_epochs: int = 15
    num_steps: Optional[int] = None     # when set, overrides num_epochs
    optimizer: str = "sgd"
    learning_rate: float = 0.05         # peak learning rate (after warmup)
    momentum: float = 0.9               # SGD momentum / AdamW beta1
    nesterov: bool = True
    beta2: float = 0.999                # AdamW
    weight_decay: float = 5e-4          # not applied to BatchNorm parameters and biases
    schedule: str = "cosine"            # step: x decay_factor at each of decay_epochs
    decay_epochs: Tuple[float, ...] = ()
    decay_factor: float = 0.1
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip_norm: Optional[float] = 5.0  # global-norm clipping (none: off)
    # Temperature annealing of the dynamic attentions (DY-CNN / ODConv: 30 -> 1 over 10 epochs).
    temp_init: float = 30.0
    temp_final: float = 1.0
    temp_epochs: float = 5.0
    # Numerics and randomness.
    dtype: str = "float32"              # 'bfloat16': bf16 compute, float32 parameters; 'float64' (enables x64)
    seed: int = 0
    # Outputs.
    workdir: Optional[str] = None       # None: runs/<dataset>-<model>-<conv>-<timestamp>
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 3
    resume: bool = False
    allow_restart: bool = False         # --resume may start from step 0 after every checkpoint was quarantined
    log_every_steps: int = 50
    progress: bool = True               # tqdm bar (off: plain log lines)
    tensorboard: bool = True
    export: bool = True                 # safetensors export + dynconv_torch agreement check
    # Parallelism.
    distributed: bool = False           # call jax.distributed.initialize() (multi-host)

    def validate(self) -> "Config":
        """Raise :class:`UsageError` naming the field for any value the run cannot use."""
        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                raise UsageError(f"--{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")

        def positive(name, allow_zero=False):
            value = getattr(self, name)
            if value is None:
                return
            if value < 0 or (value == 0 and not allow_zero):
                raise UsageError(f"--{name}={value!r}: must be {'>= 0' if allow_zero else '> 0'}")

        for f in dataclasses.fields(self):  # NaN/Inf would pass every range check below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"--{f.name}={value!r}: must be a finite number")
        for name, allowed in (("model", MODELS), ("conv", CONVS), ("optimizer", OPTIMIZERS),
                              ("schedule", SCHEDULES), ("augment", AUGMENTS), ("stem", STEMS),
                              ("preprocess", PREPROCESSES),
                              ("dtype", DTYPES)):
            choice(name, allowed)
        for name in ("num_experts", "base_width", "width_mult", "batch_size", "num_epochs", "num_steps",
                     "learning_rate", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps",
                     "temp_init", "temp_final", "grad_clip_norm", "image_size", "decay_factor",
                     "attention_bn_init"):
            positive(name)
        for name in ("weight_decay", "warmup_epochs", "temp_epochs", "crop_padding", "data_workers"):
            positive(name, allow_zero=True)
        choice("attention_norm", ATTENTION_NORMS)
        if self.conv == KW_CONV:
            raise UsageError(f"--conv={KW_CONV}: KernelWarehouse is not part of python -m train yet (its warm-up "
                             f"weight tau runs from 1 to 0 instead of a temperature, and its warehouse options have no "
                             f"flags); build it with dynconv_jax.models (conv='{KW_CONV}' or kw_resnet18, ...)")
        if self.schedule == "step" and not self.decay_epochs:
            raise UsageError("--schedule=step needs --decay_epochs=E1,E2,... (epochs at which the learning rate "
                             "is multiplied by --decay_factor)")
        if list(self.decay_epochs) != sorted(self.decay_epochs) or any(e <= 0 for e in self.decay_epochs):
            raise UsageError(f"--decay_epochs={','.join(map(str, self.decay_epochs))}: must be increasing and > 0")
        for name, unset in (("attention_bn_init", None), ("attention_norm", "batch")):
            if getattr(self, name) != unset and self.conv != "odconv":
                raise UsageError(f"--{name}={getattr(self, name)!r} applies to --conv=odconv only, "
                                 f"not --conv={self.conv}")
        if self.attention_norm == "none" and self.attention_bn_init is not None:
            raise UsageError(f"--attention_bn_init={self.attention_bn_init!r} sets the initial scale of the "
                             "attention normalisation; --attention_norm=none has none")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout={self.dropout!r}: must be in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"--label_smoothing={self.label_smoothing!r}: must be in [0, 1)")
        if not 0.0 <= self.momentum < 1.0 or not 0.0 <= self.beta2 < 1.0:
            raise UsageError(f"--momentum={self.momentum!r} / --beta2={self.beta2!r}: must be in [0, 1)")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _field_types() -> dict:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _parse_value(name: str, text: str, annotation):
    """Convert ``text`` to the field's type; 'none' gives None for Optional fields."""
    optional = typing.get_origin(annotation) is typing.Union and type(None) in typing.get_args(annotation)
    base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if typing.get_origin(base) is tuple:
            return tuple(float(v) for v in text.split(",") if v.strip())
        if base is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        return text
    except ValueError:
        kind = {bool: "true/false", int: "an integer", float: "a number"}.get(
            base, "comma-separated numbers" if typing.get_origin(base) is tuple else "a string")
        extra = " or none" if optional else ""
        raise UsageError(f"--{name}={text!r}: expected {kind}{extra}") from None


def parse_args(argv: Sequence[str], base: Optional[Config] = None) -> Config:
    """``['--batch_size=32', '--conv=dynamic', '--resume']`` -> validated :class:`Config`.

    A bare ``--flag`` sets a boolean field to True. ``--config=NAME`` starts from the preset
    ``train.presets.PRESETS[NAME]`` (wherever it appears; the other flags override it). Unknown
    keys and malformed values raise :class:`UsageError` with the offending argument.
    """
    types = _field_types()
    updates = {}
    presets = [arg for arg in argv if arg.startswith("--config=")]
    if len(presets) > 1:
        raise UsageError(f"--config given {len(presets)} times ({', '.join(presets)})")
    if presets:
        from train.presets import preset

        base = preset(presets[0].partition("=")[2], base)
    for arg in argv:
        if arg in presets:
            continue
        if not arg.startswith("--"):
            raise UsageError(f"argument {arg!r}: expected --key=value (see python -m train --help)")
        key, sep, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types:
            close = [k for k in types if k.startswith(key[:3])]
            hint = f" (did you mean {', '.join('--' + k for k in close)}?)" if close else ""
            raise UsageError(f"unknown option --{key}{hint}; see python -m train --help")
        if not sep:
            if types[key] is not bool:
                raise UsageError(f"--{key} needs a value: --{key}=...")
            value = "true"
        updates[key] = _parse_value(key, value, types[key])
    return dataclasses.replace(base or Config(), **updates).validate()


def usage() -> str:
    from train.presets import PRESETS

    lines = ["usage: python -m train [--config=PRESET] [--key=value ...]", "",
             f"presets (--config): {', '.join(sorted(PRESETS))}", "", "options (default):"]
    for f in dataclasses.fields(Config):
        lines.append(f"  --{f.name}={f.default!r}")
    return "\n".join(lines)


def from_json(text: str, source: str = "config.json") -> Config:
    """Inverse of :meth:`Config.to_json` (used to check a resumed run's configuration).

    Text that is not a JSON object of known fields raises :class:`UsageError` naming ``source``.
    """
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{source} is not valid JSON ({error}); it is not the configuration a "
                         f"`python -m train` run writes") from None
    if not isinstance(fields, dict):
        raise UsageError(f"{source} holds a JSON {type(fields).__name__}, expected an object of options")
    types = _field_types()
    unknown = sorted(set(fields) - set(types))
    if unknown:
        raise UsageError(f"{source} has unknown options {unknown} (written by another version of dynconv?)")
    return Config(**{k: tuple(v) if typing.get_origin(types[k]) is tuple else v for k, v in fields.items()})
