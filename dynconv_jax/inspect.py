"""Inspect the routing of dynamic convolutions: collect per-layer attentions, plot them.

Every ``dynconv_jax`` layer sows its attentions into the ``intermediates`` collection
(see DESIGN.md): ``kernel_attention [B, K]`` (CondConv's sigmoid routing, Yang et al.,
NeurIPS 2019; DynamicConv's softmax attention, Chen et al., CVPR 2020; ODConv's kernel
attention, Li et al., ICLR 2022) and, for ODConv, ``channel_attention [B, Cin]``,
``filter_attention [B, Cout]``, ``spatial_attention [B, *k]``.

:func:`collect_attentions` runs a model and returns them as plain numpy arrays per layer,
``{layer_path: {name: array [B, ...]}}``. The plotting functions take that dict, whatever
framework produced it (``dynconv_torch.inspect.collect_attentions`` returns the same
structure from PyTorch forward hooks), and write PNG files. matplotlib is imported only
inside the plotting functions, through its object-oriented API (no pyplot, no global
backend change).
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

ATTENTION_NAMES = ("kernel_attention", "channel_attention", "filter_attention", "spatial_attention")
ROOT = "<root>"  # the layer path of a model that is itself a single dynamic layer

Attentions = Dict[str, Dict[str, np.ndarray]]


def attentions_from_intermediates(intermediates: Mapping[str, Any]) -> Attentions:
    """Per-layer attentions from an ``intermediates`` collection.

    Walks the nested collection; every module that sowed one of :data:`ATTENTION_NAMES`
    becomes an entry keyed by its ``/``-joined path (``'layer1_0/conv1'``; :data:`ROOT`
    for the top module). A layer applied several times has its sown values concatenated
    along the batch axis. Order follows the collection (module creation order).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from dynconv_jax import CondConv, ODConv
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=False, temperature=None):
      ...         x = ODConv(8, (3, 3), num_experts=3, name="od")(x, train=train, temperature=temperature)
      ...         return CondConv(8, (1, 1), num_experts=2, name="cc")(x, temperature=temperature)
      >>> x = jax.random.normal(jax.random.key(0), (4, 8, 8, 4))
      >>> variables = Net().init(jax.random.key(1), x)
      >>> from dynconv_jax.inspect import attentions_from_intermediates
      >>> _, state = Net().apply(variables, x, mutable=['intermediates'])
      >>> attentions = attentions_from_intermediates(state['intermediates'])
      >>> sorted(attentions['od'])
      ['channel_attention', 'filter_attention', 'kernel_attention', 'spatial_attention']
    """
    out: Attentions = {}

    def walk(node: Mapping[str, Any], path: List[str]) -> None:
        found = {}
        for key, value in node.items():
            if key in ATTENTION_NAMES and isinstance(value, tuple):
                found[key] = np.concatenate([np.asarray(v) for v in value], axis=0)
            elif isinstance(value, Mapping):
                walk(value, path + [key])
        if found:
            out["/".join(path) or ROOT] = found

    walk(intermediates, [])
    return out


def collect_attentions(
    model, variables, x, *, train: bool = False, temperature: Optional[float] = None, **apply_kwargs
) -> Attentions:
    """Run ``model`` on the batch ``x`` and return every dynamic layer's attentions.

    ``model.apply(variables, x, train=train, temperature=temperature, **apply_kwargs)``
    is called with ``intermediates`` mutable (and ``batch_stats`` too when ``train``;
    pass ``rngs=`` for CondConv's routing dropout then). Works for a single layer or
    any model built from them. Returns ``{layer_path: {name: np.ndarray [B, ...]}}``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from dynconv_jax import CondConv, ODConv
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=False, temperature=None):
      ...         x = ODConv(8, (3, 3), num_experts=3, name="od")(x, train=train, temperature=temperature)
      ...         return CondConv(8, (1, 1), num_experts=2, name="cc")(x, temperature=temperature)
      >>> x = jax.random.normal(jax.random.key(0), (4, 8, 8, 4))
      >>> variables = Net().init(jax.random.key(1), x)
      >>> from dynconv_jax.inspect import collect_attentions
      >>> attentions = collect_attentions(Net(), variables, x, temperature=1.0)
      >>> sorted(attentions), attentions['od']['kernel_attention'].shape, attentions['od']['spatial_attention'].shape
      (['cc', 'od'], (4, 3), (4, 3, 3))
    """
    mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
    _, state = model.apply(variables, x, train=train, temperature=temperature, mutable=mutable, **apply_kwargs)
    attentions = attentions_from_intermediates(state.get("intermediates", {}))
    if not attentions:
        raise ValueError(f"{type(model).__name__} sowed no attentions: it has no dynamic conv layer")
    return attentions


def routing_entropy(kernel_attention: np.ndarray) -> np.ndarray:
    """Normalized entropy of each sample's routing, ``[B, K] -> [B]`` in ``[0, 1]``.

    The weights are normalized to sum to one first (CondConv's sigmoid weights do not),
    so this measures how the routing mass is spread over the K experts: 1 = uniform
    (no specialization), 0 = a single expert. Needs K >= 2.

    Examples:
      >>> import numpy as np
      >>> from dynconv_jax.inspect import routing_entropy
      >>> entropy = routing_entropy(np.array([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]))
      >>> np.allclose(entropy, [1.0, 0.0])                   # uniform routing; one expert
      True
    """
    a = np.asarray(kernel_attention, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 2:
        raise ValueError(f"routing_entropy: expected kernel attention [B, K] with K >= 2, got shape {a.shape}")
    p = a / a.sum(axis=1, keepdims=True)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -plogp.sum(axis=1) / np.log(a.shape[1])


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib imported lazily)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def _routed_layers(attentions: Attentions) -> List[str]:
    layers = [name for name, att in attentions.items() if att["kernel_attention"].shape[1] >= 2]
    if not layers:
        raise ValueError("no layer with K >= 2 experts: there is no routing to plot")
    return layers


def _boxes(ax, values: np.ndarray, rng: np.random.Generator) -> None:
    """Box plot per column of ``values [B, n]`` with the samples jittered on top."""
    n = values.shape[1]
    positions = np.arange(n)
    ax.boxplot(
        values,
        positions=positions,
        widths=0.6,
        showfliers=False,
        medianprops={"color": "tab:red"},
        boxprops={"color": "0.35"},
    )
    jitter = rng.uniform(-0.18, 0.18, size=values.shape)
    ax.scatter((positions + jitter).ravel(), values.ravel(), s=6, alpha=0.45, color="tab:blue", linewidths=0)
    ax.set_xticks(positions, [str(i) for i in positions])
    ax.set_xlim(-0.6, n - 0.4)


def plot_kernel_attention(attentions: Attentions, path: str, *, ncols: int = 4) -> str:
    """One panel per layer: each expert's kernel-attention weight across the samples.

    Boxes show quartiles over the samples, dots the samples. Layers with a single expert
    (no routing) are left out. Returns ``path``.

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> odconv = {"kernel_attention": rng.dirichlet(np.ones(4), 8), "channel_attention": rng.random((8, 16)),
      ...           "filter_attention": rng.random((8, 32)), "spatial_attention": rng.random((8, 3, 3))}  # [B, ...]
      >>> attentions = {"layer1_0/conv1": odconv, "layer1_0/conv2": {"kernel_attention": rng.random((8, 4))}}
      >>> out = tempfile.mkdtemp()
      >>> from dynconv_jax.inspect import plot_kernel_attention
      >>> os.path.basename(plot_kernel_attention(attentions, os.path.join(out, "kernel_attention.png")))
      'kernel_attention.png'
    """
    layers = _routed_layers(attentions)
    ncols = min(ncols, len(layers))
    nrows = -(-len(layers) // ncols)
    fig = _figure(3.2 * ncols, 2.6 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    rng = np.random.default_rng(0)
    num_samples = attentions[layers[0]]["kernel_attention"].shape[0]
    for ax, name in zip(axes.ravel(), layers):
        _boxes(ax, attentions[name]["kernel_attention"], rng)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel("weight", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.ravel()[len(layers) :]:
        ax.set_visible(False)
    fig.suptitle(f"Kernel (expert) attention per layer over {num_samples} samples")
    return _save(fig, path)


def plot_routing_entropy(attentions: Attentions, path: str) -> str:
    """Normalized routing entropy (see :func:`routing_entropy`) per layer, over the samples.

    1 = uniform over the experts, 0 = one expert. Returns ``path``.

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> odconv = {"kernel_attention": rng.dirichlet(np.ones(4), 8), "channel_attention": rng.random((8, 16)),
      ...           "filter_attention": rng.random((8, 32)), "spatial_attention": rng.random((8, 3, 3))}  # [B, ...]
      >>> attentions = {"layer1_0/conv1": odconv, "layer1_0/conv2": {"kernel_attention": rng.random((8, 4))}}
      >>> out = tempfile.mkdtemp()
      >>> from dynconv_jax.inspect import plot_routing_entropy
      >>> os.path.basename(plot_routing_entropy(attentions, os.path.join(out, "routing_entropy.png")))
      'routing_entropy.png'
    """
    layers = _routed_layers(attentions)
    values = np.stack([routing_entropy(attentions[name]["kernel_attention"]) for name in layers], axis=1)
    fig = _figure(max(5.0, 0.45 * len(layers) + 2.0), 4.2)
    ax = fig.subplots()
    _boxes(ax, values, np.random.default_rng(0))
    ax.set_xticks(np.arange(len(layers)), layers, rotation=60, ha="right", fontsize=8)
    ax.axhline(1.0, color="0.5", linestyle="--", linewidth=1)
    ax.set_ylim(min(-0.02, float(values.min()) - 0.02), 1.05)
    ax.set_ylabel("entropy / log K")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Routing entropy per layer over {values.shape[0]} samples (1 = uniform)")
    return _save(fig, path)


def plot_odconv_attentions(layer: Mapping[str, np.ndarray], path: str, *, title: str = "") -> str:
    """ODConv's four attentions for one layer: channel, filter, spatial (k×k), kernel.

    Channel and filter attention are drawn as samples × channels heat maps, the spatial
    attention as its mean over the samples (values written in each cell; std in
    brackets), the kernel attention as boxes per expert. A skipped attention (depthwise
    filter, 1×1 spatial, single expert) is the constant 1 and is marked as such.
    Returns ``path``.

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> odconv = {"kernel_attention": rng.dirichlet(np.ones(4), 8), "channel_attention": rng.random((8, 16)),
      ...           "filter_attention": rng.random((8, 32)), "spatial_attention": rng.random((8, 3, 3))}  # [B, ...]
      >>> attentions = {"layer1_0/conv1": odconv, "layer1_0/conv2": {"kernel_attention": rng.random((8, 4))}}
      >>> out = tempfile.mkdtemp()
      >>> from dynconv_jax.inspect import plot_odconv_attentions
      >>> os.path.basename(plot_odconv_attentions(odconv, os.path.join(out, "odconv.png"), title="layer1_0/conv1"))
      'odconv.png'
    """
    fig = _figure(11.0, 7.5)
    (ax_c, ax_f), (ax_s, ax_k) = fig.subplots(2, 2)

    def heat(ax, name, label):
        if name not in layer:
            _skipped(ax, label)
            return
        values = layer[name]
        im = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xlabel(f"{label} channel")
        ax.set_ylabel("sample")
        ax.set_title(f"{label} attention (sigmoid)")
        fig.colorbar(im, ax=ax, fraction=0.05)

    heat(ax_c, "channel_attention", "input")
    heat(ax_f, "filter_attention", "output")

    if "spatial_attention" in layer and layer["spatial_attention"].ndim == 3:
        s = layer["spatial_attention"]
        mean, std = s.mean(axis=0), s.std(axis=0)
        im = ax_s.imshow(mean, cmap="viridis", vmin=0.0, vmax=1.0)
        for (i, j), m in np.ndenumerate(mean):
            ax_s.text(
                j,
                i,
                f"{m:.2f}\n({std[i, j]:.2f})",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if m < 0.6 else "black",
            )
        ax_s.set_xticks(range(mean.shape[1]))
        ax_s.set_yticks(range(mean.shape[0]))
        ax_s.set_title(f"spatial attention, mean (std) over {s.shape[0]} samples")
        fig.colorbar(im, ax=ax_s, fraction=0.05)
    elif "spatial_attention" in layer:
        ax_s.plot(layer["spatial_attention"].reshape(layer["spatial_attention"].shape[0], -1).T, alpha=0.4)
        ax_s.set_title("spatial attention per kernel position")
    else:
        _skipped(ax_s, "spatial")

    a = layer["kernel_attention"]
    if a.shape[1] >= 2:
        _boxes(ax_k, a, np.random.default_rng(0))
        ax_k.set_xlabel("expert")
        ax_k.set_ylabel("weight")
        ax_k.set_title("kernel attention (softmax over experts)")
        ax_k.grid(axis="y", alpha=0.3)
    else:
        _skipped(ax_k, "kernel")
    fig.suptitle(title or "ODConv attentions")
    return _save(fig, path)


def _skipped(ax, label: str) -> None:
    ax.text(
        0.5,
        0.5,
        f"{label} attention skipped\n(constant 1 for this layer)",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="0.4",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _file_name(layer: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in layer)


def plot_all(attentions: Attentions, out_dir: str) -> List[str]:
    """Write every plot for ``attentions`` into ``out_dir``; returns the written paths.

    ``kernel_attention.png`` and ``routing_entropy.png`` (if any layer has K >= 2) and
    ``odconv_<layer>.png`` for each ODConv layer (one with a channel attention).

    Examples:
      >>> import os, tempfile
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> odconv = {"kernel_attention": rng.dirichlet(np.ones(4), 8), "channel_attention": rng.random((8, 16)),
      ...           "filter_attention": rng.random((8, 32)), "spatial_attention": rng.random((8, 3, 3))}  # [B, ...]
      >>> attentions = {"layer1_0/conv1": odconv, "layer1_0/conv2": {"kernel_attention": rng.random((8, 4))}}
      >>> out = tempfile.mkdtemp()
      >>> from dynconv_jax.inspect import plot_all
      >>> sorted(os.path.basename(path) for path in plot_all(attentions, out))
      ['kernel_attention.png', 'odconv_layer1_0_conv1.png', 'routing_entropy.png']
    """
    paths = []
    if any(att["kernel_attention"].shape[1] >= 2 for att in attentions.values()):
        paths.append(plot_kernel_attention(attentions, os.path.join(out_dir, "kernel_attention.png")))
        paths.append(plot_routing_entropy(attentions, os.path.join(out_dir, "routing_entropy.png")))
    for name, att in attentions.items():
        if "channel_attention" in att:
            paths.append(
                plot_odconv_attentions(
                    att, os.path.join(out_dir, f"odconv_{_file_name(name)}.png"), title=f"ODConv attentions: {name}"
                )
            )
    if not paths:
        raise ValueError("nothing to plot: no layer has routing (K >= 2) or ODConv attentions")
    return paths
