"""ONNX serving: :func:`to_onnx` writes an ONNX graph with a dynamic batch axis (BatchNorms folded,
every dynamic layer as a :class:`~dynconv_torch.export.portable.PortableDynamicConv`);
:func:`onnx_session` and :func:`check_onnx` run and check it in ONNX Runtime."""

from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from dynconv_spec.paths import check_output_file

from ..condconv import CondConv2d
from ._common import check_eval, refuse_kernelwarehouse
from .batchnorm import fuse_bn
from .portable import portable

# Opsets the export is tested with (torch's exporter, onnxruntime); the default is the newest.
ONNX_OPSETS = tuple(range(17, 21))
"""The ONNX opsets :func:`~dynconv_torch.export.to_onnx` accepts (tested with onnxruntime)."""


def _check_input_shape(input_shape, what: str) -> Tuple[Optional[int], int, int, int]:
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if (
        shape is None
        or len(shape) != 4
        or not (shape[0] is None or (isinstance(shape[0], int) and shape[0] > 0))
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:])
    ):
        raise ValueError(
            f"{what}: input_shape={input_shape!r}; expected a 4-D NCHW shape (None or batch, C, H, W) "
            "with positive ints, e.g. (None, 3, 32, 32)"
        )
    return shape


def to_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    input_shape: Sequence[Optional[int]],
    opset: Optional[int] = None,
    *,
    fuse: bool = True,
    formulation: str = "matmul",
) -> str:
    """Write the eval-mode ``model`` (or a single dynamic layer) as ONNX with a dynamic batch axis.

    The graph folds BatchNorms first (:func:`fuse_bn`, unless ``fuse=False``) and computes
    every dynamic layer with :class:`PortableDynamicConv` (``formulation``), so it runs at any
    batch size. Input ``'input'`` ``[batch, C, H, W]`` (float32), output ``'output'``; the
    spatial size is fixed to ``input_shape``'s. A layer with ``external_routing`` (which needs
    routing weights from outside) cannot be exported alone.

    Args:
      model: an eval-mode ``nn.Module`` taking one NCHW tensor.
      path: the ``.onnx`` file to write (the weights are stored inside it).
      input_shape: ``(None, C, H, W)``; a batch size instead of None is only used for tracing.
      opset: ONNX opset, one of :data:`ONNX_OPSETS` (None: the newest).
      fuse: fold BatchNorms into the convolutions.
      formulation: 'matmul' or 'experts' (see :class:`PortableDynamicConv`).

    Returns the path written. Needs ``onnx`` (``pip install 'dynconv[export]'``).

    Examples:
      >>> import torch
      >>> from dynconv_torch import ODConv2d
      >>> layer = ODConv2d(4, 8, 3, padding=1, kernel_num=3).eval()
      >>> x = torch.randn(1, 4, 8, 8)
      >>> import os, tempfile
      >>> from dynconv_torch.export import to_onnx, check_onnx
      >>> path = to_onnx(layer, os.path.join(tempfile.mkdtemp(), "layer.onnx"), (None, 4, 8, 8))
      >>> check_onnx(layer, path, torch.randn(3, 4, 8, 8)) < 1e-5     # any batch size
      True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_onnx: expected a torch.nn.Module, got {type(model).__name__}")
    check_eval(model, "to_onnx")
    refuse_kernelwarehouse(model, "to_onnx")
    path = check_output_file(path, "to_onnx: path")  # before the tracing, not after it
    shape = _check_input_shape(input_shape, "to_onnx")
    if opset is None:
        opset = ONNX_OPSETS[-1]
    if opset not in ONNX_OPSETS:
        raise ValueError(f"to_onnx: opset={opset!r} is not supported; expected one of {ONNX_OPSETS}")
    if isinstance(model, CondConv2d) and model.external_routing:
        raise ValueError(
            "to_onnx: a CondConv2d with external_routing needs routing weights from outside; export "
            "the model that computes them"
        )
    served = portable(fuse_bn(model) if fuse else model, formulation)
    example = torch.randn((2,) + tuple(shape[1:]), dtype=torch.float32)
    with torch.no_grad():
        try:
            served(example)
        except (ValueError, RuntimeError) as error:
            raise ValueError(
                f"to_onnx: input_shape={tuple(input_shape)!r} does not fit {type(model).__name__}: {error}"
            ) from error
    # The TorchScript exporter: the dynamo one measured several times slower (docs/tools.md).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            served,
            (example,),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return path


def onnx_session(path: Union[str, os.PathLike], threads: Optional[int] = None):
    """An ``onnxruntime.InferenceSession`` on CPU for ``path``; a ValueError names a file that is not a valid model.

    Examples:
      >>> import torch
      >>> from dynconv_torch import ODConv2d
      >>> layer = ODConv2d(4, 8, 3, padding=1, kernel_num=3).eval()
      >>> x = torch.randn(1, 4, 8, 8)
      >>> import os, tempfile
      >>> from dynconv_torch.export import to_onnx, onnx_session
      >>> session = onnx_session(to_onnx(layer, os.path.join(tempfile.mkdtemp(), "layer.onnx"), (None, 4, 8, 8)))
      >>> session.run(None, {"input": x.numpy()})[0].shape
      (1, 8, 8, 8)
    """
    import onnxruntime as ort

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"onnx_session: no file {path!r}")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail / InvalidProtobuf types
        raise ValueError(
            f"onnx_session: {path!r} is not a valid ONNX model (corrupt or another format): "
            f"{type(error).__name__}: {error}"
        ) from error


@torch.no_grad()
def check_onnx(model: nn.Module, path: Union[str, os.PathLike], x: Tensor, session=None) -> float:
    """``max|onnxruntime(x) - model(x)| / max|model(x)|`` for the eval-mode ``model`` and its export at ``path``.

    A model in training mode is refused: it would compare batch statistics with the export's running ones (a
    false error) and update the caller's BatchNorm running statistics.

    Examples:
      >>> import torch
      >>> from dynconv_torch import ODConv2d
      >>> layer = ODConv2d(4, 8, 3, padding=1, kernel_num=3).eval()
      >>> x = torch.randn(1, 4, 8, 8)
      >>> import os, tempfile
      >>> from dynconv_torch.export import to_onnx, check_onnx
      >>> path = to_onnx(layer, os.path.join(tempfile.mkdtemp(), "layer.onnx"), (2, 4, 8, 8))   # a fixed batch of 2
      >>> check_onnx(layer, path, torch.randn(2, 4, 8, 8)) < 1e-5          # max|ORT - eager| / max|eager|
      True
    """
    check_eval(model, "check_onnx")
    session = session or onnx_session(path)
    expected = model(x.float()).numpy()
    actual = session.run(None, {session.get_inputs()[0].name: x.float().numpy()})[0]
    scale = float(abs(expected).max())
    diff = float(abs(actual - expected).max())
    return diff / scale if scale > 0 else diff
