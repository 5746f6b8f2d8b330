"""Suite-wide settings, applied before any test module imports JAX (and inherited by the subprocesses
the tests start)."""

import atexit
import os
import shutil
import tempfile

import pytest

# Compilation, not computation, is most of the suite's time on CPU (docs/performance.md, "Compile time"):
# JAX's partitionable threefry (the default since 0.5) compiles each random draw of a new shape for
# seconds on XLA:CPU, the non-partitionable one (the earlier default) in a fraction of that. Random
# streams differ; no test depends on a particular stream. (XLA's LLVM level 0 would save more but changes
# the rounding of some convolutions, which a bit-identity test of this process caught: only the subprocesses
# that train or export, compared with runs of the same flag, use it: _helpers.quick_compile_env.)
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")

# JAX's persistent compilation cache in a folder of this session, removed at its end: a program compiled
# once (by one xdist worker, or the train step of a model that several subprocess runs train) is loaded,
# not compiled again, by the other workers and subprocesses, which inherit the variable. A loaded program
# is the compiled one, so results keep their bits; nothing outlives the session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _COMPILATION_CACHE = tempfile.mkdtemp(prefix="dynconv-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)


# The docs summary line (tests/test_docs.py): blocks run / skipped with a reason / failed. Counted on
# the process that writes the report, so it adds up xdist workers' results too.
_DOC_BLOCKS = {"run": 0, "skipped": 0, "failed": 0}


def pytest_runtest_logreport(report):
    if "test_docs.py::test_doc_block[" not in report.nodeid:
        return
    if report.failed:
        _DOC_BLOCKS["failed"] += 1
    elif report.skipped:
        _DOC_BLOCKS["skipped"] += 1
    elif report.when == "call":
        _DOC_BLOCKS["run"] += 1


def pytest_terminal_summary(terminalreporter):
    if any(_DOC_BLOCKS.values()):
        terminalreporter.write_line(
            "docs blocks: {run} run, {skipped} skipped with a reason (-ra lists them), {failed} failed".format(
                **_DOC_BLOCKS
            )
        )


@pytest.fixture
def float64():
    """The test runs with float64 on (``jax.enable_x64``), switched back off after it; the one way the suite
    turns float64 on (a module that needs it throughout: ``pytestmark = pytest.mark.usefixtures("float64")``)."""
    import jax

    with jax.enable_x64(True):
        yield
