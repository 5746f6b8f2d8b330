"""``python -m train.evaluate``: ImageNet-style evaluation of any registered model with a converted PyTorch
checkpoint, or of a ``python -m train`` run, with the Flax model on a TFDS or image-folder split.

    python -m train.evaluate --model od_resnet18 --model_args '{"kernel_num": 4}' --checkpoint od_resnet18_4x.pth \
        --dataset imagenet2012 --split validation --data_dir DIR
    python -m train.evaluate --model kw4x_resnet18 --checkpoint kw4x_resnet18.pth \
        --dataset imagefolder --data_dir IMAGENET --split val
    python -m train.evaluate --run runs/digits

``--model``: a name of ``dynconv_jax.models`` (``od_*``, ``kw_*``, ``resnet*``, ``mobilenet_v2``, EfficientNet-CondConv)
or an official KernelWarehouse config (``kw4x_resnet18``, ...: the entry point with that config's arguments);
``--model_args``: further arguments of the entry point, as JSON. A TFDS split is read with ``tfds.data_source``
(ArrayRecord, no TensorFlow); an image folder is ``DATA_DIR/<split>/<class>/*.jpg`` with the classes in sorted
order (torchvision's ImageFolder, ImageNet's label order). Every image is preprocessed as the model's official
code evaluates it: EfficientNet-CondConv as timm (resize the shorter side to ``floor(input_size / crop_pct)``
bicubic, center crop, its mean/std); the other models as the official ODConv and KernelWarehouse code
(``Resize(256)`` bilinear, ``CenterCrop(224)``, ImageNet mean/std). ``--run`` evaluates a run's newest
checkpoint with the run's own preprocessing, on its evaluation split or ``--split``. Prints top-1 / top-5.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np

from train.config import UsageError

# JAX, TFDS, PIL and the models are imported in the functions that use them: --help and a usage error
# answer without loading them.

IMAGENET_EVAL = dict(
    input_size=224, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bilinear"
)
"""The evaluation transform of the official ODConv and KernelWarehouse code (``Resize(256)``, bilinear;
``CenterCrop(224)``; ImageNet mean/std on [0, 1] pixels), used for every model but EfficientNet-CondConv."""


def preprocess(
    image, input_size: int, crop_pct: float, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic"
):
    """uint8 ``[H, W, C]`` or encoded bytes -> float32 ``[input_size, input_size, 3]`` (the center-crop eval
    transform of timm and torchvision: ``interpolation`` 'bicubic' or 'bilinear')."""
    from PIL import Image

    if isinstance(image, bytes):
        img = Image.open(io.BytesIO(image)).convert("RGB")
    else:
        img = Image.fromarray(
            np.asarray(image).squeeze(-1) if np.ndim(image) == 3 and np.shape(image)[-1] == 1 else np.asarray(image)
        ).convert("RGB")
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
    scale = math.floor(input_size / crop_pct)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != scale:  # torchvision Resize(int): shorter side -> scale, longer side truncated
        new_long = int(scale * long / short)
        img = img.resize((scale, new_long) if w <= h else (new_long, scale), resample)
    w, h = img.size
    if w < input_size or h < input_size:  # torchvision CenterCrop pads with zeros first
        pad_w, pad_h = max(input_size - w, 0), max(input_size - h, 0)
        canvas = Image.new("RGB", (w + pad_w, h + pad_h))
        canvas.paste(img, (pad_w // 2, pad_h // 2))
        img, (w, h) = canvas, canvas.size
    top, left = int(round((h - input_size) / 2.0)), int(round((w - input_size) / 2.0))
    img = img.crop((left, top, left + input_size, top + input_size))
    x = np.asarray(img, np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _check_numbers(
    batch_size: int, num_examples: Optional[int], input_size: Optional[int] = None, crop_pct: Optional[float] = None
) -> None:
    for flag, value in (("--batch_size", batch_size), ("--num_examples", num_examples), ("--input_size", input_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value} must be >= 1")
    if crop_pct is not None and not (math.isfinite(crop_pct) and 0 < crop_pct <= 1):
        raise UsageError(f"--crop_pct {crop_pct} must be in (0, 1] (the center crop's fraction of the resized image)")


def open_split(dataset: str, split: str, data_dir: Optional[str]):
    """``(source, num_classes)``: a TFDS split (``tfds.data_source``) or ``data_dir/<split>/<class>/*`` of an
    image folder (``dataset='imagefolder'``, classes in sorted order); records ``{'image', 'label'}``."""
    if dataset == "imagefolder":
        import os

        from train.sources import FolderSource

        split_dir = os.path.join(data_dir or "", split)
        if not data_dir or not os.path.isdir(split_dir):
            raise UsageError(
                f"--dataset imagefolder needs --data_dir ROOT with ROOT/{split}/<class>/<image>; "
                f"{split_dir!r} is not a directory"
            )
        classes = sorted(
            d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith(".")
        )
        return FolderSource(data_dir, split, classes), len(classes)
    import tensorflow_datasets as tfds

    try:
        source = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # TFDS raises several unrelated types for "not prepared"
        raise UsageError(
            f"could not open TFDS dataset {dataset!r} split {split!r} in data_dir={data_dir!r} "
            f"({type(error).__name__}: {error}). Prepare it first, e.g. `tfds build {dataset} "
            f"--manual_dir=... --data_dir=DIR --file_format=array_record`"
        ) from error
    return source, int(source.dataset_info.features["label"].num_classes)


def build_model(name: str, model_args: Dict[str, Any], num_classes: int):
    """``(model, entry point, eval cfg)`` of ``--model`` (a registered name or an official KernelWarehouse
    config) with ``--model_args``; the cfg is timm's for EfficientNet-CondConv, :data:`IMAGENET_EVAL` otherwise."""
    from dynconv_jax import models
    from dynconv_jax.models import efficientnet_cc as effnet
    from dynconv_spec import MODEL_NAMES
    from dynconv_spec.kernelwarehouse import OFFICIAL_CONFIGS, config_model_args

    if name in OFFICIAL_CONFIGS:
        entry, args = config_model_args(name)
        args = {**args, **model_args}
    elif name in MODEL_NAMES:
        entry, args = name, dict(model_args)
    else:
        raise UsageError(
            f"--model {name!r}: expected a registered model ({', '.join(MODEL_NAMES)}) or an "
            f"official KernelWarehouse config ({', '.join(OFFICIAL_CONFIGS)})"
        )
    try:
        if entry in effnet.VARIANTS:
            return (
                effnet.efficientnet_cc(entry, num_classes=num_classes, **args),
                entry,
                {"interpolation": "bicubic", **effnet.DEFAULT_CFGS[entry]},
            )
        return models.create_model(entry, num_classes=num_classes, **args), entry, dict(IMAGENET_EVAL)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--model {name} --model_args {json.dumps(model_args)}: {error}") from error


def convert_checkpoint(model, entry: str, state_dict, input_size: int, allow_nonfinite: bool = False):
    """The Flax variables of ``model`` from a PyTorch ``state_dict``, strictly (every key used, every shape
    checked)."""
    import jax
    import jax.numpy as jnp

    from dynconv_jax.convert import torch_to_flax
    from dynconv_jax.models import efficientnet_cc as effnet

    if entry in effnet.VARIANTS:
        return effnet.convert_torch_checkpoint(model, state_dict, allow_nonfinite=allow_nonfinite)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, input_size, input_size, 3))))
    return torch_to_flax(state_dict, template, allow_nonfinite=allow_nonfinite)


def top_k_accuracy(
    apply: Callable,
    source,
    prepare: Callable,
    num_examples: Optional[int] = None,
    batch_size: int = 64,
    workers: int = 8,
) -> Dict[str, float]:
    """Top-1 / top-5 of ``apply(images) -> logits`` on the first ``num_examples`` records of ``source``,
    ``prepare(list of raw images, pool) -> float32 [n, H, W, C]`` preprocessing each batch."""
    n = len(source) if num_examples is None else min(num_examples, len(source))
    correct1 = correct5 = 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, n, batch_size):
            records = [source[i] for i in range(start, min(n, start + batch_size))]
            labels = np.asarray([int(r["label"]) for r in records])
            logits = np.asarray(apply(prepare([r["image"] for r in records], pool)))
            top5 = np.argsort(-logits, axis=-1)[:, :5]
            correct1 += int(np.sum(top5[:, 0] == labels))
            correct5 += int(np.sum(np.any(top5 == labels[:, None], axis=-1)))
    return {"top1": correct1 / max(n, 1), "top5": correct5 / max(n, 1), "num_examples": n}


def evaluate(
    model_name: str,
    checkpoint,
    dataset: str = "imagenet2012",
    split: str = "validation",
    data_dir: Optional[str] = None,
    batch_size: int = 64,
    num_examples: Optional[int] = None,
    input_size: Optional[int] = None,
    crop_pct: Optional[float] = None,
    workers: int = 8,
    allow_nonfinite: bool = False,
    model_args: Optional[Dict[str, Any]] = None,
) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (fractions) of ``model_name`` (see the module docstring; ``model_args``: further
    arguments of its entry point) with weights from ``checkpoint`` (a PyTorch state_dict file or object) on
    a TFDS or image-folder split, at the model's official evaluation preprocessing (``input_size`` and
    ``crop_pct`` override it). A checkpoint with NaN/Inf entries is refused unless ``allow_nonfinite``. The
    arguments and the checkpoint (read with :func:`dynconv_jax.convert.load_state_dict`) are checked before
    the dataset is opened; the models' dynamic layers run at their inference temperature (1; KernelWarehouse:
    tau 0, after the warm-up)."""
    import jax

    from dynconv_jax.convert import load_state_dict

    _check_numbers(batch_size, num_examples, input_size, crop_pct)
    build_model(model_name, model_args or {}, 1)  # a bad name or argument is a usage error before any reading
    state_dict = load_state_dict(checkpoint)  # a ConversionError names the file, before the dataset is opened
    source, num_classes = open_split(dataset, split, data_dir)
    model, entry, cfg = build_model(model_name, model_args or {}, num_classes)
    cfg.update({k: v for k, v in (("input_size", input_size), ("crop_pct", crop_pct)) if v is not None})
    variables = convert_checkpoint(model, entry, state_dict, cfg["input_size"], allow_nonfinite)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))

    def prepare(images, pool):
        return np.stack(
            list(
                pool.map(
                    lambda image: preprocess(
                        image, cfg["input_size"], cfg["crop_pct"], cfg["mean"], cfg["std"], cfg["interpolation"]
                    ),
                    images,
                )
            )
        )

    return top_k_accuracy(lambda x: apply(variables, x), source, prepare, num_examples, batch_size, workers)


def evaluate_run(
    workdir: str,
    split: Optional[str] = None,
    data_dir: Optional[str] = None,
    batch_size: int = 64,
    num_examples: Optional[int] = None,
    workers: int = 8,
) -> Dict[str, float]:
    """Top-1 / top-5 of the newest checkpoint of the ``python -m train`` run in ``workdir`` with the run's own
    data set and preprocessing, on its evaluation split (or ``split``; ``data_dir`` replaces the run's), at
    the temperature the run's schedule gives that step."""
    import jax

    from train import data as data_lib
    from train.plot_attention import load_run

    _check_numbers(batch_size, num_examples)
    config, model, variables, dataset, temperature, _ = load_run(workdir)
    if split is not None or data_dir is not None:
        config = dataclasses.replace(
            config, eval_split=split or config.eval_split, data_dir=data_dir or config.data_dir
        )
        dataset = data_lib.load_dataset(config)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False, temperature=temperature))

    def prepare(images, pool):
        return dataset.preprocess.normalize(np.stack(list(pool.map(dataset.preprocess.eval, images))))

    return top_k_accuracy(lambda x: apply(variables, x), dataset.eval, prepare, num_examples, batch_size, workers)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        help="a registered model (e.g. od_resnet18, kw_resnet18, tf_efficientnet_cc_b0_4e) or "
        "an official KernelWarehouse config (e.g. kw4x_resnet18)",
    )
    p.add_argument(
        "--model_args",
        default="{}",
        help='further arguments of the entry point, as JSON (e.g. \'{"kernel_num": 4}\'; default: none)',
    )
    p.add_argument("--checkpoint", help="PyTorch checkpoint of --model: .bin/.pth/.pt/.safetensors")
    p.add_argument("--run", metavar="DIR", help="instead of --model: a python -m train run directory")
    p.add_argument(
        "--dataset", default=None, help="TFDS data set or 'imagefolder' (default: imagenet2012; --run: the run's)"
    )
    p.add_argument(
        "--split", default=None, help="split to evaluate (default: validation; --run: the run's evaluation split)"
    )
    p.add_argument(
        "--data_dir", default=None, help="TFDS data_dir, or the image folder's ROOT (default: TFDS's; --run: the run's)"
    )
    p.add_argument("--batch_size", type=int, default=64, help="images per evaluation batch (default: 64)")
    p.add_argument("--num_examples", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--input_size", type=int, default=None, help="override the model's input size")
    p.add_argument("--crop_pct", type=float, default=None, help="override the model's crop fraction")
    p.add_argument("--workers", type=int, default=8, help="preprocessing threads")
    p.add_argument("--allow_nonfinite", action="store_true", help="convert a checkpoint holding NaN/Inf anyway")
    return p


def _run(args) -> Dict[str, float]:
    if (args.model is None) == (args.run is None):
        raise UsageError("give --model NAME --checkpoint FILE, or --run DIR (one of them)")
    if args.run is not None:
        given = [
            f"--{k}"
            for k in ("dataset", "model_args", "checkpoint", "input_size", "crop_pct")
            if getattr(args, k) not in (None, "{}")
        ]
        if given:
            raise UsageError(
                f"--run evaluates with the run's own model and preprocessing: {', '.join(given)} would be ignored"
            )
        return evaluate_run(args.run, args.split, args.data_dir, args.batch_size, args.num_examples, args.workers)
    if args.checkpoint is None:
        raise UsageError("--model needs --checkpoint FILE (a PyTorch state_dict)")
    try:
        model_args = json.loads(args.model_args)
    except json.JSONDecodeError as error:
        raise UsageError(f"--model_args {args.model_args!r}: not JSON ({error})") from None
    if not isinstance(model_args, dict):
        raise UsageError(f"--model_args {args.model_args!r}: expected a JSON object, e.g. '{{\"kernel_num\": 4}}'")
    return evaluate(
        args.model,
        args.checkpoint,
        args.dataset or "imagenet2012",
        args.split or "validation",
        args.data_dir,
        args.batch_size,
        args.num_examples,
        args.input_size,
        args.crop_pct,
        args.workers,
        args.allow_nonfinite,
        model_args,
    )


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from dynconv_jax.convert import ConversionError

    try:
        result = _run(args)
    except (UsageError, ConversionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.run:
        where = f"{args.run} on {'its evaluation split' if args.split is None else 'split ' + args.split}"
    else:
        where = f"{args.model} on {args.dataset or 'imagenet2012'}/{args.split or 'validation'}"
    print(
        f"{where} ({result['num_examples']} images): "
        f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
