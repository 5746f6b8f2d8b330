"""The GPU benchmark suite (``python -m benchmarks gpu``): its dry run on CPU writes every table, and without a
GPU the real run refuses with exit status 2."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main


def test_gpu_suite_refuses_without_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gpu", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--dry-run" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_gpu_suite_dry_run_writes_every_table(tmp_path):
    main(["gpu", "--dry-run", "--out", str(tmp_path)])
    tables = ("layers", "models", "serving", "memory")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{t}_gpu-dry-run.{ext}" for t in tables for ext in ("json", "md")
    )
    models = json.loads((tmp_path / "models_gpu-dry-run.json").read_text())
    assert models["environment"]["device"] and models["environment"]["suite_seconds"] > 0
    records = models["records"]
    assert {(r["conv"], r["dtype"]) for r in records} == {("static", "bfloat16"), ("condconv", "bfloat16")}
    assert all(r["jax_train_images_per_s"] > 0 and r["jax_serve_images_per_s"] > 0 for r in records)
    assert all(r["torch_train_images_per_s"] > 0 and r["torch_serve_images_per_s"] > 0 for r in records)
    memory = (tmp_path / "memory_gpu-dry-run.md").read_text()
    assert "dry run" in memory and "| resnet18 | condconv | 2 | bfloat16 |" in memory
    layers = json.loads((tmp_path / "layers_gpu-dry-run.json").read_text())["results"]
    assert {kind for kind in layers[0]["jax"]} == {"static", "condconv", "dynamic", "odconv"}
