"""PyTorch <-> Flax checkpoint conversion for dynamic convolutions (CondConv, Yang et al.
NeurIPS 2019; DynamicConv, Chen et al. CVPR 2020; ODConv, Li et al. ICLR 2022) and the
models built from them.

The converter is generic: it knows no layer. It pairs PyTorch state_dict keys with the
leaves of a Flax *template* (the variables of the target model, or their
``jax.eval_shape``) by the naming rules of DESIGN.md, and picks for every pair the one
layout change that maps the PyTorch shape onto the template shape:

==========================  =============================  ======================
kind                        PyTorch                        Flax
==========================  =============================  ======================
Linear                      ``[O, I]``                     ``[I, O]``
1x1 conv used as Dense      ``[O, I, 1, ..., 1]``          ``[I, O]``
conv (1-D, 2-D, 3-D)        ``[O, I, *k]``                 ``[*k, I, O]``
expert stack                ``[K, O, I, *k]``              ``[K, *k, I, O]``
timm flattened experts      ``[K, O*I*prod(k)]``           ``[K, *k, I, O]``
anything else               same shape                     same shape
==========================  =============================  ======================

Names: ``a.b.3.c.weight`` <-> ``a / b_3 / c / kernel`` (a numeric segment joins the
previous one with ``_``); ``weight`` <-> ``kernel`` (or ``scale`` where the template has a
``scale``, i.e. BatchNorm); ``running_mean`` / ``running_var`` <-> ``batch_stats`` ``mean``
/ ``var``; ``num_batches_tracked`` is ignored when reading and written as ``0`` (or copied
from ``like``) when writing.

Dtypes: every output leaf takes the dtype of its target (the template leaf, or the ``like``
tensor). Floating point converts to floating point (``float64 -> float32`` rounds to
nearest), integer to integer; a float where an integer is expected, or an integer/bool
where a float is expected, is a wrong-dtype error.

Any mismatch raises :class:`ConversionError` that lists every missing, unexpected,
mis-shaped and wrong-dtype entry at once.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
from flax.core import meta, unfreeze

from dynconv_jax.variables import is_nnx, linen_variables
from dynconv_spec.paths import check_output_file

__all__ = ["ConversionError", "torch_to_flax", "flax_to_torch", "save_safetensors", "load_state_dict", "nonfinite_keys"]

#: Keys under which training scripts commonly nest the model's state_dict, tried in order (timm, the
#: torchvision references, Lightning, plain ``torch.save({'model_state_dict': ...})``). The EMA copies of
#: timm (``state_dict_ema``) and torchvision/DeiT (``model_ema``) come last: used only when the checkpoint
#: holds no other, as timm's ``load_checkpoint`` does by default.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "state_dict_ema", "model_ema")
#: Prefixes that wrappers add to every key: DataParallel / DDP, torch.compile; stripped as long as every
#: key has one (``module._orig_mod.``, ``_orig_mod.module.``, ``module.module.``).
KEY_PREFIXES = ("module.", "_orig_mod.")
#: Flax leaf names a PyTorch ``weight`` may map to, tried in order.
WEIGHT_NAMES = ("kernel", "scale", "embedding", "weight")
#: PyTorch buffers that live in Flax's ``batch_stats`` collection.
BATCH_STATS_NAMES = {"running_mean": "mean", "running_var": "var"}
IGNORED_LEAVES = ("num_batches_tracked",)
#: The largest JSON header safetensors reads (its ``MAX_HEADER_SIZE``).
SAFETENSORS_MAX_HEADER = 100_000_000

Path = Tuple[str, ...]  # ('params', 'layer1_0', 'conv1', 'kernel')


class ConversionError(ValueError):
    """A checkpoint does not fit its target. ``problems`` holds one line per problem.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from dynconv_jax import CondConv
      >>> from dynconv_jax.convert import ConversionError, torch_to_flax
      >>> template = jax.eval_shape(CondConv(8, (3, 3), num_experts=2).init, jax.random.key(0), jnp.ones((1, 4, 4, 4)))
      >>> try:
      ...     torch_to_flax({"weight": np.zeros((2, 288), np.float32)}, template)
      ... except ConversionError as error:
      ...     print(error.problems)
      ["missing: flax params:routing_fn/bias [2] has no torch entry (expected 'routing_fn.bias')", "missing: flax params:routing_fn/kernel [4, 2] has no torch entry (expected 'routing_fn.weight')"]
    """

    def __init__(self, message: str, problems: Iterable[str] = ()):
        self.problems = list(problems)
        lines = [message] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------- names


def torch_module_to_flax(module_key: str) -> Tuple[str, ...]:
    """``'layer1.0.conv1'`` -> ``('layer1_0', 'conv1')``; ``'conv.0.0'`` -> ``('conv_0_0',)``."""
    out: List[str] = []
    for seg in module_key.split(".") if module_key else []:
        if seg.isdigit() and out:
            out[-1] = f"{out[-1]}_{seg}"
        else:
            out.append(seg)
    return tuple(out)


_NUMERIC_SUFFIX = re.compile(r"^(.*?[^_\d].*?)((?:_\d+)+)$")


def flax_module_to_torch(path: Tuple[str, ...]) -> str:
    """Inverse of :func:`torch_module_to_flax`: ``('layer1_0', 'conv1')`` -> ``'layer1.0.conv1'``.

    A trailing ``_<digits>`` group is read as a list index. A PyTorch attribute that itself
    ends in ``_<digits>`` cannot be told apart: pass ``like=`` to :func:`flax_to_torch`.
    """
    segs = []
    for name in path:
        m = _NUMERIC_SUFFIX.match(name)
        if m:
            segs.append(m.group(1))
            segs.extend(m.group(2)[1:].split("_"))
        else:
            segs.append(name)
    return ".".join(segs)


def _torch_key_for(path: Path) -> str:
    """The PyTorch key of a Flax leaf ``(collection, *module, leaf)`` by the naming rules."""
    module, leaf = flax_module_to_torch(path[1:-1]), path[-1]
    if path[0] == "batch_stats":
        leaf = {v: k for k, v in BATCH_STATS_NAMES.items()}.get(leaf, leaf)
    elif leaf in WEIGHT_NAMES:
        leaf = "weight"
    return f"{module}.{leaf}" if module else leaf


def _split_key(key: str) -> Tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """One PyTorch <-> Flax array layout. ``matches(t_shape, f_shape)`` says whether it maps
    one shape onto the other; ``to_flax`` / ``to_torch`` move the data."""

    name: str
    matches: Callable[[tuple, tuple], bool]
    to_flax: Callable[[np.ndarray, tuple], np.ndarray]
    to_torch: Callable[[np.ndarray, tuple], np.ndarray]
    expert: bool = False
    spatial_rank: int = 0  # of the kernel, for breaking ties (see _choose_layout)


def _conv_perm(ndim: int, lead: int) -> Tuple[int, ...]:
    """Axis order taking ``[*lead, O, I, *k]`` to ``[*lead, *k, I, O]`` (``lead`` = 0 or 1)."""
    lead_axes = tuple(range(lead))
    return lead_axes + tuple(range(lead + 2, ndim)) + (lead + 1, lead)


def _inverse_perm(perm: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def _permuted(shape: tuple, perm: Tuple[int, ...]) -> tuple:
    return tuple(shape[i] for i in perm)


def _perm_layout(name: str, ndim: int, lead: int, rank: int) -> Layout:
    perm = _conv_perm(ndim, lead)
    inv = _inverse_perm(perm)
    return Layout(
        name=name,
        matches=lambda t, f: len(t) == ndim and len(f) == ndim and _permuted(t, perm) == tuple(f),
        to_flax=lambda a, f: np.transpose(a, perm),
        to_torch=lambda a, t: np.transpose(a, inv),
        expert=lead == 1,
        spatial_rank=rank,
    )


def _flat_experts_layout(rank: int) -> Layout:
    ndim = rank + 3  # flax [K, *k, I, O]
    perm = _conv_perm(ndim, 1)  # [K, O, I, *k] -> [K, *k, I, O]
    inv = _inverse_perm(perm)

    def matches(t, f):
        return len(t) == 2 and len(f) == ndim and t[0] == f[0] and t[1] == math.prod(f[1:])

    def to_flax(a, f):
        oihw = _permuted(tuple(f), inv)  # [K, O, I, *k]
        return np.transpose(a.reshape(oihw), perm)

    def to_torch(a, t):
        return np.transpose(a, inv).reshape(t)

    return Layout(f"timm flattened experts {rank}-D", matches, to_flax, to_torch, expert=True, spatial_rank=rank)


def _dense_layout() -> Layout:
    return Layout(
        "linear",
        matches=lambda t, f: len(t) == 2 and len(f) == 2 and tuple(t[::-1]) == tuple(f),
        to_flax=lambda a, f: a.T,
        to_torch=lambda a, t: a.T,
    )


def _conv1x1_dense_layout() -> Layout:
    def matches(t, f):
        return len(t) >= 3 and len(f) == 2 and all(s == 1 for s in t[2:]) and (t[1], t[0]) == tuple(f)

    return Layout(
        "1x1 conv as dense",
        matches=matches,
        to_flax=lambda a, f: a.reshape(a.shape[:2]).T,
        to_torch=lambda a, t: a.T.reshape(t),
    )


IDENTITY = Layout("identity", lambda t, f: tuple(t) == tuple(f), lambda a, f: a, lambda a, t: a)

#: Layouts for ``weight`` <-> ``kernel`` leaves.
KERNEL_LAYOUTS: Tuple[Layout, ...] = (
    _dense_layout(),
    _conv1x1_dense_layout(),
    *(_perm_layout(f"conv {r}-D", r + 2, 0, r) for r in (1, 2, 3)),
    *(_perm_layout(f"experts {r}-D", r + 3, 1, r) for r in (1, 2, 3)),
    *(_flat_experts_layout(r) for r in (1, 2, 3)),
)


def _expert_evidence(module: Tuple[str, ...], siblings: Mapping[Path, Any]) -> bool:
    """Whether the Flax module at ``module`` holds an expert stack: it has a routing /
    attention sub-module (CondConv, DynamicConv, ODConv), its parent has a ``routing_fn``
    (a block sharing one routing among its convs, as EfficientNet-CondConv does), or it has a
    ``[K, O]`` expert bias."""
    owners = [(module, ("routing_fn", "attention"))]
    if module:
        owners.append((module[:-1], ("routing_fn",)))
    for owner, children in owners:
        for child in children:
            prefix = owner + (child,)
            if any(p[1 : len(prefix) + 1] == prefix for p in siblings):
                return True
    bias = siblings.get(("params",) + module + ("bias",))
    return bias is not None and len(bias.shape) == 2


def _choose_layout(candidates: List[Layout], expert_hint: bool) -> Layout:
    """Break a tie between layouts that fit the same shapes (a 2-D conv ``[O,I,h,w]`` and a
    1-D expert stack ``[K,O,I,k]`` when K == O == I; a 3-D conv and a 2-D expert stack):
    experts if the module has expert evidence, else the 2-D spatial interpretation."""
    if len(candidates) == 1:
        return candidates[0]
    if expert_hint:
        candidates = [c for c in candidates if c.expert] or candidates
    return min(candidates, key=lambda c: abs(c.spatial_rank - 2))


def _default_torch_shape(f_shape: tuple, is_kernel: bool, expert_hint: bool) -> Tuple[tuple, Layout]:
    """PyTorch shape and layout for a Flax leaf when no ``like`` is given."""
    if not is_kernel:
        return tuple(f_shape), IDENTITY
    n = len(f_shape)
    if n == 2:
        return tuple(f_shape[::-1]), KERNEL_LAYOUTS[0]
    candidates = []
    for layout in KERNEL_LAYOUTS:
        if layout.name.startswith(("conv ", "experts ")) and layout.spatial_rank + (3 if layout.expert else 2) == n:
            candidates.append(layout)
    if not candidates:
        return tuple(f_shape), IDENTITY
    layout = _choose_layout(candidates, expert_hint)
    lead = 1 if layout.expert else 0
    inv = _inverse_perm(_conv_perm(n, lead))
    return _permuted(tuple(f_shape), inv), layout


# ----------------------------------------------------------------------------- reading


def _to_numpy(value, key: str) -> np.ndarray:
    """A torch tensor / numpy / jax array as a numpy array, bit for bit (bfloat16 included)."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import ml_dtypes
            import torch

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "__array__"):
        return np.asarray(value)
    raise ConversionError(f"checkpoint entry {key!r} is a {type(value).__name__}, not an array")


def _is_array(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _sniff_format(path: str) -> Optional[str]:
    """'safetensors', 'torch' (zip or legacy pickle), 'npz' or None, from the file's first bytes, whatever its name."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":  # a zip: torch.save's (``<name>/data.pkl``) or numpy.savez's (``*.npy``)
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "torch"  # torch.load reports the damage
        return "npz" if names and all(n.endswith(".npy") for n in names) else "torch"
    # safetensors: an 8-byte little-endian header length (at most 100 MB, safetensors' limit), then the JSON
    # header. The length's first byte may be 0x80, a pickle's first byte; a pickle's bytes 2-7 make its
    # "length" far larger.
    declared = int.from_bytes(head[:8], "little") if len(head) == 9 and head[8:9] == b"{" else 0
    if 0 < declared <= SAFETENSORS_MAX_HEADER:
        return "safetensors"  # a truncated one too: _load_safetensors says so
    return "torch" if head[:1] == b"\x80" else None


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    with open(path, "rb") as f:
        declared = int.from_bytes(f.read(8), "little")
    available = os.path.getsize(path) - 8
    if declared > available:
        raise ConversionError(
            f"{path!r} is a truncated safetensors file: its header declares {declared} bytes of "
            f"JSON, the file holds {max(available, 0)} after the 8-byte length"
        )
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ConversionError(f"cannot read safetensors file {path!r}: {type(e).__name__}: {e}") from e


def _load_npz(path: str) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:  # object arrays would need pickle: refused
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ConversionError(
            f"cannot read the .npz file {path!r} (arrays only, no pickled objects): {type(e).__name__}: {e}"
        ) from e


def _load_file(path: str) -> Any:
    if not os.path.exists(path):
        raise ConversionError(f"checkpoint file {path!r} does not exist")
    if os.path.isdir(path):
        raise ConversionError(f"checkpoint {path!r} is a directory, expected a .pt/.pth/.bin/.safetensors file")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"checkpoint file {path!r} is empty (0 bytes)")
    kind = _sniff_format(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    if kind == "npz":
        return _load_npz(path)
    if kind is None:
        with open(path, "rb") as f:
            head = f.read(16)
        raise ConversionError(
            f"{path!r} is not a checkpoint file: neither a PyTorch file (zip or pickle), a "
            f"safetensors file nor an .npz; it starts with {head!r}"
        )
    import pickle

    import torch

    try:
        with open(path, "rb") as f:  # a file object: torch.load dispatches on the name otherwise
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"refused to load {path!r}: it contains objects other than tensors and plain containers "
            f"(torch.load(weights_only=True) rejected it; it was not executed). If you trust the file, "
            f"load it yourself and pass its state_dict. Detail: {str(e).splitlines()[0]}"
        ) from e
    except Exception as e:
        raise ConversionError(f"cannot read checkpoint {path!r}: {type(e).__name__}: {e}") from e


def _unwrap(obj: Mapping) -> Mapping:
    """The state_dict inside a training checkpoint: descend into the first of :data:`WRAPPER_KEYS` while
    the mapping holds anything but tensors (``{'state_dict': ..., 'epoch': tensor(3), 'optimizer': ...}``)."""
    seen = []
    while not (obj and all(_is_array(v) for v in obj.values())):
        wrapped = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if wrapped is not None:
            seen.append(wrapped)
            obj = obj[wrapped]
            continue
        if any(_is_array(v) for v in obj.values()):
            raise ConversionError(
                "state_dict entries that are not tensors",
                [f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not _is_array(v)],
            )
        raise ConversionError(
            "checkpoint holds no tensors at the top level and none of the wrapper keys "
            f"{WRAPPER_KEYS} (path {'/'.join(seen) or '<root>'}); its keys are: {sorted(map(str, obj))[:20]}"
        )
    return obj


def _strip_wrapper_prefixes(state: Dict[str, Any]) -> Dict[str, Any]:
    """Remove the :data:`KEY_PREFIXES` every key has, as often as they are nested."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in KEY_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def _check_no_meta_tensors(state: Mapping[str, Any]) -> None:
    meta = [k for k, v in state.items() if getattr(getattr(v, "device", None), "type", None) == "meta"]
    if meta:
        raise ConversionError(
            f"{len(meta)} of {len(state)} checkpoint entries are meta-device tensors: shapes without data (a model "
            f"built under torch.device('meta') or with empty weights, never loaded); load or initialise its "
            f"weights first (e.g. model.to_empty(device='cpu'), then load_state_dict)",
            meta[:10] + (["..."] if len(meta) > 10 else []),
        )


def load_state_dict(source) -> Dict[str, np.ndarray]:
    """Read a checkpoint into a flat ``{key: numpy array}``.

    ``source``: a state_dict (torch tensors / numpy / jax arrays), a ``torch.nn.Module``, or a
    path to a ``.pt`` / ``.pth`` / ``.bin`` file (read with ``torch.load(weights_only=True)``:
    a pickle holding anything but tensors and plain containers is refused, never executed), a
    ``.safetensors`` file (read without torch) or an ``.npz`` (``numpy.load(allow_pickle=False)``);
    files are recognised by their first bytes, not their names. A training checkpoint's state_dict
    is found under the first of :data:`WRAPPER_KEYS` (``{'state_dict': ..., 'epoch': ...}``,
    ``{'model': ..., 'optimizer': ...}``, ...), and ``module.`` (DataParallel / DDP) and ``_orig_mod.``
    (torch.compile) prefixes on every key are stripped, nested ones too. Meta-device tensors (no data)
    are refused.

    Examples:
      >>> import torch
      >>> from dynconv_jax.convert import load_state_dict
      >>> wrapped = {"state_dict": {"module.fc.weight": torch.ones(2, 3)}}   # a DataParallel training checkpoint
      >>> state = load_state_dict(wrapped)
      >>> list(state), type(state["fc.weight"]).__name__
      (['fc.weight'], 'ndarray')
    """
    obj = source
    if isinstance(obj, (str, os.PathLike)):
        obj = _load_file(os.fspath(obj))
    elif hasattr(obj, "state_dict") and callable(obj.state_dict) and not isinstance(obj, Mapping):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ConversionError(f"checkpoint is a {type(obj).__name__}, expected a mapping of tensors")
    state = _strip_wrapper_prefixes({str(k): v for k, v in _unwrap(obj).items()})
    _check_no_meta_tensors(state)
    return {k: _to_numpy(v, k) for k, v in state.items()}


# ----------------------------------------------------------------------------- pairing


def _flatten(tree: Mapping, prefix: Path = ()) -> Dict[Path, Any]:
    out: Dict[Path, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def _unflatten(flat: Mapping[Path, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _flax_leaves(variables) -> Dict[Path, Any]:
    """``{('params', ..., leaf): leaf}`` for the ``params`` and ``batch_stats`` collections.

    ``variables`` is a Linen variables dict, or an NNX module or ``nnx.State`` (its ``nnx.Param``
    and ``nnx.BatchStat`` variables, whose paths are the Linen ones, see :mod:`dynconv_jax.variables`).
    """
    if is_nnx(variables):
        variables = linen_variables(variables)
    variables = meta.unbox(unfreeze(variables))
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ConversionError(f"the Flax variables/template must be a dict with a 'params' collection, got {keys}")
    flat = {}
    for col in ("params", "batch_stats"):
        if col in variables:
            flat.update(_flatten(variables[col], (col,)))
    return flat


def _flax_path_for(key: str, flax: Mapping[Path, Any]) -> Path:
    """The Flax path a PyTorch key maps to (``weight`` picks whichever of kernel/scale/... the
    Flax side has; a name found only in ``batch_stats`` goes there)."""
    module, leaf = _split_key(key)
    mod = torch_module_to_flax(module)
    if leaf in BATCH_STATS_NAMES:
        return ("batch_stats",) + mod + (BATCH_STATS_NAMES[leaf],)
    if leaf == "weight":
        for name in WEIGHT_NAMES:
            if ("params",) + mod + (name,) in flax:
                return ("params",) + mod + (name,)
        return ("params",) + mod + ("kernel",)
    if ("params",) + mod + (leaf,) not in flax and ("batch_stats",) + mod + (leaf,) in flax:
        return ("batch_stats",) + mod + (leaf,)
    return ("params",) + mod + (leaf,)


def _fmt_path(path: Path) -> str:
    return f"{path[0]}:{'/'.join(path[1:])}"


@dataclass
class _Pair:
    key: str
    path: Path
    layout: Layout


def _check_dtype(src: np.dtype, dst: np.dtype) -> bool:
    """Whether a value of dtype ``src`` may be cast to ``dst`` (see the module docstring)."""
    src, dst = np.dtype(src), np.dtype(dst)

    def kind(d):
        if np.issubdtype(d, np.floating) or d.name == "bfloat16":
            return "f"
        if np.issubdtype(d, np.complexfloating):
            return "c"
        if np.issubdtype(d, np.integer):
            return "i"
        return d.kind

    return kind(src) == kind(dst)


def _prefix_hint(keys: Iterable[str], flax_specs: Mapping[Path, Any]) -> str:
    """A hint for a checkpoint whose every key starts with a module the Flax model does not have (a
    wrapper's attribute, e.g. a Lightning module's ``model.``), or ''."""
    keys = list(keys)
    firsts = {k.split(".", 1)[0] for k in keys}
    if len(firsts) != 1 or not all("." in k for k in keys):
        return ""
    first = firsts.pop()
    if any(len(path) > 2 and path[1] == first for path in flax_specs):
        return ""
    return (
        f"; every checkpoint key starts with {first + '.'!r}, which is no module of the Flax model (the "
        f"attribute of a wrapper?): strip it, e.g. {{k.removeprefix({first + '.'!r}): v for k, v in "
        f"state_dict.items()}}"
    )


def _pair(
    torch_specs: Mapping[str, Tuple[tuple, np.dtype]],
    flax_specs: Mapping[Path, Any],
    direction: str,
    hint: str = "",
) -> List[_Pair]:
    """Pair every PyTorch key with a Flax leaf and a layout, or raise ConversionError with all
    problems. ``torch_specs``: key -> (shape, dtype); ``flax_specs``: path -> leaf with
    ``.shape``/``.dtype``. ``direction`` ('torch->flax' / 'flax->torch') words the dtype check;
    ``hint`` ends the first line of the error."""
    problems: List[str] = []
    pairs: List[_Pair] = []
    claimed: Dict[Path, str] = {}
    for key, (t_shape, t_dtype) in torch_specs.items():
        if _split_key(key)[1] in IGNORED_LEAVES:
            continue
        path = _flax_path_for(key, flax_specs)
        if path not in flax_specs:
            problems.append(
                f"unexpected: torch {key!r} {list(t_shape)} -> flax {_fmt_path(path)} is not in the Flax model"
            )
            continue
        if path in claimed:
            problems.append(f"unexpected: torch {key!r} and {claimed[path]!r} both map to flax {_fmt_path(path)}")
            continue
        claimed[path] = key
        leaf = flax_specs[path]
        f_shape = tuple(leaf.shape)
        is_kernel = path[-1] == "kernel" and _split_key(key)[1] == "weight"
        layouts = KERNEL_LAYOUTS if is_kernel else (IDENTITY,)
        fits = [lay for lay in layouts if lay.matches(tuple(t_shape), f_shape)]
        if not fits:
            if is_kernel:
                expected = _default_torch_shape(f_shape, True, _expert_evidence(path[1:-1], flax_specs))[0]
                hint = f" (for this Flax shape torch would be e.g. {list(expected)})"
            else:
                hint = ""
            problems.append(
                f"wrong shape: torch {key!r} {list(t_shape)} vs flax {_fmt_path(path)} {list(f_shape)}{hint}"
            )
            continue
        src, dst = (t_dtype, leaf.dtype) if direction == "torch->flax" else (leaf.dtype, t_dtype)
        if dst is not None and not _check_dtype(src, dst):
            problems.append(
                f"wrong dtype: torch {key!r} vs flax {_fmt_path(path)}: {np.dtype(src).name} cannot become "
                f"{np.dtype(dst).name} ({direction})"
            )
            continue
        layout = _choose_layout(fits, _expert_evidence(path[1:-1], flax_specs))
        pairs.append(_Pair(key, path, layout))
    for path, leaf in flax_specs.items():
        if path not in claimed:
            problems.append(
                f"missing: flax {_fmt_path(path)} {list(leaf.shape)} has no torch entry (expected {_torch_key_for(path)!r})"
            )
    if problems:
        n = {w: sum(p.startswith(w) for p in problems) for w in ("missing", "unexpected", "wrong shape", "wrong dtype")}
        summary = ", ".join(f"{v} {k}" for k, v in n.items() if v)
        raise ConversionError(f"checkpoint does not match the model ({direction}): {summary}{hint}", problems)
    return pairs


# ----------------------------------------------------------------------------- public API


def nonfinite_keys(state: Mapping[str, np.ndarray]) -> List[str]:
    """Keys of floating-point entries holding NaN or Inf.

    Examples:
      >>> import numpy as np
      >>> from dynconv_jax.convert import nonfinite_keys
      >>> nonfinite_keys({"a": np.ones(2), "b": np.array([1.0, np.nan]), "steps": np.array([3])})
      ['b']
    """
    return [
        k
        for k, v in state.items()
        if (np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16")
        and not np.all(np.isfinite(v.astype(np.float32)))
    ]


def _refuse_nonfinite(arrays: Mapping[str, np.ndarray], what: str, why: str) -> None:
    bad = nonfinite_keys(arrays)
    if bad:
        raise ConversionError(
            f"{what} hold NaN/Inf ({len(bad)} of {len(arrays)}; {why}); pass allow_nonfinite=True "
            f"to convert them anyway",
            [f"{k} {list(arrays[k].shape)}" for k in bad],
        )


def torch_to_flax(source, template, allow_nonfinite: bool = False) -> Dict[str, Dict[str, Any]]:
    """Convert a PyTorch checkpoint to Flax variables shaped like ``template``.

    Args:
      source: a state_dict (torch tensors or numpy arrays), a ``torch.nn.Module``, or a path
        to a ``.pt``/``.pth``/``.safetensors`` file (see :func:`load_state_dict`).
      template: the Flax variables of the target model (``model.init(...)``) or their
        ``jax.eval_shape`` (``ShapeDtypeStruct`` leaves). Its ``params`` and ``batch_stats``
        collections are filled; other collections are ignored. An NNX model of
        :mod:`dynconv_jax.nnx` (or its ``nnx.state``) is a template too; put the result into it with
        :func:`dynconv_jax.nnx.load_linen_variables` (or use :func:`dynconv_jax.nnx.load_torch`).

      allow_nonfinite: accept entries holding NaN or Inf (refused by default: such weights
        give NaN logits; a file overwritten or damaged in place typically shows up this way).

    Returns ``{'params': ..., 'batch_stats': ...}`` (nested dicts of numpy arrays, each with
    its template leaf's dtype; ``batch_stats`` is ``{}`` when the template has none).

    Raises :class:`ConversionError` naming every missing, unexpected, mis-shaped and
    wrong-dtype entry, and every entry with NaN/Inf unless ``allow_nonfinite``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import ODConv
      >>> from dynconv_jax.convert import torch_to_flax
      >>> from dynconv_torch import ODConv2d
      >>> torch_layer = ODConv2d(4, 8, 3, padding=1, kernel_num=2)        # or a state_dict, or a file
      >>> layer = ODConv(features=8, kernel_size=(3, 3), num_experts=2)
      >>> template = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((1, 8, 8, 4)))
      >>> variables = torch_to_flax(torch_layer, template)
      >>> variables['params']['kernel'].shape                             # torch [K, O, I, kh, kw]
      (2, 3, 3, 4, 8)
    """
    state = load_state_dict(source)
    if not allow_nonfinite:
        _refuse_nonfinite(state, "checkpoint entries", "a damaged or diverged checkpoint?")
    flax_specs = _flax_leaves(template)
    pairs = _pair(
        {k: (v.shape, v.dtype) for k, v in state.items()}, flax_specs, "torch->flax", _prefix_hint(state, flax_specs)
    )
    out: Dict[Path, np.ndarray] = {}
    for p in pairs:
        target = flax_specs[p.path]
        value = p.layout.to_flax(state[p.key], tuple(target.shape))
        out[p.path] = np.array(value, dtype=np.dtype(target.dtype), order="C")  # a copy: never aliases the torch tensor
    tree = _unflatten(out)
    return {"params": tree.get("params", {}), "batch_stats": tree.get("batch_stats", {})}


def _like_specs(like) -> Tuple[Dict[str, Tuple[tuple, Optional[np.dtype]]], Dict[str, Any]]:
    """``like`` (state_dict, module, or ``{key: shape}``) -> key -> (shape, dtype or None), and
    the ``num_batches_tracked`` values it holds. Meta-device tensors give their shapes and dtypes (a
    model built under ``torch.device('meta')`` is a valid ``like``; its counters are 0)."""
    if hasattr(like, "state_dict") and callable(like.state_dict) and not isinstance(like, Mapping):
        like = like.state_dict()
    like = _strip_wrapper_prefixes({str(k): v for k, v in like.items()})
    specs, counters = {}, {}
    for k, v in like.items():
        if getattr(getattr(v, "device", None), "type", None) == "meta":
            specs[k] = (tuple(v.shape), _to_numpy(v.new_empty((0,), device="cpu"), k).dtype)
        elif _is_array(v):
            arr = _to_numpy(v, k)
            specs[k] = (tuple(arr.shape), arr.dtype)
            if _split_key(k)[1] in IGNORED_LEAVES:
                counters[k] = arr
        else:
            specs[k] = (tuple(int(s) for s in v), None)
    return specs, counters


def _flax_to_numpy(variables, like=None, allow_nonfinite: bool = False) -> Dict[str, np.ndarray]:
    flat = _flax_leaves(variables)
    shape_only = [_fmt_path(p) for p, v in flat.items() if not hasattr(v, "__array__")]
    if shape_only:
        raise ConversionError(
            f"the Flax variables hold {len(shape_only)} leaves without values (e.g. jax.ShapeDtypeStruct from "
            f"jax.eval_shape); flax_to_torch needs arrays: pass model.init(...) or trained variables",
            shape_only[:10] + (["..."] if len(shape_only) > 10 else []),
        )
    arrays = {p: np.asarray(v) for p, v in flat.items()}
    if not allow_nonfinite:
        _refuse_nonfinite(
            {_fmt_path(p): a for p, a in arrays.items()},
            "the Flax variables",
            "a diverged run? torch_to_flax would refuse the result",
        )
    if like is None:
        specs: Dict[str, Tuple[tuple, Optional[np.dtype]]] = {}
        layouts: Dict[str, Layout] = {}
        for path, a in arrays.items():
            key = _torch_key_for(path)
            shape, layout = _default_torch_shape(a.shape, path[-1] == "kernel", _expert_evidence(path[1:-1], arrays))
            specs[key] = (shape, None)
            layouts[key] = layout
        # BatchNorm modules get a num_batches_tracked counter of 0, as a fresh nn.BatchNorm has.
        counters = {}
        for path in arrays:
            if path[0] == "batch_stats" and path[-1] == "mean":
                tmod = flax_module_to_torch(path[1:-1])
                counters[f"{tmod}.num_batches_tracked" if tmod else "num_batches_tracked"] = np.array(0, np.int64)
    else:
        specs, counters = _like_specs(like)
    pairs = _pair(specs, arrays, "flax->torch")
    out: Dict[str, np.ndarray] = {}
    for p in pairs:
        shape, dtype = specs[p.key]
        value = p.layout.to_torch(arrays[p.path], shape)
        out[p.key] = np.array(value, dtype=dtype if dtype is not None else value.dtype, order="C")
    for k in specs:  # keep the order of `like` (or of the Flax tree)
        if _split_key(k)[1] in IGNORED_LEAVES:
            out[k] = np.asarray(counters.get(k, np.array(0, np.int64)))
    for k, v in counters.items():
        out.setdefault(k, v)
    order = list(specs) + [k for k in out if k not in specs]
    return {k: out[k] for k in order if k in out}


def flax_to_torch(variables, like=None, allow_nonfinite: bool = False) -> Dict[str, Any]:
    """Convert Flax variables (``{'params': ..., 'batch_stats': ...}``, or an NNX model of
    :mod:`dynconv_jax.nnx` or its ``nnx.state``) to a PyTorch state_dict.

    Without ``like``: keys follow the naming rules, kernels get the PyTorch layout of their
    rank (``Dense [I,O]`` -> Linear ``[O,I]``, conv ``[*k,I,O]`` -> ``[O,I,*k]``, expert stacks
    ``[K,*k,I,O]`` -> ``[K,O,I,*k]``, which ``dynconv_torch.CondConv2d`` also loads), and each
    BatchNorm gets ``num_batches_tracked = 0``.
    With ``like`` (a torch state_dict, a module, or ``{key: shape}``): keys, shapes (e.g. a
    1x1 conv ``[O,I,1,1]`` for a Flax Dense, timm's flattened ``[K, O*I*kh*kw]``) and dtypes
    follow it, and ``num_batches_tracked`` is copied from it (0 where it only gives shapes).
    Variables holding NaN or Inf are refused (:class:`ConversionError` listing them), as
    :func:`torch_to_flax` refuses such a checkpoint, unless ``allow_nonfinite``.

    Returns torch tensors when torch is importable, else numpy arrays.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dynconv_jax import DynamicConv
      >>> from dynconv_jax.convert import flax_to_torch
      >>> layer = DynamicConv(features=8, kernel_size=(3, 3), num_experts=2)
      >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 4)))
      >>> state_dict = flax_to_torch(variables)
      >>> tuple(state_dict["weight"].shape), sorted(state_dict)[:2]       # dynconv_torch.DynamicConv2d's names
      ((2, 8, 4, 3, 3), ['attention.fc1.bias', 'attention.fc1.weight'])
    """
    arrays = _flax_to_numpy(variables, like, allow_nonfinite)
    try:
        import torch
    except ImportError:
        return arrays
    out = {}
    for k, a in arrays.items():
        if a.dtype.name == "bfloat16":
            out[k] = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        else:
            out[k] = torch.from_numpy(np.array(a))  # own copy: writable, contiguous
    return out


def _check_metadata(metadata) -> Dict[str, str]:
    """safetensors stores ``str -> str`` metadata; anything else is refused before the work starts."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError(f"save_safetensors: metadata must be a mapping of str to str, got {type(metadata).__name__}")
    bad = [f"{k!r}: {v!r}" for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ValueError(
            f"save_safetensors: metadata keys and values must be strings (safetensors stores "
            f"str -> str); these are not: {', '.join(bad[:5])}; convert them (str(v), json.dumps(v))"
        )
    return dict(metadata)


def save_safetensors(
    variables, path, like=None, metadata: Optional[Mapping[str, str]] = None, allow_nonfinite: bool = False
) -> None:
    """Write :func:`flax_to_torch` ``(variables, like, allow_nonfinite)`` to a ``.safetensors`` file (no
    torch needed); ``safetensors.torch.load_file(path)`` then gives the PyTorch state_dict.

    ``path`` (a file in an existing, writable folder) and ``metadata`` (``str -> str``) are checked
    before anything is converted (``ValueError``); the file is written atomically by safetensors.

    Examples:
      >>> import os, tempfile
      >>> import jax, jax.numpy as jnp
      >>> from safetensors.numpy import load_file
      >>> from dynconv_jax import CondConv
      >>> from dynconv_jax.convert import save_safetensors
      >>> variables = CondConv(8, (3, 3), num_experts=2).init(jax.random.key(0), jnp.ones((1, 8, 8, 4)))
      >>> path = os.path.join(tempfile.mkdtemp(), "layer.safetensors")
      >>> save_safetensors(variables, path, metadata={"source": "example"})
      >>> sorted(load_file(path))
      ['routing_fn.bias', 'routing_fn.weight', 'weight']
    """
    from safetensors.numpy import save_file

    path = check_output_file(path, "save_safetensors: path")
    metadata = _check_metadata(metadata)
    arrays = _flax_to_numpy(variables, like, allow_nonfinite)
    save_file(arrays, path, metadata={"format": "pt", **metadata})
