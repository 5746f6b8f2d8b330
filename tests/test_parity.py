"""A fast subset of the parity grid (``python -m parity`` runs the whole grid).

Layers: a few fixed configurations in float64 and float32 with every check (eval/train
forward, running stats, gradients, SGD steps), plus hypothesis-drawn random configurations.
Models: every registered model case (ResNet-18/34/50, MobileNetV2 x static/CondConv/DynamicConv/
ODConv, and the ImageNet-stem ODConv ResNet-18) in float64 and float32: eval and train forward and
running stats; gradients and 2 SGD steps in float64 for ResNet-18 (every conv type) and MobileNetV2
static.
"""
import numpy as np
import optax
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity.cases import CASES, CHECKS, CONV_TYPES, MODEL_FAMILIES, MODEL_TEMPERATURE, layer_case
from parity.harness import SGDConfig, compare, compare_trees, format_table, run_case

SGD = SGDConfig(steps=2)


def _assert_rows(rows):
    assert rows, "no rows"
    bad = [r for r in rows if not r.passed]
    assert not bad, "\n" + format_table(bad)


@pytest.mark.parametrize("name", ["condconv/i8o12k3s2p1d1g2K4-T3", "dynamic/i8o12k3s2p1d1g2K4-T3",
                                  "odconv/i8o12k3s2p1d1g2K4-T3"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_layer_grid_subset(name, dtype):
    rows = run_case(CASES[name], dtype, sgd=SGD)
    _assert_rows(rows)
    checks = {r.check for r in rows}
    assert {"forward_eval", "forward_train", "grad_input", "grad_params", "sgd"} <= checks
    if name.startswith("odconv"):
        assert "running_stats" in checks  # the attention BatchNorm


@settings(max_examples=3, deadline=None)
@given(family=st.sampled_from(["condconv", "dynamic", "odconv"]), k=st.sampled_from([1, 3]),
       stride=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]), experts=st.integers(1, 3),
       out_mult=st.integers(1, 2), dilation=st.sampled_from([1, 2]), size=st.integers(4, 7))
def test_random_layer_configs(family, k, stride, groups, experts, out_mult, dilation, size):
    in_ch = 2 * groups
    case = layer_case(family, in_ch, in_ch * out_mult, k, stride=stride, padding=dilation * (k // 2),
                      dilation=dilation, groups=groups, experts=experts, size=size,
                      temperature=1.5, tag="-hypothesis")
    _assert_rows(run_case(case, "float64", checks=("forward_eval", "forward_train", "grad_input", "grad_params"),
                          sgd=SGDConfig(steps=0)))


MODEL_CASES = [name for name, case in CASES.items() if case.family in MODEL_FAMILIES]


def test_model_cases_cover_every_family_and_conv_type():
    covered = {(CASES[n].family, n.split("/")[1].split("-")[0]) for n in MODEL_CASES}
    assert covered == {(f, c) for f in MODEL_FAMILIES for c in CONV_TYPES}
    assert any("-imagenet" in n for n in MODEL_CASES)


#: Model cases whose float64 test also runs gradients and 2 SGD steps (the whole train step):
#: ResNet-18 with every conv type and stem, and MobileNetV2 static. The others test eval/train
#: forward and running statistics, which compile 2-3x faster (their gradients: ``python -m parity``,
#: measured in docs/conversion_parity.md).
TRAIN_STEP_CASES = [n for n in MODEL_CASES if n.startswith(("resnet18/", "mobilenet_v2/static-"))]
FORWARD_CHECKS = ("forward_eval", "forward_train", "running_stats")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", MODEL_CASES)
def test_models(name, dtype):
    """Every model x conv type (and the ImageNet-stem ODConv ResNet-18): tiny widths, 16x16 inputs,
    batch 8, at MODEL_TOLERANCES: eval-mode and train-mode forward, running statistics; in float64
    for TRAIN_STEP_CASES also input/parameter gradients and 2 SGD steps."""
    full = dtype == "float64" and name in TRAIN_STEP_CASES
    rows = run_case(CASES[name], dtype, checks=None if full else FORWARD_CHECKS, sgd=SGD)
    _assert_rows(rows)
    assert {r.check for r in rows} == set(CHECKS if full else FORWARD_CHECKS)


def test_harness_detects_a_wrong_weight():
    """The harness must be able to fail: perturb one converted parameter and the rows fail."""
    import jax

    from parity import harness

    case = CASES["dynamic/i8o16k3s1p1d1g1K4"]
    with jax.enable_x64(True):
        pair = harness._Pair(case, "float64", 0)
        bias = pair.variables["params"]["attention"]["fc2"]["bias"]
        bias[0] += 1e-6  # one expert's logit (a shift of all logits would leave the softmax unchanged)
        rows = harness._rows_for(pair, ("forward_eval",), SGD)
    assert rows and not rows[0].passed and rows[0].max_rel > 1e-9


def test_model_harness_detects_a_wrong_weight():
    """At the (looser) model tolerances a 1e-6 change of one converted ODConv attention
    weight deep in the network still fails, in eval and in train mode."""
    import jax

    from parity import harness

    case = CASES[f"resnet18/odconv-K4-cifar-T{MODEL_TEMPERATURE['odconv']:g}"]
    with jax.enable_x64(True):
        pair = harness._Pair(case, "float64", 0)
        bias = pair.variables["params"]["layer4_1"]["conv2"]["attention"]["kernel_fc"]["bias"]
        bias[0] += 1e-6  # one expert's logit bias (zero at init)
        rows = harness._rows_for(pair, ("forward_eval", "forward_train"), SGD)
    assert len(rows) == 2 and not any(r.passed for r in rows), "\n" + format_table(rows)


def test_optax_chain_is_torch_sgd_and_order_matters():
    """add_decayed_weights before sgd(momentum) is torch.optim.SGD(weight_decay, momentum)."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(6)]
    lr, mom, wd = 0.1, 0.9, 0.05
    pt = torch.tensor(p0, requires_grad=True)
    opt = torch.optim.SGD([pt], lr=lr, momentum=mom, weight_decay=wd)

    def run(tx):
        p, state = p0.copy(), tx.init(p0)
        for g in grads:
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
        return np.asarray(p)

    import jax

    for g in grads:
        pt.grad = torch.tensor(g)
        opt.step()
    ref = pt.detach().numpy()
    with jax.enable_x64(True):
        ours = run(optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=mom)))
        decay_after_momentum = run(optax.chain(optax.trace(decay=mom), optax.add_decayed_weights(wd),
                                               optax.scale(-lr)))
    assert compare(ours, ref)[1] < 1e-15
    assert compare(decay_after_momentum, ref)[1] > 1e-4


def test_compare_trees_floor():
    ref = {"a": np.array([10.0]), "b": {"c": np.array([1e-12])}}
    assert compare_trees({"a": np.array([10.0]), "b": {"c": np.array([2e-12])}}, ref)[1] < 1e-10
    worst = compare_trees({"a": np.array([10.1]), "b": {"c": np.array([1e-12])}}, ref)
    assert worst[2] == "a" and abs(worst[1] - 0.01) < 1e-12
