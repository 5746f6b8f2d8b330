"""Strategy plans: which per-sample convolution strategy each dynamic convolution of a program runs.

``strategy='auto'`` follows fixed per-backend rules (:func:`dynconv_jax.ops.choose_strategy`) and
never measures. A :class:`Plan` replaces the rules by measured choices: it is data — one entry per
*problem* (backend, device kind, input and expert shapes, dtypes, strides, padding, dilation, groups,
which attentions and bias are present) naming the strategy to run — made on request by
:func:`dynconv_jax.autotune.tune`, saved with a run (:meth:`Plan.save`, JSON) and loaded again for a
reproducible run (:meth:`Plan.load`). Pass it where a strategy goes::

    model = create_model("resnet18", conv="odconv", strategy=plan)   # or ODConv(..., strategy=plan)

A problem the plan does not hold runs the rules' choice, with a warning naming it. A plan is computed
once and read by every process of a multi-process run, so every process compiles the same program.

While :func:`~dynconv_jax.autotune.tune` traces a function, :class:`Recording` collects the problems
the function's dynamic convolutions meet (:func:`recording` returns the active one).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Plan", "problem_key"]

FORMAT = "dynconv.plan.v1"
#: The strategies of :func:`dynconv_jax.ops.dynamic_conv` (all exact; see its module docstring).
STRATEGIES = ("vmap", "shifted", "patches", "pointwise", "mix", "map", "lean")


def problem_key(
    x_shape,
    experts_shape,
    *,
    dtype: Sequence,
    strides,
    padding,
    dilation,
    groups,
    attentions: Sequence[str],
    device=None,
) -> str:
    """The key of one problem: a canonical JSON string (readable in a saved plan). ``dtype`` holds the
    input's and the experts' dtypes; ``attentions`` the names of the optional arguments present.

    Examples:
      >>> import json
      >>> from dynconv_jax.plan import problem_key
      >>> key = problem_key((8, 16, 16, 32), (4, 3, 3, 32, 64), dtype=("float32", "float32"), strides=(1, 1),
      ...                   padding="SAME", dilation=(1, 1), groups=1, attentions=["kernel_attention"])
      >>> json.loads(key)["experts"]
      [4, 3, 3, 32, 64]
    """
    device = device or jax.devices()[0]
    return json.dumps(
        {
            "backend": device.platform,
            "device_kind": device.device_kind,
            "x": [int(d) for d in x_shape],
            "experts": [int(d) for d in experts_shape],
            "dtype": [jnp.dtype(d).name for d in dtype],
            "strides": [int(s) for s in strides],
            "padding": padding if isinstance(padding, str) else np.asarray(padding).tolist(),
            "dilation": [int(d) for d in dilation],
            "groups": int(groups),
            "attentions": sorted(attentions),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


@dataclasses.dataclass(frozen=True, init=False)
class Plan:
    """Measured strategy choices, one per problem (see the module docstring).

    Attributes:
      choices: ``(problem key, strategy)`` pairs, sorted by key (hashable: a plan can be a field of a
        Flax module).
      measurements: per problem key, what :func:`~dynconv_jax.autotune.tune` measured: ``seconds`` per
        candidate, the ``rule``'s choice, ``differentiated`` (timed forward+backward), ``count`` (calls
        of the problem in the tuned function). Informational; not compared or hashed.

    Examples:
      >>> from dynconv_jax.plan import Plan, problem_key
      >>> key = problem_key((8, 16, 16, 32), (4, 3, 3, 32, 64), dtype=("float32", "float32"), strides=(1, 1),
      ...                   padding="SAME", dilation=(1, 1), groups=1, attentions=["kernel_attention"])
      >>> plan = Plan.from_json(Plan({key: "lean"}).to_json())
      >>> plan.strategy_for(key)
      'lean'
    """

    choices: Tuple[Tuple[str, str], ...]
    measurements: Mapping[str, dict] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    def __init__(
        self,
        choices: Union[Mapping[str, str], Sequence[Tuple[str, str]]],
        measurements: Optional[Mapping[str, dict]] = None,
    ):
        pairs = tuple(sorted(dict(choices).items()))
        for key, strategy in pairs:
            if strategy not in STRATEGIES:
                raise ValueError(f"plan entry {key}: strategy={strategy!r} is not one of {STRATEGIES}")
        object.__setattr__(self, "choices", pairs)
        object.__setattr__(self, "measurements", dict(measurements or {}))

    def __len__(self) -> int:
        return len(self.choices)

    def strategy_for(self, key: str) -> Optional[str]:
        """The plan's strategy for the problem ``key`` (:func:`problem_key`), or None."""
        return dict(self.choices).get(key)

    def estimated_speedup(self) -> Optional[float]:
        """Summed measured seconds of the rules' choices over the plan's, each problem weighted by its
        number of calls: the per-layer estimate of what the plan buys (None without measurements)."""
        rule = chosen = 0.0
        for key, strategy in self.choices:
            m = self.measurements.get(key)
            if not m or m.get("rule") not in m.get("seconds", {}):
                return None
            rule += m["count"] * m["seconds"][m["rule"]]
            chosen += m["count"] * m["seconds"][strategy]
        return rule / chosen if chosen else None

    def to_json(self) -> str:
        """The plan as JSON text: its format tag and one line per problem."""
        entries = [
            json.dumps(
                {"problem": json.loads(key), "strategy": strategy, **self.measurements.get(key, {})}, sort_keys=True
            )
            for key, strategy in self.choices
        ]
        return '{"format": "%s", "entries": [\n%s\n]}' % (FORMAT, ",\n".join(entries))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """The plan of :meth:`to_json`'s text; a ValueError says what is wrong with any other text."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"not a dynconv plan: invalid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
            raise ValueError(f"not a dynconv plan: expected {{'format': '{FORMAT}', 'entries': [...]}}")
        choices, measurements = {}, {}
        for entry in data["entries"]:
            if not (isinstance(entry, dict) and isinstance(entry.get("problem"), dict) and "strategy" in entry):
                raise ValueError(f"not a dynconv plan: entry {entry!r} lacks 'problem' or 'strategy'")
            key = json.dumps(entry["problem"], sort_keys=True, separators=(",", ":"))
            choices[key] = entry["strategy"]
            measurements[key] = {k: v for k, v in entry.items() if k not in ("problem", "strategy")}
        return cls(choices, measurements)

    def save(self, path: Union[str, Path]) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Plan":
        """Read a plan written by :meth:`save`; the error names the file if it is not one."""
        try:
            return cls.from_json(Path(path).read_text())
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


_warned: set = set()


def warn_missing(key: str, rule: str) -> None:
    """Warn once per problem that a plan does not hold it (the rules' choice runs)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"dynconv: the strategy plan has no entry for the problem {key}; running the rules' "
            f"choice {rule!r} (tune the function that meets it to add one)",
            stacklevel=4,
        )


# --------------------------------------------------------------------------- recording (autotune.tune)
@dataclasses.dataclass
class Problem:
    """One problem met while tracing: how to call it again, how often it was met, whether it was
    differentiated. ``arrays``: ``(name, shape, dtype)`` of each array argument of
    :func:`dynconv_jax.ops.dynamic_conv`; ``static``: its other keyword arguments; ``rule``: 'auto''s
    choice for it."""

    arrays: Tuple[Tuple[str, Tuple[int, ...], str], ...]
    static: Dict[str, object]
    rule: str
    count: int = 0
    differentiated: bool = False


class Recording:
    """The problems met while tracing (keyed by :func:`problem_key`), in the order first met."""

    def __init__(self):
        self.problems: Dict[str, Problem] = {}

    def observe(self, key: str, problem: Problem, arrays: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
        """Count one call of ``problem``; returns ``arrays`` passed through an identity whose derivative
        rule marks the problem as differentiated (it runs only when a transformation differentiates them)."""
        known = self.problems.setdefault(key, problem)
        known.count += 1

        @jax.custom_jvp
        def probe(values):
            return values

        @probe.defjvp
        def probe_jvp(primals, tangents):
            known.differentiated = True
            return primals[0], tangents[0]

        return probe(arrays)

    @contextlib.contextmanager
    def active(self) -> Iterator["Recording"]:
        token = _recording.set(self)
        try:
            yield self
        finally:
            _recording.reset(token)


_recording: contextvars.ContextVar[Optional[Recording]] = contextvars.ContextVar("dynconv_recording", default=None)


def recording() -> Optional[Recording]:
    """The active :class:`Recording` (inside :func:`dynconv_jax.autotune.tune`), else None."""
    return _recording.get()
