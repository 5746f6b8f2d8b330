"""Write ``tests/data/official_kw_models.json.gz`` from an OSVAI/KernelWarehouse checkout (not run by the tests).

    python tests/data/make_official_kw.py /path/to/KernelWarehouse [--verify-full]

The file holds, measured by running the official code (its ``models/`` and ``modules/``; timm is
replaced by a stand-in for ``DropPath`` and ``register_model`` when it is not installed):

- ``manifests``: for every official config of :data:`dynconv_spec.kernelwarehouse.OFFICIAL_CONFIGS`,
  the state_dict keys and shapes and the parameter count (num_classes=1000);
- ``golden``: small official models (:data:`GOLDEN`), their state_dicts filled by
  :func:`fill_state_dict` (seeded, in sorted key order, float64), run on a seeded input in float64
  at warm-up tau = 1, 0.5, 0, each tau with the BatchNorms calibrated on that input
  (:func:`calibrate_batchnorms`) and then in eval and train mode: the logits, the sums of every
  BatchNorm's running statistics at the end, and each value's reproducibility floor
  (:func:`golden_with_floors`). ``tests/test_kernelwarehouse.py`` builds
  the same models from ``dynconv_torch``, fills them the same way and compares.

``--verify-full`` also compares the full official configs with ``dynconv_torch``'s entry points
the same way, single-threaded (slow), and records the worst relative error of each.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import pathlib
import subprocess
import sys
import types

import torch
from torch import nn

HERE = pathlib.Path(__file__).parent
OUT = HERE / "official_kw_models.json.gz"
TAUS = (1.0, 0.5, 0.0)
#: The golden models: (official class, its arguments) and the same model in dynconv_torch.
GOLDEN = {
    "resnet_basic_2111_1d2x": dict(
        arch="resnet",
        block="basic",
        layers=[2, 1, 1, 1],
        kw=dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5, sharing_range="layer_conv"),
    ),
    "resnet_basic_2111_1x": dict(
        arch="resnet", block="basic", layers=[2, 1, 1, 1], kw=dict(cell_num_ratio=1.0, sharing_range="layer_conv")
    ),
    "resnet_basic_1111_4x": dict(
        arch="resnet", block="basic", layers=[1, 1, 1, 1], kw=dict(cell_num_ratio=4.0, sharing_range="layer_conv")
    ),
    "resnet_bottleneck_1111_1d2x_basis": dict(
        arch="resnet",
        block="bottleneck",
        layers=[1, 1, 1, 1],
        kw=dict(
            cell_num_ratio=0.5,
            cell_inplane_ratio=0.5,
            cell_outplane_ratio=0.5,
            sharing_range="layer_conv",
            nonlocal_basis_ratio=0.0625,
        ),
    ),
    "mobilenetv2_025_1x": dict(
        arch="mobilenet_v2", width_mult=0.25, kw=dict(cell_num_ratio=1.0, sharing_range=["layer", "pwconv"])
    ),
    "mobilenetv2_025_4x": dict(
        arch="mobilenet_v2", width_mult=0.25, kw=dict(cell_num_ratio=4.0, sharing_range=["layer"])
    ),
    "mobilenetv2_025_1d2x": dict(
        arch="mobilenet_v2",
        width_mult=0.25,
        kw=dict(cell_num_ratio=0.5, cell_inplane_ratio=0.5, cell_outplane_ratio=0.5, sharing_range=["layer"]),
    ),
}
NUM_CLASSES = 10
INPUT_SHAPE = (8, 3, 32, 32)
SEED = 0
#: Threads of the second run that measures each golden value's reproducibility floor.
FLOOR_THREADS = 3


def fill_state_dict(model: nn.Module, seed: int) -> None:
    """Fill every floating-point entry of ``model``'s state_dict (already float64), in sorted key order,
    from ``torch.Generator().manual_seed(seed)``: running variances ``0.5 + 0.5 |n|``, BatchNorm
    weights ``1 + 0.2 n``, everything else ``0.3 n`` (n standard normal)."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for key in sorted(state):
            value = state[key]
            if not value.dtype.is_floating_point:
                continue
            n = torch.randn(value.shape, generator=generator, dtype=torch.float64)
            if key.endswith("running_var"):
                n = 0.5 + 0.5 * n.abs()
            elif key.endswith("weight") and value.dim() == 1:  # BatchNorm weights
                n = 1.0 + 0.2 * n
            else:
                n = 0.3 * n
            value.copy_(n)


def calibrate_batchnorms(model: nn.Module, x: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to the batch statistics of ``model(x)`` in train mode
    (momentum 1 for one forward), so that eval mode sees well-scaled activations."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def run_golden(model: nn.Module, set_tau, seed: int = SEED) -> dict:
    """The golden procedure on a float64 ``model``: fill; per tau, calibrate the BatchNorms at that tau, then
    an eval and a train forward on one seeded input; returns the logits and the per-BatchNorm sums of the
    running statistics at the end."""
    fill_state_dict(model, seed)
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    logits = {}
    with torch.no_grad():
        for tau in TAUS:
            set_tau(model, tau)
            calibrate_batchnorms(model, x)
            for mode in ("eval", "train"):
                getattr(model, mode)()
                logits[f"{mode}_tau{tau:g}"] = model(x).tolist()
    stats = {
        name: [m.running_mean.sum().item(), m.running_var.sum().item()]
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    return {"logits": logits, "running_stat_sums": stats}


def relative_error(got, ref) -> float:
    """``max|got - ref| / max|ref|`` of two nested lists of floats (float64)."""
    got, ref = torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    return ((got - ref).abs().max() / ref.abs().max()).item()


def golden_with_floors(build, set_tau) -> dict:
    """:func:`run_golden` single-threaded, and its reproducibility floors: the relative difference of the same
    procedure run with :data:`FLOOR_THREADS` threads (the same code, another summation order). A randomly
    filled deep network in train mode amplifies rounding (measured: up to ~1e-6 in the MobileNetV2 models,
    ~1e-13 in the ResNets); the test allows ten times the floor, at least 1e-12."""
    runs = []
    for threads in (1, FLOOR_THREADS):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        runs.append(run_golden(build().double(), set_tau))
    reference, other = runs
    floors = {key: relative_error(other["logits"][key], value) for key, value in reference["logits"].items()}
    floors["running_stat_sums"] = relative_error(
        list(other["running_stat_sums"].values()), list(reference["running_stat_sums"].values())
    )
    return {**reference, "floors": floors}


def load_official(checkout: str) -> dict:
    """The official model modules, imported from ``checkout``."""
    try:
        import timm.models.layers  # noqa: F401
    except ImportError:  # the official models import only DropPath (unused at drop_path_rate 0) and register_model
        timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
        layers, registry = types.ModuleType("timm.models.layers"), types.ModuleType("timm.models.registry")
        layers.DropPath = lambda p=0.0: nn.Identity()
        registry.register_model = lambda f: f
        timm.models, models.layers, models.registry = models, layers, registry
        sys.modules.update(
            {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}
        )
    sys.path.insert(0, checkout)
    package = types.ModuleType("models")
    package.__path__ = [str(pathlib.Path(checkout) / "models")]
    sys.modules["models"] = package
    return {name: importlib.import_module(f"models.{name}") for name in ("kw_resnet", "kw_mobilenetv2")}


def official_golden_model(official: dict, spec: dict) -> nn.Module:
    if spec["arch"] == "resnet":
        module = official["kw_resnet"]
        block = {"basic": module.BasicBlock, "bottleneck": module.Bottleneck}[spec["block"]]
        return module.KW_ResNet(block, spec["layers"], num_classes=NUM_CLASSES, dropout=0.0, **spec["kw"])
    return official["kw_mobilenetv2"].KW_MobileNetV2(
        num_classes=NUM_CLASSES, width_mult=spec["width_mult"], **spec["kw"]
    )


def official_set_tau(model: nn.Module, tau: float) -> None:
    model.net_update_temperature(tau)


def official_entry_points(official: dict) -> dict:
    """The official registered entry points by name."""
    resnet, mobilenet = official["kw_resnet"], official["kw_mobilenetv2"]
    return {
        "kw_resnet18": resnet.kw_resnet18,
        "kw_resnet50": resnet.kw_resnet50,
        "kw_mobilenetv2_050": mobilenet.kw_mobilenetv2_050,
        "kw_mobilenetv2_100": mobilenet.kw_mobilenetv2_100,
    }


def manifests(official: dict) -> dict:
    from dynconv_spec.kernelwarehouse import OFFICIAL_CONFIGS, config_model_args

    entry = official_entry_points(official)
    out = {}
    for config in OFFICIAL_CONFIGS:
        name, args = config_model_args(config)
        model = entry[name](**args)
        out[config] = {
            "model": name,
            "args": args,
            "num_params": sum(p.numel() for p in model.parameters()),
            "state_dict": {k: list(v.shape) for k, v in model.state_dict().items()},
        }
    return out


def verify_full(official: dict) -> dict:
    """Worst relative logit error of dynconv_torch's entry points against the official full configs."""
    from dynconv_spec.kernelwarehouse import OFFICIAL_CONFIGS, config_model_args
    from dynconv_torch import models, set_temperature

    entry = official_entry_points(official)
    out = {}
    for config in OFFICIAL_CONFIGS:
        name, args = config_model_args(config)
        torch.set_num_threads(1)
        theirs = run_golden(entry[name](**args, num_classes=NUM_CLASSES, dropout=0.0).double(), official_set_tau)
        ours = run_golden(
            models.create_model(name, **args, num_classes=NUM_CLASSES, dropout=0.0).double(), set_temperature
        )
        worst = max(relative_error(ours["logits"][key], ref) for key, ref in theirs["logits"].items())
        out[config] = worst
        print(f"{config}: worst relative logit error {worst:.1e}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", help="path of an OSVAI/KernelWarehouse checkout")
    parser.add_argument("--verify-full", action="store_true", help="also compare the full official configs (slow)")
    args = parser.parse_args(argv)
    commit = subprocess.run(
        ["git", "-C", args.checkout, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    official = load_official(args.checkout)
    data = {
        "source": f"OSVAI/KernelWarehouse commit {commit}, models/kw_resnet.py, models/kw_mobilenetv2.py, "
        f"modules/kernel_warehouse.py, run with torch {torch.__version__}",
        "golden_procedure": {
            "num_classes": NUM_CLASSES,
            "input_shape": list(INPUT_SHAPE),
            "seed": SEED,
            "taus": list(TAUS),
            "dtype": "float64",
        },
        "manifests": manifests(official),
        "golden": {},
    }
    for name, spec in GOLDEN.items():
        data["golden"][name] = {
            "spec": spec,
            **golden_with_floors(lambda: official_golden_model(official, spec), official_set_tau),
        }
        print(f"{name}: floors {data['golden'][name]['floors']}", file=sys.stderr)
    if args.verify_full:
        data["verified_full_configs"] = verify_full(official)
    OUT.write_bytes(gzip.compress(json.dumps(data, sort_keys=True).encode(), mtime=0))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
