"""strategy='auto' follows fixed rules and measures nothing; measuring is explicit (dynconv_jax.autotune.tune)
and gives a plan (dynconv_jax.plan.Plan) that layers run with strategy=plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynconv_jax import CondConv, DynamicConv, autotune, ops
from dynconv_jax.plan import Plan, problem_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ran(monkeypatch):
    """The strategies the traced code ran (each call of a strategy implementation, in order)."""
    calls = []
    for name, impl in dict(ops._IMPLS).items():

        def spy(*args, _name=name, _impl=impl, **kwargs):
            calls.append(_name)
            return _impl(*args, **kwargs)

        monkeypatch.setitem(ops._IMPLS, name, spy)
    return calls


@pytest.fixture
def no_measuring(monkeypatch):
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured"))


def _layer_and_input(strategy="auto"):
    layer = DynamicConv(features=8, kernel_size=(3, 3), strategy=strategy)
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 8))
    return layer, x, layer.init(jax.random.key(0), x)


def _key(x_shape=(4, 6, 6, 8)):
    return problem_key(
        x_shape,
        (4, 3, 3, 8, 8),
        dtype=("float32", "float32"),
        strides=(1, 1),
        padding="SAME",
        dilation=(1, 1),
        groups=1,
        attentions=["kernel_attention", "expert_bias"],
    )


def test_auto_runs_the_rule_and_measures_nothing(ran, no_measuring, tmp_path, monkeypatch):
    """layer.init and jitted calls with strategy='auto' run the rule, time nothing (autotune.measure, the only
    timer, fails if called) and write nothing under $HOME or $XDG_CACHE_HOME."""
    for var in ("HOME", "XDG_CACHE_HOME"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    layer, x, variables = _layer_and_input()
    rule = ops.choose_strategy(
        x.shape, (4, 3, 3, 8, 8), strides=(1, 1), dilation=(1, 1), groups=1, spatial_attention=False
    )
    ran.clear()
    jax.jit(layer.apply)(variables, x)
    jax.jit(jax.grad(lambda v: jnp.sum(layer.apply(v, x))))(variables)
    assert ran == [rule, rule]
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "HOME", tmp_path / "XDG_CACHE_HOME"]


# Two model families, narrow (tracing, not size, is what this test is about).
TRACED_MODELS = (
    ("resnet18", {"conv": "odconv", "base_width": 8}),
    ("mobilenet_v2", {"conv": "condconv", "width_mult": 0.25}),
)


@pytest.mark.slow  # traces two whole models: seconds on CPU
def test_eval_shape_of_a_model_compiles_nothing(no_measuring):
    """Tracing a model (jax.eval_shape of its init and of a training gradient) compiles and runs nothing."""
    from dynconv_jax.models import create_model

    keys = jax.random.key(0), jax.random.key(1)  # made before listening: a process's first key compiles its seed
    events = []
    compiling = {"on": True}
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: events.append(event) if compiling["on"] and "compile" in event else None
    )
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    try:
        for name, kwargs in TRACED_MODELS:
            model = create_model(name, num_classes=10, **kwargs)
            variables = jax.eval_shape(model.init, keys[0], x)

            def loss(params, rest, x, model=model):
                out, _ = model.apply(
                    {"params": params, **rest}, x, train=True, mutable=list(rest), rngs={"dropout": keys[1]}
                )
                return jnp.sum(out)

            rest = {c: v for c, v in variables.items() if c != "params"}
            jax.eval_shape(jax.grad(loss), variables["params"], rest, x)
    finally:
        compiling["on"] = False
    assert [e for e in events if "backend_compile" in e] == []


def test_tune_times_each_problem_and_the_plan_runs_its_choices(ran):
    first = CondConv(features=4, kernel_size=(3, 3), name="first")
    second = CondConv(features=4, kernel_size=(1, 1), name="second")
    x = jnp.ones((2, 6, 6, 3))
    v1 = first.init(jax.random.key(0), x)
    v2 = second.init(jax.random.key(1), jnp.ones((2, 6, 6, 4)))

    def step(v1, v2, x):  # the second layer's output is differentiated, the first only its input's path
        y = jax.lax.stop_gradient(first.apply(v1, x))
        return jax.grad(lambda v: jnp.sum(second.apply(v, y) ** 2))(v2)

    plan = autotune.tune(step, v1, v2, x, strategies=("shifted", "patches", "pointwise"))
    assert len(plan) == 2
    for key, choice in plan.choices:
        m = plan.measurements[key]
        assert m["count"] == 1 and choice == min(m["seconds"], key=m["seconds"].get)
        kernel = json.loads(key)["experts"][1:3]
        assert m["differentiated"] == (kernel == [1, 1])
        expected = {"shifted", "patches", "pointwise"} if kernel == [1, 1] else {"shifted", "patches"}
        assert set(m["seconds"]) == expected
    choice_of = {json.loads(key)["experts"][1]: choice for key, choice in plan.choices}  # by kernel size
    ran.clear()
    first, second = first.clone(strategy=plan), second.clone(strategy=plan)
    jax.jit(step)(v1, v2, x)
    assert ran == [choice_of[3], choice_of[1]]


def test_a_problem_missing_from_the_plan_runs_the_rule_with_a_warning(ran, no_measuring):
    forced = Plan({_key(): "patches"})
    layer, x, variables = _layer_and_input(strategy=forced)
    ran.clear()
    jax.jit(layer.apply)(variables, x)
    assert ran == ["patches"]
    ran.clear()
    other = jnp.ones((3, 6, 6, 8))
    with pytest.warns(UserWarning, match="plan has no entry"):
        jax.jit(layer.apply)(variables, other)
    assert ran == [
        ops.choose_strategy(
            other.shape, (4, 3, 3, 8, 8), strides=(1, 1), dilation=(1, 1), groups=1, spatial_attention=False
        )
    ]


def test_tune_sees_inside_an_already_traced_jit_function():
    layer, x, variables = _layer_and_input()
    step = jax.jit(jax.grad(lambda v, x: jnp.sum(layer.apply(v, x))))
    step(variables, x)  # traced and cached before tuning
    recording = autotune.record(step, variables, x)
    (problem,) = recording.problems.values()
    assert problem.differentiated and problem.count == 1


def test_plan_json_round_trip_and_bad_plans(tmp_path):
    plan = Plan({_key(): "map"}, {_key(): {"seconds": {"map": 0.1}, "rule": "map", "count": 2}})
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded == plan and hash(loaded) == hash(plan) and loaded.measurements == plan.measurements
    assert loaded.strategy_for(_key()) == "map" and loaded.strategy_for(_key((2, 6, 6, 8))) is None
    assert loaded.estimated_speedup() == 1.0
    with pytest.raises(ValueError, match="not one of"):
        Plan({_key(): "fastest"})
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: not a dynconv plan"):
        Plan.load(path)
    path.write_text(json.dumps({"format": "something else", "entries": []}))
    with pytest.raises(ValueError, match="not a dynconv plan"):
        Plan.load(path)
    with pytest.raises(ValueError, match="strategy="):
        DynamicConv(features=8, kernel_size=(3, 3), strategy="fastest").init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))


def test_the_retired_switch_is_not_read():
    """``DYNCONV_AUTOTUNE`` (which once turned measuring off) is read nowhere: no value changes what 'auto' runs."""
    sources = [
        p
        for d in ("dynconv_jax", "train", "parity", "benchmarks", "scripts", "tests")
        for p in (ROOT / d).rglob("*")
        if p.suffix in (".py", ".sh") and p != Path(__file__)
    ]
    assert [str(p) for p in sources if "DYNCONV_AUTOTUNE" in p.read_text()] == []


def test_a_losing_candidate_is_called_once(monkeypatch):
    """A candidate whose warm-up call already takes over _GIVE_UP_FACTOR x the best so far is not called again
    (a losing call can cost more than compiling); the others get a warm-up and ``repeats`` timed calls."""
    names = ["fast", "slow", "close"]
    cost = {"fast": 1.0, "slow": 10.0, "close": 2.0}  # seconds per call, on a fake clock
    calls = dict.fromkeys(names, 0)

    def make_fn(name):
        return lambda x: x + names.index(name)  # the output tells which candidate ran

    def fake_time_call(compiled, args):
        name = names[int(compiled(*args)[0])]
        calls[name] += 1
        return cost[name]

    monkeypatch.setattr(autotune, "_time_call", fake_time_call)
    seconds = autotune.measure(names, make_fn, [np.zeros(2, np.float32)], repeats=3)
    assert seconds == cost
    assert calls == {"fast": 4, "slow": 1, "close": 4}


_FIRST_STEPS = r"""
import hashlib
import jax, jax.numpy as jnp, numpy as np, optax
from dynconv_jax.models import create_model
digest = hashlib.sha256()
for name, kwargs in (("mobilenet_v2", dict(conv="condconv", width_mult=0.1)),
                     ("resnet18", dict(conv="odconv", base_width=4))):
    model = create_model(name, num_classes=10, stem="cifar", **kwargs)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=4))
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)  # threefry: minutes of XLA:CPU compile
    params, rest = variables["params"], {c: v for c, v in variables.items() if c != "params"}
    tx = optax.sgd(0.1, momentum=0.9)

    def step(params, rest, opt_state, key):
        def loss(params):
            logits, new_rest = model.apply({"params": params, **rest}, x, train=True, mutable=list(rest),
                                           rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_rest
        (value, new_rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_rest, opt_state, value

    state, step = (params, rest, tx.init(params)), jax.jit(step)
    for i in range(3):
        *state, value = step(*state, jax.random.key(i, impl="rbg"))
    for leaf in jax.tree_util.tree_leaves((state, value)):
        digest.update(np.asarray(leaf).tobytes())
print("DIGEST", digest.hexdigest())
"""


@pytest.mark.slow
def test_two_fresh_processes_give_the_same_bits_and_write_nothing(tmp_path):
    """No environment variable set: three jitted training steps of (narrow) MobileNetV2-CondConv and
        ResNet-18-ODConv give bit-identical parameters, state and loss in two fresh processes, and nothing is
    written under $XDG_CACHE_HOME or ~."""
    cache, home = tmp_path / "cache", tmp_path / "home"
    cache.mkdir()
    home.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FIRST_STEPS],
            cwd=tmp_path,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    digests = []
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        digests.append(next(line for line in out.splitlines() if line.startswith("DIGEST")))
    assert digests[0] == digests[1]
    assert list(cache.rglob("*")) == [] and list(home.rglob("*")) == []
