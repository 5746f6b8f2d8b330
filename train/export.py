"""Export a trained Flax model and check it against the live model. torch is imported lazily.

* End of training (:func:`export_and_verify`): safetensors for PyTorch, and the ``dynconv_torch``
  twin's predictions compared with Flax's on the eval split.
* For serving, ``python -m train.export --workdir RUN --format stablehlo|onnx --out FILE [--batch N]``
  (:func:`main`): the newest checkpoint of a ``python -m train`` run as a StableHLO module
  (``dynconv_jax.export.to_stablehlo``) or an ONNX graph (``dynconv_torch.export.to_onnx`` of the
  ``dynconv_torch`` twin), both with a dynamic batch axis unless ``--batch`` fixes it, checked
  on evaluation images against the Flax model (loaded StableHLO, or ONNX Runtime).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np

from dynconv_jax.convert import save_safetensors
from dynconv_spec.paths import check_output_file
from train.config import UsageError
from train.steps import model_kwargs


def jax_logits(model, variables, images: np.ndarray, temperature: float, batch_size: int = 256) -> np.ndarray:
    """Eval-mode logits ``[N, num_classes]`` in float32, in batches of one shape (the last one padded
    with its final image), so the model compiles once."""
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False, temperature=temperature))
    batch_size = min(batch_size, len(images))
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        out.append(np.asarray(apply(variables, padded), np.float32)[: len(chunk)])
    return np.concatenate(out)


def torch_logits(torch_model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of a ``dynconv_torch`` model on NHWC ``images`` (fed as NCHW), float32."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size].transpose(0, 3, 1, 2)))
            out.append(torch_model(x).float().numpy())
    return np.concatenate(out)


def torch_twin(config, variables, num_classes: int, image_shape, temperature: float, path: str):
    """The eval-mode ``dynconv_torch.models.<config.model>`` holding ``variables``, written to
    ``path`` (safetensors) on the way and loaded back strictly; attention temperature set."""
    from safetensors.torch import load_file

    from dynconv_torch import models as torch_models

    kwargs = model_kwargs(config, num_classes, image_shape)
    torch_model = torch_models.create_model(config.model, **kwargs)
    save_safetensors(
        variables,
        path,
        like=torch_model.state_dict(),
        metadata={"model": config.model, **{k: str(v) for k, v in kwargs.items()}},
    )
    torch_model.load_state_dict(load_file(path), strict=True)
    torch_models.set_temperature(torch_model, float(temperature))
    return torch_model.eval()


def export_and_verify(
    config, model, variables, images: np.ndarray, num_classes: int, temperature: float, path: str
) -> Optional[Dict[str, Any]]:
    """Write ``variables`` as a PyTorch state_dict to ``path`` (safetensors) and compare the
    predictions of ``dynconv_torch.models.<config.model>(same arguments)`` loaded from it with
    the Flax model's on ``images`` (normalised NHWC float32).

    Returns ``{'path', 'agreement', 'max_abs_logit_diff', 'max_abs_logit'}`` or None (with a
    message) when torch is not installed; the file is written either way.
    """
    variables = jax.device_get(variables)
    try:
        import torch  # noqa: F401  (only to know whether the check can run)
    except ImportError:
        save_safetensors(variables, path)
        print(
            f"export: wrote {path}; skipped the PyTorch check (torch is not installed; pip install 'dynconv[torch]')",
            flush=True,
        )
        return None
    torch_model = torch_twin(config, variables, num_classes, images.shape[1:], temperature, path)
    expected = jax_logits(model, variables, images, temperature)
    actual = torch_logits(torch_model, images)
    diff = float(np.max(np.abs(expected - actual)))
    agreement = float(np.mean(expected.argmax(-1) == actual.argmax(-1)))
    result = {
        "path": os.path.abspath(path),
        "agreement": agreement,
        "max_abs_logit_diff": diff,
        "max_abs_logit": float(np.max(np.abs(expected))),
    }
    print(
        f"export: {path}; dynconv_torch.models.{config.model} agrees with Flax on "
        f"{agreement * 100:.2f}% of {len(images)} eval predictions, max |logit diff| {diff:.3g} "
        f"(max |logit| {result['max_abs_logit']:.3g})",
        flush=True,
    )
    return result


def _relative(expected: np.ndarray, actual: np.ndarray) -> float:
    scale = float(np.max(np.abs(expected)))
    diff = float(np.max(np.abs(expected - actual)))
    return diff / scale if scale > 0 else diff


def check_export_args(fmt: str, out: str, batch: Optional[int]) -> None:
    """:class:`~train.config.UsageError` for a format other than 'stablehlo'/'onnx', a batch < 1, or an
    ``out`` that is not a file in an existing, writable folder."""
    if fmt not in ("stablehlo", "onnx"):
        raise UsageError(f"--format {fmt!r}: expected 'stablehlo' or 'onnx'")
    if batch is not None and not (isinstance(batch, int) and batch >= 1):
        raise UsageError(f"--batch {batch}: must be >= 1")
    try:
        check_output_file(out, "--out")
    except ValueError as error:
        raise UsageError(str(error)) from None


def export_run(workdir: str, fmt: str, out: str, batch: Optional[int] = None, check_images: int = 32) -> Dict[str, Any]:
    """Export the newest checkpoint of the run in ``workdir`` to ``out`` (``fmt``: 'stablehlo' or 'onnx')
    and compare the export with the live Flax model on the first evaluation images, run
    through the export in batches of ``batch`` (or of 1 and all of them when the batch is dynamic).

    Returns ``{'path', 'format', 'batch', 'images', 'max_rel_diff', 'agreement'}``. The arguments are
    checked (:func:`check_export_args`) before the run is loaded.
    """
    from train.plot_attention import load_run

    check_export_args(fmt, out, batch)
    config, model, variables, dataset, temperature, step = load_run(workdir)
    n = batch or check_images
    images = np.asarray(dataset.eval_examples(n), np.float32)
    if len(images) < n:
        raise ValueError(f"--batch {n}: the run's {config.eval_split} split has only {len(images)} images")
    expected = jax_logits(model, variables, images, temperature)
    image_shape = tuple(images.shape[1:])  # (H, W, C)
    groups = [images] if batch else [images[:1], images]
    if fmt == "stablehlo":
        from dynconv_jax.export import load_stablehlo, to_stablehlo

        blob = to_stablehlo(model, jax.device_get(variables), (batch,) + image_shape, temperature)
        with open(out, "wb") as f:
            f.write(blob)
        served = load_stablehlo(out)
        actual = [np.asarray(served(x), np.float32) for x in groups]
    else:
        from dynconv_torch.export import onnx_session, to_onnx

        with tempfile.TemporaryDirectory() as tmp:
            torch_model = torch_twin(
                config,
                jax.device_get(variables),
                dataset.num_classes,
                image_shape,
                temperature,
                os.path.join(tmp, "model.safetensors"),
            )
        h, w, c = image_shape
        to_onnx(torch_model, out, (batch, c, h, w))
        session = onnx_session(out)
        actual = [session.run(None, {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})[0] for x in groups]
    diff = max(_relative(expected[: len(x)], y) for x, y in zip(groups, actual))
    agreement = float(np.mean(expected.argmax(-1) == actual[-1].argmax(-1)))
    result = {
        "path": os.path.abspath(out),
        "format": fmt,
        "batch": batch,
        "images": len(images),
        "max_rel_diff": diff,
        "agreement": agreement,
        "step": int(step),
        "temperature": temperature,
    }
    sizes = ", ".join(str(len(x)) for x in groups)
    print(
        f"export: {out} ({fmt}, batch {'dynamic' if batch is None else batch}, {os.path.getsize(out)} bytes) from "
        f"{config.model} conv={config.conv} step {step}, T={temperature:.3g}; against the live Flax model on "
        f"{len(images)} {config.eval_split} images (batches of {sizes}): max relative logit diff {diff:.3g}, "
        f"{agreement * 100:.2f}% same predictions",
        flush=True,
    )
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.export", description="Export a `python -m train` run for serving and check it."
    )
    parser.add_argument("--workdir", required=True, help="directory of a `python -m train` run")
    parser.add_argument("--format", required=True, choices=["stablehlo", "onnx"], help="export format")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="fix the batch size of the export (default: dynamic) and check on N images",
    )
    args = parser.parse_args(argv)
    try:
        check_export_args(args.format, args.out, args.batch)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        export_run(args.workdir, args.format, args.out, args.batch)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
