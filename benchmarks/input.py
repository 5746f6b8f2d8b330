"""Input pipeline (train/data.py): images/s of ImageNet-style decode + random-resized crop at 224 from
~400x350 JPEGs for 0/1/2 grain workers, next to the raw single-process PIL decode+resize rate; peak RSS of
the same 100-step run (the pipeline alone, and a whole training run) on a folder of 2,000 and of 20,000
distinct 64-400 px JPEGs; and the fraction of those training runs spent waiting for data.

The folders are generated once under ``$DYNCONV_BENCH_DATA`` (default ``/tmp/dynconv_input_bench``), never
in the repository.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

from .timing import markdown_table

DATA_ROOT = os.environ.get("DYNCONV_BENCH_DATA", "/tmp/dynconv_input_bench")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE, BATCH, RSS_STEPS = 224, 32, 100
TRAIN_IMAGE_SIZE = 64  # the training run's crops: a 224-px step of even this small ResNet takes seconds on 2 CPU cores
THROUGHPUT_SIDES = (350, 400)  # random sides per image: mean ~375x375 px, the area of the usual ~400x350
RSS_SIDES = (64, 400)
# The training run of the RSS and data-wait measurements: a ResNet-18 at 1/8 width with static convolutions
# (the input pipeline does not depend on the conv type; a dynamic one only makes the step slower).
TRAIN_FLAGS = ["--base_width=8", "--conv=static", "--data_workers=2", f"--batch_size={BATCH}",
               "--export=false", "--tensorboard=false", "--progress=false"]
# One run in a fresh process (argv: data dir, 'pipeline' or 'train', workdir): prints a JSON line with its
# own peak RSS and the largest of its (waited-for) children's, i.e. the grain workers, in MiB.
_RSS_RUN = """
import json, resource, sys
from train import data
from train.config import parse_args
root, kind, workdir, flags = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
size = "--image_size=" + ("IMAGE_SIZE" if kind == "pipeline" else "TRAIN_IMAGE_SIZE")
config = parse_args(["--dataset=imagefolder", "--data_dir=" + root, f"--num_steps={RSS_STEPS}",
                     "--workdir=" + workdir, f"--log_every_steps={RSS_STEPS}", size, *flags])
out = {}
if kind == "pipeline":
    pipeline = data.Pipeline(data.load_dataset(config), config.batch_size, 0, config.data_workers)
    iterator = pipeline.train_iterator(RSS_STEPS)
    for batch in iterator:
        pipeline.normalize(batch["image"])
    iterator.close()
else:
    from train.loop import train_and_evaluate
    result = train_and_evaluate(config)
    out = {"seconds": round(result["seconds"], 1), "data_wait_fraction": round(result["data_wait_fraction"], 4)}
out["main_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out["largest_child_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(out))
""".replace("RSS_STEPS", str(RSS_STEPS)).replace("TRAIN_IMAGE_SIZE", str(TRAIN_IMAGE_SIZE)).replace(
    "IMAGE_SIZE", str(IMAGE_SIZE))


def make_folder(num_train: int, sides, num_test: int = 100) -> str:
    """``DATA_ROOT/jpeg<N>_<min>-<max>``: N distinct training JPEGs (10 classes) and ``num_test`` test ones,
    each side drawn in ``sides`` (generated once; ~6 ms per image)."""
    from train.make_imagefolder import write_image_folder

    root = os.path.join(DATA_ROOT, f"jpeg{num_train}_{sides[0]}-{sides[1]}")
    if not os.path.exists(os.path.join(root, "complete")):
        write_image_folder(root, {"train": num_train, "test": num_test}, num_classes=10, min_size=sides[0],
                           max_size=sides[1], modes=(("RGB", ".jpg"),))
        open(os.path.join(root, "complete"), "w").close()
    return root


def raw_rate(root: str, count: int) -> float:
    """Images/s of one process: read, PIL-decode to RGB, bilinear resize to 224x224."""
    from PIL import Image

    from train import data

    source = data.open_folder(root, "train", "test")[0]
    start = time.perf_counter()
    for index in range(count):
        with Image.open(io.BytesIO(source[index]["image"])) as img:
            img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return count / (time.perf_counter() - start)


def pipeline_rate(root: str, workers: int, steps: int) -> float:
    """Images/s of ``Pipeline.train_iterator`` (after its first batch, i.e. with the workers started)."""
    from train import data
    from train.config import parse_args

    config = parse_args(["--dataset=imagefolder", f"--data_dir={root}", f"--image_size={IMAGE_SIZE}"])
    pipeline = data.Pipeline(data.load_dataset(config), BATCH, 0, workers)
    iterator = pipeline.train_iterator(steps + 1)
    next(iterator)
    start = time.perf_counter()
    for batch in iterator:
        pipeline.normalize(batch["image"])
    elapsed = time.perf_counter() - start
    if hasattr(iterator, "close"):
        iterator.close()
    return steps * BATCH / elapsed


def peak_rss(root: str, kind: str) -> dict:
    """One 100-step ``kind`` ('pipeline' or 'train') run on ``root`` in a fresh process."""
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        out = subprocess.run([sys.executable, "-c", _RSS_RUN, root, kind, os.path.join(workdir, "run"),
                              *TRAIN_FLAGS], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{kind} run on {root} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False, repeats: int = 1, **_):
    load_before = os.getloadavg()
    sizes = (200, 2000) if quick else (2000, 20000)
    fast = make_folder(256 if quick else 1024, THROUGHPUT_SIDES)
    steps = 6 if quick else 30
    raw = raw_rate(fast, steps * BATCH)
    print(f"raw decode + resize: {raw:.1f} images/s", flush=True)
    rates = {}
    for w in (0, 1, 2):
        rates[w] = pipeline_rate(fast, w, steps)
        print(f"pipeline, {w} workers: {rates[w]:.1f} images/s", flush=True)
    roots = {n: make_folder(n, RSS_SIDES) for n in sizes}
    rss = {n: {} for n in sizes}
    for kind in ("pipeline", "train"):
        for n, root in roots.items():
            rss[n][kind] = peak_rss(root, kind)
            print(f"{kind} run, {n} images: {rss[n][kind]}", flush=True)
    return report(raw, rates, steps, rss, load_before, os.getloadavg())


def report(raw: float, rates: dict, steps: int, rss: dict, load_before, load_after):
    """The JSON payload and Markdown of :func:`run`'s measurements."""
    small, large = sorted(rss)
    growth = {kind: rss[large][kind]["main_mib"] - rss[small][kind]["main_mib"]
              + rss[large][kind]["largest_child_mib"] - rss[small][kind]["largest_child_mib"]
              for kind in ("pipeline", "train")}
    payload = {"image_size": IMAGE_SIZE, "batch": BATCH, "throughput_jpeg_sides": THROUGHPUT_SIDES,
               "throughput_batches": steps, "rss_jpeg_sides": RSS_SIDES, "raw_decode_resize_per_s": raw,
               "pipeline_per_s": {str(w): r for w, r in rates.items()}, "rss_steps": RSS_STEPS,
               "train_flags": TRAIN_FLAGS + [f"--image_size={TRAIN_IMAGE_SIZE}"],
               "peak_rss": {str(n): v for n, v in rss.items()},
               "rss_growth_mib": growth, "load_average_1_5_15": {"before": load_before, "after": load_after}}
    rows = [["raw PIL decode + resize, 1 process", f"{raw:.1f}", "1.00×"]]
    rows += [[f"pipeline, {w} worker(s)", f"{r:.1f}", f"{r / raw:.2f}×"] for w, r in rates.items()]
    rss_rows = [[f"{n:,}", kind, f"{v[kind]['main_mib']:.0f}", f"{v[kind]['largest_child_mib']:.0f}",
                 f"{100 * v[kind]['data_wait_fraction']:.1f} % of {v[kind]['seconds']} s" if kind == "train" else "–"]
                for n, v in sorted(rss.items()) for kind in ("pipeline", "train")]
    markdown = (f"Load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in load_before)} before, "
                f"{'/'.join(f'{x:.1f}' for x in load_after)} after: other jobs shared the machine.\n\n"
                f"Images/s, {IMAGE_SIZE}-px ImageNet-style training preprocessing (random-resized crop + flip) of "
                f"{THROUGHPUT_SIDES[0]}–{THROUGHPUT_SIDES[1]} px JPEGs, batch {BATCH}, {steps} batches:\n\n"
                + markdown_table(["what", "images/s", "vs raw"], rows)
                + f"\n\nPeak RSS (MiB) of the same {RSS_STEPS}-step run on folders of {RSS_SIDES[0]}–{RSS_SIDES[1]} px "
                  f"JPEGs, 2 workers: the pipeline alone ({IMAGE_SIZE}-px crops), and training "
                  f"(`{' '.join(TRAIN_FLAGS)} --image_size={TRAIN_IMAGE_SIZE}`):\n\n"
                + markdown_table(["training images", "run", "main process", "largest child (worker)", "data wait"],
                                 rss_rows)
                + f"\n\nGrowth from {small:,} to {large:,} images (main + largest child): "
                  + ", ".join(f"{kind} {g:+.0f} MiB" for kind, g in growth.items())
                + ". A child's peak RSS counts the pages it shares with the process it was forked from (Linux "
                  "starts a forked child's high-water mark at the parent's): the training run's workers, some "
                  "forked after compilation (the eval iterator's), report about the main process's size, an upper "
                  "bound of their own; the data wait share is of the whole run, compilation included.")
    print(json.dumps(payload, indent=1))
    return payload, markdown
