"""What the three dynamic layers share beyond :mod:`.functional`: temperature and ``repr``.

:class:`DynamicLayerMixin` gives CondConv2d (Yang et al., NeurIPS 2019), DynamicConv2d (Chen et
al., CVPR 2020) and ODConv2d (Li et al., ICLR 2022) one ``update_temperature`` (the official
OSVAI/ODConv name), one ``extra_repr`` and the ``where`` prefix of their error messages.
"""

from __future__ import annotations

from .functional import check_temperature, conv_extra_repr


class DynamicLayerMixin:
    """Temperature update and ``repr`` of a dynamic conv layer; list it before ``nn.Module``.

    The layer provides ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``,
    ``dilation``, ``groups``, ``temperature`` and ``_layer_repr()``: its own ``extra_repr`` fields
    after the convolution geometry, each as ``", name=value"``.
    """

    def update_temperature(self, temperature: float) -> None:
        """Set T (a plain attribute, not part of the state dict)."""
        self.temperature = check_temperature(temperature, self._where())

    def _where(self) -> str:
        """``ClassName(<extra_repr>)``, the prefix of the layer's error messages."""
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        s = conv_extra_repr(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation, self.groups
        )
        s += self._layer_repr()
        if self.temperature != 1.0:
            s += f", temperature={self.temperature}"
        return s
