"""Rigid transforms between frames, as 4x4 float64 matrices named ``a_from_b``.

``a_from_b`` maps homogeneous points expressed in frame ``b`` into frame ``a``::

    p_a = a_from_b @ p_b          (p as a column [x, y, z, 1])
    a_from_c = a_from_b @ b_from_c

Every frame in v2xfuse is right-handed, x forward, y left, z up, metres (see
:mod:`v2xfuse.structures.boxes` for the diagram). Rotations from Euler angles use the
z-y-x (yaw-pitch-roll) convention, radians: ``R = Rz(yaw) @ Ry(pitch) @ Rx(roll)``.

Functions accept numpy arrays and return numpy arrays; batched inputs ``(..., 4, 4)``
broadcast where noted.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "make_transform",
    "rotation_from_rpy",
    "rpy_from_rotation",
    "rotation_z",
    "pose_from_xyz_rpy",
    "invert_transform",
    "transform_points",
    "yaw_of",
    "relative_transform",
]


def rotation_z(yaw: float) -> np.ndarray:
    """(3, 3) rotation by ``yaw`` radians about +z (counter-clockwise seen from above)."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotation_from_rpy(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """(3, 3) rotation ``Rz(yaw) @ Ry(pitch) @ Rx(roll)``, angles in radians."""
    cr, sr = np.cos(roll), np.sin(roll)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    return np.array(
        [
            [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
            [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
            [-sp, cp * sr, cp * cr],
        ]
    )


def rpy_from_rotation(rotation: np.ndarray) -> tuple[float, float, float]:
    """Inverse of :func:`rotation_from_rpy`: ``(roll, pitch, yaw)`` in radians."""
    r = np.asarray(rotation, dtype=np.float64)
    yaw = float(np.arctan2(r[1, 0], r[0, 0]))
    pitch = float(np.arctan2(-r[2, 0], np.hypot(r[2, 1], r[2, 2])))
    roll = float(np.arctan2(r[2, 1], r[2, 2]))
    return roll, pitch, yaw


def make_transform(rotation: np.ndarray, translation) -> np.ndarray:
    """(4, 4) float64 transform from a (3, 3) rotation and a translation of 3 values."""
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = np.asarray(translation, dtype=np.float64).reshape(3)
    return out


def pose_from_xyz_rpy(x: float, y: float, z: float, roll: float = 0.0, pitch: float = 0.0,
                      yaw: float = 0.0) -> np.ndarray:
    """(4, 4) ``parent_from_child`` pose from a position and z-y-x Euler angles (radians)."""
    return make_transform(rotation_from_rpy(roll, pitch, yaw), (x, y, z))


def invert_transform(a_from_b: np.ndarray) -> np.ndarray:
    """``b_from_a``. A true matrix inverse, not a transpose: some released calibrations
    (DAIR-V2X ``virtuallidar_to_camera``) carry rotations that are not orthonormal."""
    return np.linalg.inv(np.asarray(a_from_b, dtype=np.float64))


def relative_transform(world_from_a: np.ndarray, world_from_b: np.ndarray) -> np.ndarray:
    """``a_from_b = inv(world_from_a) @ world_from_b``."""
    return np.linalg.solve(np.asarray(world_from_a, np.float64), np.asarray(world_from_b, np.float64))


def transform_points(a_from_b: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map points from frame b to frame a.

    Args:
        a_from_b: (4, 4) transform.
        points: (N, 3 + K) array; columns beyond xyz (intensity, ...) are carried unchanged.
    Returns:
        (N, 3 + K) array of the same dtype as ``points``.
    """
    pts = np.asarray(points)
    t = np.asarray(a_from_b, dtype=np.float64)
    xyz = pts[:, :3].astype(np.float64) @ t[:3, :3].T + t[:3, 3]
    out = pts.copy()
    out[:, :3] = xyz
    return out


def yaw_of(a_from_b: np.ndarray) -> float:
    """Heading of frame b's +x axis in frame a, projected onto a's xy plane (radians)."""
    t = np.asarray(a_from_b, dtype=np.float64)
    return float(np.arctan2(t[1, 0], t[0, 0]))
