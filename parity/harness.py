"""Run one parity case: the PyTorch reference against the Flax twin built from converted weights.

For a :class:`parity.cases.Case` and a dtype, :func:`run_case` returns one :class:`Row` per
check:

- ``checkpoint``: the weights saved as a training script saves them (``torch.save`` of
  ``{'epoch', 'state_dict'}`` with DataParallel's ``module.`` prefix on every key) and converted
  from that file equal, bit for bit, the weights converted from the in-memory state_dict;
- ``forward_eval``: outputs in eval mode (running BatchNorm statistics, which are randomized
  first so that eval mode is not the identity normalization);
- ``forward_train``: outputs in train mode (batch statistics);
- ``running_stats``: the BatchNorm running statistics after that one training forward;
- ``grad_input`` / ``grad_params``: gradients of ``sum((y - target)^2) / (2 B)`` w.r.t. the
  input and every parameter (the PyTorch gradients are put in the Flax layout by the same
  converter and compared leaf by leaf);
- ``sgd``: a training run, in train mode: ``torch.optim.SGD`` (momentum, weight decay) vs
  ``optax.chain(add_decayed_weights(wd), sgd(lr, momentum))`` (PyTorch adds the decay to the
  gradient before the momentum buffer; so does this chain), every parameter and running
  statistic compared after every step;
- ``adamw``: the same with ``torch.optim.AdamW`` vs ``optax.adamw``.

Errors: ``max_abs = max|a - b|`` and ``max_rel = max|a - b| / max|b|`` per array (``b`` the
PyTorch value), the worst array reported. Elementwise relative error is meaningless near zero.

Verdict. float64 rows pass at the fixed tolerance (:data:`TOLERANCES`, or the case's). A float32
row also measures its **noise floor**: the same metric between PyTorch in float32 and PyTorch in
float64 run on the same (float32) weights and inputs, i.e. the rounding error of the reference
itself, with every operation's summation order and precision changed at once. It passes when
``max_rel <= max(tol, FLOAT32_NOISE_FACTOR * floor)``: a cross-framework difference no larger
than a small multiple of the reference's own float32 error is rounding, not a conversion error
(docs/conversion_parity.md measures the factor). The floor comes from the reference alone, so a
bug that makes only the Flax side less accurate cannot widen it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import tempfile
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from parity.cases import Case

DTYPES = ("float64", "float32")
#: Relative tolerances (max|a-b| / max|b|), from the measurements in docs/conversion_parity.md.
TOLERANCES = {
    "float64": {"forward": 1e-12, "grad": 1e-12, "train": 1e-9},
    "float32": {"forward": 1e-5, "grad": 2e-5, "train": 5e-5},
}
TOLERANCE_KIND = {
    "forward_eval": "forward",
    "forward_train": "forward",
    "running_stats": "forward",
    "grad_input": "grad",
    "grad_params": "grad",
    "sgd": "train",
    "adamw": "train",
}
#: A float32 row passes when its error is at most this multiple of its noise floor (the reference's
#: own float32 error; module docstring). The largest ratio measured on a correct build over the
#: whole grid is recorded in docs/conversion_parity.md; this factor leaves a margin above it.
FLOAT32_NOISE_FACTOR = 8.0
#: AdamW hyperparameters of the ``adamw`` check (PyTorch's defaults but the learning rate).
ADAMW = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)


def tolerance(case: Case, dtype: str, check: str) -> float:
    """The fixed relative tolerance of ``check`` for ``case`` at ``dtype`` (the case's override, if any);
    0 for ``checkpoint`` (bit-exact)."""
    if check == "checkpoint":
        return 0.0
    kind = TOLERANCE_KIND[check]
    return (case.tolerances or {}).get(dtype, {}).get(kind, TOLERANCES[dtype][kind])


@dataclasses.dataclass
class Row:
    """One check of one case at one dtype. ``tol`` is the fixed tolerance, ``floor`` the float32
    noise floor (None in float64), ``limit = max(tol, FLOAT32_NOISE_FACTOR * floor)`` the bound applied."""

    case: str
    check: str
    dtype: str
    max_abs: float
    max_rel: float
    tol: float
    passed: bool
    detail: str = ""
    floor: Optional[float] = None
    limit: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class SGDConfig:
    """Training checks: ``steps`` (None = the case's own ``train_steps``) and the SGD hyperparameters
    (a case may set its own learning rate, ``Case.sgd_lr``)."""

    steps: Optional[int] = None
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-2


def compare(a, b) -> Tuple[float, float]:
    """``(max|a-b|, max|a-b| / max|b|)``; ``b`` is the reference."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return diff, (diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))


def _tree_scale(tree) -> float:
    return max(
        [
            _tree_scale(v) if isinstance(v, dict) else float(np.max(np.abs(np.asarray(v, np.float64)), initial=0.0))
            for v in tree.values()
        ],
        default=0.0,
    )


def compare_trees(
    flax_tree: Dict, torch_tree: Dict, prefix: str = "", floor: Optional[float] = None
) -> Tuple[float, float, str]:
    """Worst ``(max_abs, max_rel, path)`` over the leaves of two nested dicts with equal structure.

    Per leaf ``max|a-b| / max(max|b|, floor)`` with ``floor = 1e-3 * max|b|`` over the whole tree:
    a leaf whose true value is ~0 (e.g. the gradient of a conv bias followed by BatchNorm) is
    measured against the tree's scale, not against its own rounding noise.
    """
    if floor is None:
        floor = 1e-3 * _tree_scale(torch_tree)
    worst = (0.0, 0.0, "")
    if set(flax_tree) != set(torch_tree):
        raise ValueError(f"trees differ at {prefix or '<root>'}: {sorted(flax_tree)} vs {sorted(torch_tree)}")
    for k in flax_tree:
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(flax_tree[k], dict):
            res = compare_trees(flax_tree[k], torch_tree[k], path, floor)
        else:
            diff, _ = compare(flax_tree[k], torch_tree[k])
            scale = max(float(np.max(np.abs(np.asarray(torch_tree[k], np.float64)), initial=0.0)), floor)
            res = (diff, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")), path)
        if res[1] > worst[1] or (res[1] == worst[1] and res[0] > worst[0]):
            worst = res
    return worst


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if a.ndim > 2 else a


def _nchw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(a, -1, 1)) if a.ndim > 2 else a


def randomize_batchnorm(module, generator) -> None:
    """Random affine parameters and running statistics for every BatchNorm of a torch module."""
    import torch

    # torch's public BatchNorm classes (their base class, torch.nn.modules.batchnorm._BatchNorm, is private)
    batch_norms = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, batch_norms):
                n = m.num_features
                dtype = m.running_mean.dtype
                m.running_mean.copy_(0.3 * torch.randn(n, generator=generator, dtype=dtype))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator, dtype=dtype))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=generator, dtype=dtype))
                    m.bias.copy_(0.2 * torch.randn(n, generator=generator, dtype=dtype))


class FlaxSide:
    """The JAX side of a case: builds the Flax module, its variable template, and the two functions
    the checks call. Another JAX API (e.g. Flax NNX) plugs in by providing the same methods.

    Attributes:
      module: the Flax module (``case.make_flax(dtype, precision)``).
      template: ``jax.eval_shape`` of its variables (the converter's target structure).
    """

    def __init__(self, case: Case, dtype: str, x_nhwc: np.ndarray):
        import jax
        import jax.numpy as jnp
        from jax import lax

        self.module = case.make_flax(getattr(jnp, dtype), lax.Precision.HIGHEST)
        self.kwargs = {} if case.temperature is None else {"temperature": case.temperature}
        keys = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
        self.template = jax.eval_shape(self.module.init, keys, x_nhwc)

    def eval_fn(self) -> Callable:
        """A jitted ``(variables, x) -> y`` in eval mode."""
        import jax

        return jax.jit(lambda v, x: self.module.apply(v, x, train=False, **self.kwargs))

    def train_fn(self, grads: bool) -> Callable:
        """A jitted ``(params, batch_stats, x, target) -> (y, new_batch_stats, grad_params, grad_x)`` in
        train mode for the loss ``sum((y - target)^2) / (2 B)``; with ``grads=False`` the forward only
        (gradients None): it compiles much faster, for runs without gradient or training checks."""
        import jax
        import jax.numpy as jnp

        def loss_fn(params, batch_stats, x, target):
            y, state = self.module.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.PRNGKey(0)},
                **self.kwargs,
            )
            return jnp.sum((y - target) ** 2) / (2 * y.shape[0]), (y, state.get("batch_stats", {}))

        if not grads:
            return jax.jit(lambda p, s, x, t: (*loss_fn(p, s, x, t)[1], None, None))

        @jax.jit
        def step(params, batch_stats, x, target):
            (_, (y, new_stats)), (g_params, g_x) = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)(
                params, batch_stats, x, target
            )
            return y, new_stats, g_params, g_x

        return step


class _Pair:
    """Both sides of one case at one dtype, with the converted variables; in float32 also the
    float64 reference (the float32 torch model's weights in float64) that measures the noise floor."""

    def __init__(self, case: Case, dtype: str, seed: int, flax_side=FlaxSide):
        import jax
        import torch

        from dynconv_jax.convert import torch_to_flax

        self.case, self.dtype, self.seed = case, dtype, seed
        torch.manual_seed(seed)
        model = case.make_torch().to(getattr(torch, dtype))
        randomize_batchnorm(model, torch.Generator().manual_seed(seed + 1))
        if case.temperature is not None:
            from dynconv_torch import set_temperature

            set_temperature(model, case.temperature)
        self.torch_model = model
        self.rng = np.random.default_rng(seed + 2)
        self.x0 = self.rng.standard_normal(case.input_shape).astype(dtype)
        self.flax = flax_side(case, dtype, _nhwc(self.x0))
        self.template = self.flax.template
        self.variables = torch_to_flax(model.state_dict(), self.template)
        self.noise = dtype == "float32"
        if self.noise:  # the float32 weights, exactly, in float64; converted into a float64 template
            self.torch_model64 = copy.deepcopy(model).double()
            self.template64 = jax.tree_util.tree_map(lambda s: np.empty(s.shape, np.float64), self.template)

    def torch_fresh(self, reference: bool = False):
        return copy.deepcopy(self.torch_model64 if reference else self.torch_model)

    def to_flax(self, state_dict, reference: bool = False) -> Dict:
        from dynconv_jax.convert import torch_to_flax

        return torch_to_flax(state_dict, self.template64 if reference else self.template)

    def torch_grads_to_flax(self, module, reference: bool = False) -> Dict:
        from dynconv_jax.convert import torch_to_flax

        grads = {k: p.grad for k, p in module.named_parameters()}
        template = self.template64 if reference else self.template
        return torch_to_flax(grads, {"params": template["params"]})["params"]

    def limit(self, check: str, floor: Optional[float]) -> float:
        tol = tolerance(self.case, self.dtype, check)
        return tol if floor is None else max(tol, FLOAT32_NOISE_FACTOR * floor)


def _torch_train_step(module, x: np.ndarray, target: np.ndarray):
    import torch

    module.train()
    xt = torch.from_numpy(x).requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(xt)
    loss = ((y - torch.from_numpy(target)) ** 2).sum() / (2 * y.shape[0])
    loss.backward()
    return y.detach().numpy(), xt.grad.numpy()


def _optimizers(check: str, sgd: SGDConfig):
    """``(optax transformation, torch optimizer factory)`` of a training check."""
    import optax
    import torch

    if check == "sgd":
        tx = optax.chain(optax.add_decayed_weights(sgd.weight_decay), optax.sgd(sgd.lr, momentum=sgd.momentum))
        return tx, lambda params: torch.optim.SGD(
            params, lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay
        )
    a = ADAMW
    tx = optax.adamw(a["lr"], b1=a["b1"], b2=a["b2"], eps=a["eps"], weight_decay=a["weight_decay"])
    return tx, lambda params: torch.optim.AdamW(
        params, lr=a["lr"], betas=(a["b1"], a["b2"]), eps=a["eps"], weight_decay=a["weight_decay"]
    )


def _training_row(pair: _Pair, check: str, train_fn, sgd: SGDConfig, steps: int, target_shape) -> Row:
    """``steps`` optimizer steps on both sides from the converted weights (float32: a float64
    reference run too); the step whose error is closest to (or furthest past) its bound is reported."""
    import jax
    import optax

    case, dtype = pair.case, pair.dtype
    tx, torch_opt = _optimizers(check, sgd)
    update = jax.jit(lambda g, state, p: (optax.apply_updates(p, (u := tx.update(g, state, p))[0]), u[1]))
    m = pair.torch_fresh()
    opt = torch_opt(m.parameters())
    if pair.noise:
        m64 = pair.torch_fresh(reference=True)
        opt64 = torch_opt(m64.parameters())
    params, stats = pair.variables["params"], pair.variables["batch_stats"]
    opt_state = tx.init(params)
    data = np.random.default_rng(pair.seed + 3)  # the same stream for every check and dtype
    batches = []
    worst = None  # (ratio, max_abs, max_rel, floor, limit, where)
    for i in range(steps):
        if case.train_batches and i >= case.train_batches:
            x, t = batches[i % case.train_batches]
        else:
            x = data.standard_normal(pair.x0.shape).astype(dtype)
            t = data.standard_normal(target_shape).astype(dtype)
            batches.append((x, t))
        _torch_train_step(m, x, t)
        opt.step()
        _, stats, g, _ = train_fn(params, stats, _nhwc(x), _nhwc(t))
        params, opt_state = update(g, opt_state, params)
        ours = jax.device_get({"params": params, "batch_stats": stats})
        res = compare_trees(ours, pair.to_flax(m.state_dict()))
        floor = None
        if pair.noise:
            _torch_train_step(m64, x.astype(np.float64), t.astype(np.float64))
            opt64.step()
            floor = compare_trees(
                pair.to_flax(m.state_dict(), reference=True), pair.to_flax(m64.state_dict(), reference=True)
            )[1]
        limit = pair.limit(check, floor)
        ratio = res[1] / limit if limit > 0 else (0.0 if res[1] == 0 else float("inf"))
        if worst is None or not ratio <= worst[0]:
            worst = (ratio, res[0], res[1], floor, limit, f"step {i + 1}: {res[2]}")
    moved = compare_trees(jax.device_get(params), pair.variables["params"])  # how far training went
    lr = sgd.lr if check == "sgd" else ADAMW["lr"]
    batches_note = f", {case.train_batches} batches cycled" if case.train_batches else ", fresh data each step"
    _, max_abs, max_rel, floor, limit, where = worst
    return Row(
        case.name,
        check,
        dtype,
        max_abs,
        max_rel,
        tolerance(case, dtype, check),
        max_rel <= limit,
        f"{where} ({steps} steps, lr {lr:g}{batches_note}; params moved {moved[1]:.1e} rel.)",
        floor,
        limit,
    )


def _checkpoint_row(pair: _Pair) -> Row:
    """The state_dict saved as training scripts do (``{'epoch', 'state_dict'}``, ``module.`` prefix),
    converted from the file, must equal the in-memory conversion bit for bit."""
    import torch

    from dynconv_jax.convert import ConversionError, torch_to_flax

    wrapped = {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in pair.torch_model.state_dict().items()}}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        torch.save(wrapped, path)
        try:
            loaded = torch_to_flax(path, pair.template)
        except ConversionError as e:
            return Row(
                pair.case.name,
                "checkpoint",
                pair.dtype,
                float("inf"),
                float("inf"),
                0.0,
                False,
                f"ConversionError: {str(e).splitlines()[0]}",
                None,
                0.0,
            )
    max_abs, max_rel, where = compare_trees(loaded, pair.variables)
    return Row(
        pair.case.name,
        "checkpoint",
        pair.dtype,
        max_abs,
        max_rel,
        0.0,
        max_abs == 0.0,
        f"{where or 'every leaf'} (DataParallel .pt vs in-memory state_dict)",
        None,
        0.0,
    )


def _row(pair: _Pair, check: str, result: Tuple[float, float, str], floor: Optional[float] = None) -> Row:
    """The row of ``check`` from ``(max_abs, max_rel, detail)``, judged against the pair's limit."""
    max_abs, max_rel, detail = result
    limit = pair.limit(check, floor)
    return Row(
        pair.case.name,
        check,
        pair.dtype,
        max_abs,
        max_rel,
        tolerance(pair.case, pair.dtype, check),
        bool(max_rel <= limit),
        detail,
        floor,
        limit,
    )


def _forward_eval_row(pair: _Pair) -> Row:
    import torch

    with torch.no_grad():
        y_t = pair.torch_fresh().eval()(torch.from_numpy(pair.x0)).numpy()
        floor = None
        if pair.noise:
            y_64 = pair.torch_fresh(reference=True).eval()(torch.from_numpy(pair.x0.astype(np.float64))).numpy()
            floor = compare(y_t, y_64)[1]
    y_f = pair.flax.eval_fn()(pair.variables, _nhwc(pair.x0))
    return _row(pair, "forward_eval", (*compare(_nchw(np.asarray(y_f)), y_t), "output"), floor)


def _train_floors(pair: _Pair, checks, m, target: np.ndarray, y_t: np.ndarray, gx_t: np.ndarray) -> Dict[str, float]:
    """The reference's own float32 error on each training check: the same step rerun in float64 (``m`` is
    the float32 module after its step)."""
    m64 = pair.torch_fresh(reference=True)
    y_64, gx_64 = _torch_train_step(m64, pair.x0.astype(np.float64), target.astype(np.float64))
    floors = {"forward_train": compare(y_t, y_64)[1], "grad_input": compare(gx_t, gx_64)[1]}
    if "running_stats" in checks and pair.variables["batch_stats"]:
        floors["running_stats"] = compare_trees(
            pair.to_flax(m.state_dict(), True)["batch_stats"], pair.to_flax(m64.state_dict(), True)["batch_stats"]
        )[1]
    if "grad_params" in checks:
        floors["grad_params"] = compare_trees(pair.torch_grads_to_flax(m, True), pair.torch_grads_to_flax(m64, True))[1]
    return floors


def _train_rows(pair: _Pair, checks, train_checks, sgd: SGDConfig, steps: int) -> List[Row]:
    """The rows of one training forward/backward from the initial weights, then the optimiser runs."""
    import jax
    import torch

    train_fn = pair.flax.train_fn(grads=bool({"grad_input", "grad_params", "sgd", "adamw"} & train_checks))
    params, stats = pair.variables["params"], pair.variables["batch_stats"]
    m = pair.torch_fresh()
    target = pair.rng.standard_normal(m.eval()(torch.from_numpy(pair.x0)).shape).astype(pair.dtype)
    y_t, gx_t = _torch_train_step(m, pair.x0, target)
    y_f, stats_f, g_f, gx_f = train_fn(params, stats, _nhwc(pair.x0), _nhwc(target))
    floors = _train_floors(pair, checks, m, target, y_t, gx_t) if pair.noise else {}
    rows = []
    if "forward_train" in checks:
        rows.append(
            _row(pair, "forward_train", (*compare(_nchw(np.asarray(y_f)), y_t), "output"), floors.get("forward_train"))
        )
    if "running_stats" in checks and stats:
        rows.append(
            _row(
                pair,
                "running_stats",
                compare_trees(jax.device_get(stats_f), pair.to_flax(m.state_dict())["batch_stats"]),
                floors.get("running_stats"),
            )
        )
    if "grad_input" in checks:
        rows.append(
            _row(pair, "grad_input", (*compare(_nchw(np.asarray(gx_f)), gx_t), "input"), floors.get("grad_input"))
        )
    if "grad_params" in checks:
        rows.append(
            _row(
                pair,
                "grad_params",
                compare_trees(jax.device_get(g_f), pair.torch_grads_to_flax(m)),
                floors.get("grad_params"),
            )
        )
    for check in ("sgd", "adamw"):
        if check in checks and steps > 0:
            rows.append(_training_row(pair, check, train_fn, sgd, steps, target.shape))
    return rows


def _rows_for(pair: _Pair, checks, sgd: SGDConfig, steps: int) -> List[Row]:
    rows: List[Row] = []
    if "checkpoint" in checks:
        rows.append(_checkpoint_row(pair))
    if "forward_eval" in checks:
        rows.append(_forward_eval_row(pair))
    train_checks = {"forward_train", "running_stats", "grad_input", "grad_params", "sgd", "adamw"} & set(checks)
    if train_checks:
        rows += _train_rows(pair, checks, train_checks, sgd, steps)
    return rows


def run_case(
    case: Case, dtype: str, checks=None, sgd: SGDConfig = SGDConfig(), seed: int = 0, flax_side=FlaxSide
) -> List[Row]:
    """All requested checks of ``case`` at ``dtype`` ('float64' runs inside ``jax.enable_x64``).

    Training steps: ``sgd.steps`` if set, else the case's ``train_steps``, capped per dtype by
    ``case.train_max_steps``. A case that cannot be built, converted or run yields one failing
    ``error`` row with the exception, so one broken case does not hide the others.
    """
    import jax

    checks = tuple(case.checks if checks is None else (c for c in checks if c in case.checks))
    if case.sgd_lr is not None:
        sgd = dataclasses.replace(sgd, lr=case.sgd_lr)
    steps = case.train_steps if sgd.steps is None else sgd.steps
    steps = min(steps, (case.train_max_steps or {}).get(dtype, steps))
    with jax.enable_x64(dtype == "float64"), _torch_threads():
        try:
            pair = _Pair(case, dtype, seed, flax_side)
            return _rows_for(pair, checks, sgd, steps)
        except Exception as e:  # reported as a failing row, with the traceback's last line
            tb = traceback.format_exc().strip().splitlines()
            where = next((ln.strip() for ln in reversed(tb) if ln.strip().startswith("File")), "")
            return [
                Row(
                    case.name,
                    "error",
                    dtype,
                    float("nan"),
                    float("nan"),
                    0.0,
                    False,
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} ({where})",
                )
            ]


def run_unit(unit) -> Tuple[List[Row], float]:
    """``((case name, dtype), checks, sgd, seed) -> (rows, seconds)``: one :func:`run_case` by case
    name, for worker processes (which import the optional case modules again)."""
    import time

    from parity.cases import CASES, load_extensions

    (name, dtype), checks, sgd, seed = unit
    load_extensions()
    t0 = time.time()
    return run_case(CASES[name], dtype, checks, sgd, seed=seed), time.time() - t0


@contextlib.contextmanager
def _torch_threads():
    """Run torch single-threaded beside XLA (results do not depend on it; CPU contention does)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def format_table(rows: List[Row], markdown: bool = False) -> str:
    """The result table (plain text or Markdown): ``bound`` is the bound applied (``limit``), ``floor``
    the float32 noise floor."""
    header = ("case", "check", "dtype", "max abs", "max rel", "floor", "bound", "result", "worst")
    body = [
        (
            r.case,
            r.check,
            r.dtype,
            f"{r.max_abs:.2e}",
            f"{r.max_rel:.2e}",
            "–" if r.floor is None else f"{r.floor:.1e}",
            f"{r.tol if r.limit is None else r.limit:.1e}",
            "pass" if r.passed else "FAIL",
            r.detail,
        )
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)] if body else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*map(str, row)) for row in body])


def summarize(rows: List[Row]) -> Dict[str, Dict[str, Optional[float]]]:
    """Worst relative error per (dtype, check) over all rows (the numbers the docs record)."""
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for r in rows:
        cur = out.setdefault(r.dtype, {}).get(r.check)
        if cur is None or not (r.max_rel <= cur):
            out[r.dtype][r.check] = r.max_rel
    return out
