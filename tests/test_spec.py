"""The framework-neutral spec (``dynconv_spec``) and the two model registries built on it.

Import rules (DESIGN.md): ``dynconv_spec`` imports neither framework, ``dynconv_jax`` never imports
``dynconv_torch`` and ``dynconv_torch`` never imports JAX; the registries of ``dynconv_torch.models``,
``dynconv_jax.models`` (and ``dynconv_jax.nnx.models``) hold the spec's names, and every name builds
the same architecture (same parameter count) in each.
"""

from __future__ import annotations

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import dynconv_spec
from dynconv_jax import models as jm
from dynconv_jax.nnx import models as nm
from dynconv_spec import RESERVED_CONV_OPTIONS, check_conv_args
from dynconv_spec.registry import ModelRegistry
from dynconv_torch import models as tm

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imported_roots(package: str) -> set:
    """Top-level names of every module ``package``'s files import (lazy imports inside functions too)."""
    roots = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                roots.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(
    "package,forbidden",
    [
        (
            "dynconv_spec",
            {
                "jax",
                "jaxlib",
                "flax",
                "optax",
                "torch",
                "numpy",
                "dynconv_jax",
                "dynconv_torch",
                "train",
                "parity",
                "benchmarks",
            },
        ),
        ("dynconv_jax", {"dynconv_torch", "train", "parity", "benchmarks"}),
        ("dynconv_torch", {"jax", "jaxlib", "flax", "optax", "dynconv_jax", "train", "parity", "benchmarks"}),
    ],
)
def test_packages_import_one_way(package, forbidden):
    assert not _imported_roots(package) & forbidden


def test_installed_import_names_are_the_libraries_own():
    """The wheel (pyproject's package list, as setuptools resolves it) installs only the three
    ``dynconv_*`` libraries, every subpackage included: the checkout tools ``train``, ``parity`` and
    ``benchmarks`` never land in site-packages, where they would shadow a user's ``train.py``."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ())))
    assert {name.split(".")[0] for name in shipped} == {"dynconv_spec", "dynconv_jax", "dynconv_torch"}
    library_packages = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for package in ("dynconv_spec", "dynconv_jax", "dynconv_torch")
        for path in (ROOT / package).rglob("__init__.py")
    }
    assert shipped == library_packages


# --------------------------------------------------------------------------- check_conv_args
ACCEPTED = {"condconv": {"routing_dropout", "use_bias"}, "dynamic": {"min_channels"}, "odconv": {"attention_bn_init"}}


@pytest.mark.parametrize(
    "args,match",
    [
        (("depthwise", 4, None, None), "conv='depthwise' is not a conv type"),
        (("odconv", 0, None, None), "num_experts=0 must be a positive int"),
        (("odconv", True, None, None), "num_experts=True must be a positive int"),
        (("odconv", 2.0, None, None), "num_experts=2.0 must be a positive int"),
        (("condconv", 4, 0.25, None), r"reduction=0.25 applies to conv in \('dynamic', 'odconv', 'kernelwarehouse'\)"),
        (("dynamic", 4, 0.0, None), r"reduction=0.0 must be a number in \(0, 1\]"),
        (("odconv", 4, 2, None), r"reduction=2 must be a number in \(0, 1\]"),
        (("static", 4, None, {"use_bias": True}), "given with conv='static'"),
        (("odconv", 4, None, [("attention_bn_init", 1.0)]), "conv_options=.* must be a mapping"),
        # reserved in either framework's spelling: the torch name in a JAX model and the other way round
        (("odconv", 4, None, {"kernel_num": 2}), r"may not set \['kernel_num'\]"),
        (("dynamic", 4, None, {"strides": 2, "groups": 2}), r"may not set \['groups', 'strides'\]"),
        (("condconv", 4, None, {"external_routing": True}), r"may not set \['external_routing'\]"),
        (
            ("condconv", 4, None, {"bias": True}),
            r"conv_options \['bias'\] are not options of the conv='condconv' layer",
        ),
        # the official ODConv spelling only where the official code is mirrored (ODConv2d, od_*), not in the models
        (
            ("odconv", 4, None, {"min_channel": 4}),
            r"conv_options \['min_channel'\] use the official ODConv spelling.*"
            r"the models take \['min_channels'\]",
        ),
    ],
)
def test_check_conv_args_rejects_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        check_conv_args(*args, "Net", ACCEPTED)


def test_check_conv_args_returns_a_copy_of_the_options():
    options = {"attention_bn_init": 1.0}
    out = check_conv_args("odconv", 4, 0.125, options, "Net", ACCEPTED)
    assert out == options and out is not options
    assert check_conv_args("static", 1, None, None, "Net") == {}
    # without ``accepted`` only the reserved names are refused
    assert check_conv_args("condconv", 4, None, {"anything": 1}, "Net") == {"anything": 1}


@pytest.mark.parametrize("framework", [tm, jm], ids=["torch", "flax"])
def test_models_refuse_options_their_layers_do_not_take(framework):
    """An option of the other framework's spelling fails at construction, naming the option."""
    wrong = {tm: "use_bias", jm: "bias"}[framework]
    with pytest.raises(ValueError, match=rf"conv_options \['{wrong}'\] are not options of the conv='dynamic' layer"):
        framework.resnet18(conv="dynamic", conv_options={wrong: False})


def test_every_layer_option_a_model_may_forward_is_a_layer_argument():
    """The reserved names and the layers' own options overlap only where a model sets the argument."""
    from dynconv_jax.models._conv import LAYER_OPTIONS as FLAX_OPTIONS
    from dynconv_torch.models._conv import LAYER_OPTIONS as TORCH_OPTIONS

    for options in (FLAX_OPTIONS, TORCH_OPTIONS):
        assert set(options) == set(dynconv_spec.CONV_TYPES) - {"static"}
        for conv, names in options.items():
            assert names - RESERVED_CONV_OPTIONS, conv


def test_make_divisible_follows_the_tf_slim_rule():
    make_divisible = dynconv_spec.make_divisible
    assert [make_divisible(v) for v in (3.2, 12, 16 * 0.75, 32 * 0.35, 1280 * 1.4)] == [8, 16, 16, 16, 1792]
    assert make_divisible(20, 16) == 32  # 16 would lose 20 %


# --------------------------------------------------------------------------- registries
def test_both_registries_list_the_spec_names():
    assert tm.list_models() == jm.list_models() == sorted(dynconv_spec.MODEL_NAMES)
    assert set(nm.list_models()) == set(dynconv_spec.CONV_MODELS) | set(dynconv_spec.ODCONV_MODELS) | set(
        dynconv_spec.KW_MODELS
    )
    assert jm.list_models("od_*") == sorted(dynconv_spec.ODCONV_MODELS)


@pytest.mark.parametrize("framework", [tm, jm, nm], ids=["torch", "flax", "nnx"])
def test_unknown_model_names_the_known_ones(framework):
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'; known models: .*resnet18, resnet34"):
        framework.create_model("resnet19")


def test_registry_accepts_only_spec_names_once():
    registry = ModelRegistry("test")

    def resnet18():
        return "built"

    def resnet19():
        return None

    registry.register(resnet18)
    assert registry.create("resnet18") == "built"
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(resnet18)
    with pytest.raises(ValueError, match="'resnet19' is not a model name"):
        registry.register(resnet19)


def test_odconv_entry_points_take_the_official_arguments():
    model = tm.create_model("od_mobilenetv2_050", kernel_num=2, num_classes=5)
    layer = model.features[1].conv[0][0]
    assert (layer.kernel_num, model.classifier[1].out_features) == (2, 5)
    assert model.features[0][0].out_channels == dynconv_spec.make_divisible(32 * 0.5)
    flax_model = jm.create_model("od_resnet50", kernel_num=4, reduction=0.25)
    assert (flax_model.conv, flax_model.num_experts, flax_model.reduction) == ("odconv", 4, 0.25)
    assert jm.create_model("od_resnet18", num_experts=3).num_experts == 3  # this library's spelling works too
    with pytest.raises(ValueError, match=r"od_resnet18: kernel_num=2 and num_experts=2 are two spellings"):
        tm.create_model("od_resnet18", kernel_num=2, num_experts=2)
    with pytest.raises(ValueError, match=r"od_resnet18: \['conv'\] are fixed"):
        tm.create_model("od_resnet18", conv="dynamic")
    with pytest.raises(ValueError, match=r"\['width_mult'\] are fixed"):
        jm.create_model("od_mobilenetv2_100", width_mult=0.5)


#: Tiny versions of the registered models (the od_mobilenetv2_* widths are fixed by their names; they
#: are checked at full size against the official state_dicts in tests/test_models.py).
def _tiny(name: str) -> dict:
    if name.startswith(("resnet", "od_resnet", "kw_resnet")):
        return dict(base_width=2, num_classes=3)
    if name == "mobilenet_v2":
        return dict(width_mult=0.1, num_classes=3)
    if "efficientnet" in name:
        return dict(channel_multiplier=0.1, num_classes=3)
    return dict(num_classes=3)


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def test_every_name_builds_in_both_frameworks():
    """Every registered name builds in PyTorch and constructs (its arguments validated) in Flax;
    one of each kind of entry point is traced shape-only and must hold the PyTorch parameter count.
    (Tracing all of them would cost more than the suite can pay; tests/test_models.py compares the
    architectures in depth, the od_* names against the official state_dicts.)"""
    torch_counts = {}
    for name in dynconv_spec.MODEL_NAMES:
        torch_counts[name] = sum(p.numel() for p in tm.create_model(name, **_tiny(name)).parameters())
        assert isinstance(jm.create_model(name, **_tiny(name)), nn.Module)
    x = jnp.zeros((1, 32, 32, 3))
    for name in ("od_resnet18", "mobilenet_v2", "tf_efficientnet_cc_b0_4e", "kw_resnet18"):
        shapes = jax.eval_shape(jm.create_model(name, **_tiny(name)).init, jax.random.key(0), x)
        assert _count(shapes["params"]) == torch_counts[name], name
    for name in ("od_resnet18", "kw_resnet18"):
        nnx_model = nnx.eval_shape(lambda: nm.create_model(name, rngs=nnx.Rngs(0), **_tiny(name)))
        assert _count(nnx.state(nnx_model, nnx.Param)) == torch_counts[name], name
