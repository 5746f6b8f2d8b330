"""Exports of the dynamic layers and models, one module per job:

* :mod:`~dynconv_jax.export.static` — a dynamic conv as one plain ``flax.linen.Conv``: exact for one input
  (:func:`export_static`) or averaged over a calibration set, an approximation with its error measured
  (:func:`export_average`);
* :mod:`~dynconv_jax.export.batchnorm` — every inference-mode BatchNorm that follows a conv folded into it
  (:func:`fuse_batchnorm`; the dynamic model stays exact for every input);
* :mod:`~dynconv_jax.export.stablehlo` — the inference function serialised with ``jax.export``
  (:func:`to_stablehlo`) and run without the model's code (:func:`load_stablehlo`).

The PyTorch twin, :mod:`dynconv_torch.export`, is split the same way.
"""

from dynconv_jax.export.batchnorm import conv_batchnorm_pairs, fuse_batchnorm
from dynconv_jax.export.stablehlo import STABLEHLO_MAGIC, load_stablehlo, to_stablehlo
from dynconv_jax.export.static import (
    AverageExport,
    StaticExport,
    export_average,
    export_static,
    fold_attentions,
    layer_attentions,
)

__all__ = [
    "AverageExport",
    "STABLEHLO_MAGIC",
    "StaticExport",
    "conv_batchnorm_pairs",
    "export_average",
    "export_static",
    "fold_attentions",
    "fuse_batchnorm",
    "layer_attentions",
    "load_stablehlo",
    "to_stablehlo",
]
