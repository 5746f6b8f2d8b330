"""Tests of the input pipeline (train/data.py, sources.py, preprocess.py, pipeline.py): batches a pure
function of (seed, step) for any number of grain workers and processes, the sources (digits, image folder,
TFDS), preprocessing, unreadable images, the errors of bad data options, and the presets (train/presets.py)
running 2 steps."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from train import data, preprocess
from train.pipeline import Pipeline
from train.config import UsageError, parse_args
from train.make_imagefolder import write_image_folder

TINY = ["--base_width=2", "--export=false", "--tensorboard=false", "--progress=false", "--warmup_epochs=0"]


def folder(tmp_path, train=24, test=10, classes=3, **kwargs):
    root = str(tmp_path / "folder")
    write_image_folder(root, {"train": train, "test": test}, num_classes=classes, min_size=20, max_size=48,
                       **kwargs)
    return root


def corrupt(path):
    """Keep the JPEG/PNG header, cut the file to a third (a truncated download)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 3)


def test_digits_batches_are_a_pure_function_of_seed_and_step():
    ds = data.load_dataset(parse_args([]))
    assert ds.image_shape == (8, 8, 1) and (len(ds.train), len(ds.eval)) == (1437, 360)
    assert ds.preprocess.kind == "cifar" and ds.preprocess.crop and not ds.preprocess.flip
    pipeline = Pipeline(ds, 64, seed=3)
    x, y = pipeline.train_batch(25)
    again = Pipeline(data.load_dataset(parse_args([])), 64, seed=3).train_batch(25)
    assert np.array_equal(x, again[0]) and np.array_equal(y, again[1])
    assert not np.array_equal(x, pipeline.train_batch(26)[0])
    # An epoch visits every record once (step 22 starts epoch 1 with a new order).
    labels = np.concatenate([pipeline.train_batch(s)[1] for s in range(pipeline.steps_per_epoch)])
    assert len(labels) == 22 * 64 and np.bincount(labels).sum() == 1408
    # Two processes' local batches concatenate to the single-process global batch.
    halves = [Pipeline(ds, 64, 3, 0, i, 2).train_batch(25) for i in range(2)]
    assert np.array_equal(np.concatenate([h[0] for h in halves]), x)
    # The iterator gives the same batches and its grain state counts steps; a restored state resumes.
    iterator = pipeline.train_iterator(30, start_step=24)
    first = next(iterator)
    assert np.array_equal(pipeline.normalize(first["image"]), pipeline.train_batch(24)[0])
    fresh = pipeline.train_iterator(30, start_step=24)
    fresh.set_state(iterator.get_state())
    assert int(next(fresh)["step"][0]) == 25
    # Eval: one padded batch shape, every eval image once.
    batches = list(pipeline.eval_batches())
    assert [b["image"].shape for b in batches] == [(64, 8, 8, 1)] * 6 and sum(b["mask"].sum() for b in batches) == 360
    # What the loop compiles its steps for, before any batch exists: the batches' global shapes and dtypes.
    train_inputs, eval_inputs = pipeline.model_inputs(train=True), pipeline.model_inputs(train=False)
    assert train_inputs == tuple((first[k].shape, first[k].dtype) for k in ("image", "label"))
    assert eval_inputs == tuple((batches[0][k].shape, batches[0][k].dtype) for k in ("image", "label", "mask"))


def test_folder_source_workers_processes_and_unreadable_images(tmp_path, capfd):
    root = folder(tmp_path)
    bad = os.path.join(root, "train", "class_001", "train_000004.jpg")  # a CMYK JPEG, mid-epoch
    corrupt(bad)
    config = parse_args(["--dataset=imagefolder", f"--data_dir={root}", "--image_size=16"])
    ds = data.load_dataset(config)
    assert ds.train.classes == ["class_000", "class_001", "class_002"] and ds.num_classes == 3
    assert ds.preprocess.kind == "imagenet" and ds.image_shape == (16, 16, 3)
    # Every colour layout (gray, RGBA, palette, CMYK JPEG) becomes RGB.
    modes = {}
    from PIL import Image
    for index, path in enumerate(ds.train.paths):
        if path != bad:
            with Image.open(path) as img:
                modes[img.mode] = ds.preprocess.eval(ds.train[index]["image"])
    assert set(modes) == {"RGB", "L", "RGBA", "P", "CMYK"} and all(v.shape == (16, 16, 3) for v in modes.values())
    # 0 workers, 2 workers, 2 processes x 0 workers: the same batches; the corrupt file is replaced by the
    # next record and reported, every time its batch is built.
    steps = 6  # 3 epochs of 24 images at batch 12
    serial = Pipeline(ds, 12, seed=1)
    reference = list(serial.train_iterator(steps))
    parallel = Pipeline(ds, 12, seed=1, workers=2)
    iterator = parallel.train_iterator(steps)
    workers = list(iterator)
    iterator.close()
    halves = [list(Pipeline(ds, 12, 1, 0, p, 2).train_iterator(steps)) for p in range(2)]
    bad_index = ds.train.paths.index(bad)
    for step, (a, b) in enumerate(zip(reference, workers)):
        for key in ("image", "label", "bad", "step"):
            assert np.array_equal(a[key], b[key]), (step, key)
            assert np.array_equal(a[key], np.concatenate([halves[0][step][key], halves[1][step][key]])), (step, key)
    flagged = np.concatenate([b["bad"] for b in reference])
    assert sorted(flagged[flagged >= 0]) == [bad_index] * 3  # once per epoch
    assert all(b["image"].dtype == np.uint8 and b["image"].shape == (12, 16, 16, 3) for b in reference)
    assert Pipeline(ds, 12, 1, 0, 1, 2).model_inputs() == (((12, 16, 16, 3), np.uint8), ((12,), np.int32))
    # Eval: the unreadable image is masked out, the split is padded to whole batches.
    corrupt(os.path.join(root, "test", "class_000", "test_000000.jpg"))
    evals = list(serial.eval_batches())
    assert sum(b["mask"].sum() for b in evals) == 9 and [i for b in evals for i in b["bad"] if i >= 0] == [0]
    assert ds.eval_examples(4).shape == (4, 16, 16, 3)


def test_imagenet_preprocessing():
    p = preprocess.Preprocess("imagenet", 32, 3, crop=True, flip=True, padding=0, mean=preprocess.IMAGENET_MEAN,
                        std=preprocess.IMAGENET_STD)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(50, 80, 3), dtype=np.uint8)
    for _ in range(50):  # random-resized-crop boxes: inside the image, 8-100 % of the area, aspect 3/4-4/3
        left, top, right, bottom = p._resized_crop_box(50, 80, p.draws(rng, 1)[0])
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 80 and 0 <= top < bottom <= 50
        assert 0.08 * 4000 * 0.9 <= w * h <= 4000 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    # Eval: shorter side -> int(32 / 0.875) = 36, centre 32x32 crop. A constant image stays constant.
    flat = np.full((50, 80, 3), 7, np.uint8)
    assert np.array_equal(p.eval(flat), np.full((32, 32, 3), 7, np.uint8))
    assert p.train(image, p.draws(rng, 1)[0]).shape == (32, 32, 3)
    gray = p.eval(rng.integers(0, 256, size=(40, 40, 1), dtype=np.uint8))
    assert np.array_equal(gray[..., 0], gray[..., 2])  # gray -> RGB repeats the channel
    x = p.normalize(np.full((1, 2, 2, 3), 255, np.uint8))
    assert np.allclose(x[0, 0, 0], (255 - np.array(preprocess.IMAGENET_MEAN)) / np.array(preprocess.IMAGENET_STD))
    # The loop normalises inside its jitted steps: the same bits as on the host (every uint8 value).
    import jax
    every_value = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    for q in (p, data.load_dataset(parse_args([])).preprocess):  # ImageNet's and the digits' statistics
        x = every_value[..., :q.channels]
        assert np.array_equal(np.asarray(jax.jit(q.normalize)(x)), q.normalize(x))


def test_bad_data_options_name_the_path_or_flag(tmp_path):
    root = folder(tmp_path, train=6, test=3)

    def error(*args):
        with pytest.raises(UsageError) as info:
            config = parse_args(list(args))
            Pipeline(data.load_dataset(config), 2, 0, config.data_workers)
        return str(info.value)

    assert "no such directory" in error("--dataset=imagefolder", f"--data_dir={tmp_path / 'nope'}")
    assert "needs --data_dir" in error("--dataset=imagefolder")
    assert os.path.join(root, "validation") in error("--dataset=imagefolder", f"--data_dir={root}",
                                                     "--eval_split=validation")
    assert "--data_workers=-1" in error("--data_workers=-1")
    # The digits: options that do not apply are errors, not silently ignored.
    assert "--data_dir" in error(f"--data_dir={root}")
    assert "--eval_split='validation'" in error("--eval_split=validation")
    # --image_size: too small for the model; changing the native size of cifar-style preprocessing.
    from train import steps
    config = parse_args(["--dataset=imagefolder", f"--data_dir={root}", "--image_size=16", "--stem=imagenet"])
    with pytest.raises(UsageError, match="--image_size.*total stride \\(32\\)"):
        steps.check_image_size(config, data.load_dataset(config).image_shape)
    assert "--image_size=16" in error("--image_size=16")
    # A class folder in one split only; an empty class folder; a split with no class folders.
    os.makedirs(os.path.join(root, "test", "class_zzz"))
    assert os.path.join(root, "test", "class_zzz") in error("--dataset=imagefolder", f"--data_dir={root}")
    os.makedirs(os.path.join(root, "train", "class_zzz"))
    assert "no images" in error("--dataset=imagefolder", f"--data_dir={root}") and "class_zzz" in \
        error("--dataset=imagefolder", f"--data_dir={root}")
    os.makedirs(os.path.join(root, "empty"))
    assert "no class folders in" in error("--dataset=imagefolder", f"--data_dir={root}", "--eval_split=empty")


def test_tfds_sources_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=8):
        ds = data.load_dataset(parse_args(["--dataset=cifar10"]))
        assert ds.preprocess.kind == "cifar" and ds.image_shape == (32, 32, 3) and ds.preprocess.flip
        x, y = Pipeline(ds, 4, 0).train_batch(1)
        assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32
        ds = data.load_dataset(parse_args(["--dataset=imagenet2012", "--eval_split=validation", "--image_size=24"]))
        assert ds.preprocess.kind == "imagenet" and ds.num_classes == 1000
        assert Pipeline(ds, 4, 0).train_batch(0)[0].shape == (4, 24, 24, 3)
        with pytest.raises(UsageError, match="'imdb_reviews' has features .*needs 'image' and 'label'"):
            data.load_dataset(parse_args(["--dataset=imdb_reviews"]))


# Trains every preset for 2 steps in one process (argv: workdir root, then one JSON list of argument lists):
# prints one JSON line {preset: [steps, eval loss]}.
_PRESET_RUNS = """
import json, sys
import tensorflow_datasets as tfds
from train.config import parse_args
from train.loop import train_and_evaluate
results = {}
for args in json.loads(sys.argv[1]):
    config = parse_args(args)
    with tfds.testing.mock_data(num_examples=8):
        result = train_and_evaluate(config)
    results[args[0]] = [result["steps"], result["eval_loss"]]
print(json.dumps(results))
"""


@pytest.mark.slow
def test_presets_run_two_steps(tmp_path):
    """Every preset of train/presets.py trains 2 steps on tfds.testing.mock_data: its data, preprocessing,
    model architecture, optimiser and schedules, at a tiny width (base width 2, width multiplier 0.1, 32-px
    crops) and with static convolutions: compiling the dynamic layers of 5 networks costs minutes of CPU
    (the dynamic layers are trained by test_train.py and the models' tests). All presets run in one
    subprocess whose XLA:CPU backend compiles at LLVM optimisation level 0: compiling the 5 networks is
    nearly all of this test's time, and what it proves (each recipe runs and gives a finite loss) does not
    depend on the rounding of the generated code."""
    import json
    import subprocess
    import sys
    from train.presets import PRESETS
    runs = []
    for name in sorted(PRESETS):
        size = "--image_size=32" if "imagenet" in name else "--image_size=none"
        args = [f"--config={name}", *TINY, "--num_steps=2", "--batch_size=4", "--data_workers=0", "--width_mult=0.1",
                size, "--conv=static", f"--workdir={tmp_path / name}"]
        preset = parse_args([f"--config={name}"])
        if preset.conv == "kernelwarehouse":  # its --kw_* options would not apply to --conv=static
            args += [f"--{f.name}={'none' if f.default is None else f.default}" for f in dataclasses.fields(preset)
                     if f.metadata["group"] == "kernelwarehouse"]
        config = parse_args(args)
        assert config.model in name.replace("mobilenetv2", "mobilenet_v2") and config.base_width == 2
        family = {"dycnn": "dynamic", "kw": "kernelwarehouse"}.get(name.split("_")[0], "odconv")
        assert preset.conv == family and (family == "kernelwarehouse" or preset.num_experts == 4)
        runs.append(args)
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"}
    out = subprocess.run([sys.executable, "-c", _PRESET_RUNS, json.dumps(runs)], env=env, capture_output=True,
                         text=True, timeout=1200, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(results) == [f"--config={name}" for name in sorted(PRESETS)]
    assert all(steps == 2 and np.isfinite(loss) for steps, loss in results.values()), results


def test_step_schedule_and_preset_overrides():
    from train import steps
    config = parse_args(["--warmup_epochs=0", "--config=odconv_resnet18_imagenet", "--learning_rate=0.2"])
    assert (config.learning_rate, config.decay_epochs, config.schedule, config.dropout) == \
        (0.2, (30.0, 60.0, 90.0), "step", 0.2)
    schedule = steps.learning_rate_schedule(config, 10, 1000)
    assert [round(float(schedule(s)), 6) for s in (0, 299, 300, 599, 600, 900)] == [0.2, 0.2, 0.02, 0.02, 0.002,
                                                                                    0.0002]
    with pytest.raises(UsageError, match="unknown preset"):
        parse_args(["--config=nope"])
    with pytest.raises(UsageError, match="--schedule=step needs --decay_epochs"):
        parse_args(["--schedule=step"])


def test_input_benchmark_measures_and_reports_on_a_tiny_folder(tmp_path, monkeypatch):
    """benchmarks/input.py on 64 small JPEGs: raw decoding (one process, two at once), the pipeline with 0
    and 1 worker, and the report's rows and ratios. The rates are only checked to be measured: speed is
    the benchmark's job, not a test's."""
    from benchmarks import input as bench
    monkeypatch.setattr(bench, "DATA_ROOT", str(tmp_path))
    monkeypatch.setattr(bench, "WORKERS", (0, 1))
    root = bench.make_folder(64, (40, 60), num_test=10)
    rounds = {"raw": [bench.raw_rate(root, 32)], "raw_at_once": [bench.parallel_raw_rate(root, 16, 1)],
              0: [bench.pipeline_rate(root, 0, 2)], 1: [bench.pipeline_rate(root, 1, 2)]}
    assert all(rates[0] > 0 for rates in rounds.values()), rounds
    run = {"main_mib": 300.0, "largest_child_mib": 200.0}
    rss = {n: {"pipeline": dict(run, images_per_s=900.0),
               "train": dict(run, seconds=20.0, data_wait_fraction=0.0002, host_data_wait_fraction=0.04,
                             first_batch_seconds=0.7, images_per_s=150.0)} for n in (64, 640)}
    payload, markdown = bench.report(rounds, 2, rss, (0.0,) * 3, (0.0,) * 3)
    # The most workers (1 here) are compared with raw decoding by as many processes at once.
    ratios = rounds[1][0] / rounds["raw"][0], rounds[1][0] / rounds["raw_at_once"][0]
    assert f"| pipeline, 1 worker(s) | {rounds[1][0]:.1f} |" in markdown
    assert "{:.2f} / {:.2f}".format(*ratios) in markdown
    assert "0.02 % (host 4.0 %; first batch 0.7 s" in markdown and payload["rss_growth_mib"]["train"] == 0
    # Two rounds on a VM whose speed halved: ratios of the medians, and the median of each round's ratio.
    drift = {"raw": [200.0, 100.0], "raw_at_once": [200.0, 100.0], 0: [200.0, 90.0], 1: [170.0, 95.0]}
    payload, markdown = bench.report(drift, 2, rss, (0.0,) * 3, (0.0,) * 3)
    assert "| pipeline, 1 worker(s) | 132.5 | 95–170 | 0.88× | 0.88 / 0.88 | 0.90 |" in markdown
    assert payload["pipeline_over_reference_per_round_median"] == pytest.approx({"0": 0.95, "1": 0.9})
