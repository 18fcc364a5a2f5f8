"""3D boxes: the one layout used everywhere in v2xfuse.

Frames are right-handed, x forward, y left, z up, metres::

                 z (up)
                 |   x (forward, yaw = 0)
                 |  /
                 | /
    y (left) ____|/

A box is a row of 7 numbers ``[x, y, z, dx, dy, dz, yaw]`` in the frame named by the
variable that holds it (``boxes_ego``, ``boxes_world``...):

* ``x, y, z``  the box centre (z at the middle of the height, not the bottom);
* ``dx``       length, along the heading;  ``dy`` width;  ``dz`` height;
* ``yaw``      heading in radians, counter-clockwise from +x about +z.

Corners, seen from above (z up, out of the page), yaw = 0::

          y
          ^
     2 ---+--- 1        bottom face: 0 1 2 3, counter-clockwise from front-right
     |    |    |        top face:    4 5 6 7, above 0 1 2 3
     |    +----|---> x  (front = +x)
     |         |
     3 ------- 0

Datasets that store other conventions (OPV2V/CARLA left-handed axes and half extents,
DAIR-V2X ``world_8_points`` ordering) are converted by their adapters at load time.

Functions take numpy arrays or torch tensors and return the same kind.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..utils.precision import full_precision

__all__ = [
    "BOX_DIM",
    "CORNER_SIGNS",
    "BOX_EDGES",
    "box_corners",
    "corners_to_boxes",
    "transform_boxes",
    "wrap_angle",
    "points_in_boxes",
    "boxes_bev_corners",
]

BOX_DIM = 7

# Unit-box corner signs in the order documented above, (8, 3): bottom ccw then top.
CORNER_SIGNS = np.array(
    [
        [+1, -1, -1],
        [+1, +1, -1],
        [-1, +1, -1],
        [-1, -1, -1],
        [+1, -1, +1],
        [+1, +1, +1],
        [-1, +1, +1],
        [-1, -1, +1],
    ],
    dtype=np.float64,
)

# The 12 edges of a box as pairs of those corners: bottom face, top face, then the verticals.
BOX_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4],
                      [0, 4], [1, 5], [2, 6], [3, 7]])


def _as_torch(x) -> tuple[torch.Tensor, bool]:
    if isinstance(x, torch.Tensor):
        return x, False
    arr = np.asarray(x)
    if arr.dtype != np.float32:
        arr = arr.astype(np.float64, copy=False)
    return torch.from_numpy(np.ascontiguousarray(arr)), True


def _back(t: torch.Tensor, was_numpy: bool):
    return t.numpy() if was_numpy else t


def wrap_angle(angle, period: float = 2 * math.pi):
    """Wrap to ``[-period/2, period/2)``."""
    if isinstance(angle, torch.Tensor):
        return angle - torch.floor(angle / period + 0.5) * period
    a = np.asarray(angle, dtype=np.float64)
    return a - np.floor(a / period + 0.5) * period


def box_corners(boxes):
    """Corners of boxes.

    Args:
        boxes: (N, 7) [x, y, z, dx, dy, dz, yaw].
    Returns:
        (N, 8, 3) corners in the same frame, ordered as in the module docstring.
    """
    b, was_np = _as_torch(boxes)
    b = b.reshape(-1, BOX_DIM)
    signs = torch.as_tensor(CORNER_SIGNS, dtype=b.dtype, device=b.device)
    local = signs[None] * (0.5 * b[:, None, 3:6])
    c, s = torch.cos(b[:, 6]), torch.sin(b[:, 6])
    x = local[..., 0] * c[:, None] - local[..., 1] * s[:, None]
    y = local[..., 0] * s[:, None] + local[..., 1] * c[:, None]
    out = torch.stack([x, y, local[..., 2]], dim=-1) + b[:, None, 0:3]
    return _back(out, was_np)


def boxes_bev_corners(boxes):
    """(N, 4, 2) bird's-eye-view corners (bottom face xy), counter-clockwise."""
    corners = box_corners(boxes)
    return corners[:, :4, :2]


def corners_to_boxes(corners):
    """Fit ``[x, y, z, dx, dy, dz, yaw]`` to (N, 8, 3) corners in this module's order.

    The corners may come from a box that is rolled or pitched (a CARLA actor on a slope,
    a DAIR-V2X world box): centre is the mean corner, each extent the mean length of the
    four parallel edges, and yaw the heading of the mean front-minus-rear edge projected
    onto the xy plane.
    """
    c, was_np = _as_torch(corners)
    c = c.reshape(-1, 8, 3)
    centre = c.mean(dim=1)
    front = c[:, [0, 1, 4, 5]]
    rear = c[:, [3, 2, 7, 6]]
    left = c[:, [1, 2, 5, 6]]
    right = c[:, [0, 3, 4, 7]]
    bottom = c[:, 0:4]
    top = c[:, 4:8]
    dx = torch.linalg.norm(front - rear, dim=-1).mean(dim=1)
    dy = torch.linalg.norm(left - right, dim=-1).mean(dim=1)
    dz = torch.linalg.norm(top - bottom, dim=-1).mean(dim=1)
    heading = (front - rear).mean(dim=1)
    yaw = torch.atan2(heading[:, 1], heading[:, 0])
    out = torch.cat([centre, dx[:, None], dy[:, None], dz[:, None], yaw[:, None]], dim=1)
    return _back(out, was_np)


@full_precision
def transform_boxes(a_from_b, boxes_b):
    """Express boxes given in frame b in frame a.

    Args:
        a_from_b: (4, 4) transform; its rotation is assumed to keep z up (yaw-only up to the
            small roll/pitch of real poses), so box heights stay vertical.
        boxes_b: (N, 7) boxes in frame b.
    Returns:
        (N, 7) boxes in frame a, yaw wrapped to [-pi, pi).
    """
    b, was_np = _as_torch(boxes_b)
    t = torch.as_tensor(np.asarray(a_from_b) if not isinstance(a_from_b, torch.Tensor) else a_from_b,
                        dtype=b.dtype, device=b.device)
    b = b.reshape(-1, BOX_DIM)
    centre = b[:, 0:3] @ t[:3, :3].T + t[:3, 3]
    yaw = wrap_angle(b[:, 6] + torch.atan2(t[1, 0], t[0, 0]))
    out = torch.cat([centre, b[:, 3:6], yaw[:, None]], dim=1)
    return _back(out, was_np)


def points_in_boxes(points, boxes):
    """Which points lie inside which boxes.

    Args:
        points: (P, 3+) points; only xyz is used.
        boxes: (N, 7) boxes in the same frame.
    Returns:
        (P, N) bool mask.
    """
    p, was_np = _as_torch(points)
    b, _ = _as_torch(boxes)
    b = b.to(p.dtype).reshape(-1, BOX_DIM)
    rel = p[:, None, 0:3] - b[None, :, 0:3]
    c, s = torch.cos(b[:, 6]), torch.sin(b[:, 6])
    lx = rel[..., 0] * c + rel[..., 1] * s
    ly = -rel[..., 0] * s + rel[..., 1] * c
    half = 0.5 * b[:, 3:6]
    inside = (lx.abs() <= half[:, 0]) & (ly.abs() <= half[:, 1]) & (rel[..., 2].abs() <= half[:, 2])
    return _back(inside, was_np)
