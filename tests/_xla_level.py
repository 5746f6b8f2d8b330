"""The suite's XLA:CPU optimisation level (tests/conftest.py): LLVM level 0 unless ``--xla-default-optimisation``.
Plain ``os`` only, so conftest can import it before anything starts JAX."""

from __future__ import annotations

import os
from typing import Dict, List

LEVEL = "--xla_backend_optimization_level"
QUICK_COMPILE_FLAG = f"{LEVEL}=0"


def level_flags(flags: str) -> List[str]:
    """The optimisation-level flags among ``flags`` (an ``XLA_FLAGS`` value)."""
    return [f for f in flags.split() if f.startswith(f"{LEVEL}=")]


def quick_compile() -> bool:
    """Whether this process compiles at LLVM optimisation level 0 (the suite's level)."""
    return QUICK_COMPILE_FLAG in os.environ.get("XLA_FLAGS", "").split()


def with_session_xla_level(env: Dict[str, str]) -> Dict[str, str]:
    """``env``, whose own ``XLA_FLAGS`` (a device count) replace the session's, with the session's LLVM
    optimisation level added back."""
    level = level_flags(os.environ.get("XLA_FLAGS", ""))
    return {**env, "XLA_FLAGS": " ".join([env.get("XLA_FLAGS", ""), *level]).strip()}


def without_xla_level(env: Dict[str, str]) -> Dict[str, str]:
    """``env`` with no optimisation level in its ``XLA_FLAGS``: XLA's default level."""
    flags = env.get("XLA_FLAGS", "")
    return {**env, "XLA_FLAGS": " ".join(f for f in flags.split() if f not in level_flags(flags))}
