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
from train.config import UsageError, parse_args
from train.make_imagefolder import write_image_folder
from train.pipeline import Pipeline

TINY = ["--base_width=2", "--export=false", "--tensorboard=false", "--progress=false", "--warmup_epochs=0"]


def folder(tmp_path, train=24, test=10, classes=3, **kwargs):
    root = str(tmp_path / "folder")
    write_image_folder(root, {"train": train, "test": test}, num_classes=classes, min_size=20, max_size=48, **kwargs)
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
    p = preprocess.Preprocess(
        "imagenet", 32, 3, crop=True, flip=True, padding=0, mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD
    )
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
        x = every_value[..., : q.channels]
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
    assert os.path.join(root, "validation") in error(
        "--dataset=imagefolder", f"--data_dir={root}", "--eval_split=validation"
    )
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
    assert "no images" in error("--dataset=imagefolder", f"--data_dir={root}") and "class_zzz" in error(
        "--dataset=imagefolder", f"--data_dir={root}"
    )
    os.makedirs(os.path.join(root, "empty"))
    assert "no class folders in" in error("--dataset=imagefolder", f"--data_dir={root}", "--eval_split=empty")
    # One class: every prediction would be right ('accuracy 1.0000' said nothing).
    one = tmp_path / "one"
    image = os.path.join(root, "train", "class_000", "train_000000.jpg")
    for split in ("train", "test"):
        os.makedirs(one / split / "cats")
        for name in ("a.jpg", "b.jpg", "c.jpg"):
            os.symlink(image, one / split / "cats" / name)
    assert "one class folder in" in error("--dataset=imagefolder", f"--data_dir={one}")
    # An eval split in which no image can be read: refused before training (was a ZeroDivisionError after it).
    broken = folder(tmp_path / "broken", train=6, test=3)
    for path in data.load_dataset(parse_args(["--dataset=imagefolder", f"--data_dir={broken}"])).eval.paths:
        corrupt(path)
    assert error("--dataset=imagefolder", f"--data_dir={broken}").startswith(
        f"no image of the eval split 'test' ({os.path.join(broken, 'test')}) can be read (3 record(s) tried)"
    )
    # TFDS: an empty name, a --data_dir that does not exist (was: 'already prepared ... in TFRECORD format'),
    # an unknown name (was: TFDS's whole registry, 4,000 characters).
    assert "--dataset='': name a data set" in error("--dataset=")
    assert error("--dataset=mnist", "--data_dir=/nonexistent") == "--data_dir=/nonexistent: no such directory"
    unknown = error("--dataset=cifar_10")
    assert unknown.startswith("--dataset='cifar_10': no TFDS dataset of that name (did you mean cifar10")
    assert len(unknown) < 300 and "abstract_reasoning" not in unknown


def test_image_folder_links_are_followed_once_and_loops_not_at_all(tmp_path, capfd):
    """A symbolic link back up the tree (``loop -> ..``) used to list the folders again and again under the
    wrong labels (12 files became 5,412 records); a link to the class folder itself, or to a folder listed
    already, would list its files twice. Each real folder is listed once, the links skipped are named."""
    root = folder(tmp_path, train=6, test=3)
    train = os.path.join(root, "train")
    os.symlink("..", os.path.join(train, "class_000", "loop"))  # the split folder: holds every class
    os.symlink(".", os.path.join(train, "class_001", "self"))
    first = os.path.join(train, "class_002", sorted(os.listdir(os.path.join(train, "class_002")))[0])
    with open(first, "rb") as f:
        image = f.read()
    extra = os.path.join(train, "class_002", "more")
    os.makedirs(extra)
    with open(os.path.join(extra, "extra.jpg"), "wb") as f:
        f.write(image)
    os.symlink("more", os.path.join(train, "class_002", "more_again"))  # a folder listed already
    os.symlink(os.path.join(tmp_path, "elsewhere"), os.path.join(train, "class_001", "outside"))
    os.makedirs(tmp_path / "elsewhere")
    with open(tmp_path / "elsewhere" / "linked.jpg", "wb") as f:  # a link out of the tree is followed
        f.write(image)
    ds = data.load_dataset(parse_args(["--dataset=imagefolder", f"--data_dir={root}", "--image_size=16"]))
    names = [os.path.relpath(p, train) for p in ds.train.paths]
    assert len(names) == 8 and len(set(map(os.path.realpath, ds.train.paths))) == 8, names
    assert ds.train.labels.tolist() == [0, 0, 1, 1, 1, 2, 2, 2], names
    assert names[4] == "class_001/outside/linked.jpg"  # after the class folder's own files, as before
    assert names[7] == "class_002/more/extra.jpg"
    err = capfd.readouterr().err
    for link in ("class_000/loop", "class_001/self", "class_002/more_again"):
        assert f"not following {os.path.join(train, link)}" in err, err


def test_sixteen_bit_and_oversized_images(tmp_path, monkeypatch):
    """A 16-bit PNG is scaled to 8 bits (PIL's convert clipped it: 99 % of a gradient became 255); an image
    over PIL's decompression-bomb limit is an unreadable image like any other (skipped and named), not an
    error that stops the run."""
    import io

    from PIL import Image

    gradient = np.arange(256 * 256, dtype=np.uint32).reshape(256, 256).astype(np.uint16)
    png = io.BytesIO()
    Image.fromarray(gradient).save(png, format="PNG")
    assert Image.open(io.BytesIO(png.getvalue())).mode == "I;16"
    expected = ((gradient.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    for channels in (1, 3):
        decoded = preprocess.decode(png.getvalue(), channels)
        assert decoded.shape == (256, 256, channels) and np.array_equal(decoded[..., 0], expected)
    assert np.array_equal(preprocess.decode(gradient, 1)[..., 0], expected)  # a 16-bit array (TFDS)
    p = preprocess.Preprocess(
        "imagenet", 32, 3, crop=True, flip=False, padding=0, mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD
    )
    assert p.eval(png.getvalue()).mean() < 200  # resized from the scaled image, not from a white one
    # A decompression bomb (PIL's limit lowered, so that a small file is one): unreadable, skipped, named.
    root = folder(tmp_path, train=6, test=3)
    bomb = os.path.join(root, "test", "class_001", "test_000001.jpg")
    Image.new("RGB", (64, 64)).save(bomb, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with open(bomb, "rb") as f:
        with pytest.raises(Image.DecompressionBombError):
            preprocess.decode(f.read(), 3)
    ds = data.load_dataset(parse_args(["--dataset=imagefolder", f"--data_dir={root}", "--image_size=16"]))
    batches = list(Pipeline(ds, 2, seed=0).eval_batches())
    bad = [int(i) for b in batches for i in b["bad"] if i >= 0]
    assert bad == [ds.eval.paths.index(bomb)] and sum(b["mask"].sum() for b in batches) == len(ds.eval) - 1


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
    subprocess."""
    import json
    import subprocess
    import sys

    from train.presets import PRESETS

    runs = []
    for name in sorted(PRESETS):
        size = "--image_size=32" if "imagenet" in name else "--image_size=none"
        args = [
            f"--config={name}",
            *TINY,
            "--num_steps=2",
            "--batch_size=4",
            "--data_workers=0",
            "--width_mult=0.1",
            size,
            "--conv=static",
            f"--workdir={tmp_path / name}",
        ]
        preset = parse_args([f"--config={name}"])
        if preset.conv == "kernelwarehouse":  # its --kw_* options would not apply to --conv=static
            args += [
                f"--{f.name}={'none' if f.default is None else f.default}"
                for f in dataclasses.fields(preset)
                if f.metadata["group"] == "kernelwarehouse"
            ]
        config = parse_args(args)
        assert config.model in name.replace("mobilenetv2", "mobilenet_v2") and config.base_width == 2
        family = {"dycnn": "dynamic", "kw": "kernelwarehouse"}.get(name.split("_")[0], "odconv")
        assert preset.conv == family and (family == "kernelwarehouse" or preset.num_experts == 4)
        runs.append(args)
    out = subprocess.run(
        [sys.executable, "-c", _PRESET_RUNS, json.dumps(runs)],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(results) == [f"--config={name}" for name in sorted(PRESETS)]
    assert all(steps == 2 and np.isfinite(loss) for steps, loss in results.values()), results


def test_step_schedule_and_preset_overrides():
    from train import steps

    config = parse_args(["--warmup_epochs=0", "--config=odconv_resnet18_imagenet", "--learning_rate=0.2"])
    assert (config.learning_rate, config.decay_epochs, config.schedule, config.dropout) == (
        0.2,
        (30.0, 60.0, 90.0),
        "step",
        0.2,
    )
    schedule = steps.learning_rate_schedule(config, 10, 1000)
    assert [round(float(schedule(s)), 6) for s in (0, 299, 300, 599, 600, 900)] == [0.2, 0.2, 0.02, 0.02, 0.002, 0.0002]
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
    rounds = {
        "raw": [bench.raw_rate(root, 32)],
        "raw_at_once": [bench.parallel_raw_rate(root, 16, 1)],
        0: [bench.pipeline_rate(root, 0, 2)],
        1: [bench.pipeline_rate(root, 1, 2)],
    }
    assert all(rates[0] > 0 for rates in rounds.values()), rounds
    run = {"main_mib": 300.0, "largest_child_mib": 200.0}
    rss = {
        n: {
            "pipeline": dict(run, images_per_s=900.0),
            "train": dict(
                run,
                seconds=20.0,
                data_wait_fraction=0.0002,
                host_data_wait_fraction=0.04,
                first_batch_seconds=0.7,
                images_per_s=150.0,
            ),
        }
        for n in (64, 640)
    }
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


def test_dead_child_is_read_without_reaping_it():
    """The watchdog's view of a dead child: its status, read without reaping it (``multiprocessing`` or
    ``subprocess`` still collect it), and a signal named."""
    import signal
    import subprocess
    import sys
    import time

    from train import worker_watchdog as watchdog

    before = watchdog.child_processes()
    failed = subprocess.Popen([sys.executable, "-c", "import os; os._exit(3)"])
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert {failed.pid, killed.pid} <= watchdog.child_processes()
        killed.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len({pid for pid, _ in _dead(watchdog, before)}) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(_dead(watchdog, before)) == sorted([(failed.pid, 3), (killed.pid, -signal.SIGKILL)])
        assert watchdog.dead_child(before | {failed.pid, killed.pid}) is None
        assert (failed.wait(), killed.wait()) == (3, -signal.SIGKILL)  # not reaped by the watchdog
        assert watchdog.dead_child(before) is None
    finally:
        killed.kill()
        killed.wait()
    assert (watchdog.how_it_ended(1), watchdog.how_it_ended(-9)) == ("exited with status 1", "was killed by SIGKILL")


def _dead(watchdog, exclude):
    """Every dead, unreaped child not in ``exclude`` (``dead_child`` gives one at a time)."""
    found = []
    while (dead := watchdog.dead_child(exclude | {pid for pid, _ in found})) is not None:
        found.append(dead)
    return found


def _spawned_workers(pids):
    """The ``multiprocessing`` spawn workers among ``pids`` (their command line runs ``spawn_main``)."""

    def command(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return b""

    return {pid for pid in pids if b"spawn_main" in command(pid)}


def _next_within(iterator, seconds):
    """``next(iterator)`` in a thread: its batch or its exception, or TimeoutError if it hangs."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(next, iterator).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


@pytest.mark.slow
def test_a_killed_worker_ends_the_pipeline_with_a_clear_error(monkeypatch):
    """A grain worker SIGKILLed mid-run (what the out-of-memory killer does): next() raises WorkerDied naming
    the signal and the likely cause, and close() returns. grain's own check finds this death (the watchdog's
    scan is held off here); a death while the worker starts is the script test below."""
    import signal

    from train import worker_watchdog as watchdog

    monkeypatch.setattr(watchdog, "POLL_SECONDS", 120.0)
    pipeline = Pipeline(data.load_dataset(parse_args([])), 64, seed=0, workers=1)
    before = watchdog.child_processes()
    iterator = pipeline.train_iterator(10_000)
    try:
        assert int(_next_within(iterator, 300)["step"][0]) == 0
        (worker,) = _spawned_workers(watchdog.child_processes() - before)  # not multiprocessing's resource tracker
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(watchdog.WorkerDied) as info:
            for _ in range(10):  # the batches already prefetched, then the error
                _next_within(iterator, 60)
        message = str(info.value)
        assert "was killed by SIGKILL" in message and "out-of-memory killer" in message, message
        with pytest.raises(watchdog.WorkerDied):  # and again, at once
            next(iterator)
    finally:
        iterator.close()


_NO_MAIN_GUARD = """
from train import data
from train.config import parse_args
from train.pipeline import Pipeline
pipeline = Pipeline(data.load_dataset(parse_args([])), 64, seed=0, workers=1)
for batch in pipeline.train_iterator(5):  # without `if __name__ == '__main__':` each worker runs this again
    pass
print("all batches")
"""


@pytest.mark.slow
def test_a_script_without_main_guard_fails_instead_of_hanging(tmp_path):
    """The documented mistake: a script that starts grain workers without the `__main__` guard. Its worker
    stops as it starts (it re-imports the script), while the training process writes the pickled pipeline into
    the worker's pipe: without the watchdog the script waits forever."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(_NO_MAIN_GUARD)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": repo},
        cwd=str(tmp_path),
    )
    assert out.returncode != 0 and "all batches" not in out.stdout
    last = out.stderr.strip().splitlines()
    died = [line for line in last if line.startswith("train.worker_watchdog.WorkerDied: ")]
    assert died and "exited with status 1 after 0 batch(es)" in died[0], out.stderr[-3000:]
    assert "if __name__ == '__main__':" in died[0]
