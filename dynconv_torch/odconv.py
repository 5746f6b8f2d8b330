"""ODConv: Omni-Dimensional Dynamic Convolution (Li, Zhou, Yao; ICLR 2022).

Follows the official implementation, OSVAI/ODConv ``modules/odconv.py``: the same attention
design (1x1 conv ``fc`` without bias -> BatchNorm -> ReLU, then 1x1-conv heads with bias for
the channel, filter, spatial and kernel attentions, each divided by the temperature), the
same skips, the same initialisation and the same parameter and buffer names and shapes, so an
official ``ODConv2d`` state dict loads with ``strict=True``. One initial value differs by
default: the attention BatchNorm's weight (γ) starts at ``attention_bn_init=0.1``, not 1.0, since
the official 1.0 makes the initial gradient explode at temperature 1 (docs/training.md);
``attention_bn_init=1.0`` is the official initialisation exactly.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynconv_spec import check_attention_norm, one_spelling

from ._layer import DynamicLayerMixin
from .functional import (
    aggregate_experts,
    check_input,
    check_temperature,
    conv_geometry,
    global_avg_pool,
    per_sample_conv2d,
    positive_int,
)


class ODConvAttention(nn.Module):
    """The four attentions of ODConv (official ``Attention``), computed from ``h = relu(bn(fc(GAP(x))))``.

    ``forward(x, T)`` returns ``(channel [B, I], filter [B, O] | None, spatial [B, kh, kw] | None,
    kernel [B, K] | None)``; ``None`` marks a skipped attention (the constant 1): filter for a
    depthwise convolution (``in == groups == out``), spatial for a 1x1 kernel, kernel for K == 1.
    The skipped heads have no parameters, as in the official code.

    Examples:
      >>> import torch
      >>> from dynconv_torch import ODConvAttention
      >>> attention = ODConvAttention(16, 32, (3, 3), groups=1, attention_channels=16, kernel_num=4).eval()
      >>> channel, filter, spatial, kernel = attention(torch.randn(2, 16, 8, 8), temperature=1.0)
      >>> kernel.shape, kernel.sum(1).allclose(torch.ones(2))     # softmax over the K experts
      (torch.Size([2, 4]), True)
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_size: Tuple[int, int],
        groups: int,
        attention_channels: int,
        kernel_num: int,
        *,
        norm: str = "batch",
        bn_init: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.kernel_size = kernel_size
        self.norm = norm
        self.bn_init = bn_init
        self.fc = nn.Conv2d(in_planes, attention_channels, 1, bias=False, **factory)
        if norm == "batch":
            self.bn = nn.BatchNorm2d(attention_channels, **factory)
        elif norm == "layer":  # over the attention width, per sample
            self.ln = nn.LayerNorm(attention_channels, **factory)
        self.channel_fc = nn.Conv2d(attention_channels, in_planes, 1, bias=True, **factory)
        depthwise = in_planes == groups == out_planes
        self.filter_fc = None if depthwise else nn.Conv2d(attention_channels, out_planes, 1, bias=True, **factory)
        taps = kernel_size[0] * kernel_size[1]
        self.spatial_fc = None if taps == 1 else nn.Conv2d(attention_channels, taps, 1, bias=True, **factory)
        self.kernel_fc = None if kernel_num == 1 else nn.Conv2d(attention_channels, kernel_num, 1, bias=True, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """1x1 convs kaiming_normal (fan_out, relu) with zero bias; BN (or LayerNorm) weight ``bn_init``,
        bias 0 (official: weight 1)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
                nn.init.constant_(m.weight, self.bn_init)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, temperature: float):
        batch = x.shape[0]
        z = self.fc(global_avg_pool(x)[:, :, None, None])  # [B, A, 1, 1]
        if self.norm == "batch":
            z = self.bn(z)
        elif self.norm == "layer":
            z = self.ln(z.flatten(1))[:, :, None, None]
        h = F.relu(z)

        def head(fc: Optional[nn.Conv2d]) -> Optional[Tensor]:
            return None if fc is None else fc(h).reshape(batch, -1) / temperature  # [B, n]

        channel = torch.sigmoid(head(self.channel_fc))
        filt = head(self.filter_fc)
        spatial = head(self.spatial_fc)
        kernel = head(self.kernel_fc)
        return (
            channel,
            None if filt is None else torch.sigmoid(filt),
            None if spatial is None else torch.sigmoid(spatial).reshape((batch,) + self.kernel_size),
            None if kernel is None else torch.softmax(kernel, dim=1),
        )


class ODConv2d(DynamicLayerMixin, nn.Module):
    """Omni-dimensional dynamic 2-D convolution (ODConv, Li et al., ICLR 2022; official OSVAI/ODConv).

    With ``h = relu(bn(fc(GAP(x))))`` and ``c = sigmoid(channel_fc(h)/T)`` ``[B, I]``,
    ``f = sigmoid(filter_fc(h)/T)`` ``[B, O]``, ``s = sigmoid(spatial_fc(h)/T)`` ``[B, kh, kw]``,
    ``a = softmax(kernel_fc(h)/T)`` ``[B, K]``, for each sample ``b``::

        y_b = f_b * conv(c_b * x_b, sum_k a_b[k] * s_b * W_k)

    Positional arguments, their names and defaults are the official ones
    (``in_planes, out_planes, kernel_size, stride, padding, dilation, groups, reduction,
    kernel_num``), then ``min_channel`` (16, fixed in the official code) and ``temperature``.
    This library's spellings ``in_channels``, ``out_channels``, ``num_experts`` and ``min_channels``
    (those of ``CondConv2d``, ``DynamicConv2d`` and the models) are accepted as keywords and readable as
    attributes; giving both spellings of one argument is a ``ValueError``. Beyond the official layer,
    ``kernel_size``/``stride``/``dilation`` may be pairs and ``padding`` may be a pair, 'same' or
    'valid'. No bias (as in the paper).

    ``attention_bn_init`` (keyword only, default 0.1) is the initial weight (γ) of the attention
    BatchNorm; ``attention_bn_init=1.0`` gives the official initialisation (the same parameters,
    drawn from the same random stream as the official layer). Only the initial value changes,
    not the parameters or the forward pass.

    ``attention_norm`` (keyword only): ``'batch'`` (default, the official BatchNorm),
    ``'layer'`` (``attention.ln``, a ``LayerNorm`` over the attention width, per sample, so
    training works with a batch of one; its weight starts at ``attention_bn_init``) or ``'none'``
    (``h = relu(fc(GAP(x)))``). ``'layer'``/``'none'`` change the state dict (no ``attention.bn.*``),
    so official checkpoints load only into ``'batch'``.

    Attention width ``A = max(int(in_planes * reduction), min_channel)``. Skips as the official
    code: no filter attention for depthwise (``in == groups == out``), no spatial attention for
    a 1x1 kernel, no kernel attention for K == 1; a 1x1 kernel with K == 1 takes the official
    fast path (one plain convolution between the channel and filter attentions).

    State dict (exactly the official one): ``weight [K, O, I/g, kh, kw]``,
    ``attention.fc.weight [A, I, 1, 1]``, ``attention.bn.{weight, bias, running_mean,
    running_var, num_batches_tracked}``, ``attention.channel_fc.{weight [I, A, 1, 1], bias [I]}``,
    ``attention.filter_fc.*`` (O outputs), ``attention.spatial_fc.*`` (kh*kw outputs),
    ``attention.kernel_fc.*`` (K outputs), the last three absent when skipped.

    The attention BatchNorm normalises over the batch in training, so a training-mode batch
    needs at least two samples (a ValueError says so).

    Examples:
      >>> import torch
      >>> from dynconv_torch import ODConv2d
      >>> layer = ODConv2d(16, 32, 3, padding=1, kernel_num=4)   # the official OSVAI/ODConv arguments
      >>> layer.weight.shape                                     # [K, O, I/g, kh, kw]
      torch.Size([4, 32, 16, 3, 3])
      >>> layer(torch.ones(2, 16, 8, 8)).shape
      torch.Size([2, 32, 8, 8])
    """

    def __init__(
        self,
        in_planes: Optional[int] = None,
        out_planes: Optional[int] = None,
        kernel_size=None,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        reduction: float = 0.0625,
        kernel_num: Optional[int] = None,
        min_channel: Optional[int] = None,
        temperature: float = 1.0,
        *,
        in_channels: Optional[int] = None,
        out_channels: Optional[int] = None,
        num_experts: Optional[int] = None,
        min_channels: Optional[int] = None,
        attention_bn_init: float = 0.1,
        attention_norm: str = "batch",
        device=None,
        dtype=None,
    ):
        super().__init__()
        in_planes = one_spelling("ODConv2d", "in_planes", in_planes, in_channels)
        out_planes = one_spelling("ODConv2d", "out_planes", out_planes, out_channels)
        kernel_num = one_spelling("ODConv2d", "kernel_num", kernel_num, num_experts, default=4)
        min_channel = one_spelling("ODConv2d", "min_channel", min_channel, min_channels, default=16)
        where = (
            f"ODConv2d(in_planes={in_planes!r}, out_planes={out_planes!r}, kernel_size={kernel_size!r}, "
            f"groups={groups!r}, kernel_num={kernel_num!r})"
        )
        if kernel_size is None:
            raise ValueError(f"{where}: kernel_size is required")
        self.kernel_size, self.stride, self.padding, self.dilation = conv_geometry(
            where, in_planes, out_planes, kernel_size, stride, padding, dilation, groups, kernel_num, dtype
        )
        if not reduction > 0:
            raise ValueError(f"{where}: reduction must be > 0, got {reduction!r}")
        positive_int(min_channel, "min_channel", where)
        check_attention_norm(where, attention_norm, attention_bn_init)
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.groups = groups
        self.kernel_num = kernel_num
        self.reduction = reduction
        self.min_channel = min_channel
        self.attention_channels = max(int(in_planes * reduction), min_channel)
        self.temperature = check_temperature(temperature, where)
        factory = {"device": device, "dtype": dtype}
        self.attention = ODConvAttention(
            in_planes,
            out_planes,
            self.kernel_size,
            groups,
            self.attention_channels,
            kernel_num,
            norm=attention_norm,
            bn_init=float(attention_bn_init),
            **factory,
        )
        # Drawn with randn before the kaiming init, as the official code does: the same seed then
        # gives the same initial parameters as the official layer (the random streams line up).
        self.weight = nn.Parameter(
            torch.randn((kernel_num, out_planes, in_planes // groups) + self.kernel_size, **factory)
        )
        self._initialize_experts()

    # This library's names (nn.Conv2d's), for code that treats the three layers alike.
    @property
    def in_channels(self) -> int:
        return self.in_planes

    @property
    def out_channels(self) -> int:
        return self.out_planes

    @property
    def num_experts(self) -> int:
        return self.kernel_num

    @property
    def min_channels(self) -> int:
        return self.min_channel

    @torch.no_grad()
    def _initialize_experts(self) -> None:
        for k in range(self.kernel_num):  # the official init: each expert kaiming_normal (fan_out, relu)
            nn.init.kaiming_normal_(self.weight[k], mode="fan_out", nonlinearity="relu")

    def reset_parameters(self) -> None:
        """The initialisation of the experts and the attention (BN running stats reset too): the
        official one, except the BN weight ``attention_bn_init``."""
        self.attention.reset_parameters()
        self._initialize_experts()

    def _layer_repr(self) -> str:
        return (
            f", kernel_num={self.kernel_num}, attention_channels={self.attention_channels}, "
            f"attention_bn_init={self.attention.bn_init}"
            + ("" if self.attention.norm == "batch" else f", attention_norm={self.attention.norm!r}")
        )

    def _attention(self, x: Tensor):
        check_input(x, self.in_planes, self._where(), self.weight.dtype)
        if self.training and x.shape[0] == 1 and self.attention.norm == "batch":
            raise ValueError(
                f"{self._where()}: got a batch of one sample in training mode; the attention's BatchNorm "
                f"normalises each channel over the batch and needs more than one sample. Use a batch of "
                f"at least 2, or call .eval() to use the running statistics."
            )
        return self.attention(x, self.temperature)

    def attentions(self, x: Tensor) -> Dict[str, Tensor]:
        """The non-skipped attentions for ``x``, named as the Flax modules sow them.

        ``kernel_attention [B, K]`` (all ones ``[B, 1]`` when K == 1, as in the Flax modules),
        ``channel_attention [B, I]``, ``filter_attention [B, O]``, ``spatial_attention [B, kh, kw]``.
        In training mode this updates the BatchNorm running statistics, like ``forward``.
        """
        channel, filt, spatial, kernel = self._attention(x)
        out = {
            "kernel_attention": kernel if kernel is not None else x.new_ones(x.shape[0], 1),
            "channel_attention": channel,
        }
        if filt is not None:
            out["filter_attention"] = filt
        if spatial is not None:
            out["spatial_attention"] = spatial
        return out

    def forward(self, x: Tensor) -> Tensor:
        """x: ``[B, I, H, W]`` -> ``[B, O, H', W']``."""
        channel, filt, spatial, kernel = self._attention(x)
        batch = x.shape[0]
        x = x * channel[:, :, None, None]
        if spatial is None and kernel is None:  # 1x1 kernel, K == 1: the official fast path
            out = F.conv2d(x, self.weight[0], None, self.stride, self.padding, self.dilation, self.groups)
        else:
            if kernel is None:
                kernel = x.new_ones(batch, 1)
            weight = aggregate_experts(kernel, self.weight)  # [B, O, I/g, kh, kw]
            if spatial is not None:
                weight = weight * spatial[:, None, None]  # spatial [B, 1, 1, kh, kw]
            out = per_sample_conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
        if filt is not None:
            out = out * filt[:, :, None, None]
        return out
