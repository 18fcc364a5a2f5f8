"""SECOND (Yan et al., Sensors 2018): sparse 3D convolution over voxels, collapsed to BEV.

    points -> PointToVoxel -> mean of each voxel's points (4 features)
           -> submanifold 3D conv blocks at full resolution, strided sparse convs that halve z
           -> dense (N, C, D, ny, nx) -> (N, C * D, ny, nx) BEV map on the voxel xy grid.

The xy resolution is kept (only z is reduced), so the BEV grid is the voxel grid and the 2D
backbone sets the detection stride, as for PointPillars. Runs on CPU with spconv's CPU wheel
(backward fixed in :mod:`v2xfuse.utils.spconv_compat`) and on CUDA with ``spconv-cuXXX``.
"""
from __future__ import annotations

import torch
from torch import nn

from ...registry import ENCODERS
from ...utils.spconv_compat import spconv_pytorch
from ...structures.bev import BevGrid
from ..inputs import AgentInputs
from ..voxelize import Voxelizer

__all__ = ["Second"]


def _norm_act(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm1d(channels, eps=1e-3, momentum=0.1), nn.ReLU())


@ENCODERS.register("second")
class Second(nn.Module):
    """Points of N agents -> (N, C, ny, nx) BEV maps on ``grid``.

    Args:
        point_range: (6,) [x0, y0, z0, x1, y1, z1] in each agent's frame.
        voxel_size: (3,) metres; the BEV cell is voxel_size[0] (== voxel_size[1]).
        channels: widths of the sparse stages; each stage after the first halves z.
        max_points_per_voxel, max_voxels: voxeliser limits (per agent).
    """

    sensor = "lidar"

    def __init__(self, point_range, voxel_size=(0.4, 0.4, 0.4), channels=(16, 32, 32),
                 max_points_per_voxel: int = 8, max_voxels: int = 60000):
        super().__init__()
        if abs(voxel_size[0] - voxel_size[1]) > 1e-9:
            raise ValueError(f"SECOND needs square BEV cells, got voxel_size {voxel_size}")
        sp = spconv_pytorch()
        self.voxelizer = Voxelizer(voxel_size, point_range, max_points_per_voxel, max_voxels)
        nx, ny, nz = self.voxelizer.grid_size()
        self.sparse_shape = [nz, ny, nx]
        layers: list[nn.Module] = []
        cin, depth = 4, nz
        for i, c in enumerate(channels):
            if i == 0:
                layers += [sp.SubMConv3d(cin, c, 3, padding=1, bias=False, indice_key="subm0")]
            else:  # halve z only: (3, 1, 1) kernel, stride (2, 1, 1)
                layers += [sp.SparseConv3d(cin, c, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0),
                                           bias=False),
                           sp.SparseSequential(*_norm_act(c)),
                           sp.SubMConv3d(c, c, 3, padding=1, bias=False, indice_key=f"subm{i}")]
                depth = (depth + 2 - 3) // 2 + 1
            layers.append(sp.SparseSequential(*_norm_act(c)))
            cin = c
        self.net = sp.SparseSequential(*layers)
        self.out_depth = depth
        self.out_channels = cin * depth
        self.grid = BevGrid(point_range[0], point_range[1], point_range[3], point_range[4],
                            voxel_size[0])

    def forward(self, inputs: AgentInputs) -> torch.Tensor:
        """``inputs.points`` (P, 5) [agent, x, y, z, intensity] -> (N, C * D, ny, nx); an agent
        without points (or ``points`` None) gets a zero map."""
        sp = spconv_pytorch()
        num_agents = inputs.num_agents
        if inputs.points is None or len(inputs.points) == 0:  # spconv cannot convolve no voxel
            return next(self.parameters()).new_zeros((num_agents, self.out_channels,
                                                      self.grid.ny, self.grid.nx))
        voxels = self.voxelizer(inputs.points, num_agents)
        n = voxels.num_points.clamp(min=1).to(voxels.features.dtype)
        mean = voxels.features.sum(dim=1) / n[:, None]  # padding rows are zeros
        x = sp.SparseConvTensor(mean, voxels.coords, self.sparse_shape, num_agents)
        dense = self.net(x).dense()  # (N, C, D, ny, nx)
        return dense.flatten(1, 2).contiguous()
