"""Measuring the per-sample convolution strategies, on request: ``tune(fn, *args) -> Plan``.

``strategy='auto'`` never measures: it follows the fixed per-backend rules of
:func:`dynconv_jax.ops.choose_strategy`, so two runs of the same program compile the same program and
give the same bits, and nothing is written anywhere. Measuring is an explicit act, as
``torch.backends.cudnn.benchmark`` is opt-in: :func:`tune` traces a function (typically the training
step) once, collects every dynamic convolution problem it meets — backend, device kind, shapes, dtypes,
geometry, attentions — and times each applicable strategy of each problem on random data of its
shapes, forward and backward where the function differentiates it. The result is a
:class:`~dynconv_jax.plan.Plan`: save it with the run, load it for reproducible runs, and build the
model with ``strategy=plan``. Every strategy is exact, but each sums in its own order: a plan changes
the rounding of a run, and the run's bits are then those of the plan, not of the machine's load.

For a whole model: ``plan = autotune.tune(train_step, state, batch)`` (compiles and times every candidate
of every problem: minutes on CPU), ``plan.save("run/strategy_plan.json")``, then
``create_model(..., strategy=Plan.load("run/strategy_plan.json"))`` (docs/performance.md).
"""

from __future__ import annotations

import functools
import time
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import numpy as np

from dynconv_jax import ops, plan

__all__ = ["tune", "record", "measure_problem"]

# A candidate whose first call takes this many times the best so far is not called again.
_GIVE_UP_FACTOR = 4.0
_REPEATS = 3


def _time_call(compiled, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def measure(
    candidates: Sequence[str], make_fn: Callable[[str], Callable], args: Sequence[np.ndarray], repeats: int = _REPEATS
) -> Dict[str, float]:
    """Seconds per call of each candidate (the best of ``repeats`` after one warm-up call).

    ``make_fn(name)`` returns the function to time for strategy ``name``; each is compiled for
    ``args`` on its own. A candidate whose warm-up call (allocation and first touch included) takes
    more than ``_GIVE_UP_FACTOR`` times the fastest warm-up so far is not called again and keeps that
    time; one whose first timed call takes more than that factor times the best so far is not repeated
    (a losing candidate's call can cost far more than compiling it: docs/performance.md, "Measuring on
    request"). A candidate that fails to compile or run is left out (with a warning).
    """
    seconds: Dict[str, float] = {}
    warmups: Dict[str, float] = {}

    def losing(call_seconds: float, so_far: Dict[str, float]) -> bool:
        return bool(so_far) and call_seconds > _GIVE_UP_FACTOR * min(so_far.values())

    for name in candidates:
        try:
            compiled = jax.jit(make_fn(name)).lower(*args).compile()
            warm = _time_call(compiled, args)  # allocation, first touch: compared with the other warm-ups
            best = warm
            if not losing(warm, warmups):
                best = _time_call(compiled, args)
                if not losing(best, seconds):
                    for _ in range(repeats - 1):
                        best = min(best, _time_call(compiled, args))
        except Exception as err:  # a strategy XLA cannot run here is not a candidate
            warnings.warn(
                f"dynconv autotune: strategy {name!r} failed to run ({type(err).__name__}: {err}); skipped",
                stacklevel=2,
            )
            continue
        warmups[name], seconds[name] = warm, best
    return seconds


def random_like(shapes_dtypes: Sequence[Tuple[Tuple[int, ...], object]], seed: int = 0):
    """Host arrays of standard-normal data, one per ``(shape, dtype)`` (the values do not change the timing)."""
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(shape), dtype=np.dtype(dtype)) for shape, dtype in shapes_dtypes]


def record(fn: Callable, *args, **kwargs) -> plan.Recording:
    """The problems ``fn(*args, **kwargs)`` meets, traced once (``jax.make_jaxpr``; nothing runs).

    ``jax.jit`` functions inside ``fn`` are traced afresh (``jax.disable_jit``), so a function traced
    before still reports its problems.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import CondConv, autotune
      >>> layer = CondConv(features=4, kernel_size=(3, 3))
      >>> x = jnp.ones((2, 6, 6, 3))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> problems = autotune.record(jax.grad(lambda v: layer.apply(v, x).sum()), variables).problems
      >>> [(p.rule, p.count, p.differentiated) for p in problems.values()]
      [('lean', 1, True)]
    """
    recording = plan.Recording()
    with recording.active(), jax.disable_jit():
        jax.make_jaxpr(functools.partial(fn, **kwargs))(*args)
    return recording


def _forward(problem: plan.Problem, strategy: str) -> Callable:
    """``problem``'s convolution with ``strategy``, its array arguments positional."""
    names = [name for name, _, _ in problem.arrays]

    def forward(*values):
        return ops.dynamic_conv(**dict(zip(names, values)), **problem.static, strategy=strategy)

    return forward


def _timed_function(problem: plan.Problem, strategy: str) -> Callable:
    """The function timed for ``strategy``: the convolution's forward, or forward and VJP (the output
    cotangent is its last argument) when the problem was differentiated."""
    forward = _forward(problem, strategy)
    if not problem.differentiated:
        return forward

    def forward_backward(*args):
        _, vjp = jax.vjp(forward, *args[:-1])
        return vjp(args[-1])

    return forward_backward


def measure_problem(
    problem: plan.Problem, strategies: Optional[Sequence[str]] = None, repeats: int = _REPEATS
) -> Dict[str, float]:
    """Seconds per call of each applicable strategy (of ``strategies``, default all) for ``problem``,
    the rules' choice first, each compiled on its own and timed on one device (no mesh in view).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import CondConv, autotune
      >>> layer = CondConv(features=4, kernel_size=(3, 3))
      >>> x = jnp.ones((2, 6, 6, 3))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> problems = autotune.record(lambda v: layer.apply(v, x), variables).problems
      >>> seconds = autotune.measure_problem(next(iter(problems.values())), strategies=("map", "shifted"))
      >>> sorted(seconds)
      ['map', 'shifted']
    """
    shapes = [(shape, dtype) for _, shape, dtype in problem.arrays]
    kernel_size = dict((n, s) for n, s, _ in problem.arrays)["experts"][1:-2]
    candidates = [s for s in ops.applicable_strategies(kernel_size) if strategies is None or s in strategies]
    candidates = sorted(candidates, key=lambda s: s != problem.rule)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        if problem.differentiated:
            y = jax.eval_shape(_forward(problem, problem.rule), *[jax.ShapeDtypeStruct(s, d) for s, d in shapes])
            shapes = shapes + [(y.shape, y.dtype)]
        args = random_like(shapes)
        return measure(candidates, lambda name: _timed_function(problem, name), args, repeats)


def tune(
    fn: Callable, *args, strategies: Optional[Sequence[str]] = None, repeats: int = _REPEATS, **kwargs
) -> plan.Plan:
    """Measure the strategies of every dynamic convolution ``fn(*args, **kwargs)`` meets; return a plan.

    ``fn`` is traced once (:func:`record`; nothing of it runs), then each problem it met is timed on
    random data of its shapes (:func:`measure_problem`: forward+backward where ``fn`` differentiates it,
    the forward alone otherwise; ``strategies`` limits the candidates). Layers meet problems with
    ``strategy='auto'`` or a plan; layers with a fixed strategy are left alone. The plan's measurements
    hold every candidate's seconds, the rules' choice and the calls per problem
    (:meth:`~dynconv_jax.plan.Plan.estimated_speedup`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import CondConv, autotune
      >>> layer = CondConv(features=4, kernel_size=(3, 3))
      >>> x = jnp.ones((2, 6, 6, 3))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> plan = autotune.tune(jax.grad(lambda v, x: layer.apply(v, x).sum()), variables, x)
      >>> y = CondConv(features=4, kernel_size=(3, 3), strategy=plan).apply(variables, x)
    """
    recording = record(fn, *args, **kwargs)
    if not recording.problems:
        raise ValueError(
            "tune: the function met no dynamic convolution with strategy='auto' or a plan "
            "(layers built with a fixed strategy are not tuned)"
        )
    choices, measurements = {}, {}
    for key, problem in recording.problems.items():
        seconds = measure_problem(problem, strategies, repeats)
        choices[key] = min(seconds, key=seconds.get) if seconds else problem.rule
        measurements[key] = {
            "seconds": seconds,
            "rule": problem.rule,
            "count": problem.count,
            "differentiated": problem.differentiated,
        }
    return plan.Plan(choices, measurements)
