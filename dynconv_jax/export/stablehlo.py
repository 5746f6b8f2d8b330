"""StableHLO serving: :func:`to_stablehlo` serialises the inference function with ``jax.export``
and a symbolic batch size; :func:`load_stablehlo` runs it without the model's Python code."""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Mapping, Optional, Sequence, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import dynconv_spec
from dynconv_jax.export.batchnorm import as_linen_variables, fuse_batchnorm

# What a model raises when its variables or its input do not fit it (flax's scope errors are FlaxErrors).
_MODEL_FIT_ERRORS = (ValueError, TypeError, flax.errors.FlaxError)
#: The platforms ``jax.export`` lowers for (its ``platforms`` argument).
SERVING_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _variables_mismatch(model, variables, x_spec) -> Optional[str]:
    """The first difference between ``variables`` and the tree ``model.init`` makes for an input like
    ``x_spec`` (a missing or unexpected path, or both shapes of one), or None when there is none or the
    model cannot be initialised on that input (then the input is what does not fit)."""
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    try:
        expected = flax.core.unfreeze(jax.eval_shape(lambda x: model.init(rngs, x, train=False), x_spec))
    except _MODEL_FIT_ERRORS:
        return None
    if not isinstance(variables, Mapping):
        return f"variables are a {type(variables).__name__}, not a variables dict"
    want = flax.traverse_util.flatten_dict(expected, sep="/")
    have = {
        path: tuple(np.shape(leaf))
        for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(variables)), sep="/").items()
        if path.split("/")[0] in expected
    }
    for path, leaf in want.items():
        if path not in have:
            return f"{path} is missing from variables"
        if have[path] != tuple(leaf.shape):
            return f"{path} has shape {have[path]} in variables, {tuple(leaf.shape)} for this input"
    for path in have:
        if path not in want:
            return f"variables hold {path}, which the model does not have"
    return None


def _check_serving_shape(input_shape, where: str) -> Tuple[Optional[int], ...]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if (
        shape is None
        or len(shape) < 2
        or not (shape[0] is None or (isinstance(shape[0], int) and shape[0] > 0))
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:])
    ):
        raise ValueError(
            f"{where}: input_shape={input_shape!r}; expected (None or batch, *spatial, channels) "
            "with positive ints after the batch, e.g. (None, 32, 32, 3)"
        )
    return shape


def _check_serving_options(temperature, platforms) -> None:
    """``to_stablehlo``'s temperature (checked as the layers check a concrete one, before anything is traced,
    so that a bad value is not taken for an input that does not fit) and platforms (a file lowered for an
    unknown platform used to be written, and fail only when called)."""
    if temperature is not None:
        if np.ndim(temperature) != 0:
            raise ValueError(f"to_stablehlo: temperature must be a scalar, got shape {np.shape(temperature)}")
        dynconv_spec.check_temperature(temperature, "to_stablehlo")
    if platforms is None:
        return
    if isinstance(platforms, str) or not isinstance(platforms, (tuple, list)) or not platforms:
        raise ValueError(
            f"to_stablehlo: platforms={platforms!r}; expected a non-empty tuple of names from "
            f"{SERVING_PLATFORMS}, e.g. ('cpu', 'cuda')"
        )
    unknown = [p for p in platforms if p not in SERVING_PLATFORMS]
    if unknown or len(set(platforms)) != len(platforms):
        what = f"unknown {unknown}" if unknown else "a name twice"
        raise ValueError(
            f"to_stablehlo: platforms={tuple(platforms)!r} has {what}; jax.export lowers for {SERVING_PLATFORMS}"
        )


def to_stablehlo(
    model: nn.Module,
    variables,
    input_shape: Sequence[Optional[int]],
    temperature: Optional[float] = None,
    *,
    fuse_bn: bool = True,
    dtype=jnp.float32,
    platforms: Optional[Sequence[str]] = None,
) -> bytes:
    """Serialise ``model.apply(variables, x, train=False, temperature=temperature)`` for serving.

    Uses ``jax.export``: the result is a StableHLO module with the weights embedded as
    constants; :func:`load_stablehlo` runs it with no model code. A ``None`` batch in
    ``input_shape`` becomes a symbolic dimension, so one file serves every batch size.

    Args:
      model: a Flax (linen) model or dynamic layer (inference: ``train=False``). An NNX model is
        exported through its Linen twin: pass the Linen model here and the NNX module as ``variables``.
      variables: its variables, or an NNX module / ``nnx.State`` with the same parameter tree.
      input_shape: ``(None, *spatial, channels)`` (or a fixed batch size instead of None).
      temperature: the attention temperature baked in (None: the layers' default).
      fuse_bn: fold BatchNorms into the preceding convs first (:func:`fuse_batchnorm`).
      dtype: the input dtype.
      platforms: lowering platforms, a tuple from :data:`SERVING_PLATFORMS`, e.g. ``('cpu', 'cuda')``
        (default: the current backend).

    Returns the serialised module (bytes: a header and a checksum, then ``jax.export``'s payload).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import DynamicConv
      >>> model = DynamicConv(features=10, kernel_size=(3, 3), num_experts=2)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
      >>> from dynconv_jax.export import to_stablehlo, load_stablehlo
      >>> blob = to_stablehlo(model, variables, (None, 16, 16, 3))                  # a symbolic batch
      >>> serve = load_stablehlo(blob)
      >>> serve(jnp.zeros((5, 16, 16, 3))).shape
      (5, 16, 16, 10)
    """
    shape = _check_serving_shape(input_shape, "to_stablehlo")
    _check_serving_options(temperature, platforms)
    variables = as_linen_variables(model, variables, "to_stablehlo")
    concrete = (1,) + shape[1:]
    one_sample = jax.ShapeDtypeStruct(concrete, dtype)
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False, temperature=temperature), variables, one_sample)
    except _MODEL_FIT_ERRORS as error:
        mismatch = _variables_mismatch(model, variables, one_sample)
        if mismatch:
            raise ValueError(
                f"to_stablehlo: variables and input_shape={tuple(input_shape)!r} do not fit together "
                f"in {type(model).__name__}: {mismatch}"
            ) from error
        raise ValueError(
            f"to_stablehlo: input_shape={tuple(input_shape)!r} does not fit {type(model).__name__}: {error}"
        ) from error
    if fuse_bn:
        variables = fuse_batchnorm(model, variables, concrete)
    batch = jax.export.symbolic_shape("batch") if shape[0] is None else (shape[0],)
    spec = jax.ShapeDtypeStruct(tuple(batch) + shape[1:], dtype)

    def serve(x):
        return model.apply(variables, x, train=False, temperature=temperature)

    exported = jax.export.export(jax.jit(serve), platforms=platforms)(spec)
    payload = bytes(exported.serialize())
    return STABLEHLO_MAGIC + hashlib.sha256(payload).digest() + payload


# A serialised export: this header, the SHA-256 of the jax.export payload, the payload. The
# digest catches a corrupted weight, which the payload's own format would load silently.
STABLEHLO_MAGIC = b"dynconv.stablehlo.v1\n"
"""The first bytes of every :func:`to_stablehlo` file (a format version; :func:`load_stablehlo` checks it)."""


def load_stablehlo(blob: Union[bytes, bytearray, str, os.PathLike]) -> Callable[[jax.Array], jax.Array]:
    """A jitted callable ``x -> model output`` from :func:`to_stablehlo` bytes or a file holding them.

    Needs neither the model's code nor its variables (they are in the module). Raises
    ValueError for a file or bytes that are not such an export or whose checksum does not
    match (corrupted).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import DynamicConv
      >>> model = DynamicConv(features=10, kernel_size=(3, 3), num_experts=2)
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
      >>> import os, tempfile
      >>> from dynconv_jax.export import to_stablehlo, load_stablehlo
      >>> path = os.path.join(tempfile.mkdtemp(), "model.stablehlo")
      >>> with open(path, "wb") as f:
      ...     _ = f.write(to_stablehlo(model, variables, (None, 16, 16, 3)))
      >>> load_stablehlo(path)(jnp.zeros((2, 16, 16, 3))).shape                    # no model code needed
      (2, 16, 16, 10)
    """
    source = "blob"
    if isinstance(blob, (str, os.PathLike)):
        source = os.fspath(blob)
        with open(source, "rb") as f:
            blob = f.read()
    if not isinstance(blob, (bytes, bytearray)):
        raise TypeError(f"load_stablehlo: expected bytes or a path, got {type(blob).__name__}")
    header = len(STABLEHLO_MAGIC)
    if bytes(blob[:header]) != STABLEHLO_MAGIC:
        raise ValueError(
            f"load_stablehlo: {source} is not a dynconv StableHLO export (it does not start with "
            f"{STABLEHLO_MAGIC!r}); write one with dynconv_jax.export.to_stablehlo"
        )
    digest, payload = bytes(blob[header : header + 32]), bytes(blob[header + 32 :])
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError(
            f"load_stablehlo: {source} is corrupted (its SHA-256 checksum does not match; {len(blob)} bytes)"
        )
    try:
        exported = jax.export.deserialize(bytearray(payload))
    except Exception as error:  # flatbuffers / MLIR raise assorted types on corrupt input
        raise ValueError(
            f"load_stablehlo: {source} is not a serialised jax.export module "
            f"(corrupt or another format): {type(error).__name__}: {error}"
        ) from error
    return jax.jit(exported.call)
