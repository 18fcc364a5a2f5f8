"""3D key points read from the image features of the cameras that see them (the query head's
camera mode, ``sample_from: camera``; Sparse4D's and ACCO's feature sampling).

    key points (B, M, 3) in each map's frame (its agent's LiDAR frame as the batch has it)
      -> every camera k of map b:  [u d, v d, d] = K_k @ (inv(lidar_from_camera_k) @ p)[:3]
      -> seen by camera k where d > MIN_DEPTH_M and (u, v) lies inside its image:
         u in [-0.5, W - 0.5], v in [-0.5, H - 0.5] (pixel centres at integers, OpenCV)
      -> bilinear sample of camera k's (C, h, w) features at (u, v): ``grid_sample`` with
         ``align_corners=False`` at ((u + 0.5) / W * 2 - 1, (v + 0.5) / H * 2 - 1); a stride-s
         feature pixel j covers image columns [j s, (j + 1) s) and sits at u = j s + (s - 1) / 2,
         which is where this mapping puts its centre (the lift-splat encoder's convention)
      -> the mean over the cameras that see the point; (0, not seen) where none does.

The intrinsics are the ones the pipeline adjusted to its resizing and cropping and
``lidar_from_camera`` includes its augmentation, so a point lands on the pixel that saw it
whatever the pipeline did to the image; the latter is inverted as a matrix (an augmented one
may reflect and scale). The calibration is composed in float64; the points stay in their
dtype, so gradients reach them (the learned key-point offsets) as well as the features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...utils.precision import full_precision
from ..inputs import CameraFeatures

__all__ = ["MIN_DEPTH_M", "project_to_cameras", "sample_cameras"]

#: a point closer to a camera's image plane than this (or behind it) is not seen by it
MIN_DEPTH_M = 0.1


@full_precision
def project_to_cameras(points: torch.Tensor,
                       cameras: CameraFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Each camera's view of the key points of its own map.

    Args:
        points: (B, M, 3) x, y, z in each map's frame.
        cameras: K cameras, ``cameras.agent`` indexing the B maps.
    Returns:
        ((K, M, 2) pixel coordinates [u, v] (meaningless where the depth is not positive),
        (K, M) depth along each camera's optical axis).
    """
    l64 = cameras.lidar_from_camera.to(torch.float64)
    camera_from_map = torch.linalg.inv(l64)[:, :3, :]                      # (K, 3, 4)
    project = (cameras.intrinsics.to(torch.float64) @ camera_from_map).to(points.dtype)
    own = points[cameras.agent]                                            # (K, M, 3)
    uvd = torch.einsum("kij,kmj->kmi", project[:, :, :3], own) + project[:, None, :, 3]
    depth = uvd[..., 2]
    uv = uvd[..., :2] / depth.clamp(min=MIN_DEPTH_M)[..., None]
    return uv, depth


def sample_cameras(points: torch.Tensor, cameras: CameraFeatures | None,
                   channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The image features at B maps' key points, averaged over the cameras that see each
    (module docstring).

    Args:
        points: (B, M, 3) in each map's frame.
        cameras: the maps' K cameras (``agent`` in 0..B-1; K may be 0), or None: no map has one.
        channels: C of the features (what to return when no camera exists).
    Returns:
        ((B, M, C) the mean feature, 0 where no camera sees the point, (B, M) bool seen by at
        least one camera).
    """
    b, m = points.shape[:2]
    if cameras is None or cameras.num_cameras == 0:
        return points.new_zeros(b, m, channels), torch.zeros(b, m, dtype=torch.bool,
                                                             device=points.device)
    feats = cameras.features
    h, w = cameras.image_size
    uv, depth = project_to_cameras(points.to(feats.dtype), cameras)
    grid = torch.stack([(uv[..., 0] + 0.5) / w, (uv[..., 1] + 0.5) / h], dim=-1) * 2 - 1
    seen = (depth > MIN_DEPTH_M) & (grid.abs() <= 1).all(-1)              # (K, M)
    grid = grid.masked_fill(~seen[..., None], -2.0)  # outside: zeros, and no gradient
    sampled = F.grid_sample(feats, grid[:, :, None], mode="bilinear", padding_mode="zeros",
                            align_corners=False)[..., 0]                  # (K, C, M)
    sampled = sampled * seen[:, None].to(feats.dtype)
    total = feats.new_zeros(b, feats.shape[1], m).index_add_(0, cameras.agent, sampled)
    count = feats.new_zeros(b, m).index_add_(0, cameras.agent, seen.to(feats.dtype))
    mean = total / count.clamp(min=1.0)[:, None]
    return mean.transpose(1, 2), count > 0
