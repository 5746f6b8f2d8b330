"""Suite-wide settings, applied before any test module imports JAX (and inherited by the subprocesses
the tests start)."""
import os
import shutil
import tempfile

# strategy='auto' measures every applicable strategy the first time it meets a problem
# (dynconv_jax.autotune): in the suite that would compile each candidate for every test shape.
# The suite runs the fixed rules instead; tests/test_autotune.py turns measuring on with a cache of its own.
os.environ.setdefault("DYNCONV_AUTOTUNE", "0")

# Compilation, not computation, is most of the suite's time on CPU (docs/performance.md, "Compile time"):
# JAX's partitionable threefry (the default since 0.5) compiles each random draw of a new shape for
# seconds on XLA:CPU, the non-partitionable one (the earlier default) in a fraction of that. Random
# streams differ; no test depends on a particular stream. (XLA's LLVM level 0 would save more but changes
# the rounding of some convolutions, which a bit-identity test caught: not used.)
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")

# Many tests compile the same programs (the tiny training configuration in-process, again after a resume,
# and in the `python -m train` subprocesses): one persistent compilation cache, new for each pytest run and
# shared by the xdist workers (they inherit the controller's environment) and their subprocesses, compiles
# each program once. Only programs that took >= 0.5 s to compile are written. A test that needs a cache of
# its own sets JAX_COMPILATION_CACHE_DIR for itself (tests/test_train.py::compile_cache_env).
_OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILATION_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dynconv-tests-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_unconfigure(config):
    """The run that made the compilation cache (the controller, or the only process) removes it."""
    if _OWN_COMPILATION_CACHE and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
