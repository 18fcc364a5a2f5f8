"""LiDAR and camera models on top of :mod:`v2xfuse.sim.raycast`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from ..structures.transforms import invert_transform, make_transform, rotation_from_rpy
from .config import CameraSpec, LidarSpec
from .raycast import BUILDING, GROUND, NOTHING, Solids, cast_grid

#: Bumped when rendering changes what a camera dataset holds; a dataset of another renderer is
#: regenerated (LiDAR-only data does not depend on it). 2: pixel centres at whole coordinates.
CAMERA_RENDERER = 2

__all__ = ["CAMERA_RENDERER", "LidarScan", "scan_lidar", "camera_intrinsic", "lidar_from_camera", "render_camera",
           "GroundModel"]

# (reflectivity (N,), albedo (N, 3)) of the ground at world xy points (N, 2).
GroundModel = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

# OpenCV camera axes (x right, y down, z forward) expressed in x-forward/y-left/z-up axes.
FLU_FROM_CV = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


@dataclass
class LidarScan:
    """One LiDAR sweep.

    Attributes:
        points: (N, 4) float32 [x, y, z, intensity] in the LiDAR frame, intensity in [0, 1]
            quantised to multiples of 1/255 (what 8-bit datasets can store exactly).
        owner: (N,) int64 actor id each point hit, or GROUND / BUILDING.
    """

    points: np.ndarray
    owner: np.ndarray


@lru_cache(maxsize=8)
def _lidar_grid(beams: int, el_min: float, el_max: float, steps: int):
    el = np.deg2rad(np.linspace(el_min, el_max, beams))
    az = -math.pi + np.arange(steps) * (2 * math.pi / steps)
    ce = np.cos(el)[:, None]
    dirs = np.stack([ce * np.cos(az)[None], ce * np.sin(az)[None],
                     np.broadcast_to(np.sin(el)[:, None], (beams, steps))], axis=-1)
    return el, az, dirs


def _lidar_windows(spec: LidarSpec, lidar_from_world: np.ndarray, solids: Solids, el: np.ndarray,
                   exclude_owner: int | None):
    steps = spec.azimuth_steps
    d_az = 2 * math.pi / steps
    corners = solids.corners() @ lidar_from_world[:3, :3].T + lidar_from_world[:3, 3]
    centre = corners.mean(axis=1)
    dist = np.hypot(centre[:, 0], centre[:, 1])
    half_diag = np.hypot(solids.half[:, 0], solids.half[:, 1])
    windows = []
    margin_el = (el[1] - el[0]) if len(el) > 1 else 0.01
    for i in range(len(solids)):
        if exclude_owner is not None and solids.owner[i] == exclude_owner:
            windows.append(None)
            continue
        if dist[i] - half_diag[i] > spec.max_range:
            windows.append(None)
            continue
        az_c = np.arctan2(corners[i, :, 1], corners[i, :, 0])
        if dist[i] <= half_diag[i]:
            cols = np.arange(steps)  # the sensor may be inside the footprint: all azimuths
        else:
            mid = math.atan2(centre[i, 1], centre[i, 0])
            rel = (az_c - mid + math.pi) % (2 * math.pi) - math.pi
            a0, a1 = mid + rel.min(), mid + rel.max()
            i0 = math.floor((a0 + math.pi) / d_az) - 1
            i1 = math.ceil((a1 + math.pi) / d_az) + 1
            cols = np.arange(i0, i1 + 1) % steps
        r_min = max(dist[i] - half_diag[i], 0.05)
        r_max = dist[i] + half_diag[i]
        top, bottom = corners[i, :, 2].max(), corners[i, :, 2].min()
        el_hi = math.atan2(top, r_min if top > 0 else r_max)
        el_lo = math.atan2(bottom, r_min if bottom < 0 else r_max)
        rows = np.nonzero((el >= el_lo - margin_el) & (el <= el_hi + margin_el))[0]
        windows.append((rows, cols))
    return windows


def scan_lidar(spec: LidarSpec, world_from_lidar: np.ndarray, solids: Solids, ground: GroundModel,
               rng: np.random.Generator, exclude_owner: int | None = None) -> LidarScan:
    """Ray-cast one sweep; ``exclude_owner`` is the agent's own vehicle (no self returns)."""
    el, _, dirs_l = _lidar_grid(spec.beams, spec.elevation_min_deg, spec.elevation_max_deg,
                                spec.azimuth_steps)
    rot = world_from_lidar[:3, :3]
    origin = world_from_lidar[:3, 3]
    dirs_w = dirs_l @ rot.T
    lidar_from_world = invert_transform(world_from_lidar)
    windows = _lidar_windows(spec, lidar_from_world, solids, el, exclude_owner)
    hits = cast_grid(origin, dirs_w, solids, windows, spec.max_range)

    valid = np.isfinite(hits.t) & (hits.t >= spec.min_range)
    valid &= rng.random(valid.shape) >= spec.dropout
    r_idx, c_idx = np.nonzero(valid)
    t = hits.t[r_idx, c_idx]
    owner = hits.owner[r_idx, c_idx]
    solid = hits.solid[r_idx, c_idx]
    cos_inc = hits.cos_incidence[r_idx, c_idx]

    reflect = np.empty(len(t))
    on_ground = owner == GROUND
    if on_ground.any():
        hit_w = origin + t[on_ground, None] * dirs_w[r_idx[on_ground], c_idx[on_ground]]
        reflect[on_ground] = ground(hit_w[:, :2])[0]
    reflect[~on_ground] = solids.reflectivity[solid[~on_ground]]
    intensity = reflect * (0.35 + 0.65 * cos_inc) * (1.0 - 0.4 * t / spec.max_range)
    intensity = intensity + rng.normal(0.0, spec.intensity_noise_std, len(t))
    intensity = np.round(np.clip(intensity, 0.0, 1.0) * 255.0) / 255.0

    t_noisy = t + rng.normal(0.0, spec.range_noise_std, len(t))
    xyz = t_noisy[:, None] * dirs_l[r_idx, c_idx]
    points = np.concatenate([xyz, intensity[:, None]], axis=1).astype(np.float32)
    return LidarScan(points, owner.astype(np.int64))


def camera_intrinsic(spec: CameraSpec) -> np.ndarray:
    """(3, 3) K of an ideal pinhole with the spec's horizontal field of view, square pixels."""
    f = (spec.width / 2.0) / math.tan(math.radians(spec.hfov_deg) / 2.0)
    return np.array([[f, 0.0, spec.width / 2.0], [0.0, f, spec.height / 2.0], [0.0, 0.0, 1.0]])


def lidar_from_camera(spec: CameraSpec) -> np.ndarray:
    """(4, 4) pose of the OpenCV camera frame in the agent's LiDAR frame."""
    look = rotation_from_rpy(0.0, math.radians(spec.mount_pitch_deg), math.radians(spec.mount_yaw_deg))
    return make_transform(look @ FLU_FROM_CV, spec.mount_xyz)


def _camera_windows(cam_from_world, k, width, height, solids: Solids, exclude_owner, max_dist):
    corners = solids.corners() @ cam_from_world[:3, :3].T + cam_from_world[:3, 3]
    windows = []
    all_rows, all_cols = np.arange(height), np.arange(width)
    near = 0.05
    for i in range(len(solids)):
        z = corners[i, :, 2]
        if (exclude_owner is not None and solids.owner[i] == exclude_owner) or z.max() < near \
                or np.linalg.norm(corners[i].mean(0)) > max_dist:
            windows.append(None)
            continue
        if z.min() < near:
            windows.append((all_rows, all_cols))
            continue
        u = k[0, 0] * corners[i, :, 0] / z + k[0, 2]
        v = k[1, 1] * corners[i, :, 1] / z + k[1, 2]
        c0, c1 = max(math.floor(u.min()) - 1, 0), min(math.ceil(u.max()) + 1, width - 1)
        r0, r1 = max(math.floor(v.min()) - 1, 0), min(math.ceil(v.max()) + 1, height - 1)
        if c0 > c1 or r0 > r1:
            windows.append(None)
            continue
        windows.append((np.arange(r0, r1 + 1), np.arange(c0, c1 + 1)))
    return windows


def render_camera(spec: CameraSpec, world_from_camera: np.ndarray, solids: Solids, ground: GroundModel,
                  exclude_owner: int | None = None, max_dist: float = 250.0):
    """Render one RGB image by ray casting each pixel centre. Pixel (row r, column c) is the ray
    through image point (u, v) = (c, r), the convention of OpenCV and of every consumer here
    (:func:`~v2xfuse.datasets.images.project_points`, the lss frustum): until renderer 2 the rays
    went through (c + 0.5, r + 0.5), half a pixel off the intrinsics the data declares.

    Returns:
        image: (H, W, 3) uint8 RGB.
        owner: (H, W) int64 id of what each pixel shows (actor id, GROUND, BUILDING, NOTHING).
    """
    k = camera_intrinsic(spec)
    h, w = spec.height, spec.width
    u = np.arange(w, dtype=np.float64)
    v = np.arange(h, dtype=np.float64)
    d_cam = np.stack(np.broadcast_arrays((u[None, :] - k[0, 2]) / k[0, 0],
                                         (v[:, None] - k[1, 2]) / k[1, 1], np.ones((h, w))), axis=-1)
    d_cam /= np.linalg.norm(d_cam, axis=-1, keepdims=True)
    dirs_w = d_cam @ world_from_camera[:3, :3].T
    origin = world_from_camera[:3, 3]
    cam_from_world = invert_transform(world_from_camera)
    windows = _camera_windows(cam_from_world, k, w, h, solids, exclude_owner, max_dist)
    hits = cast_grid(origin, dirs_w, solids, windows, max_dist)

    image = np.empty((h, w, 3))
    sky = np.clip(dirs_w[..., 2:3], 0.0, 1.0)
    image[:] = (1 - sky) * np.array([0.72, 0.80, 0.90]) + sky * np.array([0.35, 0.55, 0.85])
    on_ground = hits.owner == GROUND
    if on_ground.any():
        hit_w = origin + hits.t[on_ground, None] * dirs_w[on_ground]
        albedo = ground(hit_w[:, :2])[1]
        fog = np.clip(hits.t[on_ground] / max_dist, 0.0, 1.0)[:, None]
        image[on_ground] = (1 - fog) * albedo * 0.9 + fog * np.array([0.72, 0.80, 0.90])
    on_solid = hits.solid >= 0
    if on_solid.any():
        albedo = solids.colour[hits.solid[on_solid]]
        face_light = np.array([0.75, 0.6, 1.0])[hits.face_axis[on_solid]]
        light = 0.3 + 0.7 * face_light * (0.55 + 0.45 * hits.cos_incidence[on_solid])
        image[on_solid] = albedo * light[:, None]
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), hits.owner


__all__ += ["GROUND", "BUILDING", "NOTHING", "FLU_FROM_CV"]
