"""Input pipeline (train/data.py) alone: images/s of ImageNet-style decode + random-resized crop at 224 from
~400x350 JPEGs for 0/1/2 grain workers, next to the raw single-process PIL decode+resize rate; peak RSS of
the same 100-step pipeline run on a 2,000- and a 20,000-image folder; and the fraction of wall time a short
training run (``train_and_evaluate``) waits for data.

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
IMAGE_SIZE, BATCH, JPEG_SIZES = 224, 32, (300, 450)
# One 100-step pipeline run in a fresh process: prints its peak RSS and its workers' (MiB).
_RSS_RUN = """
import resource, sys
from train import data
from train.config import parse_args
config = parse_args(["--dataset=imagefolder", "--data_dir=" + sys.argv[1], "--image_size=224", "--data_workers=2"])
pipeline = data.Pipeline(data.load_dataset(config), 32, 0, config.data_workers)
iterator = pipeline.train_iterator(100)
for batch in iterator:
    pipeline.normalize(batch["image"])
iterator.close()
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"{own:.1f} {workers:.1f}")
"""


POOL = 200  # distinct JPEGs; larger folders hard-link them under new names (10 classes, round-robin)


def make_folder(num_train: int) -> str:
    """``DATA_ROOT/jpeg<N>``: N training JPEG files (10 classes) and 100 test ones, hard links to a pool of
    :data:`POOL` distinct 300-450 px JPEGs (generating 20,000 distinct ones takes hours on a loaded 2-core
    machine; what the folder size changes in the pipeline, the file list and the epoch permutation, is the same)."""
    from train.make_imagefolder import write_image_folder

    pool_root = os.path.join(DATA_ROOT, "pool")
    if not os.path.exists(os.path.join(pool_root, "complete")):
        write_image_folder(pool_root, {"train": POOL}, num_classes=1, min_size=JPEG_SIZES[0],
                           max_size=JPEG_SIZES[1], modes=(("RGB", ".jpg"),))
        open(os.path.join(pool_root, "complete"), "w").close()
    pool = sorted(os.path.join(pool_root, "train", "class_000", f) for f in
                  os.listdir(os.path.join(pool_root, "train", "class_000")))
    root = os.path.join(DATA_ROOT, f"jpeg{num_train}")
    if not os.path.exists(os.path.join(root, "complete")):
        for split, count in (("train", num_train), ("test", 100)):
            for i in range(count):
                class_dir = os.path.join(root, split, f"class_{i % 10:03d}")
                os.makedirs(class_dir, exist_ok=True)
                target = os.path.join(class_dir, f"{split}_{i:06d}.jpg")
                if not os.path.exists(target):
                    os.link(pool[i % len(pool)], target)
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


def peak_rss(root: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _RSS_RUN, root], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    own, workers = (float(v) for v in out.stdout.split()[-2:])
    return {"main_mib": own, "largest_worker_mib": workers}


def data_wait(root: str, steps: int) -> dict:
    """Fraction of a short training run's wall time spent waiting for batches (2 workers)."""
    import tempfile

    from train.config import parse_args
    from train.loop import train_and_evaluate

    with tempfile.TemporaryDirectory() as workdir:
        config = parse_args(["--dataset=imagefolder", f"--data_dir={root}", f"--image_size={IMAGE_SIZE}",
                             "--data_workers=2", "--base_width=8", f"--batch_size={BATCH}", f"--num_steps={steps}",
                             "--export=false", "--tensorboard=false", "--progress=false", f"--workdir={workdir}",
                             f"--log_every_steps={steps}"])
        result = train_and_evaluate(config)
    return {"steps": steps, "seconds": round(result["seconds"], 1),
            "data_wait_fraction": round(result["data_wait_fraction"], 4)}


def run(quick: bool = False, repeats: int = 1, **_):
    sizes = (200, 2000) if quick else (2000, 20000)
    roots = {n: make_folder(n) for n in sizes}
    small = roots[sizes[0]]
    steps = 10 if quick else 30
    raw = raw_rate(small, steps * BATCH // 2)
    rates = {w: pipeline_rate(small, w, steps) for w in (0, 1, 2)}
    rss = {n: peak_rss(root) for n, root in roots.items()}
    wait = data_wait(small, 10 if quick else 20)
    payload = {"image_size": IMAGE_SIZE, "batch": BATCH, "jpeg_sides": JPEG_SIZES, "raw_decode_resize_per_s": raw,
               "pipeline_per_s": {str(w): r for w, r in rates.items()},
               "peak_rss_100_steps": {str(n): v for n, v in rss.items()}, "training_data_wait": wait}
    rows = [["raw PIL decode + resize, 1 process", f"{raw:.0f}", "1.00×"]]
    rows += [[f"pipeline, {w} worker(s)", f"{r:.0f}", f"{r / raw:.2f}×"] for w, r in rates.items()]
    markdown = (f"Images/s, {IMAGE_SIZE}-px ImageNet-style training preprocessing (random-resized crop + flip) of "
                f"{JPEG_SIZES[0]}–{JPEG_SIZES[1]} px JPEGs, batch {BATCH}:\n\n"
                + markdown_table(["what", "images/s", "vs raw"], rows)
                + "\n\nPeak RSS of a 100-step pipeline run (2 workers), MiB:\n\n"
                + markdown_table(["training images", "main process", "largest worker"],
                                 [[str(n), f"{v['main_mib']:.0f}", f"{v['largest_worker_mib']:.0f}"]
                                  for n, v in rss.items()])
                + f"\n\nTraining run (ResNet-18 dynamic, base width 8, {wait['steps']} steps, 2 workers): "
                  f"{100 * wait['data_wait_fraction']:.1f} % of {wait['seconds']} s spent waiting for data.")
    print(json.dumps(payload, indent=1))
    return payload, markdown
