"""Voxelisation of every agent's points with spconv's ``PointToVoxel`` (CPU and CUDA)."""
from __future__ import annotations

import torch
from torch import nn

from ..utils.spconv_compat import spconv_utils

__all__ = ["Voxelizer", "Voxels"]


class Voxels:
    """Voxelised points of N agents.

    Attributes:
        features: (V, T, 4) float32 points per voxel [x, y, z, intensity], zero-padded.
        num_points: (V,) int32 valid points per voxel.
        coords: (V, 4) int32 [agent, z, y, x] (spconv order).
    """

    __slots__ = ("features", "num_points", "coords")

    def __init__(self, features: torch.Tensor, num_points: torch.Tensor, coords: torch.Tensor):
        self.features, self.num_points, self.coords = features, num_points, coords


class Voxelizer(nn.Module):
    """Groups points into voxels per agent.

    Args:
        voxel_size: (3,) metres.
        point_range: (6,) [x0, y0, z0, x1, y1, z1] in each agent's frame.
        max_points_per_voxel: T; extra points in a voxel are dropped (first come first kept).
        max_voxels: per agent; beyond it voxels are dropped.
    """

    def __init__(self, voxel_size, point_range, max_points_per_voxel: int = 32, max_voxels: int = 40000):
        super().__init__()
        self.voxel_size = [float(v) for v in voxel_size]
        self.point_range = [float(v) for v in point_range]
        self.max_points_per_voxel = int(max_points_per_voxel)
        self.max_voxels = int(max_voxels)
        self._generators: dict[str, object] = {}

    def grid_size(self) -> tuple[int, int, int]:
        """(nx, ny, nz)."""
        return tuple(int(round((self.point_range[i + 3] - self.point_range[i]) / self.voxel_size[i]))
                     for i in range(3))

    def _generator(self, device: torch.device):
        key = str(device)
        if key not in self._generators:
            self._generators[key] = spconv_utils().PointToVoxel(
                vsize_xyz=self.voxel_size, coors_range_xyz=self.point_range, num_point_features=4,
                max_num_voxels=self.max_voxels, max_num_points_per_voxel=self.max_points_per_voxel,
                device=device)
        return self._generators[key]

    @torch.no_grad()
    def forward(self, points: torch.Tensor, num_agents: int) -> Voxels:
        """points: (P, 5) [agent, x, y, z, intensity] -> :class:`Voxels` of all agents."""
        gen = self._generator(points.device)
        agent = points[:, 0].long()
        counts = torch.bincount(agent, minlength=num_agents).tolist()
        # collate stacks the agents' clouds in order: then each agent's points are already one
        # run and the stable argsort (1.2-1.7x the rest of the voxeliser) changes nothing.
        if len(agent) > 1 and not bool((agent[1:] >= agent[:-1]).all()):
            points = points[torch.argsort(agent, stable=True)]
        chunks = torch.split(points[:, 1:].contiguous(), counts)
        feats, coords, npts = [], [], []
        for i, chunk in enumerate(chunks):
            if len(chunk) == 0:
                continue
            v, c, n = gen(chunk)
            feats.append(v)
            coords.append(torch.nn.functional.pad(c, (1, 0), value=i))
            npts.append(n)
        if not feats:
            return Voxels(points.new_zeros((0, self.max_points_per_voxel, 4)),
                          torch.zeros(0, dtype=torch.int32, device=points.device),
                          torch.zeros((0, 4), dtype=torch.int32, device=points.device))
        return Voxels(torch.cat(feats), torch.cat(npts).to(torch.int32), torch.cat(coords).to(torch.int32))
