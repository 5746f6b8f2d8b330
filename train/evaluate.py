"""``python -m train.evaluate``: ImageNet-style evaluation of a converted EfficientNet-CondConv
(Yang et al., NeurIPS 2019) PyTorch checkpoint with the Flax model, on a TFDS split.

    python -m train.evaluate --model tf_efficientnet_cc_b0_4e --checkpoint pytorch_model.bin \\
        --dataset imagenet2012 --split validation --data_dir DIR

Reads the split with ``tfds.data_source`` (ArrayRecord, no TensorFlow), preprocesses every image
as timm evaluates the model (its default cfg): RGB, resize the shorter side to
``floor(input_size / crop_pct)`` with PIL bicubic, center crop ``input_size``, scale to [0, 1],
normalise with the model's mean/std; prints top-1 / top-5 accuracy.
"""
from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional, Sequence

import numpy as np

from train.config import UsageError

# JAX, TFDS, PIL and the models are imported in the functions that use them: --help and a usage error
# answer without loading them.


def preprocess(image: np.ndarray, input_size: int, crop_pct: float, mean: Sequence[float], std: Sequence[float]):
    """uint8 ``[H, W, C]`` -> float32 ``[input_size, input_size, 3]`` (timm's center-crop eval transform)."""
    from PIL import Image

    img = Image.fromarray(np.asarray(image).squeeze(-1) if np.ndim(image) == 3 and np.shape(image)[-1] == 1
                          else np.asarray(image)).convert("RGB")
    scale = math.floor(input_size / crop_pct)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != scale:  # torchvision Resize(int): shorter side -> scale, longer side truncated
        new_long = int(scale * long / short)
        img = img.resize((scale, new_long) if w <= h else (new_long, scale), Image.BICUBIC)
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


def evaluate(model_name: str, checkpoint, dataset: str = "imagenet2012", split: str = "validation",
             data_dir: Optional[str] = None, batch_size: int = 64, num_examples: Optional[int] = None,
             input_size: Optional[int] = None, crop_pct: Optional[float] = None, workers: int = 8,
             allow_nonfinite: bool = False) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (fractions) of ``model_name`` with weights from ``checkpoint``
    (a timm/``dynconv_torch`` state_dict file or object) on a TFDS split. A checkpoint with
    NaN/Inf entries is refused unless ``allow_nonfinite``. The arguments and the checkpoint (read with
    :func:`dynconv_jax.convert.load_state_dict`) are checked before the dataset is opened."""
    from dynconv_jax.convert import load_state_dict
    from dynconv_jax.models import efficientnet_cc as effnet

    if model_name not in effnet.VARIANTS:
        raise UsageError(f"--model {model_name!r}: expected one of {sorted(effnet.VARIANTS)}")
    for flag, value in (("--batch_size", batch_size), ("--num_examples", num_examples), ("--input_size", input_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value} must be >= 1")
    if crop_pct is not None and not (math.isfinite(crop_pct) and 0 < crop_pct <= 1):
        raise UsageError(f"--crop_pct {crop_pct} must be in (0, 1] (the center crop's fraction of the resized image)")
    state_dict = load_state_dict(checkpoint)  # a ConversionError names the file, before the dataset is opened
    import jax
    import jax.numpy as jnp
    import tensorflow_datasets as tfds

    cfg = dict(effnet.DEFAULT_CFGS[model_name])
    cfg["input_size"] = cfg["input_size"] if input_size is None else input_size
    cfg["crop_pct"] = cfg["crop_pct"] if crop_pct is None else crop_pct
    try:
        source = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # TFDS raises several unrelated types for "not prepared"
        raise UsageError(f"could not open TFDS dataset {dataset!r} split {split!r} in data_dir={data_dir!r} "
                         f"({type(error).__name__}: {error}). Prepare it first, e.g. `tfds build {dataset} "
                         f"--manual_dir=... --data_dir=DIR --file_format=array_record`") from error
    num_classes = int(source.dataset_info.features["label"].num_classes)
    model = effnet.efficientnet_cc(model_name, num_classes=num_classes)
    variables = effnet.convert_torch_checkpoint(model, state_dict, allow_nonfinite=allow_nonfinite)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))

    n = len(source) if num_examples is None else min(num_examples, len(source))
    correct1 = correct5 = 0
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, n, batch_size):
            records = [source[i] for i in range(start, min(n, start + batch_size))]
            images = list(pool.map(lambda r: preprocess(r["image"], cfg["input_size"], cfg["crop_pct"], cfg["mean"],
                                                        cfg["std"]), records))
            labels = np.asarray([int(r["label"]) for r in records])
            logits = np.asarray(apply(variables, jnp.asarray(np.stack(images))))
            top5 = np.argsort(-logits, axis=-1)[:, :5]
            correct1 += int(np.sum(top5[:, 0] == labels))
            correct5 += int(np.sum(np.any(top5 == labels[:, None], axis=-1)))
    return {"top1": correct1 / max(n, 1), "top5": correct5 / max(n, 1), "num_examples": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="e.g. tf_efficientnet_cc_b0_4e")
    p.add_argument("--checkpoint", required=True, help="PyTorch checkpoint: .bin/.pth/.pt/.safetensors")
    p.add_argument("--dataset", default="imagenet2012", help="TFDS data set (default: imagenet2012)")
    p.add_argument("--split", default="validation", help="TFDS split to evaluate (default: validation)")
    p.add_argument("--data_dir", default=None, help="TFDS data_dir of the prepared data set (default: TFDS's)")
    p.add_argument("--batch_size", type=int, default=64, help="images per evaluation batch (default: 64)")
    p.add_argument("--num_examples", type=int, default=None, help="evaluate only the first N examples")
    p.add_argument("--input_size", type=int, default=None, help="override the model's input size")
    p.add_argument("--crop_pct", type=float, default=None, help="override the model's crop fraction")
    p.add_argument("--workers", type=int, default=8, help="preprocessing threads")
    p.add_argument("--allow_nonfinite", action="store_true", help="convert a checkpoint holding NaN/Inf anyway")
    args = p.parse_args(argv)
    from dynconv_jax.convert import ConversionError

    try:
        result = evaluate(args.model, args.checkpoint, args.dataset, args.split, args.data_dir, args.batch_size,
                          args.num_examples, args.input_size, args.crop_pct, args.workers, args.allow_nonfinite)
    except (UsageError, ConversionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.model} on {args.dataset}/{args.split} ({result['num_examples']} images): "
          f"top-1 {100 * result['top1']:.2f}%  top-5 {100 * result['top5']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
