"""A Flax NNX training example: a dynamic-convolution ResNet of :mod:`dynconv_jax.nnx.models` on the digits.

The NNX counterpart of the Linen loop in ``train/`` in one small file: ``nnx.Optimizer`` + optax
(SGD with momentum, cosine learning rate), the temperature annealed linearly from ``temp_init``
to 1 over the first ``temp_epochs`` epochs and passed to the model as a traced argument (no
recompilation), ``model.train()`` / ``model.eval()`` for BatchNorm and dropout, ``nnx.jit`` steps.

    python -m train.nnx_example --conv=odconv --epochs=8
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dynconv_jax.nnx import models
from train.config import Config
from train.data import load_dataset


@dataclasses.dataclass(frozen=True)
class ExampleConfig:
    """The knobs of the example (defaults: a few epochs of a narrow dynamic ResNet-18 on 8×8 digits)."""

    model: str = "resnet18"
    conv: str = "dynamic"
    num_experts: int = 4
    base_width: int = 8
    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    temp_init: float = 30.0
    temp_epochs: float = 2.0
    seed: int = 0


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model, optimizer: nnx.Optimizer, images, labels, temperature) -> Dict[str, jax.Array]:
    """One SGD step in training mode (batch statistics; running statistics update in place)."""

    def loss_fn(model):
        logits = model(images, temperature=temperature)
        return cross_entropy(logits, labels), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


@nnx.jit
def predict(model, images):
    """Class predictions (call on a model in eval mode; temperature 1)."""
    return jnp.argmax(model(images), -1)


def build_model(config: ExampleConfig, in_channels: int, num_classes: int):
    kwargs = dict(
        conv=config.conv, num_classes=num_classes, stem="cifar", in_channels=in_channels, rngs=nnx.Rngs(config.seed)
    )
    if config.conv != "static":
        kwargs["num_experts"] = config.num_experts
    if config.model.startswith("resnet"):
        kwargs["base_width"] = config.base_width
    return models.create_model(config.model, **kwargs)


def run(config: ExampleConfig = ExampleConfig(), log=print) -> float:
    """Train on the digits' train split, return the accuracy on its test split."""
    data = load_dataset(Config())  # the embedded digits, normalised with their training statistics
    normalize = data.preprocess.normalize
    train_x, train_y = normalize(data.train.images), data.train.labels
    model = build_model(config, data.image_shape[-1], data.num_classes)
    steps_per_epoch = len(train_x) // config.batch_size
    total = steps_per_epoch * config.epochs
    learning_rate = optax.cosine_decay_schedule(config.learning_rate, total)
    temperature = optax.linear_schedule(config.temp_init, 1.0, max(int(config.temp_epochs * steps_per_epoch), 1))
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(learning_rate, momentum=config.momentum, nesterov=True),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(config.seed)
    step = 0
    for epoch in range(config.epochs):
        model.train()
        order = rng.permutation(len(train_x))
        for i in range(steps_per_epoch):
            idx = order[i * config.batch_size : (i + 1) * config.batch_size]
            metrics = train_step(model, optimizer, train_x[idx], train_y[idx], jnp.float32(temperature(step)))
            step += 1
        model.eval()
        accuracy = float(np.mean(np.asarray(predict(model, normalize(data.eval.images))) == data.eval.labels))
        log(
            f"epoch {epoch + 1}: loss {float(metrics['loss']):.4f}  T {float(temperature(step)):.2f}  "
            f"test accuracy {accuracy:.4f}"
        )
    return accuracy


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(ExampleConfig):
        parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
    run(ExampleConfig(**vars(parser.parse_args(argv))))


if __name__ == "__main__":
    main()
