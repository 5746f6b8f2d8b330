"""Suite-wide settings, applied before any test module imports JAX (and inherited by the subprocesses
the tests start)."""

import atexit
import os
import shutil
import tempfile

import pytest
from _xla_level import compile_flags, with_quick_compile

# Compilation, not computation, is most of the suite's time on CPU (docs/performance.md, "Compile time"):
# JAX's partitionable threefry (the default since 0.5) compiles each random draw of a new shape for
# seconds on XLA:CPU, the non-partitionable one (the earlier default) in a fraction of that. Random
# streams differ; no test depends on a particular stream.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")

# One OpenMP thread per process (PyTorch's and NumPy's intra-op pools): the two xdist workers already keep both
# cores busy, and a second thread spin-waiting beside the other worker only burns CPU (measured: test_export.py
# and test_parity.py spent 7-11 % less CPU time; benchmarks/results/test_suite.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# XLA:CPU compiles quickly (tests/_xla_level.py: LLVM optimisation level 0, the classic loop emitters, one
# code-generation thread), set in pytest_configure before any backend starts, so the xdist workers and every
# subprocess a test starts inherit it: less than half the default compile time, nearly all of the suite's.
# Results keep every tolerance; runs compared bit for bit all compile so. What depends on the default options'
# rounding (a per-sample convolution bit-identical to the batched one, marked `xla_default_bits`) runs again with
# XLA's defaults: tests/test_structure.py::test_default_level_bits. `--xla-default-optimisation` runs a session
# with XLA's defaults (as the main command, `python -m parity` and the benchmarks compile).


def pytest_addoption(parser):
    parser.addoption(
        "--xla-default-optimisation",
        action="store_true",
        help="compile with XLA:CPU's default options (the suite compiles quickly: tests/_xla_level.py)",
    )


def pytest_configure(config):
    flags = os.environ.get("XLA_FLAGS", "")
    if config.getoption("--xla-default-optimisation"):
        if compile_flags(flags):
            raise pytest.UsageError(f"--xla-default-optimisation, but XLA_FLAGS sets compile options: {flags!r}")
    else:
        os.environ["XLA_FLAGS"] = with_quick_compile(flags)


# JAX's persistent compilation cache in a folder of this session, removed at its end: a program compiled
# once (by one xdist worker, or the train step of a model that several subprocess runs train) is loaded,
# not compiled again, by the other workers and subprocesses, which inherit the variable. A loaded program
# is the compiled one, so results keep their bits; nothing outlives the session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _COMPILATION_CACHE = tempfile.mkdtemp(prefix="dynconv-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILATION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """The slow tests run first (each group in its usual order), handed to the xdist workers two at a time
    (``--maxschedchunk 2``, scripts/test.sh): the workers share the minute-long tests and end with short ones, so
    neither waits at the end for the other's last long test (xdist's default hands out a quarter of the suite at
    once, and its 'worksteal' splits the list in contiguous halves: either left one worker idle for minutes)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@pytest.fixture(scope="session")
def shared_files(tmp_path_factory):
    """``shared_files(name)``: the path of a file of tests/_shared_files.py, made once per session. The xdist
    workers of a session share the folder (pytest's session temp folder, the parent of each worker's)."""
    from _shared_files import shared_file

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-files"
    return lambda name: shared_file(root, name)


@pytest.fixture
def float64():
    """The test runs with float64 on (``jax.enable_x64``), switched back off after it; the one way the suite
    turns float64 on (a module that needs it throughout: ``pytestmark = pytest.mark.usefixtures("float64")``)."""
    import jax

    with jax.enable_x64(True):
        yield
