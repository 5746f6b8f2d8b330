"""Bad layer arguments and inputs, in both frameworks: each gets a ValueError naming the layer
(docs/reliability.md); a property test over layer configurations (valid or not) checks that every one
either equals the naive per-sample loop or raises such an error."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _helpers import naive_dynamic_conv, random_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _layers():
    from dynconv_jax import CondConv, DynamicConv, ODConv

    return (CondConv, DynamicConv, ODConv)


X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 3)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _initialised(cls):
    """``(layer, variables)`` of a 3x3 layer with 4 features for ``X``."""
    layer = cls(features=4, kernel_size=(3, 3))
    return layer, random_variables(layer, X)


@pytest.mark.parametrize("kernel_size", [(3.5, 3), 3.5, (True, 3)])
def test_float_kernel_size_is_an_error_not_truncated(kernel_size):
    for cls in _layers():
        with pytest.raises(ValueError, match=rf"{cls.__name__} .*kernel_size=.* must be an int or a sequence"):
            cls(features=4, kernel_size=kernel_size).init(jax.random.key(0), X)


def test_bad_temperature_names_the_layer():
    for cls in _layers():
        layer, variables = _initialised(cls)
        for bad in ("hot", object(), 0.0, -1.0, float("nan"), float("inf"), jnp.asarray(0.0), np.float32(-2)):
            with pytest.raises(ValueError, match=rf"{cls.__name__} '<top level>': temperature="):
                layer.apply(variables, X, temperature=bad)


def test_traced_temperature_is_floored_under_jit():
    """A traced T <= 0 or NaN is clamped to TEMPERATURE_FLOOR (no NaN output); +inf gives uniform attention."""
    from dynconv_jax.attention import TEMPERATURE_FLOOR

    for cls in _layers():
        layer, variables = _initialised(cls)
        run = jax.jit(lambda v, x, t: layer.apply(v, x, temperature=t, mutable=["intermediates"]))
        floor_out, floor_sown = run(variables, X, jnp.float32(TEMPERATURE_FLOOR))
        for bad in (0.0, -3.0, float("nan"), 1e-30):
            out, sown = run(variables, X, jnp.float32(bad))
            assert np.all(np.isfinite(out)), (cls.__name__, bad)
            np.testing.assert_array_equal(out, floor_out)
        attention = run(variables, X, jnp.float32(np.inf))[1]["intermediates"]["kernel_attention"][0]
        expected = 0.5 if cls.__name__ == "CondConv" else 1 / attention.shape[-1]  # sigmoid(0) / uniform softmax
        np.testing.assert_allclose(attention, expected, rtol=1e-6)
        # At the floor the attention saturates (hard routing), as T -> 0+ would.
        hard = floor_sown["intermediates"]["kernel_attention"][0]
        assert np.all((hard < 1e-3) | (hard > 1 - 1e-3)), hard


def test_empty_batch_names_the_layer():
    """ODConv with batch 0 in eval raised a ZeroDivisionError from a reshape; all three now say it, as torch does."""
    for cls in _layers():
        layer, variables = _initialised(cls)
        with pytest.raises(ValueError, match=rf"{cls.__name__} .*empty batch"):
            layer.apply(variables, X[:0])


def test_torch_layers_name_themselves_for_a_wrong_input_dtype():
    import torch

    from dynconv_torch import CondConv2d, DynamicConv2d, ODConv2d

    for layer in (CondConv2d(3, 4, 3), DynamicConv2d(3, 4, 3), ODConv2d(3, 4, 3)):
        for dtype in (torch.int64, torch.float64):
            with pytest.raises(
                ValueError,
                match=rf"^{type(layer).__name__}\(.*input dtype {dtype} differs from the "
                r"layer's parameters \(torch.float32\)",
            ):
                layer(torch.ones(2, 3, 5, 5, dtype=dtype))


def _check_config(
    cls_name, rank, kernel, strides, dilation, padding, groups, in_ch, feat, experts, batch, spatial, seed
):
    """Run one configuration; returns 'ok' or 'error'. Asserts the invariants of the property."""
    from dynconv_jax import CondConv, DynamicConv, ODConv

    cls = {"CondConv": CondConv, "DynamicConv": DynamicConv, "ODConv": ODConv}[cls_name]
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(batch, *spatial, in_ch)), jnp.float32)
    layer = cls(
        features=feat,
        kernel_size=kernel,
        strides=strides,
        kernel_dilation=dilation,
        padding=padding,
        feature_group_count=groups,
        num_experts=experts,
    )
    try:
        variables = random_variables(layer, x, seed)
        y, sown = layer.apply(variables, x, mutable=["intermediates"])
    except ValueError as error:  # never another type; always naming the layer
        assert str(error).startswith(f"{cls_name} '"), str(error)
        return "error: " + str(error)
    assert np.all(np.isfinite(y)), "NaN/Inf for a finite input"
    att = {k: v[0] for k, v in sown["intermediates"].items()}
    params = variables["params"]
    lax_padding = padding if isinstance(padding, str) else [tuple(p) for p in padding]
    ref = naive_dynamic_conv(
        x,
        params["kernel"],
        att["kernel_attention"],
        att.get("spatial_attention"),
        att.get("channel_attention"),
        att.get("filter_attention"),
        params.get("bias"),
        strides=strides,
        padding=lax_padding,
        dilation=dilation,
        groups=groups,
    )
    np.testing.assert_allclose(y, ref, rtol=2e-4, atol=2e-5)
    return "ok"


@pytest.mark.slow
def test_layer_configs_run_exactly_or_raise_a_named_value_error():
    """Hypothesis: every layer configuration (valid or not) either equals the naive per-sample loop,
    finite, or raises a ValueError that names the layer."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    outcomes = []

    @st.composite
    def configs(draw):
        rank = draw(st.sampled_from([1, 2]))
        groups = draw(st.sampled_from([1, 1, 2, 3]))
        config = dict(
            cls_name=draw(st.sampled_from(["CondConv", "DynamicConv", "ODConv"])),
            rank=rank,
            kernel=tuple(draw(st.integers(1, 3)) for _ in range(rank)),
            strides=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
            dilation=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
            padding=draw(
                st.one_of(
                    st.sampled_from(["SAME", "VALID"]),
                    st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2))] * rank),
                )
            ),
            groups=groups,
            in_ch=groups * draw(st.integers(1, 3)),
            feat=groups * draw(st.integers(1, 2)),
            experts=draw(st.integers(1, 3)),
            batch=draw(st.integers(1, 2)),
            spatial=tuple(draw(st.integers(1, 6)) for _ in range(rank)),
            seed=draw(st.integers(0, 2**16)),
        )
        # About one in three configurations gets one bad value (too small inputs come on their own).
        bad = draw(st.sampled_from([None] * 9 + ["kernel", "groups", "in_ch", "experts", "batch"]))
        if bad == "kernel":
            config["kernel"] = (draw(st.sampled_from([0, -1, 2.5, 1.0, "3", None])),) + config["kernel"][1:]
        elif bad is not None:
            config[bad] = draw(
                st.sampled_from({"groups": [0, -2, 4], "in_ch": [5, 7], "experts": [0, -1], "batch": [0]}[bad])
            )
        return config

    @hypothesis.settings(
        max_examples=30,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(configs())
    def check(config):
        outcomes.append(_check_config(**config))

    check()
    errors = [o for o in outcomes if o.startswith("error")]
    assert outcomes.count("ok") >= 8 and len(errors) >= 4, "\n".join(outcomes)  # both sides were exercised
