"""Suite-wide settings, applied before any test module imports JAX (and inherited by the subprocesses
the tests start)."""
import os

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
        terminalreporter.write_line("docs blocks: {run} run, {skipped} skipped with a reason (-ra lists them), "
                                    "{failed} failed".format(**_DOC_BLOCKS))
