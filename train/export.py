"""Export a trained Flax model to PyTorch (safetensors) and check that the ``dynconv_torch``
twin predicts the same on the eval split. torch is imported here only, lazily."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import jax
import numpy as np

from dynconv_jax.convert import save_safetensors
from train.steps import model_kwargs


def jax_logits(model, variables, images: np.ndarray, temperature: float, batch_size: int = 256) -> np.ndarray:
    """Eval-mode logits ``[N, num_classes]`` in float32, in batches."""
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False, temperature=temperature))
    return np.concatenate([np.asarray(apply(variables, images[i:i + batch_size]), np.float32)
                           for i in range(0, len(images), batch_size)])


def torch_logits(torch_model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of a ``dynconv_torch`` model on NHWC ``images`` (fed as NCHW), float32."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size].transpose(0, 3, 1, 2)))
            out.append(torch_model(x).float().numpy())
    return np.concatenate(out)


def export_and_verify(config, model, variables, images: np.ndarray, num_classes: int, temperature: float,
                      path: str) -> Optional[Dict[str, Any]]:
    """Write ``variables`` as a PyTorch state_dict to ``path`` (safetensors) and compare the
    predictions of ``dynconv_torch.models.<config.model>(same arguments)`` loaded from it with
    the Flax model's on ``images`` (normalised NHWC float32).

    Returns ``{'path', 'agreement', 'max_abs_logit_diff', 'max_abs_logit'}`` or None (with a
    message) when torch is not installed; the file is written either way.
    """
    variables = jax.device_get(variables)
    kwargs = model_kwargs(config, num_classes, images.shape[1:])
    try:
        import torch  # noqa: F401  (only to know whether the check can run)
    except ImportError:
        save_safetensors(variables, path)
        print(f"export: wrote {path}; skipped the PyTorch check (torch is not installed; "
              "pip install 'dynconv[torch]')", flush=True)
        return None
    from safetensors.torch import load_file

    from dynconv_torch import models as torch_models

    torch_model = getattr(torch_models, config.model)(**kwargs)
    save_safetensors(variables, path, like=torch_model.state_dict(),
                     metadata={"model": config.model, **{k: str(v) for k, v in kwargs.items()}})
    torch_model.load_state_dict(load_file(path), strict=True)
    torch_models.set_temperature(torch_model, float(temperature))
    torch_model.eval()
    expected = jax_logits(model, variables, images, temperature)
    actual = torch_logits(torch_model, images)
    diff = float(np.max(np.abs(expected - actual)))
    agreement = float(np.mean(expected.argmax(-1) == actual.argmax(-1)))
    result = {"path": os.path.abspath(path), "agreement": agreement, "max_abs_logit_diff": diff,
              "max_abs_logit": float(np.max(np.abs(expected)))}
    print(f"export: {path}; dynconv_torch.models.{config.model} agrees with Flax on "
          f"{agreement * 100:.2f}% of {len(images)} eval predictions, max |logit diff| {diff:.3g} "
          f"(max |logit| {result['max_abs_logit']:.3g})", flush=True)
    return result
