"""Test helpers shared by several test files (import as ``from _helpers import ...``)."""

from __future__ import annotations

import math
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax import lax

from dynconv_jax.convert import torch_module_to_flax

# Channels-last dimension numbers of lax.conv_general_dilated for 1-D, 2-D and 3-D convolutions.
DIMENSION_NUMBERS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def naive_dynamic_conv(x, experts, a, s, c, f, bias, *, strides, padding, dilation, groups):
    """The definition of a dynamic conv (CondConv / DY-CNN / ODConv), one sample at a time, straight on lax.

    ``W_b = sum_k a[b, k] s_b W_k``; ``y_b = f_b * conv(c_b * x_b, W_b) + a_b @ bias``. x: ``[B, *S, Cin]``;
    experts: ``[K, *k, Cin/g, Cout]``; a: ``[B, K]``; s: ``[B, *k]``, c: ``[B, Cin]``, f: ``[B, Cout]``
    and bias ``[K, Cout]`` may each be None.
    """
    outs = []
    for b in range(x.shape[0]):
        w = sum(a[b, k] * experts[k] for k in range(experts.shape[0]))
        if s is not None:
            w = w * s[b][..., None, None]
        xb = x[b] if c is None else x[b] * c[b]
        yb = lax.conv_general_dilated(
            xb[None],
            w,
            window_strides=strides,
            padding=padding,
            rhs_dilation=dilation,
            dimension_numbers=DIMENSION_NUMBERS[x.ndim - 2],
            feature_group_count=groups,
        )[0]
        if f is not None:
            yb = yb * f[b]
        if bias is not None:
            yb = yb + a[b] @ bias
        outs.append(yb)
    return jnp.stack(outs)


def random_variables(layer, x, seed=0):
    """N(0, 1) parameters (BatchNorm variance 1) drawn by NumPy in the shapes ``jax.eval_shape`` gives
    (the layer's validation runs while tracing; no init is compiled)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(layer.init, jax.random.key(seed), x))


def skip_without_private_tmpfs(mount, size: str) -> None:
    """Skip the calling test unless a tmpfs of ``size`` can be mounted at ``mount`` in a private user and mount
    namespace (``unshare -rm``): how the disk-full tests get a real full disk without privileges."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {mount}"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({probe.stderr.strip()})")


def flax_leaf_counts(variables) -> dict:
    """``{(collection, *module path, leaf): elements}`` over params and batch_stats."""
    return {
        (col,) + path: math.prod(leaf.shape)
        for col in ("params", "batch_stats")
        for path, leaf in flatten_dict(variables.get(col, {})).items()
    }


def torch_to_flax_names(shapes: dict) -> dict:
    """PyTorch ``{key: shape}`` → ``{flax path: elements}`` by the DESIGN.md rules (leaf names modulo
    weight ↔ kernel/scale, which the flax side also reduces to 'weight')."""
    out = {}
    for key, shape in shapes.items():
        module, leaf = key.rsplit(".", 1)
        if leaf == "num_batches_tracked":
            continue
        col = "batch_stats" if leaf in ("running_mean", "running_var") else "params"
        leaf = {"running_mean": "mean", "running_var": "var"}.get(leaf, leaf)
        out[(col,) + torch_module_to_flax(module) + (leaf,)] = math.prod(shape)
    return out


def weight_names(counts: dict) -> dict:
    return {p[:-1] + ("weight" if p[-1] in ("kernel", "scale") else p[-1],): n for p, n in counts.items()}
