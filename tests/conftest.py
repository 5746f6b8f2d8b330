"""Suite-wide settings, applied before any test module imports JAX (and inherited by the subprocesses
the tests start)."""
import os

# strategy='auto' measures every applicable strategy the first time it meets a problem
# (dynconv_jax.autotune): in the suite that would compile each candidate for every test shape.
# The suite runs the fixed rules instead; tests/test_autotune.py turns measuring on with a cache of its own.
os.environ.setdefault("DYNCONV_AUTOTUNE", "0")

# Compilation, not computation, is most of the suite's time on CPU (docs/performance.md, "Compile time").
# Two settings that change no result a test checks make it several times cheaper:
# - LLVM optimisation level 0 for XLA:CPU's generated code. The arithmetic is the same IR (XLA:CPU emits
#   it without fast-math flags, so LLVM may not reassociate or contract at any level); convolutions and
#   dot products run in the same library kernels. Only the speed of the small fused loops changes.
# - JAX's non-partitionable threefry (the pre-0.5 default): the partitionable one compiles each random
#   draw of a new shape for seconds on CPU. Random streams differ, so no test depends on a stream.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
