"""Whole-model training throughput (images/s): ResNet-18 CIFAR, static vs dynamic, JAX vs PyTorch.

One training step = forward, cross-entropy, backward, SGD-momentum update (optax /
torch.optim), on random 32x32x3 images, 10 classes. JAX jit-compiles the whole
step (with ``batch_stats`` updates); PyTorch runs eager with the same thread count.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from dynconv_spec import CONV_TYPES

from .timing import markdown_table, median_times

CONVS = CONV_TYPES
MODEL_ARGS = dict(num_classes=10, stem="cifar")


def _jax_step(conv, batch):
    import optax

    from dynconv_jax.models import resnet18

    model = resnet18(conv=conv, **MODEL_ARGS)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=batch))
    variables = model.init(jax.random.PRNGKey(0), x)
    params, state = variables["params"], {c: v for c, v in variables.items() if c != "params"}
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)

    def loss_fn(params, state, x, labels, key):
        logits, new_state = model.apply({"params": params, **state}, x, train=True, mutable=list(state),
                                        rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state

    @jax.jit
    def step(params, state, opt_state, x, labels, key):
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, labels, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, loss

    key = jax.random.PRNGKey(1)
    return lambda: step(params, state, opt_state, x, labels, key)


def _torch_step(conv, batch):
    import torch

    from dynconv_torch.models import resnet18

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = resnet18(conv=conv, **MODEL_ARGS).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    labels = torch.randint(0, 10, (batch,), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        return loss

    return step


def run(quick: bool, repeats: int, threads=None):
    backend = jax.default_backend()
    batch = 8 if quick else (32 if backend == "cpu" else 128)
    convs = ("static", "dynamic") if quick else CONVS
    sync_torch = lambda _: None  # noqa: E731
    have_torch = True
    try:
        import torch

        torch.set_num_threads(threads or os.cpu_count())
        torch.backends.cudnn.benchmark = True
        if torch.cuda.is_available():
            sync_torch = lambda _: torch.cuda.synchronize()  # noqa: E731
        import dynconv_torch.models  # noqa: F401
    except ImportError:
        have_torch = False
    records, rows = [], []
    for conv in convs:
        tj = median_times({"jax": _jax_step(conv, batch)}, repeats=repeats, sync=jax.block_until_ready)["jax"]
        tt = (median_times({"torch": _torch_step(conv, batch)}, repeats=repeats, sync=sync_torch)["torch"]
              if have_torch else None)
        records.append({"conv": conv, "batch": batch, "jax_step_s": tj, "torch_step_s": tt,
                        "jax_images_per_s": batch / tj, "torch_images_per_s": batch / tt if tt else None})
        print(f"resnet18-cifar {conv} B{batch}: jax {batch / tj:.1f} img/s, "
              f"torch {batch / tt:.1f} img/s" if tt else f"resnet18-cifar {conv}: jax {batch / tj:.1f} img/s",
              flush=True)
    static = {r["conv"]: r for r in records}["static"]
    for r in records:
        rows.append([r["conv"], r["batch"], f"{r['jax_images_per_s']:.1f}",
                     f"{static['jax_step_s'] / r['jax_step_s']:.2f}",
                     "–" if r["torch_images_per_s"] is None else f"{r['torch_images_per_s']:.1f}",
                     "–" if r["torch_step_s"] is None else f"{static['torch_step_s'] / r['torch_step_s']:.2f}",
                     "–" if r["torch_step_s"] is None else f"{r['torch_step_s'] / r['jax_step_s']:.2f}×"])
    md = ("ResNet-18, CIFAR stem, 10 classes, 32x32 random images, one SGD-momentum training step "
          "(forward, loss, backward, update), median of repeats.\n\n")
    md += markdown_table(["conv", "batch", "JAX img/s", "JAX vs static", "torch img/s", "torch vs static",
                          "JAX speed-up over torch"], rows)
    return {"model": "resnet18", "model_args": MODEL_ARGS, "batch": batch, "results": records}, md
