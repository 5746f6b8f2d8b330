"""Whole-model training throughput (images/s) and step memory: static vs dynamic, JAX vs PyTorch.

Models: ResNet-18 and MobileNetV2, CIFAR stems, 32x32 random images, 10 classes. One
training step = forward, cross-entropy, backward, SGD-momentum update (optax /
torch.optim). JAX jit-compiles the whole step (with ``batch_stats`` updates); PyTorch
runs eager with the same thread count.

Memory of one training step: JAX, XLA's ``compiled.memory_analysis()`` of the jitted step
(temporaries, and the peak estimate arguments + outputs + temporaries - aliased); PyTorch,
``torch.cuda.max_memory_allocated`` on a GPU (not measured on CPU).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from dynconv_spec import CONV_TYPES

from .timing import fmt_ratio, markdown_table, median_times

CONVS = CONV_TYPES  # KernelWarehouse at its default 1x budget (conv_options: the models' defaults)
#: The benchmark models of this suite and of ``serving``: registry names (dynconv_spec.MODEL_NAMES),
#: CIFAR stems, 10 classes, and narrow versions for --quick.
MODELS = ("resnet18", "mobilenet_v2")
MODEL_ARGS = dict(num_classes=10, stem="cifar")
QUICK_SIZE = {"resnet18": dict(base_width=8), "mobilenet_v2": dict(width_mult=0.25)}
#: The goals of the performance issue, checked per row (docs/performance.md).
GOAL_TIME_VS_STATIC = 1.6     # dynamic step time / static step time, JAX
GOAL_JAX_OVER_TORCH = 2.0     # JAX images/s / PyTorch images/s, dynamic models
GOAL_MEMORY_VS_STATIC = 2.0   # peak step memory / static, JAX


def model_kwargs(name, conv, quick):
    """``create_model`` keyword arguments of benchmark model ``name`` with ``conv`` layers."""
    return dict(MODEL_ARGS, conv=conv, **(QUICK_SIZE[name] if quick else {}))


def check_models(models):
    """``models`` as a tuple; a ValueError names ``--models`` and the choices if one is not a benchmark model."""
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    return tuple(models)


def _jax_step(name, conv, batch, quick):
    """(zero-argument step, compiled memory analysis or None) for one model."""
    import optax

    from dynconv_jax.models import create_model

    model = create_model(name, **model_kwargs(name, conv, quick))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=batch))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    params, state = variables["params"], {c: v for c, v in variables.items() if c != "params"}
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)

    def loss_fn(params, state, x, labels, key):
        logits, new_state = model.apply({"params": params, **state}, x, train=True, mutable=list(state),
                                        rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state

    def step(params, state, opt_state, x, labels, key):
        (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, labels, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, opt_state, loss

    key = jax.random.PRNGKey(1)
    compiled = jax.jit(step).lower(params, state, opt_state, x, labels, key).compile()
    try:
        analysis = compiled.memory_analysis()
        memory = {"temp_bytes": int(analysis.temp_size_in_bytes),
                  "peak_bytes": int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                                    + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)}
    except Exception:  # memory_analysis is not implemented on every backend
        memory = None
    return (lambda: compiled(params, state, opt_state, x, labels, key)), memory


def _torch_step(name, conv, batch, quick):
    """(zero-argument step, peak CUDA bytes of one step or None) for one model."""
    import torch

    from dynconv_torch.models import create_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = create_model(name, **model_kwargs(name, conv, quick)).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    labels = torch.randint(0, 10, (batch,), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        return loss

    peak = None
    if dev == "cuda":
        step()  # the optimizer's momentum buffers exist from here on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = int(torch.cuda.max_memory_allocated())
    return step, peak


def _fmt(value, spec="{:.2f}"):
    """``value`` formatted by ``spec``, or a dash where it was not measured."""
    return "–" if value is None else spec.format(value)


def _mib(n):
    return None if n is None else n / 2**20


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _goal(value, bound, higher_is_better=False):
    if value is None:
        return "–"
    return "met" if (value >= bound if higher_is_better else value <= bound) else "not met"


def run(quick: bool, repeats: int, threads=None, models=None):
    backend = jax.default_backend()
    batch = 8 if quick else (32 if backend == "cpu" else 128)
    convs = ("static", "dynamic") if quick else CONVS
    models = check_models(models or MODELS)
    sync_torch = lambda _: None  # noqa: E731
    have_torch = True
    try:
        import torch

        torch.set_num_threads(threads or os.cpu_count())
        torch.backends.cudnn.benchmark = True
        if torch.cuda.is_available():
            sync_torch = lambda _: torch.cuda.synchronize()  # noqa: E731
        import dynconv_torch.models  # noqa: F401
    except ImportError:
        have_torch = False
    records = []
    for name in models:
        for conv in convs:
            jax_step, jax_memory = _jax_step(name, conv, batch, quick)
            tj = median_times({"jax": jax_step}, repeats=repeats, sync=jax.block_until_ready)["jax"]
            tt, torch_peak = None, None
            if have_torch:
                torch_step, torch_peak = _torch_step(name, conv, batch, quick)
                tt = median_times({"torch": torch_step}, repeats=repeats, sync=sync_torch)["torch"]
            records.append({"model": name, "conv": conv, "batch": batch, "jax_step_s": tj, "torch_step_s": tt,
                            "jax_images_per_s": batch / tj, "torch_images_per_s": batch / tt if tt else None,
                            "jax_memory": jax_memory, "torch_cuda_peak_bytes": torch_peak})
            print(f"{name} {conv} B{batch}: jax {batch / tj:.1f} img/s"
                  + (f", torch {batch / tt:.1f} img/s" if tt else "")
                  + (f", jax step peak {_mib(jax_memory['peak_bytes']):.1f} MiB" if jax_memory else ""), flush=True)
    rows = []
    for r in records:
        static = next(s for s in records if s["model"] == r["model"] and s["conv"] == "static")
        peak = (r["jax_memory"] or {}).get("peak_bytes")
        time_ratio = r["jax_step_s"] / static["jax_step_s"]
        speedup = _ratio(r["torch_step_s"], r["jax_step_s"])
        memory_ratio = _ratio(peak, (static["jax_memory"] or {}).get("peak_bytes"))
        goals = "; ".join([f"time {_goal(time_ratio, GOAL_TIME_VS_STATIC)}",
                           f"vs torch {_goal(speedup, GOAL_JAX_OVER_TORCH, higher_is_better=True)}",
                           f"memory {_goal(memory_ratio, GOAL_MEMORY_VS_STATIC)}"])
        rows.append([r["model"], r["conv"], r["batch"], _fmt(r["jax_images_per_s"], "{:.1f}"), _fmt(time_ratio),
                     _fmt(_mib(peak), "{:.1f}"), _fmt(_mib((r["jax_memory"] or {}).get("temp_bytes")), "{:.1f}"),
                     _fmt(memory_ratio), _fmt(r["torch_images_per_s"], "{:.1f}"),
                     _fmt(_ratio(static["torch_step_s"], r["torch_step_s"])),
                     _fmt(_mib(r["torch_cuda_peak_bytes"]), "{:.1f}"), fmt_ratio(r["torch_step_s"], r["jax_step_s"]),
                     goals if r["conv"] != "static" else ""])
    md = ("One training step (forward, cross-entropy, backward, SGD-momentum update) on 32x32 random images, "
          "CIFAR stems, 10 classes, median of repeats. JAX memory: XLA's compiled memory analysis of the "
          "jitted step (peak = arguments + outputs + temporaries - aliased; temp = temporaries). torch "
          "memory: CUDA peak of one step (GPU only). Goals: JAX step time ≤ "
          f"{GOAL_TIME_VS_STATIC}× static, JAX ≥ {GOAL_JAX_OVER_TORCH}× PyTorch's images/s, JAX peak memory "
          f"≤ {GOAL_MEMORY_VS_STATIC}× static.\n\n")
    md += markdown_table(["model", "conv", "batch", "JAX img/s", "JAX time vs static", "JAX peak MiB",
                          "JAX temp MiB", "JAX peak vs static", "torch img/s", "torch vs static",
                          "torch CUDA peak MiB", "JAX speed-up over torch", "goals"], rows)
    return {"models": list(models), "model_args": MODEL_ARGS, "batch": batch, "quick": quick,
            "results": records}, md
