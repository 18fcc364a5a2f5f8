"""BEV backbone: strided conv blocks, each upsampled to a common stride and concatenated."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["BevBackbone", "conv_bn_relu"]


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(cout, eps=1e-3, momentum=0.1), nn.ReLU(inplace=True))


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
            if stride >= out_stride:
                k = stride // out_stride
                ups = nn.ConvTranspose2d(c, up, k, k, bias=False) if k > 1 else nn.Conv2d(c, up, 1, bias=False)
            else:
                k = out_stride // stride
                ups = nn.Conv2d(c, up, k, k, bias=False)
            self.ups.append(nn.Sequential(ups, nn.BatchNorm2d(up, eps=1e-3, momentum=0.1), nn.ReLU(inplace=True)))
            cin = c
        self.out_channels = int(sum(upsample_channels))
        self.out_stride = out_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for block, up in zip(self.blocks, self.ups):
            x = block(x)
            outs.append(up(x))
        return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
