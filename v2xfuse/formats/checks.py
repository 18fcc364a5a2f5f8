"""Checks the format readers apply to what they parsed: rigid transforms and finite numbers.

Each check raises ``ValueError`` whose message starts with ``where`` (the file and the field);
the dataset adapters re-raise it as :class:`~v2xfuse.datasets.base.DatasetError`, and
``tools/check_dataset.py`` reports it, so a loader and the checker can never disagree.

Rigidity tolerances (``||R^T R - I||_F``, Frobenius, so it bounds every singular value's distance
from 1 and every pair of columns' lack of orthogonality):

* :data:`RIGID_TOL` = 0.05 for **poses** (DAIR ``lidar_to_novatel``, ``novatel_to_world``,
  ``virtuallidar_to_world``; OPV2V camera extrinsics). The DAIR poses quoted in
  shared/reference/dair-v2x.md 1.5 deviate by ~1e-6, and users report real DAIR-V2X rotations
  off by ~1e-3..1e-2 (rounding, re-calibration), so 0.05 passes them with a margin of 5 while a
  scale of 1.05 (dev 0.18), a shear of 0.05 (dev 0.07), a reflection (det < 0) or a singular
  matrix (dev >= 1) fails. A pose that is not rigid would warp one agent's points and features
  into the ego frame stretched or mirrored, without any other symptom.
* :data:`CAMERA_RIGID_TOL` = 0.5 for DAIR **camera extrinsics** (``lidar_to_camera``,
  ``virtuallidar_to_camera``): some released ones are known not to be orthonormal (issue #64,
  "secondary calibration ... led to a non-standard rotation matrix"; frame 000009 has det 0.813
  and ``||R^T R - I||`` = 0.33). They are used as given, through a true inverse, so they only
  need to be invertible and orientation-preserving; 0.5 still rejects a scale of 2 (dev 5.2),
  a reflection (det < 0) and a singular matrix (dev >= 1).
"""
from __future__ import annotations

import numpy as np

__all__ = ["RIGID_TOL", "CAMERA_RIGID_TOL", "check_rigid", "check_finite", "json_type"]

RIGID_TOL = 0.05
CAMERA_RIGID_TOL = 0.5


def check_rigid(m, where: str, tol: float = RIGID_TOL) -> np.ndarray:
    """``m`` as a (4, 4) float64 rigid transform, or ``ValueError`` naming ``where``.

    Rigid here: finite, bottom row ``[0, 0, 0, 1]``, ``det(R) > 0`` (no reflection, not singular)
    and ``||R^T R - I||_F <= tol`` (see the module docstring for the tolerances).
    """
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"{where}: expected a 4x4 transform, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{where}: transform contains NaN or inf")
    if not np.allclose(m[3], (0.0, 0.0, 0.0, 1.0), atol=1e-9):
        raise ValueError(f"{where}: bottom row must be [0, 0, 0, 1], got {m[3].tolist()}")
    rot = m[:3, :3]
    det = float(np.linalg.det(rot))
    if det <= 0.0:
        what = "singular" if abs(det) < 1e-12 else "a reflection"
        raise ValueError(f"{where}: rotation is {what} (det {det:.4g}), not a rigid rotation")
    dev = float(np.linalg.norm(rot.T @ rot - np.eye(3)))
    if dev > tol:
        sv = np.linalg.svd(rot, compute_uv=False)
        raise ValueError(f"{where}: rotation is not orthonormal: ||R^T R - I|| = {dev:.3g} > "
                         f"{tol} (det {det:.4g}, singular values {np.round(sv, 4).tolist()}; "
                         f"scaled or sheared)")
    return m


def check_finite(values, where: str) -> np.ndarray:
    """``values`` as a float64 array, or ``ValueError`` naming ``where`` if any is NaN/inf."""
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}: expected finite numbers, got {np.asarray(values).tolist()!r}")
    return arr


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages (``"object"``, ``"array"``...)."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)
