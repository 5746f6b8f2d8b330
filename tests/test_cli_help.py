"""The command lines explain themselves: ``--help`` describes every option, typos get the closest name."""

from __future__ import annotations

import dataclasses
import importlib
import re

import pytest

from train import __main__ as train_main
from train.config import GROUPS, Config, UsageError, build_parser, parse_args
from train.presets import PRESETS


def help_entries(text: str) -> dict:
    """``{'--option': 'its help text'}`` from argparse's help output (the entries of its sections)."""
    entries, current = {}, None
    for line in text.splitlines():
        entry = re.match(r"^  (\S.*?)(?:\s{2,}(\S.*))?$", line)
        if entry and not line.startswith("   "):
            names = re.findall(r"(?:^|, )(--?[\w-]+)", entry.group(1))
            current = names[-1] if names else entry.group(1).split(" ")[0]
            entries[current] = entry.group(2) or ""
        elif current and line.startswith("    ") and line.strip():
            entries[current] = (entries[current] + " " + line.strip()).strip()
        elif not line.strip() or not line.startswith(" "):
            current = None
    return entries


def test_train_help_describes_every_option_with_its_default_in_its_group(capsys):
    assert train_main.main(["--help"]) == 0
    text = capsys.readouterr().out
    entries = help_entries(text)
    fields = dataclasses.fields(Config)
    for field in fields:
        described = entries.get(f"--{field.name}", "")
        assert field.metadata["help"].split(" (")[0][:30] in " ".join(described.split()), field.name
        assert "(default: " in described, field.name
    # Each option under its group's title, the groups in their order.
    titles = [text.index(f"\n{title}:\n") for title in GROUPS.values()]
    assert titles == sorted(titles)
    for field in fields:
        group = list(GROUPS).index(field.metadata["group"])
        end = titles[group + 1] if group + 1 < len(titles) else len(text)
        assert titles[group] < text.index(f"\n  --{field.name} ") < end, field.name
    for name in PRESETS:
        assert re.search(rf"^  {name}\s+\S", text, re.M), name
    assert "docs/training.md" in text
    assert {f.metadata["group"] for f in fields} == set(GROUPS)


def test_unknown_option_names_the_closest_and_exits_2(capsys):
    assert train_main.main(["--epochs=2"]) == 2
    assert "unknown option --epochs; did you mean --num_epochs?" in capsys.readouterr().err
    for typo, closest in [
        ("--num_epoch=3", "--num_epochs"),
        ("--learning-rte=0.1", "--learning_rate"),
        ("--confg=odconv_resnet18_cifar10", "--config"),
    ]:
        with pytest.raises(UsageError, match=f"did you mean {closest}\\?"):
            parse_args([typo])
    with pytest.raises(UsageError, match="unknown option --zzz; python -m train --help"):
        parse_args(["--zzz=1"])


def test_key_value_forms():
    config = parse_args(
        [
            "--num_epochs",
            "3",
            "--resume",
            "--nesterov=false",
            "--batch-size=8",
            "--dropout=none",
            "--decay_epochs=2,4",
            "--schedule=step",
        ]
    )
    assert (
        config.num_epochs,
        config.resume,
        config.nesterov,
        config.batch_size,
        config.dropout,
        config.decay_epochs,
    ) == (3, True, False, 8, None, (2.0, 4.0))
    assert parse_args([]) == Config()
    with pytest.raises(UsageError, match="--config given 2 times"):
        parse_args(["--config=odconv_resnet18_cifar10", "--config", "odconv_resnet18_cifar10"])
    assert build_parser().prog == "python -m train"


# Each tool's main(["--help"]) prints its options; every one must say what it does.
TOOLS = [
    "train.evaluate",
    "train.export",
    "train.plot_attention",
    "train.make_imagefolder",
    "train.make_digits",
    "parity.__main__",
    "parity.sensitivity",
    "parity.mutants",
    "benchmarks.__main__",
    "dynconv_jax.summary",
]


@pytest.mark.parametrize("module", TOOLS)
def test_tool_help_describes_every_option(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--help"])
    assert exit_info.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    assert entries
    assert not [name for name, text in entries.items() if not text], entries
