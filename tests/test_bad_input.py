"""Bad input and faults (docs/reliability.md): every case gets a clear error that names
the argument, file or layer, or the right behaviour; nothing silently wrong; no intact
checkpoint is ever set aside.

Earlier error tests stay beside the code they test (test_jax_layers, test_torch_layers,
test_convert, test_train, test_tools); this module holds the other bad-input cases, the
checkpoint faults (SIGKILL and disk full during a write) and a property test over layer
configurations.

The checkpoint fault tests inject faults inside Orbax through its private modules
(``orbax.checkpoint._src.path.atomicity``: a commit that raises or stalls; ``async_path.rmtree``: a slowed
removal): Orbax has no public hook at those points. Library and tool code use Orbax's public API only
(tests/test_compat.py greps for it).
"""
from __future__ import annotations

import concurrent.futures
import errno
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _helpers import naive_dynamic_conv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- JAX layers


def _layers():
    from dynconv_jax import CondConv, DynamicConv, ODConv
    return (CondConv, DynamicConv, ODConv)


X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 5, 3)), jnp.float32)


def _random_variables(layer, x, seed=0):
    """N(0, 1) parameters (BatchNorm variance 1) drawn by NumPy in the shapes ``jax.eval_shape`` gives
    (the layer's validation runs while tracing; no init is compiled)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.ones(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(layer.init, jax.random.key(seed), x))


@functools.lru_cache(maxsize=None)
def _initialised(cls):
    """``(layer, variables)`` of a 3x3 layer with 4 features for ``X``."""
    layer = cls(features=4, kernel_size=(3, 3))
    return layer, _random_variables(layer, X)


@pytest.mark.parametrize("kernel_size", [(3.5, 3), 3.5, (True, 3)])
def test_float_kernel_size_is_an_error_not_truncated(kernel_size):
    for cls in _layers():
        with pytest.raises(ValueError, match=rf"{cls.__name__} .*kernel_size=.* must be an int or a sequence"):
            cls(features=4, kernel_size=kernel_size).init(jax.random.key(0), X)


def test_bad_temperature_names_the_layer():
    for cls in _layers():
        layer, variables = _initialised(cls)
        for bad in ("hot", object(), 0.0, -1.0, float("nan"), float("inf"), jnp.asarray(0.0), np.float32(-2)):
            with pytest.raises(ValueError, match=rf"{cls.__name__} '<top level>': temperature="):
                layer.apply(variables, X, temperature=bad)


def test_traced_temperature_is_floored_under_jit():
    """A traced T <= 0 or NaN is clamped to TEMPERATURE_FLOOR (no NaN output); +inf gives uniform attention."""
    from dynconv_jax.attention import TEMPERATURE_FLOOR
    for cls in _layers():
        layer, variables = _initialised(cls)
        run = jax.jit(lambda v, x, t: layer.apply(v, x, temperature=t, mutable=["intermediates"]))
        floor_out, floor_sown = run(variables, X, jnp.float32(TEMPERATURE_FLOOR))
        for bad in (0.0, -3.0, float("nan"), 1e-30):
            out, sown = run(variables, X, jnp.float32(bad))
            assert np.all(np.isfinite(out)), (cls.__name__, bad)
            np.testing.assert_array_equal(out, floor_out)
        attention = run(variables, X, jnp.float32(np.inf))[1]["intermediates"]["kernel_attention"][0]
        expected = 0.5 if cls.__name__ == "CondConv" else 1 / attention.shape[-1]  # sigmoid(0) / uniform softmax
        np.testing.assert_allclose(attention, expected, rtol=1e-6)
        # At the floor the attention saturates (hard routing), as T -> 0+ would.
        hard = floor_sown["intermediates"]["kernel_attention"][0]
        assert np.all((hard < 1e-3) | (hard > 1 - 1e-3)), hard


def test_empty_batch_names_the_layer():
    """ODConv with batch 0 in eval raised a ZeroDivisionError from a reshape; all three now say it, as torch does."""
    for cls in _layers():
        layer, variables = _initialised(cls)
        with pytest.raises(ValueError, match=rf"{cls.__name__} .*empty batch"):
            layer.apply(variables, X[:0])


# ----------------------------------------------------------------------------- torch layers and models


def test_torch_layers_name_themselves_for_a_wrong_input_dtype():
    import torch
    from dynconv_torch import CondConv2d, DynamicConv2d, ODConv2d
    for layer in (CondConv2d(3, 4, 3), DynamicConv2d(3, 4, 3), ODConv2d(3, 4, 3)):
        for dtype in (torch.int64, torch.float64):
            with pytest.raises(ValueError, match=rf"^{type(layer).__name__}\(.*input dtype {dtype} differs from the "
                                                 r"layer's parameters \(torch.float32\)"):
                layer(torch.ones(2, 3, 5, 5, dtype=dtype))


def test_models_refuse_num_classes_zero():
    from dynconv_jax import models as jax_models
    from dynconv_torch import models as torch_models
    for name in ("resnet18", "mobilenet_v2"):
        for bad in (0, -1, 2.0, True):
            with pytest.raises(ValueError, match=r"num_classes=.* must be an int >= 1"):
                getattr(jax_models, name)(num_classes=bad)
            with pytest.raises(ValueError, match=r"num_classes=.* must be an int >= 1"):
                getattr(torch_models, name)(num_classes=bad)


# ----------------------------------------------------------------------------- converter


def _dynamic_variables():
    from dynconv_jax import DynamicConv
    return _initialised(DynamicConv)[1]


def test_safetensors_renamed_bin_loads(tmp_path):
    from dynconv_jax.convert import save_safetensors, torch_to_flax
    variables = _dynamic_variables()
    save_safetensors(variables, tmp_path / "m.safetensors")
    os.rename(tmp_path / "m.safetensors", tmp_path / "pytorch_model.bin")
    out = torch_to_flax(str(tmp_path / "pytorch_model.bin"), variables)
    np.testing.assert_array_equal(out["params"]["kernel"], variables["params"]["kernel"])


def test_nonfinite_weights_are_refused_with_their_keys(tmp_path):
    from dynconv_jax.convert import ConversionError, flax_to_torch, save_safetensors, torch_to_flax
    variables = _dynamic_variables()
    state = flax_to_torch(variables)
    state["weight"][0, 0, 0, 0, 0] = float("nan")
    state["attention.fc1.bias"][1] = float("-inf")
    with pytest.raises(ConversionError, match=r"hold NaN/Inf \(2 of 6.*allow_nonfinite=True") as info:
        torch_to_flax(state, variables)
    assert sorted(info.value.problems) == ["attention.fc1.bias [4]", "weight [4, 4, 3, 3, 3]"]
    assert np.isnan(torch_to_flax(state, variables, allow_nonfinite=True)["params"]["kernel"]).any()
    # A .safetensors overwritten in place with the same size: the header still parses, the data is garbage.
    path = tmp_path / "m.safetensors"
    save_safetensors(variables, path)
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")
    raw[data_start:] = b"\xff" * (len(raw) - data_start)  # 0xffffffff is a float32 NaN
    path.write_bytes(bytes(raw))
    with pytest.raises(ConversionError, match=r"hold NaN/Inf \(6 of 6"):
        torch_to_flax(str(path), variables)


def test_flax_to_torch_on_a_shape_only_template():
    from dynconv_jax import DynamicConv
    from dynconv_jax.convert import ConversionError, flax_to_torch
    template = jax.eval_shape(lambda: DynamicConv(4, (3, 3)).init(jax.random.key(0), X))
    with pytest.raises(ConversionError, match=r"6 leaves without values(.|\n)*params:kernel"):
        flax_to_torch(template)


# ----------------------------------------------------------------------------- training CLI and tools


@pytest.mark.parametrize("flag", ["learning_rate", "temp_init", "temp_final", "weight_decay", "momentum",
                                  "label_smoothing", "grad_clip_norm", "warmup_epochs"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nonfinite_flags_name_the_flag(flag, value):
    from train.config import UsageError, parse_args
    with pytest.raises(UsageError, match=rf"^--{flag}=.*: must be a finite number"):
        parse_args([f"--{flag}={value}"])


def test_garbage_config_json_on_resume(tmp_path):
    from train.config import Config, UsageError, from_json
    from train.loop import _check_resumable
    for text, words in [("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list"),
                        ('{"bogus_option": 1}', r"has unknown options \['bogus_option'\]")]:
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(UsageError, match=rf"config.json {words}"):
            _check_resumable(str(tmp_path), Config())
        with pytest.raises(UsageError, match=words):
            from_json(text)


def test_workdir_that_is_a_file(tmp_path):
    from train.config import Config, UsageError
    from train.loop import train_and_evaluate
    path = tmp_path / "run"
    path.write_text("not a directory")
    with pytest.raises(UsageError, match=r"--workdir=.*run' is a file, not a directory"):
        train_and_evaluate(Config(workdir=str(path)))
    assert path.read_text() == "not a directory"


@pytest.mark.parametrize("flag", ["--eval_split=validation", "--train_split=train[:50%]", "--data_dir=/data"])
def test_digits_refuse_split_and_data_dir_flags_they_would_ignore(flag):
    """The embedded digits have one train/test split: a flag they would ignore is an error (the log would
    otherwise call the test split 'validation')."""
    from train.config import UsageError, parse_args
    from train.data import load_dataset
    with pytest.raises(UsageError, match=re.escape(flag.split("=")[0]) + ".* would be ignored"):
        load_dataset(parse_args([flag]))
    assert load_dataset(parse_args([])).name == "digits"


@pytest.mark.parametrize("kwargs, words", [
    ({"num_examples": -1}, "--num_examples -1 must be >= 1"), ({"num_examples": 0}, "--num_examples 0 must be >= 1"),
    ({"input_size": 0}, "--input_size 0 must be >= 1"), ({"crop_pct": 0.0}, r"--crop_pct 0.0 must be in \(0, 1\]"),
    ({"crop_pct": -1.0}, r"--crop_pct -1.0 must be in"), ({"crop_pct": float("nan")}, "--crop_pct nan must be in"),
    ({"batch_size": 0}, "--batch_size 0 must be >= 1")])
def test_evaluate_flags(kwargs, words):
    from train.config import UsageError
    from train.evaluate import evaluate
    with pytest.raises(UsageError, match=words):
        evaluate("tf_efficientnet_cc_b0_4e", "unused.bin", **kwargs)


def test_evaluate_cli_reports_without_traceback(capsys):
    from train.evaluate import main
    assert main(["--model", "tf_efficientnet_cc_b0_4e", "--checkpoint", "x.bin", "--num_examples", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --num_examples -1 must be >= 1") and "Traceback" not in err


def _tree(path):
    return sorted(os.path.relpath(os.path.join(r, n), path) for r, ds, fs in os.walk(path) for n in ds + fs)


def test_plot_attention_on_a_workdir_without_checkpoints(tmp_path, capsys):
    from train.config import Config
    from train.plot_attention import main
    work = tmp_path / "run"
    work.mkdir()
    (work / "config.json").write_text(Config().to_json())
    before = _tree(work)
    assert main(["--workdir", str(work), "--out", str(tmp_path / "plots")]) == 1
    err = capsys.readouterr().err
    assert "error: no checkpoint in" in err and "Traceback" not in err
    assert _tree(work) == before and not (tmp_path / "plots").exists()  # nothing created
    (work / "checkpoints").mkdir()
    (work / "config.json").write_text("{garbage")
    (work / "checkpoints" / "7").mkdir()
    assert main(["--workdir", str(work), "--out", str(tmp_path / "plots")]) == 1
    assert "config.json is not valid JSON" in capsys.readouterr().err


def test_summary_rejects_an_unknown_model(capsys):
    from dynconv_jax.summary import build, main
    with pytest.raises(SystemExit) as exit_info:
        main(["--models", "bogus"])
    assert exit_info.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="model 'bogus': expected one of resnet18"):
        build("bogus", "static", 4, "imagenet", 10)


def test_ablate_rejects_repeated_expert_counts(capsys):
    from train.ablate import _split_args, main
    with pytest.raises(ValueError, match=r"--vary num_experts='1,1': a value is repeated"):
        _split_args(["--ks", "1,1"])
    assert main(["--ks=2,4,2", "--out", "unused"]) == 2
    assert "a value is repeated" in capsys.readouterr().err


# ----------------------------------------------------------------------------- checkpoints


def _state(step, width=3, value=None):
    w = np.full((2, width), step if value is None else value, np.float32)
    return {"step": jnp.asarray(step), "params": {"w": jnp.asarray(w)}, "batch_stats": {}}


def _target(width=3):
    return {"step": 0, "params": {"w": jnp.zeros((2, width))}, "batch_stats": {}}


def _saved(workdir, steps=(1, 2)):
    from train.checkpoint import Checkpointer
    ckpt = Checkpointer(str(workdir), 3)
    for s in steps:
        ckpt.save(s, _state(s), {"running": {"count": s}})
    ckpt.close()


def _damage_arrays(step_dir):
    """Overwrite the array data files of a checkpoint with zeros, in place (same size)."""
    damaged = 0
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":  # Orbax/OCDBT data files
            for name in files:
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    f.write(b"\x00" * os.path.getsize(path))
                damaged += 1
    assert damaged, "no array data file found"


def test_restore_normalises_dtypes_under_x64(tmp_path):
    """Saved without x64 (step int32), restored with JAX_ENABLE_X64=1 (template int64): intact, nothing moved."""
    _saved(tmp_path)
    code = ("import jax.numpy as jnp, numpy as np, sys\n"
            "from train.checkpoint import Checkpointer\n"
            "c = Checkpointer(sys.argv[1], 3)\n"
            "step, state, meta = c.restore_latest({'step': jnp.asarray(0), 'params': {'w': jnp.zeros((2, 3))},"
            " 'batch_stats': {}})\n"
            "print(step, state['step'].dtype, state['params']['w'].dtype, float(state['params']['w'][0, 0]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "JAX_ENABLE_X64": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "int64", "float64", "2.0"], out.stdout + out.stderr
    assert "WARNING" not in out.stderr and not (tmp_path / "corrupt_checkpoints").exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]


def test_structure_mismatch_names_keys_and_moves_nothing(tmp_path):
    from train.checkpoint import Checkpointer, CheckpointMismatch
    _saved(tmp_path)
    ckpt = Checkpointer(str(tmp_path), 3)
    target = {"step": 0, "params": {"w": jnp.zeros((2, 4)), "b": jnp.zeros(2)}, "batch_stats": {}}
    with pytest.raises(CheckpointMismatch, match=r"step 2 .* is intact but does not fit(.|\n)*every checkpoint was "
                                                 r"left in place(.|\n)*differs: \['params'\]\['w'\] stored "
                                                 r"float32\[2, 3\], current float32\[2, 4\](.|\n)*missing in the "
                                                 r"checkpoint: \['params'\]\['b'\]"):
        ckpt.restore_latest(target)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_damaged_checkpoint_is_moved_and_the_previous_restored(tmp_path, capfd):
    from train.checkpoint import Checkpointer
    _saved(tmp_path)
    _damage_arrays(tmp_path / "checkpoints" / "2")
    ckpt = Checkpointer(str(tmp_path), 3)
    step, state, meta = ckpt.restore_latest(_target())
    ckpt.close()
    assert (step, float(state["params"]["w"][0, 0]), meta["running"]) == (1, 1.0, {"count": 1})
    assert "checkpoint step 2" in capfd.readouterr().err
    assert os.listdir(tmp_path / "checkpoints") == ["1"] and os.listdir(tmp_path / "corrupt_checkpoints") == ["2"]


def test_read_only_checkpointer_moves_and_creates_nothing(tmp_path, capfd):
    from train.checkpoint import Checkpointer
    ckpt = Checkpointer(str(tmp_path / "empty"), 3, read_only=True)
    assert ckpt.all_steps() == [] and ckpt.restore_latest(_target()) is None
    ckpt.close()
    assert not (tmp_path / "empty").exists()
    _saved(tmp_path / "run")
    _damage_arrays(tmp_path / "run" / "checkpoints" / "2")
    before = _tree(tmp_path / "run")
    ckpt = Checkpointer(str(tmp_path / "run"), 3, read_only=True)
    assert ckpt.restore_latest(_target())[0] == 1
    ckpt.close()
    assert "left it in place (read-only)" in capfd.readouterr().err and _tree(tmp_path / "run") == before


def test_environment_error_is_not_corruption(tmp_path, monkeypatch):
    from train.checkpoint import Checkpointer, CheckpointError
    _saved(tmp_path)
    ckpt = Checkpointer(str(tmp_path), 3)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "checkpoints" / "2"))

    monkeypatch.setattr(ckpt.manager, "restore", denied)
    with pytest.raises(CheckpointError, match=r"cannot read the metadata of checkpoint step 2 .*Permission denied.*"
                                              r"left in place"):
        ckpt.restore_latest(_target())
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    assert not (tmp_path / "corrupt_checkpoints").exists()


@pytest.mark.parametrize("process_index", [0, 1])
def test_quarantine_with_several_processes(tmp_path, monkeypatch, process_index):
    """Every process waits for process 0's removal of unfinished writes (none here) when it opens the run; then
    every process checks, waits at a barrier, process 0 alone moves, all wait again, then go on."""
    from train import checkpoint as ckpt_lib
    _saved(tmp_path)
    _damage_arrays(tmp_path / "checkpoints" / "2")
    barriers = []
    monkeypatch.setattr(ckpt_lib, "_sync", lambda name: barriers.append(
        (name, sorted(os.listdir(tmp_path / "checkpoints")))))
    monkeypatch.setattr(jax, "process_index", lambda: process_index)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), 3)
    assert ckpt.restore_latest(_target())[0] == 1
    ckpt.close()
    moved_by_me = ["1"] if process_index == 0 else ["1", "2"]
    assert barriers == [("dynconv-remove-unfinished-writes", ["1", "2"]), ("dynconv-quarantine-2-checked", ["1", "2"]),
                        ("dynconv-quarantine-2-moved", moved_by_me)]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch, asynchronous):
    """Disk full simulated by fault injection: the commit step of Orbax's atomic write raises ENOSPC (in the
    background thread when asynchronous: raised by the next wait)."""
    from orbax.checkpoint._src.path import atomicity
    from train.checkpoint import Checkpointer, CheckpointWriteError
    _saved(tmp_path, steps=(1,))

    async def disk_full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
    ckpt = Checkpointer(str(tmp_path), 3, asynchronous=asynchronous)
    with pytest.raises(CheckpointWriteError, match=r"could not write the checkpoint of step 2 .*\(disk full\).*No space "
                                                   r"left on device.*the earlier checkpoints \(\[1\]\) are untouched"):
        ckpt.save(2, _state(2), {"running": {}})
        ckpt.wait()  # asynchronous: the background failure is raised here
    if asynchronous:  # or described by the loop's error messages ("Last good checkpoint: ...")
        ckpt.save(2, _state(2), {"running": {}})
        assert re.match(r"step 1 in .* \(could not write the checkpoint of step 2 .*\(disk full\)", ckpt.last_good())
    monkeypatch.undo()
    assert os.listdir(tmp_path / "checkpoints") == ["1"]  # the temporary directory was removed
    assert ckpt.restore_latest(_target())[0] == 1
    ckpt.save(2, _state(2), {"running": {}})  # the next write works
    ckpt.wait()
    assert ckpt.all_steps() == [1, 2] and ckpt.latest_committed == 2
    ckpt.close()


_DISK_FULL = """
import os, sys, numpy as np
from train.checkpoint import Checkpointer, CheckpointWriteError
def state(s):
    return {"step": np.int32(s), "params": {"w": np.random.default_rng(s).normal(size=40_000).astype(np.float32)}}

target = {"step": 0, "params": {"w": np.zeros(40_000, np.float32)}}
c = Checkpointer(sys.argv[1], 3, asynchronous=True)  # as the training loop writes
c.save(1, state(1), {})
try:
    c.save(2, state(2), {})  # waits for step 1's write
    c.wait()
    print("SAVED 2 (the file system was not full)")
except CheckpointWriteError as error:
    print("WRITE ERROR", error)
print("LEFT", sorted(os.listdir(os.path.join(sys.argv[1], "checkpoints"))))
step, restored, _ = c.restore_latest(target)
print("RESTORED", step, np.array_equal(restored["params"]["w"], state(1)["params"]["w"]))
"""


def test_disk_full_on_a_small_tmpfs(tmp_path):
    """A real full disk: a 256 KiB tmpfs (mounted in a private user+mount namespace) holds one checkpoint, not two."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=256k tmpfs {mount}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({probe.stderr.strip()})")
    script = f'mount -t tmpfs -o size=256k tmpfs "$1" && exec "{sys.executable}" -c "$2" "$1/run"'
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(mount), _DISK_FULL], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert re.search(r"WRITE ERROR could not write the checkpoint of step 2 to .* \(disk full\) .*No space left on "
                     r"device.*earlier checkpoints \(\[1\]\) are untouched", out.stdout), out.stdout + out.stderr
    assert "LEFT ['1']" in out.stdout and "RESTORED 1 True" in out.stdout, out.stdout + out.stderr


_KILLED_WRITER = """
import sys, time, numpy as np
from train.checkpoint import Checkpointer
mode, workdir = sys.argv[1:3]
state = lambda s: {"step": np.int32(s), "params": {"w": np.full(4_000_000, s, np.float32)}}
c = Checkpointer(workdir, 3)
c.save(1, state(1), {})
if mode == "commit":
    from orbax.checkpoint._src.path import atomicity
    async def stall(self):
        print("COMMITTING", flush=True)
        time.sleep(300)
    atomicity.AtomicRenameTemporaryPath.finalize = stall
print("SAVING 2", flush=True)
c.save(2, state(2), {})
print("SAVED 2", flush=True)
"""


@pytest.mark.parametrize("mode", ["write", "commit"])
def test_sigkill_during_a_checkpoint_write(tmp_path, mode):
    """SIGKILL while step 2 is written (as soon as its temporary directory appears), or just before its
    commit: step 1 stays intact and restores, the temporary is cleaned up when the run is reopened."""
    from train.checkpoint import Checkpointer
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, mode, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wait_for = "COMMITTING" if mode == "commit" else "SAVING 2"
    for line in proc.stdout:
        if line.startswith(wait_for):
            break
    deadline = time.time() + 60
    while mode == "write" and not any(".orbax-checkpoint-tmp" in n for n in os.listdir(tmp_path / "checkpoints")):
        assert time.time() < deadline and proc.poll() is None, "the write of step 2 never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path / "checkpoints")
    assert "1" in left and "2" not in left and any(".orbax-checkpoint-tmp" in n for n in left), left
    ckpt = Checkpointer(str(tmp_path), 3)
    step, state, _ = ckpt.restore_latest({"step": 0, "params": {"w": np.zeros(4_000_000, np.float32)}})
    ckpt.close()
    assert step == 1 and float(state["params"]["w"][-1]) == 1.0
    assert os.listdir(tmp_path / "checkpoints") == ["1"] and not (tmp_path / "corrupt_checkpoints").exists()


def test_reopening_a_run_removes_unfinished_writes_before_it_returns(tmp_path, monkeypatch):
    """A run opened, read and closed (no save) leaves no temporary of an unfinished write behind: the Checkpointer
    removes them before it returns. Orbax's own removal (cleanup_tmp_directories) runs in a background thread that
    only its next save waits for; made slow here, it would still be running at the end (CI once caught it)."""
    import asyncio

    from orbax.checkpoint._src.path import async_path

    from train.checkpoint import Checkpointer
    _saved(tmp_path, steps=(1,))
    shutil.copytree(tmp_path / "checkpoints" / "1", tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp")
    remove = async_path.rmtree

    async def slow_remove(path):
        await asyncio.sleep(2)
        await remove(path)

    monkeypatch.setattr(async_path, "rmtree", slow_remove)
    ckpt = Checkpointer(str(tmp_path), 3)
    assert os.listdir(tmp_path / "checkpoints") == ["1"]
    step, _, _ = ckpt.restore_latest(_target())
    ckpt.close()
    assert step == 1 and os.listdir(tmp_path / "checkpoints") == ["1"]


def test_resume_after_every_checkpoint_was_quarantined(tmp_path, capfd, monkeypatch):
    """--resume refuses to restart from step 0 once every checkpoint failed its check, unless --allow_restart
    (a stand-in state replaces the model's, and the run stops right after that decision: nothing compiles)."""
    from train import loop
    from train.checkpoint import Checkpointer, CheckpointError, NoIntactCheckpoint
    from train.config import parse_args
    from train.loop import train_and_evaluate

    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    def stand_in(*args):  # an init that compiles nothing; no steps
        init = concurrent.futures.Future()
        init.set_result(lambda key: {"params": _target()["params"]})
        return init, None, None

    monkeypatch.setattr(loop.metrics_lib, "MetricsWriter", started)
    monkeypatch.setattr(loop, "_compile_ahead", stand_in)
    work = tmp_path / "run"
    args = ["--base_width=2", "--conv=static", "--batch_size=32", "--export=false", "--tensorboard=false",
            "--progress=false", f"--workdir={work}", "--num_steps=2", "--checkpoint_every_steps=2", "--resume"]
    work.mkdir()
    (work / "config.json").write_text(parse_args(args).to_json())
    ckpt = Checkpointer(str(work), 3)
    ckpt.save(2, _state(2), {"running": {}})
    ckpt.close()
    meta_dir = work / "checkpoints" / "2" / "meta"
    for path in meta_dir.iterdir():
        if path.is_file():
            path.write_text("{damaged")
    with pytest.raises(NoIntactCheckpoint, match=r"checkpoint step 2 .* is damaged: its metadata cannot be read"
                                                 r"(.|\n)*pass --allow_restart"):
        train_and_evaluate(parse_args(args))
    assert os.listdir(work / "corrupt_checkpoints") == ["2"]
    with pytest.raises(CheckpointError, match=r"steps \['2'\] failed their integrity check .*pass --allow_restart"):
        train_and_evaluate(parse_args(args))
    with pytest.raises(Started):
        train_and_evaluate(parse_args(args + ["--allow_restart"]))
    assert "--resume: no checkpoint in" in capfd.readouterr().out and "starting from step 0"


def test_a_run_that_stops_with_an_error_closes_what_it_opened(tmp_path, monkeypatch):
    """An error before the first step (the metrics writer's) or in a step (after the data workers started)
    still closes the asynchronous checkpointer and stops the grain workers: a notebook or a sweep that calls
    ``train_and_evaluate`` again keeps no Orbax threads or orphaned worker processes. A stand-in state and
    stand-in steps replace the model's: nothing compiles."""
    import multiprocessing

    from train import loop
    from train.checkpoint import Checkpointer
    from train.config import parse_args
    from train.loop import train_and_evaluate

    closed, workers = [], []
    close = Checkpointer.close
    monkeypatch.setattr(Checkpointer, "close", lambda self: (closed.append(self.directory), close(self))[1])

    def failing_step(*args):
        workers.extend(multiprocessing.active_children())
        raise RuntimeError("device lost")

    def stand_in(*args):
        init, step = concurrent.futures.Future(), concurrent.futures.Future()
        init.set_result(lambda key: {"params": _target()["params"]})
        step.set_result(failing_step)
        return init, step, step

    monkeypatch.setattr(loop, "_compile_ahead", stand_in)
    args = ["--base_width=2", "--conv=static", "--batch_size=32", "--export=false", "--tensorboard=false",
            "--progress=false", "--num_steps=2", "--data_workers=1"]

    def failing_writer(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(loop.metrics_lib, "MetricsWriter", failing_writer)
        with pytest.raises(OSError, match="disk full"):
            train_and_evaluate(parse_args(args + [f"--workdir={tmp_path / 'writer'}"]))
    assert closed == [str(tmp_path / "writer" / "checkpoints")]
    with pytest.raises(RuntimeError, match="device lost"):
        train_and_evaluate(parse_args(args + [f"--workdir={tmp_path / 'step'}"]))
    assert closed[1:] == [str(tmp_path / "step" / "checkpoints")]
    assert workers and "grain" in workers[0].name  # the step ran after the worker process started
    for worker in workers:
        worker.join(timeout=30)
        assert not worker.is_alive(), worker


# ----------------------------------------------------------------------------- property test over layer configs


def _check_config(cls_name, rank, kernel, strides, dilation, padding, groups, in_ch, feat, experts, batch, spatial,
                  seed):
    """Run one configuration; returns 'ok' or 'error'. Asserts the invariants of the property."""
    from dynconv_jax import CondConv, DynamicConv, ODConv
    cls = {"CondConv": CondConv, "DynamicConv": DynamicConv, "ODConv": ODConv}[cls_name]
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(batch, *spatial, in_ch)), jnp.float32)
    layer = cls(features=feat, kernel_size=kernel, strides=strides, kernel_dilation=dilation, padding=padding,
                feature_group_count=groups, num_experts=experts)
    try:
        variables = _random_variables(layer, x, seed)
        y, sown = layer.apply(variables, x, mutable=["intermediates"])
    except ValueError as error:  # never another type; always naming the layer
        assert str(error).startswith(f"{cls_name} '"), str(error)
        return "error: " + str(error)
    assert np.all(np.isfinite(y)), "NaN/Inf for a finite input"
    att = {k: v[0] for k, v in sown["intermediates"].items()}
    params = variables["params"]
    lax_padding = padding if isinstance(padding, str) else [tuple(p) for p in padding]
    ref = naive_dynamic_conv(x, params["kernel"], att["kernel_attention"], att.get("spatial_attention"),
                             att.get("channel_attention"), att.get("filter_attention"), params.get("bias"),
                             strides=strides, padding=lax_padding, dilation=dilation, groups=groups)
    np.testing.assert_allclose(y, ref, rtol=2e-4, atol=2e-5)
    return "ok"


def test_layer_configs_run_exactly_or_raise_a_named_value_error():
    """Hypothesis: every layer configuration (valid or not) either equals the naive per-sample loop,
    finite, or raises a ValueError that names the layer."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    outcomes = []

    @st.composite
    def configs(draw):
        rank = draw(st.sampled_from([1, 2]))
        groups = draw(st.sampled_from([1, 1, 2, 3]))
        config = dict(
            cls_name=draw(st.sampled_from(["CondConv", "DynamicConv", "ODConv"])), rank=rank,
            kernel=tuple(draw(st.integers(1, 3)) for _ in range(rank)),
            strides=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
            dilation=tuple(draw(st.integers(1, 2)) for _ in range(rank)),
            padding=draw(st.one_of(st.sampled_from(["SAME", "VALID"]),
                                   st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2))] * rank))),
            groups=groups, in_ch=groups * draw(st.integers(1, 3)), feat=groups * draw(st.integers(1, 2)),
            experts=draw(st.integers(1, 3)), batch=draw(st.integers(1, 2)),
            spatial=tuple(draw(st.integers(1, 6)) for _ in range(rank)), seed=draw(st.integers(0, 2 ** 16)))
        # About one in three configurations gets one bad value (too small inputs come on their own).
        bad = draw(st.sampled_from([None] * 9 + ["kernel", "groups", "in_ch", "experts", "batch"]))
        if bad == "kernel":
            config["kernel"] = (draw(st.sampled_from([0, -1, 2.5, 1.0, "3", None])),) + config["kernel"][1:]
        elif bad is not None:
            config[bad] = draw(st.sampled_from({"groups": [0, -2, 4], "in_ch": [5, 7], "experts": [0, -1],
                                                "batch": [0]}[bad]))
        return config

    @hypothesis.settings(max_examples=30, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(configs())
    def check(config):
        outcomes.append(_check_config(**config))

    check()
    errors = [o for o in outcomes if o.startswith("error")]
    assert outcomes.count("ok") >= 8 and len(errors) >= 4, "\n".join(outcomes)  # both sides were exercised
