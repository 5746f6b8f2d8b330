"""Exports of the dynamic layers and models (PyTorch twin of :mod:`dynconv_jax.export`), one module per job:

* :mod:`~dynconv_torch.export.static` — a dynamic conv as one plain ``nn.Conv2d``: exact for one input
  (:func:`export_static`) or averaged over a calibration set, an approximation with its error measured
  (:func:`export_average`);
* :mod:`~dynconv_torch.export.batchnorm` — every eval-mode ``BatchNorm2d`` that follows a conv folded into it
  (:func:`fuse_bn`; the dynamic model stays exact for every input);
* :mod:`~dynconv_torch.export.portable` and :mod:`~dynconv_torch.export.onnx` — the dynamic layers in
  batch-independent operations (:class:`PortableDynamicConv`) and the ONNX graph with a dynamic batch axis
  built from them (:func:`to_onnx`), run in ONNX Runtime (:func:`onnx_session`, :func:`check_onnx`).
"""

from ._common import DYNAMIC_LAYERS, experts_oihw
from .batchnorm import ChannelBias, conv_batchnorm_pairs, fuse_bn
from .onnx import ONNX_OPSETS, check_onnx, onnx_session, to_onnx
from .portable import FORMULATIONS, PortableDynamicConv, batched_conv2d, portable
from .static import AverageExport, export_average, export_static, fold_attentions

__all__ = [
    "AverageExport",
    "ChannelBias",
    "DYNAMIC_LAYERS",
    "FORMULATIONS",
    "ONNX_OPSETS",
    "PortableDynamicConv",
    "batched_conv2d",
    "check_onnx",
    "conv_batchnorm_pairs",
    "experts_oihw",
    "export_average",
    "export_static",
    "fold_attentions",
    "fuse_bn",
    "onnx_session",
    "portable",
    "to_onnx",
]
