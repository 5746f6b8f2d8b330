"""Training configuration: one frozen dataclass, kept apart from the code that uses it.

``Config()`` is the documented default run (a dynamic ResNet-18 on the embedded digits).
Override any field from the command line with ``--key=value`` (see :func:`parse_args`; each field's
help group and line, in its ``metadata``, make ``python -m train --help``);
:meth:`Config.validate` rejects bad values with a message that names the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import typing
from typing import Optional, Sequence, Tuple

from dynconv_spec import ATTENTION_NORMS, CONV_MODELS, CONV_TYPES, KW_CONV
from train.presets import PRESETS

MODELS = CONV_MODELS  # the registered models that take conv= (dynconv_spec.registry)
CONVS = CONV_TYPES
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant", "step")
AUGMENTS = ("auto", "none", "crop", "crop_flip")
PREPROCESSES = ("auto", "imagenet", "cifar", "none")
STEMS = ("auto", "imagenet", "cifar")
DTYPES = ("float32", "bfloat16", "float64")
MAX_SEED = 2**63 - 1
# The options that take one of a few names: checked by Config.validate, listed by --help.
CHOICES = {
    "model": MODELS,
    "conv": CONVS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "augment": AUGMENTS,
    "stem": STEMS,
    "preprocess": PREPROCESSES,
    "dtype": DTYPES,
    "attention_norm": ATTENTION_NORMS,
}


class UsageError(ValueError):
    """A bad option or an unusable combination of options / workdir state; printed without traceback."""


# The option groups of `python -m train --help`, in the order shown.
GROUPS = {
    "data": "data (train/data.py)",
    "model": "model (dynconv_jax.models)",
    "optimisation": "optimisation",
    "temperature": "temperature annealing of the dynamic attentions (30 -> 1, as DY-CNN and ODConv)",
    "kernelwarehouse": "KernelWarehouse (--conv=kernelwarehouse): warehouses and the warm-up of tau (1 -> 0)",
    "numerics": "numerics and randomness",
    "checkpointing": "checkpointing and export",
    "logging": "logging",
    "parallelism": "parallelism",
}


def _option_of(group: str):
    """A field maker for one help group: ``name: type = data("default", "one line of help")``."""

    def option(default, help: str):
        return dataclasses.field(default=default, metadata={"group": group, "help": help})

    return option


_data, _model, _optimisation, _temperature, _kernelwarehouse, _numerics, _checkpointing, _logging, _parallelism = map(
    _option_of, GROUPS
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every knob of a training run. Defaults: the main command's digits run.

    Each field's group and one-line help (its ``metadata``) make ``python -m train --help``.
    """

    dataset: str = _data(
        "digits", "'digits' (embedded), 'imagefolder' or a TFDS name with 'image' and 'label' features"
    )
    data_dir: Optional[str] = _data(None, "imagefolder: ROOT of ROOT/<split>/<class>/*.jpg; TFDS: its data_dir")
    train_split: str = _data("train", "split to train on")
    eval_split: str = _data("test", "split to evaluate on after every epoch")
    preprocess: str = _data(
        "auto",
        "cifar: native size; imagenet: resize and crop to --image_size; auto: cifar "
        "for the digits and small fixed-size TFDS images",
    )
    image_size: Optional[int] = _data(
        None, "imagenet preprocessing: output side (none: 224); the others keep the native size"
    )
    augment: str = _data("auto", "training augmentation; auto: crop for the digits, crop_flip otherwise")
    crop_padding: Optional[int] = _data(
        None, "cifar preprocessing: padding of the random crops (none: 1 pixel for the digits, 4 otherwise)"
    )
    data_workers: int = _data(0, "grain worker processes decoding and augmenting (0: in the training process)")
    model: str = _model("resnet18", "network (dynconv_jax.models)")
    conv: str = _model("dynamic", "convolution in the blocks (dynamic: DY-CNN)")
    num_experts: int = _model(4, "experts (kernels) K of each dynamic convolution")
    stem: str = _model(
        "auto", "cifar: a 3x3 conv; imagenet: a 7x7/2 conv and max pooling; auto: cifar for images up to 64 px"
    )
    base_width: int = _model(16, "ResNet: channels of the first stage (64 in the papers)")
    width_mult: float = _model(1.0, "MobileNetV2 width multiplier")
    dropout: Optional[float] = _model(None, "dropout before the classifier (none: the model's default)")
    attention_bn_init: Optional[float] = _model(
        None, "odconv: initial attention-BatchNorm scale (none: the layer's 0.1; the official code: 1.0)"
    )
    attention_norm: str = _model("batch", "odconv: normalisation in the attention (batch: the official BatchNorm)")
    batch_size: int = _optimisation(64, "global batch, split over all devices of all processes")
    num_epochs: int = _optimisation(15, "epochs to train")
    num_steps: Optional[int] = _optimisation(None, "steps to train; when set, overrides --num_epochs")
    optimizer: str = _optimisation("sgd", "optimiser")
    learning_rate: float = _optimisation(0.05, "peak learning rate (after the warmup)")
    momentum: float = _optimisation(0.9, "SGD momentum / AdamW beta1")
    nesterov: bool = _optimisation(True, "SGD: Nesterov momentum")
    beta2: float = _optimisation(0.999, "AdamW beta2")
    weight_decay: float = _optimisation(5e-4, "weight decay; not applied to BatchNorm parameters and biases")
    schedule: str = _optimisation(
        "cosine", "learning-rate decay after the warmup (step: x --decay_factor at each of --decay_epochs)"
    )
    decay_epochs: Tuple[float, ...] = _optimisation((), "step schedule: the epochs of the decays, E1,E2,...")
    decay_factor: float = _optimisation(0.1, "step schedule: learning-rate factor at each decay")
    warmup_epochs: float = _optimisation(1.0, "epochs of linear warmup from 0 to --learning_rate")
    label_smoothing: float = _optimisation(0.1, "label smoothing of the cross-entropy, in [0, 1)")
    grad_clip_norm: Optional[float] = _optimisation(5.0, "global-norm gradient clipping (none: off)")
    temp_init: float = _temperature(30.0, "temperature at step 0")
    temp_final: float = _temperature(1.0, "temperature at the end of the annealing and after it")
    temp_epochs: float = _temperature(5.0, "epochs of linear annealing from --temp_init to --temp_final")
    kw_ratio: float = _kernelwarehouse(
        1.0,
        "cell_num_ratio: each warehouse holds this many times its layers' cells "
        "(the parameter budget: 0.25, 0.5, 1, 2, 4 = KW 1/4x ... 4x)",
    )
    kw_inplane_ratio: float = _kernelwarehouse(
        1.0,
        "cell_inplane_ratio: a cell's input channels, as a fraction "
        "of the layers' common divisor (the 1/2x, 1/4x configs: 0.5)",
    )
    kw_outplane_ratio: float = _kernelwarehouse(1.0, "cell_outplane_ratio: a cell's output channels, likewise")
    kw_sharing_range: Optional[str] = _kernelwarehouse(
        None,
        "which layers share a warehouse: names such as "
        "layer,conv (or the official layer_conv); none: "
        "the model's default",
    )
    kw_basis_ratio: float = _kernelwarehouse(
        1.0, "nonlocal_basis_ratio: below 1, the other layers' cells go through a smaller basis"
    )
    kw_temp_init: float = _kernelwarehouse(1.0, "tau at step 0, in [0, 1] (official --temp_init_value)")
    kw_temp_epochs: Optional[float] = _kernelwarehouse(
        None, "epochs of the linear warm-up of tau to 0 (official --temp_epoch, 20 on ImageNet; none: --temp_epochs)"
    )
    kw_assignment_bias_init: float = _kernelwarehouse(
        10.0,
        "initial attention logit of each mixture's warm-up cell (assignment_bias_init; official: 0): keeps "
        "training stable as tau reaches 0 (docs/training.md, KernelWarehouse on the digits)",
    )
    dtype: str = _numerics("float32", "bfloat16: bf16 compute, float32 parameters; float64: enables jax x64")
    seed: int = _numerics(0, "seed of the initialisation, the data order and the augmentation")
    workdir: Optional[str] = _checkpointing(
        None, "folder of the run's checkpoints, metrics and export (none: runs/<dataset>-<model>-<conv>-<timestamp>)"
    )
    checkpoint_every_steps: int = _checkpointing(200, "save an Orbax checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _checkpointing(3, "newest checkpoints to keep")
    resume: bool = _checkpointing(False, "continue the run in --workdir from its newest checkpoint")
    allow_restart: bool = _checkpointing(
        False, "--resume may start from step 0 after every checkpoint was quarantined as damaged"
    )
    log_every_steps: int = _logging(50, "training metrics every N steps (and at epoch ends)")
    progress: bool = _logging(True, "a tqdm progress bar (false: plain log lines)")
    tensorboard: bool = _logging(True, "TensorBoard events in --workdir/tensorboard")
    export: bool = _checkpointing(True, "at the end: safetensors export and the dynconv_torch agreement check")
    distributed: bool = _parallelism(False, "call jax.distributed.initialize() (multi-process, multi-host)")

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
        if not 0 <= self.seed <= MAX_SEED:  # NumPy's generators take no negative seed, JAX's key no larger one
            raise UsageError(f"--seed={self.seed}: must be an integer from 0 to 2**63 - 1")
        if not self.dataset.strip():
            raise UsageError(
                f"--dataset={self.dataset!r}: name a data set: 'digits' (embedded), 'imagefolder' "
                f"(with --data_dir) or a TFDS name such as 'cifar10'"
            )
        for name, allowed in CHOICES.items():
            if name != "attention_norm":  # checked after the numbers (its message reads better there)
                choice(name, allowed)
        for name in (
            "num_experts",
            "base_width",
            "width_mult",
            "batch_size",
            "num_epochs",
            "num_steps",
            "learning_rate",
            "checkpoint_every_steps",
            "keep_checkpoints",
            "log_every_steps",
            "temp_init",
            "temp_final",
            "grad_clip_norm",
            "image_size",
            "decay_factor",
            "attention_bn_init",
        ):
            positive(name)
        for name in ("weight_decay", "warmup_epochs", "temp_epochs", "crop_padding", "data_workers"):
            positive(name, allow_zero=True)
        choice("attention_norm", ATTENTION_NORMS)
        self._validate_kernelwarehouse()
        if self.schedule == "step" and not self.decay_epochs:
            raise UsageError(
                "--schedule=step needs --decay_epochs=E1,E2,... (epochs at which the learning rate "
                "is multiplied by --decay_factor)"
            )
        if list(self.decay_epochs) != sorted(self.decay_epochs) or any(e <= 0 for e in self.decay_epochs):
            raise UsageError(f"--decay_epochs={','.join(map(str, self.decay_epochs))}: must be increasing and > 0")
        for name, unset in (("attention_bn_init", None), ("attention_norm", "batch")):
            if getattr(self, name) != unset and self.conv != "odconv":
                raise UsageError(
                    f"--{name}={getattr(self, name)!r} applies to --conv=odconv only, not --conv={self.conv}"
                )
        if self.attention_norm == "none" and self.attention_bn_init is not None:
            raise UsageError(
                f"--attention_bn_init={self.attention_bn_init!r} sets the initial scale of the "
                "attention normalisation; --attention_norm=none has none"
            )
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"--dropout={self.dropout!r}: must be in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"--label_smoothing={self.label_smoothing!r}: must be in [0, 1)")
        if not 0.0 <= self.momentum < 1.0 or not 0.0 <= self.beta2 < 1.0:
            raise UsageError(f"--momentum={self.momentum!r} / --beta2={self.beta2!r}: must be in [0, 1)")
        return self

    def _validate_kernelwarehouse(self) -> None:
        """The --kw_* options apply to --conv=kernelwarehouse only; --temp_init/--temp_final to the other convs."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.conv != KW_CONV:
            changed = [
                f.name
                for f in dataclasses.fields(self)
                if f.metadata["group"] == "kernelwarehouse" and getattr(self, f.name) != defaults[f.name]
            ]
            if changed:
                raise UsageError(
                    f"--{changed[0]}={getattr(self, changed[0])!r} applies to --conv={KW_CONV} only, "
                    f"not --conv={self.conv}"
                )
            return
        for name in ("temp_init", "temp_final"):
            if getattr(self, name) != defaults[name]:
                raise UsageError(
                    f"--{name}={getattr(self, name)!r}: --conv={KW_CONV} has no softmax temperature; "
                    f"its warm-up blends (1 - tau) * attention + tau * one-hot, tau going from "
                    f"--kw_temp_init to 0 over --kw_temp_epochs"
                )
        for name in ("kw_ratio", "kw_inplane_ratio", "kw_outplane_ratio", "kw_basis_ratio"):
            if not getattr(self, name) > 0:
                raise UsageError(f"--{name}={getattr(self, name)!r}: must be > 0")
        if not 0.0 <= self.kw_temp_init <= 1.0:
            raise UsageError(f"--kw_temp_init={self.kw_temp_init!r}: tau must be in [0, 1]")
        if not 0.0 <= self.kw_assignment_bias_init < math.inf:
            raise UsageError(f"--kw_assignment_bias_init={self.kw_assignment_bias_init!r}: must be >= 0")
        if self.kw_temp_epochs is not None and self.kw_temp_epochs < 0:
            raise UsageError(f"--kw_temp_epochs={self.kw_temp_epochs!r}: must be >= 0")

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
            base, "comma-separated numbers" if typing.get_origin(base) is tuple else "a string"
        )
        extra = " or none" if optional else ""
        raise UsageError(f"--{name}={text!r}: expected {kind}{extra}") from None


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (``python -m train`` prints it and exits 2) instead of exiting."""

    def error(self, message):
        raise UsageError(f"{message}; see python -m train --help")


def _shown(value) -> str:
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _metavar(name: str, annotation) -> Optional[str]:
    if name in CHOICES:
        return "{" + ",".join(CHOICES[name]) + "}"
    if name in ("data_dir", "workdir"):
        return "DIR"
    optional = typing.get_origin(annotation) is typing.Union
    base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
    if typing.get_origin(base) is tuple:
        return "E1,E2,..."
    return {bool: "BOOL", int: "INT", float: "FLOAT"}.get(base, "NAME")


def conv_size(conv: str, num_experts: int, kw_ratio: float) -> str:
    """How big the dynamic convs are, for log lines: ``'K=4'`` (experts), ``'KW 4x'`` (warehouse budget)."""
    return f"KW {kw_ratio:g}x" if conv == KW_CONV else f"K={num_experts}"


def _preset_line(fields: dict) -> str:
    """One line of a preset's recipe, from its values: model, data, length and optimiser."""
    c = {**{f.name: f.default for f in dataclasses.fields(Config)}, **fields}
    schedule = c["schedule"]
    if schedule == "step":
        schedule += " x" + _shown(c["decay_factor"]) + " at " + ",".join(f"{e:g}" for e in c["decay_epochs"])
    size = conv_size(c["conv"], c["num_experts"], c["kw_ratio"])
    return (
        f"{c['model']} {c['conv']} {size}, {c['dataset']}, {c['num_epochs']} epochs, "
        f"batch {c['batch_size']}, {c['optimizer']} lr {c['learning_rate']:g} {schedule}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m train`` parser: one option per :class:`Config` field, in its help group."""
    width = max(map(len, PRESETS))
    presets = "\n".join(f"  {name:<{width}}  {_preset_line(fields)}" for name, fields in sorted(PRESETS.items()))
    parser = _Parser(
        prog="python -m train",
        usage="python -m train [--config=PRESET] [--key=value ...]",
        add_help=False,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a dynconv_jax model with optax on the embedded digits (default), an image folder or a "
        "TFDS data set;\nevaluate every epoch, checkpoint, and export to PyTorch at the end. "
        "Options: --key=value (or --key value);\na bare --flag sets a boolean option, 'none' "
        "clears an optional one.",
        epilog=f"presets (--config=NAME; the options given with it override it):\n{presets}\n\n"
        "Recipes, outputs, resuming and multi-process runs: docs/training.md",
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    parser.add_argument("--config", metavar="PRESET", help="start from a preset (listed below)")
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    types = _field_types()
    for f in dataclasses.fields(Config):
        help = f"{f.metadata['help']} (default: {_shown(f.default)})".replace("%", "%%")
        options = dict(nargs="?", const="true") if types[f.name] is bool else {}
        groups[f.metadata["group"]].add_argument(
            f"--{f.name}", metavar=_metavar(f.name, types[f.name]), help=help, **options
        )
    return parser


def _check_option_names(argv: Sequence[str], known: Sequence[str]) -> None:
    """An unknown ``--key`` names the closest options (argparse's own message names none)."""
    for arg in argv:
        key = arg[2:].partition("=")[0] if arg.startswith("--") else None
        if key is not None and key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            close += [k for k in known if key in k.split("_") and k not in close][: 3 - len(close)]
            hint = f"; did you mean --{close[0]}?" if close else ""
            also = f" (also close: {', '.join('--' + k for k in close[1:])})" if close[1:] else ""
            raise UsageError(f"unknown option --{key}{hint}{also}; python -m train --help lists every option")


def parse_args(argv: Sequence[str], base: Optional[Config] = None) -> Config:
    """``['--batch_size=32', '--conv=dynamic', '--resume']`` -> validated :class:`Config`.

    A bare ``--flag`` sets a boolean field to True; ``--batch-size`` is ``--batch_size``. ``--config=NAME``
    starts from the preset ``train.presets.PRESETS[NAME]`` (wherever it appears; the other options override
    it). Unknown options (with the closest names), malformed values and unusable combinations raise
    :class:`UsageError` naming the option.
    """
    argv = [
        ("--" + arg[2:].partition("=")[0].replace("-", "_") + arg[2:].partition("=")[1] + arg[2:].partition("=")[2])
        if arg.startswith("--")
        else arg
        for arg in argv
    ]
    types = _field_types()
    _check_option_names(argv, [*types, "config", "help"])
    presets = [arg for arg in argv if arg == "--config" or arg.startswith("--config=")]
    if len(presets) > 1:
        raise UsageError(f"--config given {len(presets)} times ({', '.join(presets)})")
    values = vars(build_parser().parse_args(argv))
    values.pop("help", None)
    if "config" in values:
        base = preset(values.pop("config"), base)
    updates = {key: _parse_value(key, text, types[key]) for key, text in values.items()}
    return dataclasses.replace(base or Config(), **updates).validate()


def preset(name: str, base: Optional[Config] = None) -> Config:
    """``base`` (default: ``Config()``) with the fields of preset ``name`` (:data:`train.presets.PRESETS`).

    Examples:
      >>> from train.config import preset
      >>> config = preset("odconv_resnet18_imagenet")
      >>> config.conv, config.num_experts, config.num_epochs, config.decay_epochs
      ('odconv', 4, 100, (30.0, 60.0, 90.0))
    """
    if name not in PRESETS:
        raise UsageError(f"--config={name!r}: unknown preset; expected one of {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(base or Config(), **PRESETS[name])


def usage() -> str:
    """The text of ``python -m train --help``."""
    return build_parser().format_help()


def from_json(text: str, source: str = "config.json") -> Config:
    """Inverse of :meth:`Config.to_json` (used to check a resumed run's configuration).

    Text that is not a JSON object of known fields raises :class:`UsageError` naming ``source``.
    """
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(
            f"{source} is not valid JSON ({error}); it is not the configuration a `python -m train` run writes"
        ) from None
    if not isinstance(fields, dict):
        raise UsageError(f"{source} holds a JSON {type(fields).__name__}, expected an object of options")
    types = _field_types()
    unknown = sorted(set(fields) - set(types))
    if unknown:
        raise UsageError(f"{source} has unknown options {unknown} (written by another version of dynconv?)")
    return Config(**{k: tuple(v) if typing.get_origin(types[k]) is tuple else v for k, v in fields.items()})
