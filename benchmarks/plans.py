"""The fixed rules vs measuring: each model's training step tuned (``dynconv_jax.autotune``), then timed with
``strategy='auto'`` (the rules) and with the measured plan.

For ResNet-18 and MobileNetV2 (CIFAR stems, B32 on CPU) x every dynamic conv type: the problems of the
training step are recorded (``autotune.record``) and each is timed with every applicable strategy
(``autotune.measure_problem``, forward+backward); the fastest make the plan. Then the step with the rules
and the step with the plan are timed in interleaved rounds (median): the plan's measured speed-up. On
XLA:CPU the depthwise problems skip 'mix' (K static depthwise convs: 5-94 s per call there, see
docs/performance.md), which no rule picks either. ``--plans DIR`` reuses the plans saved by an earlier run
(``<model>_<conv>.json``) instead of measuring again; every run saves its plans under ``<out>/plans_<device>``.
"""

from __future__ import annotations

import json
import os
import time

import jax

from dynconv_jax import autotune, ops
from dynconv_jax.plan import Plan

from .models import MODELS, DonatingStep, check_models, jax_training_step
from .timing import markdown_table, median_times

CONVS = ("condconv", "dynamic", "odconv")


def _skipped(problem, backend):
    """Strategies not measured for ``problem`` on ``backend`` (see the module docstring)."""
    shapes = {n: s for n, s, _ in problem.arrays}
    if backend != "cpu":
        return ()
    skip = ("mix",) if shapes["experts"][-2] == 1 else ()
    return skip + (("vmap",) if shapes["x"][0] > 1 else ())


def tune_step(step, args, backend):
    """``(plan, seconds)``: the plan of a training step, measured problem by problem."""
    start = time.perf_counter()
    recording = autotune.record(step, *args)
    choices, measurements = {}, {}
    for key, problem in recording.problems.items():
        skip = _skipped(problem, backend)
        seconds = autotune.measure_problem(problem, [s for s in ops.STRATEGIES if s not in skip])
        choices[key] = min(seconds, key=seconds.get)
        measurements[key] = {
            "seconds": seconds,
            "rule": problem.rule,
            "count": problem.count,
            "differentiated": problem.differentiated,
            "not_measured": list(skip),
        }
        print(
            f"  {_describe(key)}: rule {problem.rule}, tuned {choices[key]} "
            + " ".join(f"{n}={t * 1e3:.1f}ms" for n, t in sorted(seconds.items(), key=lambda kv: kv[1])),
            flush=True,
        )
    return Plan(choices, measurements), time.perf_counter() - start


def _describe(key):
    """A short name of a problem: input shape, kernel, stride, groups, attentions."""
    p = json.loads(key)
    kernel = "x".join(map(str, p["experts"][1:-2]))
    attentions = "+".join(a.split("_")[0] for a in p["attentions"] if a != "kernel_attention") or "-"
    return (
        f"{'x'.join(map(str, p['x'][1:-1]))}x{p['x'][-1]} {kernel}/{p['strides'][0]} →{p['experts'][-1]}"
        f" g{p['groups']} {attentions}"
    )


def _problem_rows(name, conv, plan):
    rows = []
    for key, choice in plan.choices:
        m = plan.measurements[key]
        seconds = m["seconds"]
        rule_s = seconds.get(m["rule"])
        rows.append(
            [
                name,
                conv,
                _describe(key),
                m["count"],
                m["rule"],
                choice,
                "–" if rule_s is None else f"{rule_s / seconds[choice]:.2f}×",
                ", ".join(f"{n} {t * 1e3:.1f}" for n, t in sorted(seconds.items(), key=lambda kv: kv[1])),
            ]
        )
    return rows


def run(quick: bool, repeats: int, models=None, convs=None, plans_dir=None, out_dir=None):
    backend = jax.default_backend()
    batch = 8 if quick else 32
    convs = convs or (("dynamic",) if quick else CONVS)
    save_dir = os.path.join(out_dir, f"plans_{backend}") if out_dir else None
    records, problem_rows, rows = [], [], []
    for name in check_models(models or MODELS):
        for conv in convs:
            step, args = jax_training_step(name, conv, batch, quick)
            stem = f"{name}_{conv}{'_quick' if quick else ''}.json"
            if plans_dir:
                plan, tune_s = Plan.load(os.path.join(plans_dir, stem)), None
            else:
                print(f"{name} {conv} B{batch}: tuning", flush=True)
                plan, tune_s = tune_step(step, args, backend)
            if save_dir:
                os.makedirs(save_dir, exist_ok=True)
                plan.save(os.path.join(save_dir, stem))
            planned_step, planned_args = jax_training_step(name, conv, batch, quick, strategy=plan)
            runs = {"rules": DonatingStep(step, args), "plan": DonatingStep(planned_step, planned_args)}
            times = median_times(runs, repeats=repeats, sync=jax.block_until_ready)
            record = {
                "model": name,
                "conv": conv,
                "batch": batch,
                "tune_s": tune_s,
                "rules_step_s": times["rules"],
                "plan_step_s": times["plan"],
                "estimated_speedup": plan.estimated_speedup(),
                "plan": json.loads(plan.to_json()),
            }
            records.append(record)
            problem_rows += _problem_rows(name, conv, plan)
            ratio = times["rules"] / times["plan"]
            rows.append(
                [
                    name,
                    conv,
                    batch,
                    f"{times['rules']:.3f}",
                    f"{times['plan']:.3f}",
                    f"{ratio:.2f}×",
                    "met" if ratio <= 1.1 else "not met",
                    f"{record['estimated_speedup']:.2f}×",
                    "–" if tune_s is None else f"{tune_s:.0f}",
                ]
            )
            print(f"{name} {conv}: rules {times['rules']:.3f} s, plan {times['plan']:.3f} s ({ratio:.2f}×)", flush=True)
    md = (
        "Training step (SGD-momentum, CIFAR stem, 32x32) with strategy='auto' (the fixed rules) and with the plan "
        "measured by tuning it (autotune.measure_problem per problem, forward+backward); both steps compiled, "
        "then timed in interleaved rounds (median). Goal: the rules within 10 % of the plan (rules / plan ≤ "
        "1.10). 'estimated' = the summed per-problem seconds of the rules' choices over the plan's.\n\n"
    )
    md += markdown_table(
        [
            "model",
            "conv",
            "batch",
            "rules step s",
            "plan step s",
            "rules / plan",
            "within 10 %",
            "estimated",
            "tuning s",
        ],
        rows,
    )
    md += (
        "\n\nPer problem (input HxWxC, kernel/stride →Cout, groups, attentions besides the kernel attention): "
        "calls in the step, the rules' choice, the measured fastest, and every candidate's forward+backward ms "
        "(the losers' after one call).\n\n"
    )
    md += markdown_table(["model", "conv", "problem", "calls", "rule", "tuned", "rule / tuned", "ms"], problem_rows)
    return {"batch": batch, "quick": quick, "results": records}, md
