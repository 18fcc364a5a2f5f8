"""A BEV backbone on the occupied pillars only (PillarNet, Shi et al., CVPR 2022, section 3.2).

    Pillars: features (V, C) at coords (V, 4) [agent, 0, y, x] on the (ny, nx) grid
      -> per block: SparseConv2d 3x3 at the block's stride (an output cell is active when an
         input cell of its 3x3 window is), then SubMConv2d 3x3 (active cells stay the same)
         each followed by BatchNorm1d + ReLU over the active cells' features
      -> each block's output densified (zero where inactive) and passed through the same neck
         as :class:`~.backbone.BevBackbone`'s (upsample to ``out_stride``, BN2d, ReLU); where
         the neck's conv maps each input cell to its own output cells it runs on the active
         cells before the densifying (the same products, see ``_sparse_neck``)
      -> concatenated: (N, sum(upsample_channels), ny / out_stride, nx / out_stride).

The cost of the blocks follows the number of active cells instead of the grid's area. The
output has the dense backbone's shape and channels for the same widths, so fusion methods and
heads read it unchanged. Parameter names are the dense backbone's too (``blocks.i.j.0`` the
conv, ``blocks.i.j.1`` the norm, ``ups.i``); only the conv weights' layout differs (spconv's
(out, kH, kW, in) against torch's (out, in, kH, kW)).

On a fully occupied grid of even size it computes what the dense backbone computes (a strided
3x3 conv's outputs are all active, a submanifold conv is a dense conv, and BN over the active
cells is BN over the map). Elsewhere it differs on purpose: empty cells stay empty through
the submanifold convs instead of filling in, and BatchNorm's statistics are those of the
active cells.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import BACKBONES
from ..utils.spconv_compat import spconv_pytorch
from .backbone import upsample_to
from .encoders.pointpillars import Pillars

__all__ = ["SparseBevBackbone"]


def _sparse_conv_bn_relu(cin: int, cout: int, stride: int, key: str, grow: bool = False):
    """A SparseConv2d (stride > 1, or ``grow``: the active cells and a ring around them) or a
    SubMConv2d sharing rule book ``key``, then BatchNorm1d + ReLU on the features; its children
    are numbered as ``conv_bn_relu``'s."""
    sp = spconv_pytorch()
    if stride > 1 or grow:
        conv = sp.SparseConv2d(cin, cout, 3, stride, padding=1, bias=False)
    else:
        conv = sp.SubMConv2d(cin, cout, 3, padding=1, bias=False, indice_key=key)
    return sp.SparseSequential(conv, nn.BatchNorm1d(cout, eps=1e-3, momentum=0.1),
                               nn.ReLU(inplace=True))


def _finish_neck(up: nn.Sequential, spread: nn.Module, conv_out: torch.Tensor) -> torch.Tensor:
    """A neck after its conv: the spread, then the neck's norm and ReLU."""
    return up[1:](spread(conv_out))


def _sparse_neck(up: nn.Sequential, x, spread: nn.Module) -> torch.Tensor:
    """``up(x.dense())`` for a neck of ``upsample_to``, with its convolution applied to the
    active cells only where each output cell reads one input cell (a 1x1 conv, a transposed
    conv of kernel = stride): without a bias an inactive (zero) cell gives zeros, so the conv
    of the zero-filled map is the active cells' products scattered into a zero map. At the
    OPV2V grid the necks are 10 of the 19.5 G multiply-adds left on the synthetic world's
    clouds when they run densely. A strided (downsampling) neck sums a window: dense.
    ``spread`` runs between the neck's conv and its norm.

    The map is built channels-last (its memory; the shape is NCHW): each active cell writes
    k rows of k * C contiguous values, where a channel-first map took one scattered cache line
    per channel (the OPV2V grid's two upsampling necks: 100 of a forward's 470 ms). The
    spread, norm and ReLU run on it channels-last (a depthwise conv 3x faster so); the
    caller makes the concatenated maps contiguous once."""
    conv = up[0]
    if isinstance(conv, nn.ConvTranspose2d) and conv.kernel_size == conv.stride:
        k = conv.stride[0]
        # weight (in, out, k, k) -> columns (dy, dx, out): output cell (y * k + dy, x * k + dx)
        cols = x.features @ conv.weight.permute(0, 2, 3, 1).flatten(1)
    elif isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1):
        k = 1
        cols = x.features @ conv.weight.flatten(1).T  # weight (out, in, 1, 1)
    else:
        return _finish_neck(up, spread, conv(x.dense()))
    (ny, nx), cout, n = x.spatial_shape, conv.out_channels, x.batch_size
    canvas = cols.new_zeros((n, ny, k, nx, k, cout))
    b, y, xs = x.indices.long().unbind(1)
    canvas[b, y, :, xs] = cols.view(-1, k, k, cout)
    canvas = canvas.view(n, ny * k, nx * k, cout).permute(0, 3, 1, 2)
    return _finish_neck(up, spread, canvas)


def _transpose_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for one of them channels-last and the other NCHW-contiguous, as one
    2D transpose per sample: torch's blocked transpose, a quarter of the time of the generic
    strided copy (``.contiguous()``) at the OPV2V grid."""
    n, c, h, w = src.shape
    for b in range(n):
        if src.is_contiguous():  # (c, h * w) -> channels-last rows (h * w, c)
            dst[b].permute(1, 2, 0).view(h * w, c).copy_(src[b].view(c, h * w).T)
        else:
            dst[b].view(c, h * w).copy_(src[b].permute(1, 2, 0).reshape(h * w, c).T)


class _ConcatNCHW(torch.autograd.Function):
    """``torch.cat(maps, 1).contiguous()`` of NCHW or channels-last maps; the backward gives
    each map its gradient in the map's own memory format, by the same transposes."""

    @staticmethod
    def forward(ctx, *maps):
        n, _, h, w = maps[0].shape
        out = maps[0].new_empty((n, sum(m.shape[1] for m in maps), h, w))
        ctx.layouts, c0 = [], 0
        for m in maps:
            c = m.shape[1]
            last = not m.is_contiguous() and m.is_contiguous(memory_format=torch.channels_last)
            if last:
                _transpose_into(out[:, c0:c0 + c], m)
            else:
                out[:, c0:c0 + c] = m
            ctx.layouts.append((c0, c, last))
            c0 += c
        return out

    @staticmethod
    def backward(ctx, grad):
        grad, grads = grad.contiguous(), []
        for c0, c, last in ctx.layouts:
            part = grad[:, c0:c0 + c]
            if last:
                g = torch.empty_like(part, memory_format=torch.channels_last)
                _transpose_into(g, part.contiguous())
                grads.append(g)
            else:
                grads.append(part)
        return tuple(grads)


@BACKBONES.register("sparse")
class SparseBevBackbone(nn.Module):
    """The :class:`~.backbone.BevBackbone` of the same arguments on sparse pillars.

    A block of stride 1 starts with a submanifold conv (a regular one would grow the active
    set by a ring of cells at every layer), or with ``grow_first`` with a regular one: one
    ring of cells around the pillars per block, where a car's centre often has no point.

    ``spread`` (an odd kernel size, 0 for none) adds to each block's neck, between its conv
    and its norm, a dense depthwise ``spread x spread`` conv: what the submanifold convs keep
    on the active cells reaches the empty cells around them (a dense backbone's 3x3 convs fill
    those in), at a cost of ``spread**2`` multiply-adds per output cell and channel: PillarNet's
    dense neck at the price of a depthwise one.

    ``forward``: :class:`~.encoders.pointpillars.Pillars` of N agents ->
    (N, sum(upsample_channels), ny / out_stride, nx / out_stride).
    """

    #: the detector hands this backbone the encoder's ``pillars(inputs)``, not a dense map
    sparse_input = True

    def __init__(self, in_channels: int, layer_strides=(2, 2), layer_channels=(64, 128),
                 layer_nums=(3, 3), upsample_channels=(64, 64), out_stride: int = 2,
                 grow_first: bool = False, spread: int = 0):
        super().__init__()
        spread = int(spread)
        if spread < 0 or (spread and spread % 2 == 0):
            raise ValueError(f"model.backbone.spread: an odd kernel size or 0, got {spread}")
        sp = spconv_pytorch()
        self.blocks = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.spreads = nn.ModuleList()
        self.layer_strides = [int(s) for s in layer_strides]
        stride, cin = 1, in_channels
        for i, (s, c, n, up) in enumerate(zip(layer_strides, layer_channels, layer_nums,
                                              upsample_channels)):
            key = f"subm{i}"
            layers = [_sparse_conv_bn_relu(cin, c, s, key, grow=grow_first)]
            layers += [_sparse_conv_bn_relu(c, c, 1, key) for _ in range(n)]
            self.blocks.append(sp.SparseSequential(*layers))
            stride *= s
            self.ups.append(upsample_to(c, up, stride, out_stride))
            self.spreads.append(nn.Conv2d(up, up, spread, padding=spread // 2, groups=up,
                                          bias=False) if spread else nn.Identity())
            cin = c
        self.layer_channels = [int(c) for c in layer_channels]
        self.out_channels = int(sum(upsample_channels))
        self.out_stride = out_stride

    def forward(self, pillars: Pillars) -> torch.Tensor:
        sp = spconv_pytorch()
        if len(pillars.features) == 0:  # spconv cannot convolve no cell: every block is zero
            return self._necks(self._zero_blocks(pillars))
        indices = pillars.coords[:, [0, 2, 3]].to(torch.int32).contiguous()
        x = sp.SparseConvTensor(pillars.features, indices, [pillars.ny, pillars.nx],
                                pillars.num_agents)
        outs = []
        for block, up, spread in zip(self.blocks, self.ups, self.spreads):
            x = block(x)
            outs.append(_sparse_neck(up, x, spread))
        return _ConcatNCHW.apply(*outs)  # the NCHW map fusion methods and heads read

    def _necks(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        outs = [_finish_neck(up, spread, up[0](x))
                for up, spread, x in zip(self.ups, self.spreads, blocks)]
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]

    def _zero_blocks(self, pillars: Pillars) -> list[torch.Tensor]:
        """What each block outputs when no agent has a pillar: zero maps of its shape."""
        weight = next(self.parameters())
        ny, nx, out = pillars.ny, pillars.nx, []
        for s, c in zip(self.layer_strides, self.layer_channels):
            if s > 1:  # a 3x3 conv, padding 1
                ny, nx = (ny - 1) // s + 1, (nx - 1) // s + 1
            out.append(weight.new_zeros((pillars.num_agents, c, ny, nx)))
        return out
