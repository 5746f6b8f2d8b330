"""Whole-model training throughput (images/s), time to the first step and step memory: static vs dynamic,
JAX vs PyTorch.

Models: ResNet-18 and MobileNetV2, CIFAR stems, 32x32 random images, 10 classes. One training step =
forward, cross-entropy, backward, SGD-momentum update (optax / torch.optim). JAX jit-compiles the whole
step (with ``batch_stats`` updates; parameters, statistics and optimizer state donated, as ``train/``
does) with ``strategy='auto'`` (the fixed rules); PyTorch runs eager with the same thread count. All
candidates of one model are timed in interleaved rounds (median).

Memory of one training step: JAX, XLA's ``compiled.memory_analysis()`` (peak = arguments + outputs +
temporaries - aliased) and the measured growth of the process's resident set during one step (Linux:
peak RSS reset through ``/proc/self/clear_refs``, then ``VmHWM`` - ``VmRSS``); PyTorch,
``torch.cuda.max_memory_allocated`` on a GPU (not measured on CPU). Time to the first step: from
building the model to the first step's result (init, tracing, compiling, one step), defaults only.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dynconv_spec import CONV_TYPES

from .timing import fmt_ratio, markdown_table, median_times, synced

CONVS = CONV_TYPES  # KernelWarehouse at its default 1x budget (conv_options: the models' defaults)
#: The benchmark models of this suite and of ``serving``: registry names (dynconv_spec.MODEL_NAMES),
#: CIFAR stems, 10 classes, and narrow versions for --quick.
MODELS = ("resnet18", "mobilenet_v2")
MODEL_ARGS = dict(num_classes=10, stem="cifar")
QUICK_SIZE = {"resnet18": dict(base_width=8), "mobilenet_v2": dict(width_mult=0.25)}
#: The goals of the performance issue, checked per row (docs/performance.md).
GOAL_TIME_VS_STATIC = 1.6  # dynamic step time / static step time, JAX, ResNet-18
GOAL_JAX_OVER_TORCH = 2.0  # JAX images/s / PyTorch images/s, dynamic models
GOAL_MEMORY_VS_STATIC = {"resnet18": 2.0, "mobilenet_v2": 1.5}  # peak step memory / static, JAX


def model_kwargs(name, conv, quick):
    """``create_model`` keyword arguments of benchmark model ``name`` with ``conv`` layers."""
    return dict(MODEL_ARGS, conv=conv, **(QUICK_SIZE[name] if quick else {}))


def check_models(models):
    """``models`` as a tuple; a ValueError names ``--models`` and the choices if one is not a benchmark model."""
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    return tuple(models)


def jax_model(name, conv, batch, quick, strategy="auto", dtype=None, size=32):
    """``(model, variables, x)``: benchmark model ``name``, its initial variables (drawn with the 'rbg' PRNG, as
    ``train/`` does: XLA:CPU compiles a threefry init for minutes) and a batch of random images."""
    from dynconv_jax.models import create_model

    extra = {} if conv == "static" else {"strategy": strategy}
    model = create_model(name, dtype=dtype, **model_kwargs(name, conv, quick), **extra)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)
    return model, variables, x


def jax_training_step(name, conv, batch, quick, strategy="auto", dtype=None, size=32):
    """``(step, args)``: one SGD-momentum training step of benchmark model ``name`` and its arguments
    ``(params, state, opt_state, x, labels, key)``; ``step`` returns the first three updated and the loss."""
    return training_step(*jax_model(name, conv, batch, quick, strategy=strategy, dtype=dtype, size=size))


def training_step(model, variables, x):
    """:func:`jax_training_step` of a built model, its variables and a batch of images."""
    import optax

    labels = jnp.asarray(np.random.default_rng(1).integers(0, 10, size=x.shape[0]))
    params, state = variables["params"], {c: v for c, v in variables.items() if c != "params"}
    tx = optax.sgd(0.1, momentum=0.9)

    def loss_fn(params, state, x, labels, key):
        logits, new_state = model.apply(
            {"params": params, **state}, x, train=True, mutable=list(state), rngs={"dropout": key}
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
        return loss, new_state

    def step(params, state, opt_state, x, labels, key):
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, labels, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, loss

    return step, (params, state, tx.init(params), x, labels, jax.random.PRNGKey(1))


def compiled_memory(compiled):
    """XLA's memory analysis of a compiled program in bytes (None where the backend has none)."""
    try:
        analysis = compiled.memory_analysis()
        return {
            "temp_bytes": int(analysis.temp_size_in_bytes),
            "argument_bytes": int(analysis.argument_size_in_bytes),
            "peak_bytes": int(
                analysis.argument_size_in_bytes
                + analysis.output_size_in_bytes
                + analysis.temp_size_in_bytes
                - analysis.alias_size_in_bytes
            ),
        }
    except Exception:  # memory_analysis is not implemented on every backend
        return None


def lower_donating(step, args):
    """``step`` lowered for ``args`` with its state (the first three arguments) donated, as ``train/`` does."""
    return jax.jit(step, donate_argnums=(0, 1, 2)).lower(*args)


class DonatingStep:
    """A compiled step whose donated state (its first three arguments and results) is carried from call to call
    (``compiled``: the step compiled already, e.g. in a thread; default: compiled here)."""

    def __init__(self, step, args, compiled=None):
        self.compiled = compiled or lower_donating(step, args).compile()
        self.args = list(args)

    def __call__(self):
        out = self.compiled(*self.args)
        self.args[:3] = out[:3]
        return out[3]


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def step_rss_growth(run):
    """Bytes the resident set grows by during one call of ``run`` (Linux; None elsewhere)."""
    try:
        run()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _proc_status_kib("VmRSS")
        jax.block_until_ready(run())
        return 1024 * (_proc_status_kib("VmHWM") - before)
    except OSError:
        return None


def jax_candidate(name, conv, batch, quick, strategy="auto", dtype=None):
    """``(run, record)``: a zero-argument training step with donated state, and what building it measured
    (seconds to the first step's result, compiled memory, resident-set growth of one step)."""
    start = time.perf_counter()
    step, args = jax_training_step(name, conv, batch, quick, strategy=strategy, dtype=dtype)
    run = DonatingStep(step, args)
    jax.block_until_ready(run())
    record = {
        "first_step_s": time.perf_counter() - start,
        "jax_memory": compiled_memory(run.compiled),
        "jax_rss_step_bytes": step_rss_growth(run),
    }
    return run, record


def torch_candidate(name, conv, batch, quick, dtype=None, size=32):
    """``(step, peak CUDA bytes of one step or None)`` for one model (``dtype``: torch autocast dtype)."""
    import contextlib

    import torch

    from dynconv_torch.models import create_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = create_model(name, **model_kwargs(name, conv, quick)).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=dev)
    labels = torch.randint(0, 10, (batch,), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        cast = torch.autocast(dev, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with cast:
            loss = torch.nn.functional.cross_entropy(model(x).float(), labels)
        loss.backward()
        opt.step()
        return loss

    return step, cuda_peak(step)


def cuda_peak(fn):
    """Peak CUDA bytes allocated during the second call of ``fn`` (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    fn()  # e.g. the optimizer's momentum buffers exist from here on
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def setup_torch(threads):
    """``(available, sync)``: torch threads and cuDNN benchmark mode set; ``sync`` waits for the device."""
    try:
        import torch

        import dynconv_torch.models  # noqa: F401
    except ImportError:
        return False, None
    torch.set_num_threads(threads or os.cpu_count())
    torch.backends.cudnn.benchmark = True
    sync = (lambda _: torch.cuda.synchronize()) if torch.cuda.is_available() else (lambda _: None)
    return True, sync


def _fmt(value, spec="{:.2f}"):
    """``value`` formatted by ``spec``, or a dash where it was not measured."""
    return "–" if value is None else spec.format(value)


def _mib(n):
    return None if n is None else n / 2**20


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _goal(value, bound, higher_is_better=False):
    if value is None or bound is None:
        return "–"
    return "met" if (value >= bound if higher_is_better else value <= bound) else "not met"


def measure_model(name, convs, batch, quick, repeats, have_torch, sync_torch, dtype=None, torch_dtype=None):
    """One record per conv type of model ``name``: every candidate built, then timed in interleaved rounds."""
    runs, records = {}, {}
    for conv in convs:
        run, record = jax_candidate(name, conv, batch, quick, dtype=dtype)
        runs[("jax", conv)] = run
        records[conv] = {"model": name, "conv": conv, "batch": batch, **record, "torch_cuda_peak_bytes": None}
        if have_torch:
            runs[("torch", conv)], records[conv]["torch_cuda_peak_bytes"] = torch_candidate(
                name, conv, batch, quick, dtype=torch_dtype
            )
        print(f"{name} {conv} B{batch}: first step {record['first_step_s']:.1f} s", flush=True)
    candidates = {f"{fw} {conv}": run for (fw, conv), run in runs.items()}
    sync = {"jax": jax.block_until_ready, "torch": sync_torch}
    times = median_times(
        {k: synced(r, sync[k.split()[0]]) for k, r in candidates.items()}, repeats=repeats, sync=lambda _: None
    )
    for conv, r in records.items():
        r["jax_step_s"], r["torch_step_s"] = times[f"jax {conv}"], times.get(f"torch {conv}")
        r["jax_images_per_s"] = batch / r["jax_step_s"]
        r["torch_images_per_s"] = batch / r["torch_step_s"] if r["torch_step_s"] else None
    return list(records.values())


def _row(r, static):
    """A table row of record ``r`` against its model's static record."""
    peak = (r["jax_memory"] or {}).get("peak_bytes")
    time_ratio = r["jax_step_s"] / static["jax_step_s"]
    speedup = _ratio(r["torch_step_s"], r["jax_step_s"])
    memory_ratio = _ratio(peak, (static["jax_memory"] or {}).get("peak_bytes"))
    time_goal = GOAL_TIME_VS_STATIC if r["model"] == "resnet18" else None
    goals = "; ".join(
        [
            f"time {_goal(time_ratio, time_goal)}",
            f"vs torch {_goal(speedup, GOAL_JAX_OVER_TORCH, higher_is_better=True)}",
            f"memory {_goal(memory_ratio, GOAL_MEMORY_VS_STATIC.get(r['model']))}",
        ]
    )
    return [
        r["model"],
        r["conv"],
        r["batch"],
        _fmt(r["jax_images_per_s"], "{:.1f}"),
        _fmt(time_ratio),
        _fmt(r["first_step_s"], "{:.1f}"),
        _fmt(_mib(peak), "{:.0f}"),
        _fmt(_mib((r["jax_memory"] or {}).get("temp_bytes")), "{:.0f}"),
        _fmt(memory_ratio),
        _fmt(_mib(r["jax_rss_step_bytes"]), "{:.0f}"),
        _fmt(r["torch_images_per_s"], "{:.1f}"),
        _fmt(_ratio(static["torch_step_s"], r["torch_step_s"])),
        _fmt(_mib(r["torch_cuda_peak_bytes"]), "{:.0f}"),
        fmt_ratio(r["torch_step_s"], r["jax_step_s"]),
        goals if r["conv"] != "static" else "",
    ]


def table(records):
    """The Markdown table of the records (each row against its model's static row)."""
    rows = [_row(r, next(s for s in records if s["model"] == r["model"] and s["conv"] == "static")) for r in records]
    return markdown_table(
        [
            "model",
            "conv",
            "batch",
            "JAX img/s",
            "JAX time vs static",
            "JAX first step s",
            "JAX peak MiB",
            "JAX temp MiB",
            "JAX peak vs static",
            "JAX step RSS growth MiB",
            "torch img/s",
            "torch vs static",
            "torch CUDA peak MiB",
            "JAX speed-up over torch",
            "goals",
        ],
        rows,
    )


def run(quick: bool, repeats: int, threads=None, models=None, convs=None):
    backend = jax.default_backend()
    batch = 8 if quick else (32 if backend == "cpu" else 128)
    convs = (
        ("static",) + tuple(c for c in convs if c != "static") if convs else (("static", "dynamic") if quick else CONVS)
    )
    have_torch, sync_torch = setup_torch(threads)
    records = []
    for name in check_models(models or MODELS):
        records += measure_model(name, convs, batch, quick, repeats, have_torch, sync_torch)
    md = (
        "One training step (forward, cross-entropy, backward, SGD-momentum update) on 32x32 random images, "
        "CIFAR stems, 10 classes, JAX with strategy='auto' (the fixed rules) and donated state, every "
        "candidate of a model timed in interleaved rounds, median. JAX first step: building the model to the "
        "first step's result (init, trace, compile, one step). JAX memory: XLA's compiled memory analysis of "
        "the step (peak = arguments + outputs + temporaries - aliased; temp = temporaries) and the resident "
        "set's growth during one step. torch memory: CUDA peak of one step (GPU only). Goals: JAX step time "
        f"≤ {GOAL_TIME_VS_STATIC}× static (ResNet-18), JAX ≥ {GOAL_JAX_OVER_TORCH}× PyTorch's images/s, JAX "
        f"peak memory ≤ {GOAL_MEMORY_VS_STATIC['resnet18']}× static (ResNet-18) / "
        f"{GOAL_MEMORY_VS_STATIC['mobilenet_v2']}× (MobileNetV2).\n\n"
    )
    return {
        "models": list(models or MODELS),
        "model_args": MODEL_ARGS,
        "batch": batch,
        "quick": quick,
        "results": records,
    }, md + table(records)
