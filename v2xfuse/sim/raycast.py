"""Ray casting against the world's solid blocks and the flat ground.

All solids are upright blocks with a yaw (vehicle bodies, cabins, buildings), so a ray-block
test is the slab method in the block's local frame. Sensors cast a *grid* of rays (LiDAR:
beams x azimuth steps; camera: pixel rows x columns); for each block only the sub-grid that can
possibly hit it (its angular or image-space window) is tested, which keeps a frame near
linear in the number of rays that actually land on something.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Solids", "GridHits", "cast_grid"]

GROUND = -1     # owner id of the ground plane
BUILDING = -2   # owner id of buildings
NOTHING = -3    # owner id of rays that hit nothing (sky, beyond range)


@dataclass
class Solids:
    """Upright blocks in the world frame, one row each.

    Attributes:
        centre: (B, 2) xy of the block centre.
        z0, z1: (B,) bottom and top heights.
        half: (B, 2) half length (along yaw) and half width.
        yaw: (B,) radians.
        owner: (B,) int64 actor id, or BUILDING.
        reflectivity: (B,) LiDAR reflectivity in [0, 1].
        colour: (B, 3) RGB albedo in [0, 1].
    """

    centre: np.ndarray
    z0: np.ndarray
    z1: np.ndarray
    half: np.ndarray
    yaw: np.ndarray
    owner: np.ndarray
    reflectivity: np.ndarray
    colour: np.ndarray

    def __len__(self) -> int:
        return len(self.owner)

    def corners(self) -> np.ndarray:
        """(B, 8, 3) world corners."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        sx = np.array([1, 1, -1, -1, 1, 1, -1, -1], dtype=np.float64)
        sy = np.array([-1, 1, 1, -1, -1, 1, 1, -1], dtype=np.float64)
        lx = sx[None] * self.half[:, 0:1]
        ly = sy[None] * self.half[:, 1:2]
        x = self.centre[:, 0:1] + lx * c[:, None] - ly * s[:, None]
        y = self.centre[:, 1:2] + lx * s[:, None] + ly * c[:, None]
        z = np.where(np.arange(8)[None] < 4, self.z0[:, None], self.z1[:, None])
        return np.stack([x, y, z], axis=-1)

    def subset(self, index: np.ndarray) -> "Solids":
        return Solids(self.centre[index], self.z0[index], self.z1[index], self.half[index],
                      self.yaw[index], self.owner[index], self.reflectivity[index], self.colour[index])


@dataclass
class GridHits:
    """Per-ray results of :func:`cast_grid` for an (R1, R2) grid of rays.

    Attributes:
        t: (R1, R2) distance along the (unit) ray; inf where nothing was hit.
        solid: (R1, R2) int index into the solids, -1 for ground or nothing.
        owner: (R1, R2) int64 actor id, GROUND, BUILDING or NOTHING.
        cos_incidence: (R1, R2) |cos| of the angle between ray and surface normal.
        face_axis: (R1, R2) int8 0/1/2 for a block's x/y/z face, 2 for the ground.
    """

    t: np.ndarray
    solid: np.ndarray
    owner: np.ndarray
    cos_incidence: np.ndarray
    face_axis: np.ndarray


def cast_grid(origin: np.ndarray, dirs: np.ndarray, solids: Solids,
              windows: list[tuple[np.ndarray, np.ndarray] | None], max_t: float) -> GridHits:
    """Cast a grid of rays from one origin.

    Args:
        origin: (3,) world position of the sensor.
        dirs: (R1, R2, 3) unit ray directions in the world frame.
        solids: the blocks to test.
        windows: per block, ``(rows, cols)`` index arrays of the sub-grid that may hit it,
            or None to skip the block.
        max_t: rays longer than this are misses.
    """
    r1, r2, _ = dirs.shape
    t_best = np.full((r1, r2), np.inf)
    down = dirs[..., 2] < -1e-9
    t_ground = np.where(down, -origin[2] / np.where(down, dirs[..., 2], -1.0), np.inf)
    t_best = np.where((t_ground > 0) & (t_ground <= max_t), t_ground, np.inf)
    owner = np.where(np.isfinite(t_best), GROUND, NOTHING).astype(np.int64)
    solid_idx = np.full((r1, r2), -1, dtype=np.int64)
    cos_inc = np.abs(dirs[..., 2]).copy()
    face = np.full((r1, r2), 2, dtype=np.int8)

    cos_yaw, sin_yaw = np.cos(solids.yaw), np.sin(solids.yaw)
    for i, window in enumerate(windows):
        if window is None:
            continue
        rows, cols = window
        if len(rows) == 0 or len(cols) == 0:
            continue
        d = dirs[np.ix_(rows, cols)]
        c, s = cos_yaw[i], sin_yaw[i]
        rel = origin[:2] - solids.centre[i]
        o = np.array([rel[0] * c + rel[1] * s, -rel[0] * s + rel[1] * c, origin[2]])
        dl = np.stack([d[..., 0] * c + d[..., 1] * s, -d[..., 0] * s + d[..., 1] * c, d[..., 2]], -1)
        lo = np.array([-solids.half[i, 0], -solids.half[i, 1], solids.z0[i]])
        hi = np.array([solids.half[i, 0], solids.half[i, 1], solids.z1[i]])
        safe = np.where(np.abs(dl) < 1e-12, 1e-12, dl)
        inv = 1.0 / safe
        t1 = (lo - o) * inv
        t2 = (hi - o) * inv
        t_near_axes = np.minimum(t1, t2)
        t_near = t_near_axes.max(axis=-1)
        t_far = np.maximum(t1, t2).min(axis=-1)
        hit = (t_near <= t_far) & (t_near > 1e-6)
        if not hit.any():
            continue
        sub_best = t_best[np.ix_(rows, cols)]
        better = hit & (t_near < sub_best)
        if not better.any():
            continue
        axis = t_near_axes.argmax(axis=-1)
        cos_here = np.abs(np.take_along_axis(dl, axis[..., None], -1)[..., 0])
        rr, cc = np.nonzero(better)
        gr, gc = rows[rr], cols[cc]
        t_best[gr, gc] = t_near[rr, cc]
        owner[gr, gc] = solids.owner[i]
        solid_idx[gr, gc] = i
        cos_inc[gr, gc] = cos_here[rr, cc]
        face[gr, gc] = axis[rr, cc]
    t_best = np.where(t_best <= max_t, t_best, np.inf)
    owner = np.where(np.isfinite(t_best), owner, NOTHING)
    solid_idx = np.where(np.isfinite(t_best), solid_idx, -1)
    return GridHits(t_best, solid_idx, owner, cos_inc, face)
