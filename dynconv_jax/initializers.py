"""The initializers of the PyTorch references, shared by the Linen and NNX layers and models.

Each one draws what the official PyTorch code draws (same distribution, same fan), so a model
initialised here trains like its PyTorch twin; the values differ (different random streams).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax.typing import Initializer

# PyTorch's nn.Conv2d / nn.Linear default: kaiming_uniform_(a=sqrt(5)) = U(±1/sqrt(fan_in)),
# i.e. variance_scaling(1/3, fan_in, uniform). ``batch_axis=(0,)`` makes each expert of an
# ``[K, *k, I/g, O]`` bank its own convolution kernel (fan_in = I/g * prod(k)), as timm's
# CondConv initializer does expert by expert.
torch_default_expert_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", batch_axis=(0,))
torch_default_dense_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# ODConv official: kaiming_normal_(mode='fan_out', nonlinearity='relu') for experts and the
# 1x1 attention convs: N(0, 2 / fan_out), fan_out = O * prod(k) (experts) or the output width.
kaiming_fan_out_expert_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal", batch_axis=(0,))
kaiming_fan_out_dense_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu') of a static conv ``[*k, I/g, O]``:
# N(0, 2 / (O * prod(k))), every static conv of torchvision's and the official ODConv models
# ("normal" is untruncated in jax).
kaiming_fan_out_normal = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# The official models' classifier: N(0, 0.01²) weights (zero bias).
classifier_init = jax.nn.initializers.normal(0.01)


def uniform_init(bound: float) -> Initializer:
    """U(-bound, bound)."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_default_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default bias init for a layer with ``fan_in`` inputs: U(±1/sqrt(fan_in))."""
    return uniform_init(1.0 / math.sqrt(fan_in))


def expert_bias_init(bias_init: Optional[Initializer], fan_in: int) -> Initializer:
    """The ``[K, O]`` expert bias initializer; None means PyTorch's conv default U(±1/sqrt(fan_in))."""
    return bias_init or torch_default_bias_init(fan_in)


def allow_empty(init: Initializer) -> Initializer:
    """``init``, but an array with a zero-sized axis is returned empty (``variance_scaling`` divides by its fans):
    PyTorch initialises empty tensors as a no-op (a KernelWarehouse basis map onto no other cells)."""

    def wrapped(key, shape, dtype=jnp.float32):
        return jnp.zeros(shape, dtype) if 0 in tuple(shape) else init(key, shape, dtype)

    return wrapped
