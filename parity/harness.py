"""Run one parity case: the PyTorch reference against the Flax twin built from converted weights.

For a :class:`parity.cases.Case` and a dtype, :func:`run_case` returns one :class:`Row` per
check:

- ``forward_eval``: outputs in eval mode (running BatchNorm statistics, which are randomized
  first so that eval mode is not the identity normalization);
- ``forward_train``: outputs in train mode (batch statistics);
- ``running_stats``: the BatchNorm running statistics after that one training forward;
- ``grad_input`` / ``grad_params``: gradients of ``sum((y - target)^2) / (2 B)`` w.r.t. the
  input and every parameter (the PyTorch gradients are put in the Flax layout by the same
  converter and compared leaf by leaf);
- ``sgd``: ``steps`` steps of SGD with momentum and weight decay in train mode, fresh data
  each step, ``torch.optim.SGD`` vs ``optax.chain(add_decayed_weights(wd), sgd(lr, momentum))``
  (PyTorch adds the decay to the gradient before the momentum buffer; so does this chain),
  comparing every parameter and running statistic after every step.

Errors: ``max_abs = max|a - b|`` and ``max_rel = max|a - b| / max|b|`` per array (``b`` the
PyTorch value), the worst array reported. Elementwise relative error is meaningless near zero.
Train-mode rows also report ``sens``: the same metric between two Flax runs whose inputs differ by
one rounding unit, i.e. how much the network amplifies rounding; an error of that order is
amplified rounding, an error far above it (in float64) a real difference. Cases may override the
tolerances, the SGD learning rate and the SGD steps per dtype (``Case.tolerances``, ``Case.sgd_lr``,
``Case.sgd_max_steps``: the model cases).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import traceback
from typing import Dict, List, Optional, Tuple

import numpy as np

from parity.cases import Case

DTYPES = ("float64", "float32")
#: Relative tolerances (max|a-b| / max|b|), from the measurements in docs/conversion_parity.md.
TOLERANCES = {
    "float64": {"forward": 1e-12, "grad": 1e-12, "sgd": 1e-9},
    "float32": {"forward": 1e-5, "grad": 2e-5, "sgd": 5e-5},
}
TOLERANCE_KIND = {"forward_eval": "forward", "forward_train": "forward", "running_stats": "forward",
                  "grad_input": "grad", "grad_params": "grad", "sgd": "sgd"}


def tolerance(case: Case, dtype: str, check: str) -> float:
    """The relative tolerance of ``check`` for ``case`` at ``dtype`` (the case's override, if any)."""
    kind = TOLERANCE_KIND[check]
    return (case.tolerances or {}).get(dtype, {}).get(kind, TOLERANCES[dtype][kind])


@dataclasses.dataclass
class Row:
    case: str
    check: str
    dtype: str
    max_abs: float
    max_rel: float
    tol: float
    passed: bool
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class SGDConfig:
    steps: int = 20
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
    return max([_tree_scale(v) if isinstance(v, dict) else float(np.max(np.abs(np.asarray(v, np.float64)), initial=0.0))
                for v in tree.values()], default=0.0)


def compare_trees(flax_tree: Dict, torch_tree: Dict, prefix: str = "", floor: Optional[float] = None
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

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                dtype = m.running_mean.dtype
                m.running_mean.copy_(0.3 * torch.randn(n, generator=generator, dtype=dtype))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator, dtype=dtype))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=generator, dtype=dtype))
                    m.bias.copy_(0.2 * torch.randn(n, generator=generator, dtype=dtype))


class _Pair:
    """Both sides of one case at one dtype, with the converted variables."""

    def __init__(self, case: Case, dtype: str, seed: int):
        import jax
        import jax.numpy as jnp
        import torch
        from jax import lax

        from dynconv_jax.convert import torch_to_flax

        self.case, self.dtype = case, dtype
        torch.manual_seed(seed)
        self.torch_dtype = getattr(torch, dtype)
        model = case.make_torch().to(self.torch_dtype)
        randomize_batchnorm(model, torch.Generator().manual_seed(seed + 1))
        if case.temperature is not None:
            from dynconv_torch import set_temperature

            set_temperature(model, case.temperature)
        self.torch_model = model
        self.flax_model = case.make_flax(getattr(jnp, dtype), lax.Precision.HIGHEST)
        self.rng = np.random.default_rng(seed + 2)
        self.x0 = self.rng.standard_normal(case.input_shape).astype(dtype)
        keys = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
        self.template = jax.eval_shape(self.flax_model.init, keys, _nhwc(self.x0))
        self.variables = torch_to_flax(model.state_dict(), self.template)
        self.apply_kwargs = {} if case.temperature is None else {"temperature": case.temperature}

    def torch_fresh(self):
        return copy.deepcopy(self.torch_model)

    def to_flax(self, state_dict) -> Dict:
        from dynconv_jax.convert import torch_to_flax

        return torch_to_flax(state_dict, self.template)

    def torch_grads_to_flax(self, module) -> Dict:
        from dynconv_jax.convert import torch_to_flax

        grads = {k: p.grad for k, p in module.named_parameters()}
        return torch_to_flax(grads, {"params": self.template["params"]})["params"]


def _make_train_step(pair: _Pair, sgd: SGDConfig, grads: bool = True):
    """A jitted Flax training step: outputs, new batch_stats, gradients (params, input), updated
    params and optimizer state. With ``grads=False`` only the train-mode forward (gradients None,
    params unchanged), for runs without gradient or SGD checks: it compiles much faster (a ResNet-18
    ODConv float32 case, 8x8 inputs: 15 s instead of 36 s for the whole run)."""
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.chain(optax.add_decayed_weights(sgd.weight_decay), optax.sgd(sgd.lr, momentum=sgd.momentum))
    model, kwargs = pair.flax_model, pair.apply_kwargs

    def loss_fn(params, batch_stats, x, target):
        y, state = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                               mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)}, **kwargs)
        return jnp.sum((y - target) ** 2) / (2 * y.shape[0]), (y, state.get("batch_stats", {}))

    @jax.jit
    def step(params, batch_stats, opt_state, x, target):
        (_, (y, new_stats)), (g_params, g_x) = jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True)(
            params, batch_stats, x, target)
        updates, opt_state = tx.update(g_params, opt_state, params)
        return y, new_stats, g_params, g_x, optax.apply_updates(params, updates), opt_state

    @jax.jit
    def forward(params, batch_stats, opt_state, x, target):
        _, (y, new_stats) = loss_fn(params, batch_stats, x, target)
        return y, new_stats, None, None, params, opt_state

    return tx, (step if grads else forward)


def _torch_train_step(module, x: np.ndarray, target: np.ndarray):
    import torch

    module.train()
    xt = torch.from_numpy(x).requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(xt)
    loss = ((y - torch.from_numpy(target)) ** 2).sum() / (2 * y.shape[0])
    loss.backward()
    return y.detach().numpy(), xt.grad.numpy()


def _rows_for(pair: _Pair, checks, sgd: SGDConfig) -> List[Row]:
    import jax
    import torch

    case, dtype = pair.case, pair.dtype
    rows: List[Row] = []

    def add(check, result, sens=None):
        tol = tolerance(case, dtype, check)
        max_abs, max_rel, detail = result
        if sens is not None:
            detail = f"{detail}; sens {sens:.1e}"
        rows.append(Row(case.name, check, dtype, max_abs, max_rel, tol, bool(max_rel <= tol), detail))

    x_nhwc = _nhwc(pair.x0)
    if "forward_eval" in checks:
        m = pair.torch_fresh().eval()
        with torch.no_grad():
            y_t = m(torch.from_numpy(pair.x0)).numpy()
        # jitted: one compilation instead of one per primitive (op-by-op dispatch), same numerics
        # as the jitted training step
        eval_fn = jax.jit(lambda v, x: pair.flax_model.apply(v, x, train=False, **pair.apply_kwargs))
        y_f = eval_fn(pair.variables, x_nhwc)
        add("forward_eval", (*compare(_nchw(np.asarray(y_f)), y_t), "output"))

    train_checks = {"forward_train", "running_stats", "grad_input", "grad_params", "sgd"} & set(checks)
    if not train_checks:
        return rows
    tx, step = _make_train_step(pair, sgd, grads=bool({"grad_input", "grad_params", "sgd"} & train_checks))
    params, stats = pair.variables["params"], pair.variables["batch_stats"]

    # One training forward/backward from the initial weights.
    m = pair.torch_fresh()
    target = pair.rng.standard_normal(m.eval()(torch.from_numpy(pair.x0)).shape).astype(dtype)
    y_t, gx_t = _torch_train_step(m, pair.x0, target)
    y_f, stats_f, g_f, gx_f, _, _ = step(params, stats, tx.init(params), x_nhwc, _nhwc(target))
    # Rounding sensitivity: the same Flax step on the input perturbed by one rounding unit
    # (x * (1 + eps * n), n ~ N(0, 1)), compared with the same metric. A torch-vs-Flax error of the
    # order of this number is rounding amplified by the network, not a conversion difference.
    eps = float(np.finfo(dtype).eps)
    x_pert = (x_nhwc * (1 + eps * np.random.default_rng(0).standard_normal(x_nhwc.shape))).astype(dtype)
    y_p, stats_p, g_p, gx_p, _, _ = step(params, stats, tx.init(params), x_pert, _nhwc(target))
    if "forward_train" in checks:
        add("forward_train", (*compare(_nchw(np.asarray(y_f)), y_t), "output"),
            compare(np.asarray(y_p), np.asarray(y_f))[1])
    if "running_stats" in checks and stats:
        add("running_stats", compare_trees(jax.device_get(stats_f), pair.to_flax(m.state_dict())["batch_stats"]),
            compare_trees(jax.device_get(stats_p), jax.device_get(stats_f))[1])
    if "grad_input" in checks:
        add("grad_input", (*compare(_nchw(np.asarray(gx_f)), gx_t), "input"),
            compare(np.asarray(gx_p), np.asarray(gx_f))[1])
    if "grad_params" in checks:
        add("grad_params", compare_trees(jax.device_get(g_f), pair.torch_grads_to_flax(m)),
            compare_trees(jax.device_get(g_p), jax.device_get(g_f))[1])

    if "sgd" in checks and sgd.steps > 0:
        m = pair.torch_fresh()
        opt = torch.optim.SGD(m.parameters(), lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay)
        opt_state = tx.init(params)
        worst = (0.0, 0.0, "")
        for i in range(sgd.steps):
            x = pair.rng.standard_normal(pair.x0.shape).astype(dtype)
            t = pair.rng.standard_normal(target.shape).astype(dtype)
            _torch_train_step(m, x, t)
            opt.step()
            _, stats, _, _, params, opt_state = step(params, stats, opt_state, _nhwc(x), _nhwc(t))
            ref = pair.to_flax(m.state_dict())
            res = compare_trees(jax.device_get({"params": params, "batch_stats": stats}), ref)
            if res[1] >= worst[1]:
                worst = (res[0], res[1], f"step {i + 1}: {res[2]}")
        moved = compare_trees(jax.device_get(params), pair.variables["params"])  # how far SGD went
        add("sgd", (worst[0], worst[1], f"{worst[2]} (lr {sgd.lr:g}, params moved {moved[1]:.1e} rel.)"))
    return rows


def run_case(case: Case, dtype: str, checks=None, sgd: SGDConfig = SGDConfig(), seed: int = 0) -> List[Row]:
    """All requested checks of ``case`` at ``dtype`` ('float64' runs inside ``jax.enable_x64``).

    A case that cannot be built, converted or run yields one failing ``error`` row with the
    exception, so one broken case does not hide the others.
    """
    import jax

    checks = tuple(case.checks if checks is None else (c for c in checks if c in case.checks))
    if case.sgd_lr is not None:
        sgd = dataclasses.replace(sgd, lr=case.sgd_lr)
    if dtype in (case.sgd_max_steps or {}):
        sgd = dataclasses.replace(sgd, steps=min(sgd.steps, case.sgd_max_steps[dtype]))
    with jax.enable_x64(dtype == "float64"), _torch_threads():
        try:
            pair = _Pair(case, dtype, seed)
            return _rows_for(pair, checks, sgd)
        except Exception as e:  # reported as a failing row, with the traceback's last line
            tb = traceback.format_exc().strip().splitlines()
            where = next((ln.strip() for ln in reversed(tb) if ln.strip().startswith("File")), "")
            return [Row(case.name, "error", dtype, float("nan"), float("nan"), 0.0, False,
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} ({where})")]


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
    """The result table (plain text or Markdown)."""
    header = ("case", "check", "dtype", "max abs", "max rel", "tol", "result", "worst")
    body = [(r.case, r.check, r.dtype, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", f"{r.tol:.0e}",
             "pass" if r.passed else "FAIL", r.detail) for r in rows]
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
