"""The Flax NNX twins (``dynconv_jax.nnx``) in the parity harness.

``python -m parity --api nnx`` runs the torch cases against the NNX twins; ``python -m parity.nnx_api``
compares every layer and model case's NNX twin with its Linen module (float64, same variables).

For ``--api nnx`` each case's Linen module is replaced by :class:`LinenStyle`, which builds the NNX twin
(:func:`dynconv_jax.nnx.from_linen`) and offers the Linen ``init``/``apply`` calls the harness
makes, so every check (forward eval/train, running statistics, gradients, SGD) and tolerance is
the Linen one and the numbers come from the NNX modules.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynconv_jax.nnx import from_linen, linen_variables, load_linen_variables
from parity.cases import LAYER_FAMILIES, MODEL_FAMILIES

#: The case families whose Flax side has an NNX twin (EfficientNet-CondConv has none yet).
NNX_FAMILIES = LAYER_FAMILIES + MODEL_FAMILIES


class LinenStyle:
    """Linen-style ``init`` / ``apply`` of the NNX twin of a Linen layer or model (functional:
    ``apply`` merges a fresh NNX module, loads the given variables, runs it)."""

    def __init__(self, linen_module):
        self.linen = linen_module
        self._graph = None

    def _abstract(self, in_features: int):
        return nnx.eval_shape(lambda: from_linen(self.linen, in_features, rngs=nnx.Rngs(0)))

    def init(self, rngs, x, **kwargs):
        del kwargs
        key = rngs["params"] if isinstance(rngs, dict) else rngs
        return linen_variables(from_linen(self.linen, x.shape[-1], rngs=nnx.Rngs(key)))

    def apply(self, variables, x, train: bool = False, mutable=False, rngs=None, **kwargs):
        del rngs  # the parity cases have no active dropout
        if self._graph is None:
            self._graph = nnx.split(self._abstract(x.shape[-1]))
        graphdef, abstract_state = self._graph
        # new Variables in the current trace (the stored ones belong to the trace that made them)
        model = nnx.merge(graphdef, jax.tree.map(lambda leaf: leaf, abstract_state))
        load_linen_variables(model, variables)
        model.train() if train else model.eval()
        y = model(x, **kwargs)
        if mutable:
            return y, {"batch_stats": linen_variables(model)["batch_stats"]}
        return y


def nnx_case(case):
    """The same case with its Flax side built as the NNX twin."""
    make_flax = case.make_flax
    return dataclasses.replace(case, make_flax=lambda dtype, precision: LinenStyle(make_flax(dtype, precision)))


def _rel(a, b) -> float:
    """``max|a - b| / max|b|`` (absolute where ``b`` is all zeros, e.g. a dead ReLU's gradient)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) or 1.0)) if a.size else 0.0


def _tree_rel(a, b) -> float:
    errs = jax.tree.leaves(jax.tree.map(_rel, a, b))
    return max(errs) if errs else 0.0


def compare_with_linen(linen_module, variables, x, temperature=None) -> Dict[str, float]:
    """The NNX twin of ``linen_module`` against it, given the same Linen ``variables`` and input ``x``.

    Returns the worst relative difference per check: ``tree`` (0 when the parameter trees have the
    same paths and shapes, else inf), ``forward_eval``, ``forward_train``, ``running_stats``,
    ``grad_input`` and ``grad_params`` (train mode, loss ``sum(sin(y))``). Each side is one jitted
    program (on CPU, compiling a model's step is cheaper than dispatching its ops one by one).
    """
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    model = nnx.eval_shape(lambda: from_linen(linen_module, x.shape[-1], rngs=nnx.Rngs(0)))
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    if shapes(linen_variables(model)) != shapes(variables):
        return {"tree": float("inf")}
    kwargs = {} if temperature is None else {"temperature": temperature}
    load_linen_variables(model, variables)

    @jax.jit
    def linen_side(variables, x):
        def loss(params, x):
            y, upd = linen_module.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"], **kwargs
            )
            return jnp.sum(jnp.sin(y)), (y, upd.get("batch_stats", {}))

        (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
        return linen_module.apply(variables, x, **kwargs), y, stats, grads

    @nnx.jit
    def nnx_side(model, x):
        model.eval()
        y_eval = model(x, **kwargs)
        model.train()

        def loss(model, x):
            y = model(x, **kwargs)
            return jnp.sum(jnp.sin(y)), y

        (_, y), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        return y_eval, y, grads

    y_eval, y, stats, (g_params, g_x) = linen_side(variables, x)
    n_eval, n_y, (n_params, n_x) = nnx_side(model, x)
    return {
        "tree": 0.0,
        "forward_eval": _rel(n_eval, y_eval),
        "forward_train": _rel(n_y, y),
        "running_stats": _tree_rel(linen_variables(model)["batch_stats"], stats),
        "grad_input": _rel(n_x, g_x),
        "grad_params": _tree_rel(nnx.to_pure_dict(n_params), g_params),
    }


def main(argv=None) -> int:
    """``python -m parity.nnx_api``: every layer and model case of the parity grid, NNX twin against Linen
    (float64, same variables); prints the worst relative difference per case and check, exits 1 above 1e-12."""
    import argparse
    import time

    from jax import lax

    from parity import cases as registry

    p = argparse.ArgumentParser(prog="python -m parity.nnx_api", description=main.__doc__)
    p.add_argument("--match", default=None, help="only cases whose name contains this string")
    args = p.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    worst, failed, start = {}, 0, time.time()
    for case in registry.select(NNX_FAMILIES, match=args.match):
        linen = case.make_flax(jnp.float64, lax.Precision.HIGHEST)
        batch, channels, *spatial = case.input_shape
        x = jax.random.normal(jax.random.key(0), (max(batch, 2), *spatial, channels), jnp.float64)
        variables = jax.jit(linen.init)({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x)
        errs = compare_with_linen(linen, variables, x, case.temperature)
        bad = [k for k, v in errs.items() if not v <= 1e-12]
        failed += bool(bad)
        for k, v in errs.items():
            worst[k] = max(worst.get(k, 0.0), v)
        print(
            f"[{time.time() - start:6.1f}s] {case.name}: "
            + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
            + (f"  FAIL {bad}" if bad else ""),
            flush=True,
        )
    print("worst: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + f"; {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
