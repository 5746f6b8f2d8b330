"""A fast subset of the parity grid (``python -m parity`` runs the default grid, ``--full`` all).

Layers: a few fixed configurations in float64 and float32 with every check (checkpoint file, eval/
train forward, running stats, gradients, SGD steps), plus hypothesis-drawn random configurations.
Models: the model cases (ResNet-18/50, MobileNetV2 x static/CondConv/DynamicConv/ODConv, ResNet-18 with
KernelWarehouse, and the ImageNet-stem ODConv ResNet-18) in float64, ResNet-18 and the deep ODConv ones in float32 (ResNet-34 and
the rest: ``python -m parity --full``): eval and train forward and running stats; gradients and 2 SGD steps in float64 for ResNet-18 (every conv type) and MobileNetV2
static; one whole 100-step float64 training run (ResNet-18 DynamicConv). The harness must fail on a
wrong build: a subset of the mutation test (``python -m parity.mutants`` runs every mutant) and the
command line's refusal of selections that are empty or invalid.
"""

import numpy as np
import optax
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parity import mutants
from parity.__main__ import main as parity_main
from parity.cases import CASE_CHECKS, CASES, CONV_TYPES, MODEL_FAMILIES, MODEL_TEMPERATURE, layer_case
from parity.harness import FLOAT32_NOISE_FACTOR, SGDConfig, compare, compare_trees, format_table, run_case

SGD = SGDConfig(steps=2)


def _assert_rows(rows):
    assert rows, "no rows"
    bad = [r for r in rows if not r.passed]
    assert not bad, "\n" + format_table(bad)


@pytest.mark.parametrize(
    "name",
    [
        "condconv/i8o12k3s2p1d1g2K4-T3",
        "dynamic/i8o12k3s2p1d1g2K4-T3",
        "odconv/i8o12k3s2p1d1g2K4-T3",
        "kernelwarehouse/i8o12k3s2p1d1g2-cell_num_ratio4-T0.7",
    ],
)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_layer_grid_subset(name, dtype):
    rows = run_case(CASES[name], dtype, sgd=SGD)
    _assert_rows(rows)
    checks = {r.check for r in rows}
    assert {"checkpoint", "forward_eval", "forward_train", "grad_input", "grad_params", "sgd"} <= checks
    if name.startswith(("odconv", "kernelwarehouse")):
        assert "running_stats" in checks  # the attention BatchNorm
    for r in rows:  # float32 rows are judged against their measured noise floor, float64 rows are not
        if dtype == "float32" and r.check != "checkpoint":
            assert r.floor is not None and r.floor > 0 and r.limit == max(r.tol, FLOAT32_NOISE_FACTOR * r.floor)
        else:
            assert r.floor is None and r.limit == r.tol


def test_odconv_attention_layer_norm_float64_on_a_batch_of_one():
    """ODConv's attention LayerNorm equals the PyTorch reference, training on one sample (``python -m parity``
    also runs ``attention_norm='none'``, ``odconv/i8o12k3s2p1d1g2K4-T3-nonenorm-B1``)."""
    rows = run_case(
        CASES["odconv/i8o12k3s2p1d1g2K4-T3-layernorm-B1"],
        "float64",
        checks=("forward_train", "grad_input", "grad_params"),
        sgd=SGDConfig(steps=0),
    )
    _assert_rows(rows)
    assert {r.check for r in rows} == {"forward_train", "grad_input", "grad_params"}


@pytest.mark.slow
@settings(max_examples=3, deadline=None)
@given(
    family=st.sampled_from(["condconv", "dynamic", "odconv"]),
    k=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2]),
    experts=st.integers(1, 3),
    out_mult=st.integers(1, 2),
    dilation=st.sampled_from([1, 2]),
    size=st.integers(4, 7),
)
def test_random_layer_configs(family, k, stride, groups, experts, out_mult, dilation, size):
    in_ch = 2 * groups
    case = layer_case(
        family,
        in_ch,
        in_ch * out_mult,
        k,
        stride=stride,
        padding=dilation * (k // 2),
        dilation=dilation,
        groups=groups,
        experts=experts,
        size=size,
        temperature=1.5,
        tag="-hypothesis",
    )
    _assert_rows(
        run_case(
            case,
            "float64",
            checks=("forward_eval", "forward_train", "grad_input", "grad_params"),
            sgd=SGDConfig(steps=0),
        )
    )


MODEL_CASES = [name for name, case in CASES.items() if case.family in MODEL_FAMILIES]


def test_model_cases_cover_every_family_and_conv_type():
    covered = {(CASES[n].family, n.split("/")[1].split("-")[0]) for n in MODEL_CASES}
    assert covered == {(f, c) for f in MODEL_FAMILIES for c in CONV_TYPES}
    assert any("-imagenet" in n for n in MODEL_CASES)
    for n in MODEL_CASES:  # --full: whole 100-step training runs of every model x conv type
        assert CASES[n].train_steps == 100 and CASES[n].train_batches == 1 and "sgd" in CASES[n].checks
    # the default run (docs/conversion_parity.md, "What the default run proves"): one whole 100-step
    # float64 model training run, SGD and AdamW, and every layer family in both dtypes
    default_models = [n for n in MODEL_CASES if CASES[n].default]
    assert default_models == ["resnet18/odconv-K4-cifar-T30"]
    flagship = CASES[default_models[0]]
    assert flagship.default == ("float64",) and "adamw" in flagship.checks
    for family in ("condconv", "dynamic", "odconv", "kernelwarehouse"):
        assert any(c.family == family and set(c.default) == {"float64", "float32"} for c in CASES.values())


#: Model cases whose float64 test also runs gradients and 2 SGD steps (the whole train step):
#: ResNet-18 with every conv type and stem, and MobileNetV2 static. The others test eval/train
#: forward and running statistics, which compile 2-3x faster (their gradients: ``python -m parity``,
#: measured in docs/conversion_parity.md).
TRAIN_STEP_CASES = [n for n in MODEL_CASES if n.startswith(("resnet18/", "mobilenet_v2/static-"))]
FORWARD_CHECKS = ("forward_eval", "forward_train", "running_stats")


#: The suite's model cases, one per block kind and dynamic family, in float64 (the harness's float32 verdicts are
#: tested on the layer cases): ResNet-18 basic blocks with ODConv (every check, 2 SGD steps) and
#: KernelWarehouse, ResNet-50 bottlenecks with ODConv, MobileNetV2 inverted residuals with CondConv. The other
#: model x conv type cases, both dtypes and the ImageNet stem run in ``python -m parity`` (its default run) and
#: ``python -m parity --full`` (docs/conversion_parity.md); tests/test_models.py converts and compares the logits
#: of every model x conv type.
SUITE_MODEL_CASES = [
    (n, "float64")
    for n in MODEL_CASES
    if n.startswith(
        ("resnet18/odconv-K4-cifar", "resnet18/kernelwarehouse", "resnet50/odconv", "mobilenet_v2/condconv")
    )
]


@pytest.mark.slow
@pytest.mark.parametrize("name,dtype", SUITE_MODEL_CASES)
def test_models(name, dtype):
    """Model x conv type cases (and the ImageNet-stem ODConv ResNet-18): tiny widths, 16x16 inputs,
    batch 8, at MODEL_TOLERANCES: eval-mode and train-mode forward, running statistics; in float64
    for TRAIN_STEP_CASES also input/parameter gradients and 2 SGD steps."""
    full = dtype == "float64" and name in TRAIN_STEP_CASES
    rows = run_case(CASES[name], dtype, checks=CASE_CHECKS if full else FORWARD_CHECKS, sgd=SGD)
    _assert_rows(rows)
    assert {r.check for r in rows} == set(CASE_CHECKS if full else FORWARD_CHECKS)


def test_harness_detects_a_wrong_weight(float64):
    """The harness must be able to fail: perturb one converted parameter and the rows fail."""

    from parity import harness

    case = CASES["dynamic/i8o16k3s1p1d1g1K4"]
    pair = harness._Pair(case, "float64", 0)
    bias = pair.variables["params"]["attention"]["fc2"]["bias"]
    bias[0] += 1e-6  # one expert's logit (a shift of all logits would leave the softmax unchanged)
    rows = harness._rows_for(pair, ("forward_eval",), SGD, 0)
    assert rows and not rows[0].passed and rows[0].max_rel > 1e-9


@pytest.mark.slow
def test_model_harness_detects_a_wrong_weight(float64):
    """At the (looser) model tolerances a 1e-6 change of one converted ODConv attention
    weight deep in the network still fails, in eval and in train mode."""

    from parity import harness

    case = CASES[f"resnet18/odconv-K4-cifar-T{MODEL_TEMPERATURE['odconv']:g}"]
    pair = harness._Pair(case, "float64", 0)
    bias = pair.variables["params"]["layer4_1"]["conv2"]["attention"]["kernel_fc"]["bias"]
    bias[0] += 1e-6  # one expert's logit bias (zero at init)
    rows = harness._rows_for(pair, ("forward_eval", "forward_train"), SGD, 0)
    assert len(rows) == 2 and not any(r.passed for r in rows), "\n" + format_table(rows)


def test_optax_chain_is_torch_sgd_and_order_matters(float64):
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

    for g in grads:
        pt.grad = torch.tensor(g)
        opt.step()
    ref = pt.detach().numpy()
    ours = run(optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=mom)))
    decay_after_momentum = run(optax.chain(optax.trace(decay=mom), optax.add_decayed_weights(wd), optax.scale(-lr)))
    assert compare(ours, ref)[1] < 1e-15
    assert compare(decay_after_momentum, ref)[1] > 1e-4


def test_compare_trees_floor():
    ref = {"a": np.array([10.0]), "b": {"c": np.array([1e-12])}}
    assert compare_trees({"a": np.array([10.0]), "b": {"c": np.array([2e-12])}}, ref)[1] < 1e-10
    worst = compare_trees({"a": np.array([10.1]), "b": {"c": np.array([1e-12])}}, ref)
    assert worst[2] == "a" and abs(worst[1] - 0.01) < 1e-12


@pytest.mark.slow
def test_whole_training_run_float64():
    """100 SGD steps (momentum, weight decay) of a whole model, every parameter and running statistic
    after every step equal to PyTorch's within 1e-9 relative (the model cases' default training run)."""
    case = CASES["resnet18/dynamic-K4-cifar-T2"]
    rows = run_case(case, "float64", checks=("sgd",))
    _assert_rows(rows)
    assert len(rows) == 1 and rows[0].tol <= 1e-9 and "100 steps" in rows[0].detail


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--match", "resnet50/odconvv"], "--match 'resnet50/odconvv' selects none of the"),
        (["--steps", "-3"], "--steps -3: must be >= 1"),
        (["--dtypes", "float16,float64"], "--dtypes: unknown ['float16']; choose from float64,float32"),
        (["--checks", "grads"], "--checks: unknown ['grads']; choose from checkpoint,forward_eval,"),
        (["--dtypes", "none"], "--dtypes is empty"),
        (["--models", "resnet19"], "unknown families ['resnet19']"),
        (["--layers", "condconv", "--models", "none", "--checks", "adamw"], "no selected case runs these checks"),
    ],
)
def test_cli_refuses_invalid_or_empty_selections(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parity_main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_close_names_and_empty_result(capsys):
    with pytest.raises(SystemExit):
        parity_main(["--match", "resnet50/odconvv"])
    assert "close names: resnet50/odconv-K4-cifar-T30," in capsys.readouterr().err
    # a selection whose checks yield no row (CondConv has no BatchNorm) is an error, not a green run
    assert (
        parity_main(
            [
                "--layers",
                "condconv",
                "--models",
                "none",
                "--match",
                "condconv/i8o16k3s1p1d1g1K4",
                "--checks",
                "running_stats",
                "--dtypes",
                "float64",
            ]
        )
        == 2
    )


def test_every_mutant_applies_to_the_current_source(tmp_path):
    """Each injected bug still matches the source exactly (a stale mutant would test nothing)."""
    assert len(mutants.MUTANTS) >= 12
    for m in mutants.MUTANTS:
        mutants.mutated_copy(m, str(tmp_path / m.name))


#: The fast subset of the mutation test (the whole kill table: ``python -m parity.mutants``,
#: recorded in docs/conversion_parity.md): one converter bug, one layer bug, one BatchNorm bug and the
#: float32-only bug that the noise-aware verdict must still catch.
FAST_MUTANTS = (
    "module-prefix-half-stripped",
    "temperature-twice",
    "bn-biased-running-var",
    "float32-attention-in-bfloat16",
)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAST_MUTANTS)
def test_parity_fails_on_a_wrong_build(name):
    mutant = next(m for m in mutants.MUTANTS if m.name == name)
    result = mutants.run_mutant(mutant)
    assert result.status == "killed" and result.exit_code == 1, result
    assert mutant.expect in result.failed_checks, result


@pytest.mark.slow
def test_mutant_runner_passes_an_unmodified_copy():
    """The control: the same runner on an unmodified copy exits 0 (so a kill is the bug's doing)."""
    mutant = mutants.Mutant(
        "control", "none", "__init__.py", "", "", "dynamic/i8o12k3s2p1d1g2K4-T3", ("--checks", "forward_eval"), ""
    )
    result = mutants.run_mutant(mutant)
    assert result.status == "passes" and result.exit_code == 0, result
