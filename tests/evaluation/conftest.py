"""Hand-checkable box cases shared by the evaluation tests."""
from __future__ import annotations

import numpy as np
import pytest


def _aabb(x1: float, y1: float, x2: float, y2: float, z: float = 0.0, dz: float = 1.5) -> list:
    """Axis-aligned box from its BEV extent [x1, x2] x [y1, y2]: [x, y, z, dx, dy, dz, 0]."""
    return [(x1 + x2) / 2, (y1 + y2) / 2, z, x2 - x1, y2 - y1, dz, 0.0]


@pytest.fixture(scope="session")
def aabb():
    """aabb(x1, y1, x2, y2, z=0, dz=1.5) -> [x, y, z, dx, dy, dz, 0], an axis-aligned box."""
    return _aabb


@pytest.fixture
def opencood_vectors():
    """The reference cross-check case (reference/opencood-opv2v.md §4.5): 2 frames, 3 GT, 5 dets.

    Frame f1: GT A = [0,0,4,2], B = [10,0,14,2]
              dets ([0,0,4,2], 0.9)      IoU 1 with A
                   ([10.5,0,14.5,2], 0.3) IoU 7/9 = 0.778 with B (overlap 3.5 x 2 = 7, union 9)
                   ([20,0,24,2], 0.8)     no overlap
    Frame f2: GT C = [0,0,4,2]
              dets ([1,0,5,2], 0.6)       IoU 6/10 = 0.6 with C
                   ([30,0,34,2], 0.95)    no overlap
    Returns [(frame_id, det_boxes, det_scores, gt_boxes), ...].
    """
    return [
        ("f1", np.array([_aabb(0, 0, 4, 2), _aabb(10.5, 0, 14.5, 2), _aabb(20, 0, 24, 2)]),
         np.array([0.9, 0.3, 0.8]), np.array([_aabb(0, 0, 4, 2), _aabb(10, 0, 14, 2)])),
        ("f2", np.array([_aabb(1, 0, 5, 2), _aabb(30, 0, 34, 2)]),
         np.array([0.6, 0.95]), np.array([_aabb(0, 0, 4, 2)])),
    ]
