"""strategy='auto' measures (dynconv_jax.autotune): cache miss/hit, disabled mode, corrupt cache,
differentiated vs not, forward mode, and one choice for every process of a 2-process run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynconv_jax import DynamicConv, autotune, ops

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tuning(tmp_path, monkeypatch):
    """Measuring on, with a cache file of the test's own and an empty memory."""
    cache = tmp_path / "cache" / "autotune.json"
    monkeypatch.setenv("DYNCONV_AUTOTUNE", "1")
    monkeypatch.setenv("DYNCONV_AUTOTUNE_CACHE", str(cache))
    autotune.clear_memory()
    yield cache
    autotune.clear_memory()


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


def _layer_and_input(kind=DynamicConv):
    layer = kind(features=8, kernel_size=(3, 3))
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 8))
    return layer, x, layer.init(jax.random.key(0), x)


def _entries(cache: Path):
    return json.loads(cache.read_text())["entries"]


def test_miss_measures_every_candidate_then_hits(tuning, ran, monkeypatch):
    layer, x, variables = _layer_and_input()
    y = jax.jit(layer.apply)(variables, x)
    (key, entry), = _entries(tuning).items()
    assert set(entry["seconds"]) == set(ops.applicable_strategies((3, 3)))
    assert entry["strategy"] == min(entry["seconds"], key=entry["seconds"].get)
    assert json.loads(key)["differentiated"] == "no"
    # The traced layer ran the measured choice (the timing runs themselves ran every candidate before it).
    assert ran[-1] == entry["strategy"]

    # A new process (memory cleared) reads the file and measures nothing.
    autotune.clear_memory()
    ran.clear()
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured on a cache hit"))
    y2 = jax.jit(lambda v, x: layer.apply(v, x))(variables, x)
    assert ran == [entry["strategy"]]
    np.testing.assert_allclose(y, y2, rtol=1e-6, atol=1e-6)


def test_cached_choice_is_used(tuning, ran):
    """Whatever the cache says (here a fake entry: 'patches'), that strategy runs."""
    layer, x, variables = _layer_and_input()
    jax.jit(layer.apply)(variables, x)  # writes the real entry
    entries = _entries(tuning)
    key = next(iter(entries))
    forced = "patches" if entries[key]["strategy"] != "patches" else "shifted"
    tuning.write_text(json.dumps({"version": autotune.CACHE_VERSION,
                                  "entries": {key: {"strategy": forced, "seconds": {}}}}))
    autotune.clear_memory()
    ran.clear()
    jax.jit(lambda v, x: layer.apply(v, x))(variables, x)
    assert ran == [forced]


def test_differentiated_is_its_own_problem(tuning):
    layer, x, variables = _layer_and_input()

    def loss(params, x):
        return jnp.sum(layer.apply({"params": params}, x) ** 2)

    jax.jit(jax.grad(loss))(variables["params"], x)
    jax.jit(layer.apply)(variables, x)
    modes = sorted(json.loads(k)["differentiated"] for k in _entries(tuning))
    assert modes == ["no", "reverse"]


def test_forward_mode_never_picks_map(tuning, ran):
    """'map' has a custom VJP: under jax.jvp it is no candidate (and the jvp runs)."""
    layer, x, variables = _layer_and_input()
    ran.clear()
    jax.jvp(lambda x: layer.apply(variables, x), (x,), (jnp.ones_like(x),))
    (entry,) = [e for k, e in _entries(tuning).items() if json.loads(k)["differentiated"] == "forward"]
    assert "map" not in entry["seconds"] and "map" not in ran


def test_forward_mode_runs_with_the_rules_too(monkeypatch):
    """With measuring off, the rule's 'map' (reverse mode only) gives way under jax.jvp."""
    monkeypatch.setenv("DYNCONV_AUTOTUNE", "0")
    layer, x, variables = _layer_and_input()
    y, dy = jax.jvp(lambda x: layer.apply(variables, x), (x,), (jnp.ones_like(x),))
    y_ref, dy_ref = jax.jvp(lambda x: DynamicConv(features=8, kernel_size=(3, 3), strategy="vmap").apply(variables, x),
                            (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dy, dy_ref, rtol=1e-5, atol=1e-5)


def test_disabled_follows_the_rules_and_writes_nothing(tuning, ran, monkeypatch):
    monkeypatch.setenv("DYNCONV_AUTOTUNE", "0")
    monkeypatch.setattr(autotune, "measure", lambda *a, **k: pytest.fail("measured while disabled"))
    layer, x, variables = _layer_and_input()
    ran.clear()
    jax.jit(layer.apply)(variables, x)
    rule = ops.choose_strategy((4, 6, 6, 8), (4, 3, 3, 8, 8), strides=(1, 1), dilation=(1, 1), groups=1,
                               spatial_attention=False)
    assert ran == [rule]
    assert not tuning.exists()


def test_corrupt_cache_is_set_aside_with_a_warning(tuning):
    tuning.parent.mkdir(parents=True)
    tuning.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable cache"):
        layer, x, variables = _layer_and_input()
        jax.jit(layer.apply)(variables, x)
    assert (tuning.parent / "autotune.json.corrupt").read_text() == "{not json"
    assert len(_entries(tuning)) == 1  # a fresh, valid cache


def test_cache_location_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("DYNCONV_AUTOTUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert autotune.cache_path() == tmp_path / "dynconv" / "autotune.json"


_WORKER = r"""
import json, os, sys
process, port = int(sys.argv[1]), sys.argv[2]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process,
                           initialization_timeout=120)
import jax.numpy as jnp
from dynconv_jax import DynamicConv, ops
ran = []
for name, impl in dict(ops._IMPLS).items():
    ops._IMPLS[name] = lambda *a, _n=name, _i=impl, **k: (ran.append(_n), _i(*a, **k))[1]
layer = DynamicConv(features=8, kernel_size=(3, 3))
x = jnp.ones((4, 6, 6, 8))
variables = jax.eval_shape(layer.init, jax.random.key(0), x)
ran.clear()
jax.jit(layer.apply).lower(variables, x)
print("RAN", json.dumps(ran), flush=True)
jax.distributed.shutdown()
"""


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


@pytest.mark.slow
def test_two_processes_make_process_zeros_choice(tmp_path):
    """Process 1's own cache says one strategy, process 0 measures another: both run process 0's."""
    key = autotune.problem_key((4, 6, 6, 8), (4, 3, 3, 8, 8), dtype=("float32", "float32"), strides=(1, 1),
                               padding="SAME", dilation=(1, 1), groups=1,
                               attentions=["kernel_attention", "expert_bias"], differentiated=None)
    seconds = {"vmap": 9.0, "shifted": 9.0, "patches": 1.0, "map": 9.0, "mix": 9.0}
    caches = []
    for process, choice in enumerate(["patches", "shifted"]):
        path = tmp_path / f"cache{process}.json"
        path.write_text(json.dumps({"version": autotune.CACHE_VERSION,
                                    "entries": {key: {"strategy": choice, "seconds": seconds}}}))
        caches.append(path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "DYNCONV_AUTOTUNE": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), port], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**env, "DYNCONV_AUTOTUNE_CACHE": str(caches[i])}) for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    ran = [json.loads(next(l for l in out.splitlines() if l.startswith("RAN"))[4:]) for out in outs]
    assert ran == [["patches"], ["patches"]]
