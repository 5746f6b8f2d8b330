"""The one module of ``dynconv_jax`` that relies on a detail a library does not publish.

Each function here names the detail, the versions it was checked with, and why no public API does the
job; tests/test_compat.py checks each against the installed version and fails (it does not fall back)
when a release changes it. Nothing else in ``dynconv_jax`` uses a private name (the same test greps).
"""

from __future__ import annotations

from flax import nnx

#: The attribute ``flax.nnx.capture`` sets on every module of the call it collects from, for the length of
#: the call (flax 0.12.6, the first with ``nnx.capture``, to 0.12.8). flax has no public way to ask whether a
#: capture is running: ``Module.sow`` outside one stores the value as a module attribute and appends to it
#: on every call, with a DeprecationWarning.
NNX_CAPTURES_ATTRIBUTE = "__captures__"


def nnx_capturing(module: nnx.Module) -> bool:
    """Whether ``module`` is being called under ``nnx.capture`` (so ``module.sow`` records into the capture)."""
    return hasattr(module, NNX_CAPTURES_ATTRIBUTE)
