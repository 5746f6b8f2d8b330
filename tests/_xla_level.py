"""The suite's XLA:CPU compile options (tests/conftest.py): quick compilation unless ``--xla-default-optimisation``.
Plain ``os`` only, so conftest can import it before anything starts JAX.

Quick compilation is three options of XLA:CPU, each measured to cut compile time without changing what a test
checks (docs/performance.md, "Compile time"): LLVM optimisation level 0, XLA's classic loop emitters for fused
element-wise code instead of the newer fusion emitters, and one code-generation thread per program (the two
xdist workers already keep both cores busy)."""

from __future__ import annotations

import os
from typing import Dict, List

QUICK_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_cpu_parallel_codegen_split_count=1",
)


def _option(flag: str) -> str:
    """``'--name=value'`` -> ``'--name'``."""
    return flag.split("=")[0]


_OPTIONS = tuple(_option(flag) for flag in QUICK_COMPILE_FLAGS)


def compile_flags(flags: str) -> List[str]:
    """The flags among ``flags`` (an ``XLA_FLAGS`` value) that set one of the quick-compile options."""
    return [f for f in flags.split() if _option(f) in _OPTIONS]


def with_quick_compile(flags: str) -> str:
    """``flags`` with each quick-compile option it does not set already added."""
    taken = {_option(f) for f in compile_flags(flags)}
    return " ".join([*flags.split(), *(f for f in QUICK_COMPILE_FLAGS if _option(f) not in taken)])


def quick_compile() -> bool:
    """Whether this process compiles with the suite's quick options (LLVM level 0 among them)."""
    return set(QUICK_COMPILE_FLAGS) <= set(os.environ.get("XLA_FLAGS", "").split())


def with_session_compile_flags(env: Dict[str, str]) -> Dict[str, str]:
    """``env``, whose own ``XLA_FLAGS`` (a device count) replace the session's, with the session's compile
    options added back."""
    session = compile_flags(os.environ.get("XLA_FLAGS", ""))
    return {**env, "XLA_FLAGS": " ".join([env.get("XLA_FLAGS", ""), *session]).strip()}


def without_compile_flags(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` with none of the quick-compile options in its ``XLA_FLAGS``: XLA's defaults."""
    flags = env.get("XLA_FLAGS", "")
    return {**env, "XLA_FLAGS": " ".join(f for f in flags.split() if f not in compile_flags(flags))}
