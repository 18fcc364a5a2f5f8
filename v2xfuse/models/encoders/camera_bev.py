"""A deliberately simple camera BEV encoder: BEV cell centres projected into the images.

    images (K, 3, H, W) -> two stride-2 convs -> (K, C, H/4, W/4)
    every BEV cell centre at each of ``heights`` -> K @ inv(lidar_from_camera) -> pixel
    -> bilinear sample of its camera's features -> mean over the cameras and heights that see
       the cell -> (N, C, ny, nx) per agent; cells no camera sees are zero.

No depth is estimated, so an image feature lands on every cell whose chosen heights project
onto it (the "inverse perspective mapping" of a flat world). It reads the images only through
their calibration, which is what this encoder is for: the camera path of the data (augmented
``lidar_from_camera``, adjusted intrinsics) exercised end to end at little cost. The encoder
that estimates depth is :mod:`.lss` (``type: lss``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import ENCODERS
from ...structures.bev import BevGrid
from ...utils.precision import full_precision
from ..inputs import AgentInputs

__all__ = ["CameraBev"]

# ImageNet statistics: what pretrained image backbones expect, and a sane scale for a new one.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@ENCODERS.register("camera_bev")
class CameraBev(nn.Module):
    """Camera images of N agents -> (N, C, ny, nx) maps on ``grid``, in each agent's LiDAR frame.

    Args:
        point_range: (6,) [x0, y0, z0, x1, y1, z1]: the BEV extent in each agent's frame.
        cell: BEV cell size in metres (the builder passes the LiDAR encoder's so the maps
            align; required without one).
        out_channels: C.
        hidden_channels: width of the first image conv.
        heights: z of the projected cell centres, metres in the LiDAR frame (LiDARs sit about
            1.5-2 m above the road: -1.5 is near the road, -0.7 mid-height of a car).
        min_depth: metres; a cell closer to a camera than this (or behind it) is not seen by it.
    """

    sensor = "camera"

    def __init__(self, point_range, cell: float | None = None, out_channels: int = 16,
                 hidden_channels: int = 16, heights=(-1.5, -0.7), min_depth: float = 1.0):
        super().__init__()
        if cell is None:
            raise ValueError("camera_bev: give `cell` (BEV cell size in metres) when no LiDAR "
                             "encoder sets the grid")
        self.grid = BevGrid(point_range[0], point_range[1], point_range[3], point_range[4], float(cell))
        self.out_channels = int(out_channels)
        self.heights = tuple(float(h) for h in heights)
        self.min_depth = float(min_depth)
        self.image_net = nn.Sequential(
            nn.Conv2d(3, hidden_channels, 3, 2, 1, bias=False), nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, out_channels, 3, 2, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, inputs: AgentInputs) -> torch.Tensor:
        """``inputs.cameras`` -> (N, C, ny, nx); agents without a camera get a zero map."""
        n, ny, nx = inputs.num_agents, self.grid.ny, self.grid.nx
        cams = inputs.cameras
        if cams is None or cams.num_cameras == 0:
            return self.mean.new_zeros((n, self.out_channels, ny, nx))
        images = (cams.images.to(self.mean.dtype) / 255.0 - self.mean) / self.std
        feats = self.image_net(images)                                     # (K, C, h, w)
        grid, seen = self.sample_grid(cams.intrinsics, cams.lidar_from_camera, images.shape[-2:])
        sampled = F.grid_sample(feats, grid.to(feats.dtype), mode="bilinear", padding_mode="zeros",
                                align_corners=False)                       # (K, C, Z, ny*nx)
        sampled = (sampled * seen[:, None].to(feats.dtype)).sum(2)         # (K, C, ny*nx)
        count = seen.sum(1).to(feats.dtype)                                # (K, ny*nx)
        total = feats.new_zeros((n, self.out_channels, ny * nx)).index_add_(0, cams.agent, sampled)
        hits = feats.new_zeros((n, ny * nx)).index_add_(0, cams.agent, count)
        return (total / hits.clamp(min=1.0)[:, None]).view(n, self.out_channels, ny, nx)

    @full_precision
    def sample_grid(self, intrinsics: torch.Tensor, lidar_from_camera: torch.Tensor,
                    image_size) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each camera sees each cell centre at each height.

        Args:
            intrinsics: (K, 3, 3); lidar_from_camera: (K, 4, 4), inverted as a matrix since
                augmentation may have made it a reflection (see :mod:`v2xfuse.datasets.pipeline`).
            image_size: (H, W) of the images ``intrinsics`` refer to.
        Returns:
            (``grid_sample`` coordinates (K, Z, ny*nx, 2) in [-1, 1] with align_corners=False,
            (K, Z, ny*nx) bool: in front of the camera and inside its image).
        """
        dev = lidar_from_camera.device
        xs, ys = self.grid.centres(dev, torch.float64)
        z = torch.tensor(self.heights, dtype=torch.float64, device=dev)
        pts = torch.stack([xs.reshape(1, -1).expand(len(z), -1), ys.reshape(1, -1).expand(len(z), -1),
                           z[:, None].expand(-1, xs.numel())], -1)        # (Z, M, 3)
        cam_from_lidar = torch.linalg.inv(lidar_from_camera.to(torch.float64))
        p = (torch.einsum("kij,zmj->kzmi", cam_from_lidar[:, :3, :3], pts)
             + cam_from_lidar[:, None, None, :3, 3])
        uvw = torch.einsum("kij,kzmj->kzmi", intrinsics.to(torch.float64), p)
        depth = p[..., 2]
        uv = uvw[..., :2] / depth.clamp(min=1e-6)[..., None]
        h, w = image_size
        # pixel centres at integers (OpenCV); align_corners=False puts -1 at the left edge, -0.5 px
        norm = torch.stack([(uv[..., 0] + 0.5) / w, (uv[..., 1] + 0.5) / h], -1) * 2 - 1
        seen = (depth > self.min_depth) & (norm.abs() <= 1).all(-1)
        return norm.masked_fill(~seen[..., None], -2.0), seen
