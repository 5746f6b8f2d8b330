"""The command-line tools' usage errors (``python -m train`` options, ``train.evaluate``, ``plot_attention``,
``summary``, ``ablate``): each names the option or file, without a traceback, before any work starts."""

from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "flag",
    [
        "learning_rate",
        "temp_init",
        "temp_final",
        "weight_decay",
        "momentum",
        "label_smoothing",
        "grad_clip_norm",
        "warmup_epochs",
    ],
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nonfinite_flags_name_the_flag(flag, value):
    from train.config import UsageError, parse_args

    with pytest.raises(UsageError, match=rf"^--{flag}=.*: must be a finite number"):
        parse_args([f"--{flag}={value}"])


def test_garbage_config_json_on_resume(tmp_path):
    from train.config import Config, UsageError, from_json
    from train.workdir import check_resumable

    for text, words in [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "holds a JSON list"),
        ('{"bogus_option": 1}', r"has unknown options \['bogus_option'\]"),
    ]:
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(UsageError, match=rf"config.json {words}"):
            check_resumable(str(tmp_path), Config())
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


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"num_examples": -1}, "--num_examples -1 must be >= 1"),
        ({"num_examples": 0}, "--num_examples 0 must be >= 1"),
        ({"input_size": 0}, "--input_size 0 must be >= 1"),
        ({"crop_pct": 0.0}, r"--crop_pct 0.0 must be in \(0, 1\]"),
        ({"crop_pct": -1.0}, r"--crop_pct -1.0 must be in"),
        ({"crop_pct": float("nan")}, "--crop_pct nan must be in"),
        ({"batch_size": 0}, "--batch_size 0 must be >= 1"),
    ],
)
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
