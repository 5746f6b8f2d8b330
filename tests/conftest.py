"""Suite-wide settings, applied before any test module imports JAX (and inherited by the subprocesses
the tests start)."""
import os

# Compilation, not computation, is most of the suite's time on CPU (docs/performance.md, "Compile time"):
# JAX's partitionable threefry (the default since 0.5) compiles each random draw of a new shape for
# seconds on XLA:CPU, the non-partitionable one (the earlier default) in a fraction of that. Random
# streams differ; no test depends on a particular stream. (XLA's LLVM level 0 would save more but changes
# the rounding of some convolutions, which a bit-identity test caught: not used.)
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
