"""Input pipeline (train/pipeline.py): images/s of ImageNet-style decode + random-resized crop at 224 from
~400x350 JPEGs for 0/1/2 grain workers (and 4, 8, ... while a core stays free), next to the raw PIL
decode+resize rate of one process and of as many processes as the most workers, decoding at once; peak
RSS of the same 100-step run (the pipeline alone, and a whole training run) on a folder of 2,000 and of
20,000 distinct 64-400 px JPEGs; and, in those training runs, the share of the steady training steps'
time spent waiting for data next to the pipeline's own rate.

The folders are generated once under ``$DYNCONV_BENCH_DATA`` (default ``/tmp/dynconv_input_bench``), never
in the repository.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Optional

from .timing import markdown_table

DATA_ROOT = os.environ.get("DYNCONV_BENCH_DATA", "/tmp/dynconv_input_bench")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE, BATCH, RSS_STEPS = 224, 32, 100
THROUGHPUT_BATCHES = 100
# Worker counts: 0, 1, 2, then powers of two that leave a core to the main process (a host with many cores).
WORKERS = (0, 1, 2) + tuple(2**k for k in range(2, 8) if 2**k < len(os.sched_getaffinity(0)))
TRAIN_IMAGE_SIZE = 64  # the training run's crops: a 224-px step of even this small ResNet takes seconds on 2 CPU cores
THROUGHPUT_SIDES = (350, 400)  # random sides per image: mean ~375x375 px, the area of the usual ~400x350
RSS_SIDES = (64, 400)
# The training run of the RSS and data-wait measurements: a ResNet-18 at 1/8 width with static convolutions
# (the input pipeline does not depend on the conv type; a dynamic one only makes the step slower).
TRAIN_FLAGS = [
    "--base_width=8",
    "--conv=static",
    "--data_workers=2",
    f"--batch_size={BATCH}",
    "--export=false",
    "--tensorboard=false",
    "--progress=false",
]
# One run in a fresh process (argv: data dir, 'pipeline' or 'train', workdir): prints a JSON line with its
# own peak RSS and the largest of its (waited-for) children's, i.e. the grain workers, in MiB; the pipeline
# run also its images/s after the first batch, the training run its data wait (train/metrics.DataWaitClock).
_RSS_RUN = """
import json, resource, sys, time
from train import data
from train.config import parse_args
from train.pipeline import Pipeline
root, kind, workdir, flags = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
config = parse_args(["--dataset=imagefolder", "--data_dir=" + root, f"--num_steps={RSS_STEPS}",
                     "--workdir=" + workdir, f"--log_every_steps={RSS_STEPS}", "--image_size=TRAIN_IMAGE_SIZE",
                     *flags])
if kind == "pipeline":
    pipeline = Pipeline(data.load_dataset(config), config.batch_size, 0, config.data_workers)
    iterator = pipeline.train_iterator(RSS_STEPS)
    next(iterator)
    start = time.perf_counter()
    for batch in iterator:
        pass
    out = {"images_per_s": round((RSS_STEPS - 1) * config.batch_size / (time.perf_counter() - start), 1)}
    iterator.close()
else:
    from train.loop import train_and_evaluate
    result = train_and_evaluate(config)
    out = {"seconds": round(result["seconds"], 1), "data_wait_fraction": round(result["data_wait_fraction"], 5),
           "host_data_wait_fraction": round(result["host_data_wait_fraction"], 4),
           "first_batch_seconds": round(result["first_batch_seconds"], 2),
           "images_per_s": round(config.batch_size / result["step_seconds"], 1)}
out["main_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["largest_child_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(out))
""".replace("RSS_STEPS", str(RSS_STEPS)).replace("TRAIN_IMAGE_SIZE", str(TRAIN_IMAGE_SIZE))


def make_folder(num_train: int, sides, num_test: int = 100) -> str:
    """``DATA_ROOT/jpeg<N>_<min>-<max>``: N distinct training JPEGs (10 classes) and ``num_test`` test ones,
    each side drawn in ``sides`` (generated once; ~6 ms per image)."""
    from train.make_imagefolder import write_image_folder

    root = os.path.join(DATA_ROOT, f"jpeg{num_train}_{sides[0]}-{sides[1]}")
    if not os.path.exists(os.path.join(root, "complete")):
        write_image_folder(
            root,
            {"train": num_train, "test": num_test},
            num_classes=10,
            min_size=sides[0],
            max_size=sides[1],
            modes=(("RGB", ".jpg"),),
        )
        open(os.path.join(root, "complete"), "w").close()
    return root


def raw_rate(root: str, count: int) -> float:
    """Images/s of one process: read, PIL-decode to RGB, bilinear resize to 224x224 (``count`` <= images)."""
    from PIL import Image

    from train.sources import open_folder

    source = open_folder(root, "train", "test")[0]
    start = time.perf_counter()
    for index in range(count):
        with Image.open(io.BytesIO(source[index]["image"])) as img:
            img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return count / (time.perf_counter() - start)


def parallel_raw_rate(root: str, count: int, processes: int) -> float:
    """Summed images/s of ``processes`` processes running :func:`raw_rate` at once."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes) as pool:
        return sum(pool.map(raw_rate, [root] * processes, [count] * processes))


def pipeline_rate(root: str, workers: int, steps: int) -> float:
    """Images/s of ``Pipeline.train_iterator``'s uint8 batches (what the loop sends to the devices), timed
    after its first ``2 + 3 * workers`` batches (the workers started and their buffers drained)."""
    from train import data
    from train.config import parse_args
    from train.pipeline import Pipeline

    config = parse_args(["--dataset=imagefolder", f"--data_dir={root}", f"--image_size={IMAGE_SIZE}"])
    pipeline = Pipeline(data.load_dataset(config), BATCH, 0, workers)
    warmup = 2 + 3 * workers
    iterator = pipeline.train_iterator(warmup + steps + 1)  # one more: the timing never waits for its end
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    elapsed = time.perf_counter() - start
    if hasattr(iterator, "close"):
        iterator.close()
    return steps * BATCH / elapsed


def peak_rss(root: str, kind: str) -> dict:
    """One 100-step ``kind`` ('pipeline' or 'train') run on ``root`` in a fresh process."""
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        out = subprocess.run(
            [sys.executable, "-c", _RSS_RUN, root, kind, os.path.join(workdir, "run"), *TRAIN_FLAGS],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
    if out.returncode:
        raise RuntimeError(f"{kind} run on {root} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False, repeats: Optional[int] = None, **_):
    """Throughput: ``repeats`` interleaved rounds of every measurement (the CLI: 5, 3 with ``--quick``),
    medians reported (a VM's speed drifts between minutes); then the RSS runs."""
    repeats = repeats or (1 if quick else 3)
    load_before = os.getloadavg()
    sizes = (200, 2000) if quick else (2000, 20000)
    fast = make_folder(256 if quick else 1024, THROUGHPUT_SIDES)
    steps, count = (6, 256) if quick else (THROUGHPUT_BATCHES, 1024)
    rounds = {"raw": [], "raw_at_once": [], **{w: [] for w in WORKERS}}
    raw_rate(fast, count)  # untimed warm-up: a process's first pass decodes slower (docs/training.md)
    for r in range(repeats):
        rounds["raw"].append(raw_rate(fast, count))
        rounds["raw_at_once"].append(parallel_raw_rate(fast, count, max(WORKERS)))
        for w in WORKERS:
            rounds[w].append(pipeline_rate(fast, w, steps))
        print(f"round {r + 1}: " + ", ".join(f"{k}: {v[-1]:.1f}" for k, v in rounds.items()), flush=True)
    roots = {n: make_folder(n, RSS_SIDES) for n in sizes}
    rss = {n: {} for n in sizes}
    for kind in ("pipeline", "train"):
        for n, root in roots.items():
            rss[n][kind] = peak_rss(root, kind)
            print(f"{kind} run, {n} images: {rss[n][kind]}", flush=True)
    return report(rounds, steps, rss, load_before, os.getloadavg())


def _reference(w, raw_per_s, at_once_per_s):
    """What ``w`` workers are compared with: raw × workers, or the measured raw at once for the most."""
    return at_once_per_s if w == max(WORKERS) else raw_per_s * max(w, 1)


def _throughput_rows(rounds: dict, median: dict, per_round: dict) -> list:
    raw, at_once = median["raw"], median["raw_at_once"]

    def spread(key):
        return f"{min(rounds[key]):.0f}–{max(rounds[key]):.0f}"

    rows = [
        ["raw PIL decode + resize, 1 process", f"{raw:.1f}", spread("raw"), "1.00×", "–", "–"],
        [
            f"raw PIL decode + resize, {max(WORKERS)} processes at once (summed)",
            f"{at_once:.1f}",
            spread("raw_at_once"),
            f"{at_once / raw:.2f}×",
            "–",
            "–",
        ],
    ]
    rows += [
        [
            f"pipeline, {w} worker(s)",
            f"{median[w]:.1f}",
            spread(w),
            f"{median[w] / raw:.2f}×",
            f"{median[w] / (raw * max(w, 1)):.2f} / {median[w] / _reference(w, raw, at_once):.2f}",
            f"{per_round[w]:.2f}",
        ]
        for w in WORKERS
    ]
    return rows


def _rss_rows(rss: dict) -> list:
    rows = []
    for n, v in sorted(rss.items()):
        pipe, train = v["pipeline"], v["train"]
        rows.append(
            [
                f"{n:,}",
                "pipeline",
                f"{pipe['main_mib']:.0f}",
                f"{pipe['largest_child_mib']:.0f}",
                f"{pipe['images_per_s']:.0f}",
                "–",
            ]
        )
        rows.append(
            [
                f"{n:,}",
                "train",
                f"{train['main_mib']:.0f}",
                f"{train['largest_child_mib']:.0f}",
                f"{train['images_per_s']:.0f}",
                f"{100 * train['data_wait_fraction']:.2f} % (host "
                f"{100 * train['host_data_wait_fraction']:.1f} %; first batch "
                f"{train['first_batch_seconds']} s; run {train['seconds']} s)",
            ]
        )
    return rows


def _markdown(
    rounds: dict, steps: int, rss: dict, growth: dict, per_round: dict, median: dict, load_before, load_after
) -> str:
    small, large = sorted(rss)
    return (
        f"Load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in load_before)} before, "
        f"{'/'.join(f'{x:.1f}' for x in load_after)} after.\n\n"
        f"Images/s, {IMAGE_SIZE}-px ImageNet-style training preprocessing (random-resized crop + flip) of "
        f"{THROUGHPUT_SIDES[0]}–{THROUGHPUT_SIDES[1]} px JPEGs, batch {BATCH}, uint8 batches as the loop "
        f"sends them to the devices, {steps} batches after the workers' start; median (and range) of "
        f"{len(rounds['raw'])} interleaved rounds. Next to last column: the pipeline over raw × workers, "
        f"and over what raw decoding does with as many processes busy at once (raw × workers for fewer "
        f"than {max(WORKERS)}; the measured row above for {max(WORKERS)}), from the medians. Last column: "
        f"the second ratio taken in each round (the pipeline over the raw rates of its own round, seconds "
        f"apart) and its median over the rounds, which the VM's drift between minutes moves less:\n\n"
        + markdown_table(
            [
                "what",
                "images/s",
                "range",
                "vs raw (1 process)",
                "vs raw × workers / vs raw at once (goal ≥ 0.90)",
                "vs raw at once, per round (median)",
            ],
            _throughput_rows(rounds, median, per_round),
        )
        + f"\n\nPeak RSS (MiB) of the same {RSS_STEPS}-step run on folders of {RSS_SIDES[0]}–{RSS_SIDES[1]} px "
        f"JPEGs ({TRAIN_IMAGE_SIZE}-px crops, 2 workers): the pipeline alone, and training "
        f"(`{' '.join(TRAIN_FLAGS)} --image_size={TRAIN_IMAGE_SIZE}`). Images/s: the pipeline's after its "
        f"first batch; training's from the mean step time after the first step (evaluation and "
        f"checkpoints left out). Data wait: the share of that steady step time the devices waited for data "
        f"(`data_wait_fraction`: the loop's waits for a batch that ended with the devices done with "
        f"every earlier step), and in brackets every wait of the host (`host_data_wait_fraction`, "
        f"also while the devices still ran earlier steps); the first batch's wait (workers starting) "
        f"apart:\n\n"
        + markdown_table(
            ["training images", "run", "main process", "largest child (worker)", "images/s", "data wait"],
            _rss_rows(rss),
        )
        + f"\n\nGrowth from {small:,} to {large:,} images (main + largest child): "
        + ", ".join(f"{kind} {g:+.0f} MiB" for kind, g in growth.items())
        + ". A child's peak RSS counts the pages it shares with the process it was forked from (Linux "
        "starts a forked child's high-water mark at the parent's): the training run's workers, some "
        "forked after compilation (the eval iterator's), report about the main process's size, an upper "
        "bound of their own."
    )


def report(rounds: dict, steps: int, rss: dict, load_before, load_after):
    """The JSON payload and Markdown of :func:`run`'s measurements."""
    median = {k: statistics.median(v) for k, v in rounds.items()}
    small, large = sorted(rss)
    growth = {
        kind: rss[large][kind]["main_mib"]
        - rss[small][kind]["main_mib"]
        + rss[large][kind]["largest_child_mib"]
        - rss[small][kind]["largest_child_mib"]
        for kind in ("pipeline", "train")
    }
    # The same ratios round by round (each pipeline rate over the raw rates of its own round), then their
    # median: the VM's speed drifts between minutes, and a round's measurements are seconds apart.
    per_round = {
        w: statistics.median(
            rate / _reference(w, raw_r, at_once_r)
            for rate, raw_r, at_once_r in zip(rounds[w], rounds["raw"], rounds["raw_at_once"])
        )
        for w in WORKERS
    }
    payload = {
        "image_size": IMAGE_SIZE,
        "batch": BATCH,
        "throughput_jpeg_sides": THROUGHPUT_SIDES,
        "throughput_batches": steps,
        "rounds": {str(k): v for k, v in rounds.items()},
        "raw_decode_resize_per_s": median["raw"],
        "raw_decode_resize_at_once_per_s": median["raw_at_once"],
        "raw_processes_at_once": max(WORKERS),
        "pipeline_per_s": {str(w): median[w] for w in WORKERS},
        "rss_steps": RSS_STEPS,
        "train_flags": TRAIN_FLAGS + [f"--image_size={TRAIN_IMAGE_SIZE}"],
        "peak_rss": {str(n): v for n, v in rss.items()},
        "rss_growth_mib": growth,
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "pipeline_over_reference_per_round_median": {str(w): per_round[w] for w in WORKERS},
    }
    markdown = _markdown(rounds, steps, rss, growth, per_round, median, load_before, load_after)
    print(json.dumps(payload, indent=1))
    return payload, markdown
