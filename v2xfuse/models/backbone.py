"""BEV backbone: strided conv blocks, each upsampled to a common stride and concatenated."""
from __future__ import annotations

import torch
from torch import nn

from ..registry import BACKBONES

__all__ = ["BevBackbone", "conv_bn_relu", "upsample_to"]


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1), nn.ReLU(inplace=True))


def upsample_to(cin: int, cout: int, stride: int, out_stride: int) -> nn.Sequential:
    """The neck of one block: (N, cin) maps at ``stride`` -> (N, cout) at ``out_stride``
    (transposed conv up, strided conv down, 1x1 conv at the same stride), then BN + ReLU."""
    if stride >= out_stride:
        k = stride // out_stride
        ups = nn.ConvTranspose2d(cin, cout, k, k, bias=False) if k > 1 else nn.Conv2d(cin, cout, 1, bias=False)
    else:
        k = out_stride // stride
        ups = nn.Conv2d(cin, cout, k, k, bias=False)
    return nn.Sequential(ups, nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1), nn.ReLU(inplace=True))


@BACKBONES.register("dense")
class BevBackbone(nn.Module):
    """SECOND/PointPillars-style 2D backbone.

    Args:
        in_channels: channels of the input BEV map.
        layer_strides, layer_channels, layer_nums: per block, its stride (relative to the
            previous block), width and number of extra 3x3 convs.
        upsample_channels: per block, width after upsampling to ``out_stride``.
        out_stride: stride of the output relative to the input.

    ``forward``: (N, in_channels, H, W) -> (N, sum(upsample_channels), H/out_stride, W/out_stride).
    """

    def __init__(self, in_channels: int, layer_strides=(2, 2), layer_channels=(64, 128),
                 layer_nums=(3, 3), upsample_channels=(64, 64), out_stride: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.ups = nn.ModuleList()
        stride, cin = 1, in_channels
        for s, c, n, up in zip(layer_strides, layer_channels, layer_nums, upsample_channels):
            layers = [conv_bn_relu(cin, c, s)] + [conv_bn_relu(c, c) for _ in range(n)]
            self.blocks.append(nn.Sequential(*layers))
            stride *= s
            self.ups.append(upsample_to(c, up, stride, out_stride))
            cin = c
        self.out_channels = int(sum(upsample_channels))
        self.out_stride = out_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for block, up in zip(self.blocks, self.ups):
            x = block(x)
            outs.append(up(x))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
