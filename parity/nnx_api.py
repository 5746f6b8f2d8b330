"""``python -m parity --api nnx``: run the torch cases against the Flax NNX twins (``dynconv_jax.nnx``).

Each case's Linen module is replaced by :class:`LinenStyle`, which builds the NNX twin
(:func:`dynconv_jax.nnx.from_linen`) and offers the Linen ``init``/``apply`` calls the harness
makes, so every check (forward eval/train, running statistics, gradients, SGD) and tolerance is
the Linen one and the numbers come from the NNX modules.
"""
from __future__ import annotations

import dataclasses

import jax
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


__all__ = ["NNX_FAMILIES", "LinenStyle", "nnx_case"]
