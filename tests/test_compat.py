"""Public APIs only (DESIGN.md, "Public APIs only").

Library and tool code (``dynconv_*``, ``train/``, ``parity/``, ``benchmarks/``) uses no private name of
another library: no ``_src`` import, no ``_private`` attribute that our own code does not define. The one
exception per package lives in its compat module (``dynconv_jax/_compat.py``; ``train/`` needs none), and
this module checks each of its details against the installed version, failing when a release changes it
(the version-range test runs this module under the oldest supported versions too).
"""

from __future__ import annotations

import ast
import pathlib
import warnings

import jax.numpy as jnp
import pytest
from flax import nnx

from dynconv_jax import _compat
from dynconv_jax.nnx import ODConv

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKED = ("dynconv_spec", "dynconv_jax", "dynconv_torch", "train", "parity", "benchmarks")
OWN_ROOTS = frozenset(CHECKED)
#: The compat modules (one per package at most; train/, parity/ and benchmarks/ need none).
COMPAT_MODULES = {"dynconv_jax/_compat.py"}
EXEMPT = COMPAT_MODULES
#: Underscored names that are public: Python's data model and module attributes (``object.__setattr__`` is how
#: a frozen dataclass sets its own fields, as the dataclasses docs show), and ``os._exit`` (documented: exit
#: without cleanup, for a forked child).
PUBLIC_UNDERSCORED = frozenset(
    {
        "__future__",
        "__version__",
        "__name__",
        "__qualname__",
        "__module__",
        "__doc__",
        "__dict__",
        "__class__",
        "__file__",
        "__path__",
        "__all__",
        "__spec__",
        "__wrapped__",
        "__self__",
        "__func__",
        "__code__",
        "__annotations__",
        "__array__",
        "__call__",
        "__init__",
        "__post_init__",
        "__enter__",
        "__exit__",
        "__iter__",
        "__next__",
        "__getitem__",
        "__len__",
        "__bases__",
        "__mro__",
        "__dataclass_fields__",
        "__cause__",
        "__context__",
        "__traceback__",
        "__slots__",
        "__defaults__",
        "__kwdefaults__",
        "__globals__",
        "__signature__",
        "__setattr__",
        "_exit",
    }
)


# --------------------------------------------------------------------------- the compat module's details
class _Probe(nnx.Module):
    """Records, on each call, whether :func:`dynconv_jax._compat.nnx_capturing` saw a capture."""

    def __init__(self):
        self.seen = nnx.data([])

    def __call__(self, x):
        self.seen.append(_compat.nnx_capturing(self))
        return x


class _Outer(nnx.Module):
    def __init__(self):
        self.inner = _Probe()

    def __call__(self, x):
        return self.inner(x)


def test_nnx_capturing_sees_nnx_capture_and_nothing_else():
    """flax marks the modules of an ``nnx.capture`` call with ``__captures__`` (not public API): if a release
    renames or drops it, this fails instead of the NNX layers silently recording no attentions."""
    outer = _Outer()
    outer(jnp.ones(2))
    nnx.capture(outer, nnx.Intermediate)(jnp.ones(2))
    outer(jnp.ones(2))
    assert list(outer.inner.seen) == [False, True, False]


def test_nnx_layers_sow_only_under_capture():
    """The NNX ODConv records its attentions under ``nnx.capture`` and nothing (no attribute, no warning)
    on a plain call."""
    layer = ODConv(4, 6, (3,), num_experts=2, min_channels=4, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 5, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        layer(x)
    assert not any(isinstance(v, nnx.Intermediate) for v in vars(layer).values())
    _, intermediates = nnx.capture(layer, nnx.Intermediate)(x)
    assert {"kernel_attention", "channel_attention", "filter_attention", "spatial_attention"} <= set(
        nnx.to_pure_dict(intermediates)
    )


# --------------------------------------------------------------------------- the grep
def _module_aliases(tree: ast.AST) -> set:
    """Names bound to another library's modules or objects by the file's imports (``jnp``, ``nnx``, ``ocp``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(
                (a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] not in OWN_ROOTS
            )
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] not in OWN_ROOTS:
            names.update(a.asname or a.name for a in node.names)
    return names


def _defined_names(trees) -> set:
    """Every name our own code defines: functions, classes, arguments, assigned names and attributes, modules."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                names.update(a.name for a in node.names)
                names.update((node.module or "").split("."))
    return names


def _is_private(name: str) -> bool:
    return name.startswith("_") and name not in PUBLIC_UNDERSCORED


def _import_violations(node: ast.AST) -> list:
    """``import a._b`` / ``from a._src.c import d`` / ``from a import _d`` of another library."""
    if isinstance(node, ast.Import):
        modules = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
        modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
        return []
    return [
        f"import of {m}"
        for m in modules
        if m.split(".")[0] not in OWN_ROOTS and any(_is_private(part) for part in m.split("."))
    ]


def _attribute_violations(node: ast.AST, aliases: set, defined: set) -> list:
    """``lib._x`` on an imported library, ``obj._x`` our code never defines, ``getattr(obj, '_x')``."""
    if isinstance(node, ast.Attribute) and _is_private(node.attr):
        base = node.value
        while isinstance(base, ast.Attribute):
            base = base.value
        on_library = isinstance(base, ast.Name) and base.id in aliases
        if on_library or node.attr not in defined:
            return [f"attribute .{node.attr}"]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and _is_private(node.args[1].value)
        and node.args[1].value not in defined
    ):
        return [f"{node.func.id}(..., {node.args[1].value!r})"]
    return []


def private_api_uses(sources: dict) -> list:
    """``'path:line: what'`` for every private use of another library in ``sources`` (path -> source text)."""
    trees = {path: ast.parse(text, path) for path, text in sources.items()}
    defined = _defined_names(trees.values()) | {pathlib.Path(p).stem for p in sources}
    found = []
    for path, tree in trees.items():
        aliases = _module_aliases(tree)
        for node in ast.walk(tree):
            for what in _import_violations(node) + _attribute_violations(node, aliases, defined):
                found.append(f"{path}:{node.lineno}: {what}")
    return found


def _library_and_tool_sources() -> dict:
    paths = [p for package in CHECKED for p in sorted((ROOT / package).rglob("*.py"))]
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in paths}


def test_library_and_tools_use_no_private_api_outside_the_compat_modules():
    sources = _library_and_tool_sources()
    assert len(sources) > 50 and "dynconv_jax/nnx/layers.py" in sources
    found = [use for use in private_api_uses(sources) if use.split(":")[0] not in EXEMPT]
    assert not found, "private APIs outside the compat modules:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "snippet,what",
    [
        ("from jax._src import distributed", "import of jax._src"),
        ("import orbax.checkpoint._src.path.async_path as p", "import of orbax.checkpoint._src"),
        ("from torch.nn.modules.batchnorm import _BatchNorm", "import of torch.nn.modules.batchnorm._BatchNorm"),
        ("import torch\nx = torch.nn.modules.batchnorm._BatchNorm", "attribute ._BatchNorm"),
        ("def f(manager):\n    manager._maybe_await_cleanup_tmp_directory()", "attribute ._maybe_await_cleanup"),
        ("def f(module):\n    return hasattr(module, '__captures__')", "hasattr(..., '__captures__')"),
    ],
)
def test_the_check_finds_each_kind_of_private_use(snippet, what):
    assert any(what in use for use in private_api_uses({"lib/mod.py": snippet}))


def test_the_check_leaves_our_own_private_names_and_public_dunders_alone():
    snippet = (
        "import os, jax\nfrom .models import _conv\nclass A:\n    def __init__(self):\n        self._n = 1\n"
        "    def f(self, other):\n        return other._n, _conv.x, jax.__version__, os._exit\n"
    )
    assert private_api_uses({"lib/mod.py": snippet}) == []
