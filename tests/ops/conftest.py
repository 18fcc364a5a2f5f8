"""Box-pair cases and a shapely oracle shared by the op tests."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from v2xfuse.structures import boxes_bev_corners


def _rand_boxes(rng, n, centre=5.0, dims=(0.5, 5.0)):
    boxes = np.zeros((n, 7))
    boxes[:, 0:2] = rng.uniform(-centre, centre, (n, 2))
    boxes[:, 2] = rng.uniform(-1, 1, n)
    boxes[:, 3:6] = rng.uniform(*dims, (n, 3))
    boxes[:, 6] = rng.uniform(-math.pi, math.pi, n)
    return boxes


def _offset_in_frame(boxes, du, dv):
    """Centres moved by (du, dv) along each box's heading and left axes."""
    out = boxes.copy()
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    out[:, 0] += c * du - s * dv
    out[:, 1] += s * du + c * dv
    return out


def make_box_pairs(n_per_case: int = 1000, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Named sets of row-paired boxes (a[k], b[k]), each (n_per_case, 7) float64."""
    rng = np.random.default_rng(seed)
    n = n_per_case
    cases = {}

    a = _rand_boxes(rng, n)
    b = _rand_boxes(rng, n, centre=1.0)
    b[:, 0:2] += a[:, 0:2]
    cases["random_overlapping"] = (a, b)

    a = _rand_boxes(rng, n)
    cases["identical"] = (a, a.copy())

    outer = _rand_boxes(rng, n, dims=(4.0, 8.0))
    inner = _rand_boxes(rng, n, dims=(0.2, 1.0))
    r_in = 0.5 * np.hypot(inner[:, 3], inner[:, 4])
    du = rng.uniform(-1, 1, n) * (0.5 * outer[:, 3] - r_in)
    dv = rng.uniform(-1, 1, n) * (0.5 * outer[:, 4] - r_in)
    inner[:, 0:2] = _offset_in_frame(outer, du, dv)[:, 0:2]
    half = n // 2
    cases["nested"] = (np.concatenate([outer[:half], inner[half:]]),
                       np.concatenate([inner[:half], outer[half:]]))

    # Same yaw, shifted by exactly the sum of half lengths: shared edge, shared corner, or a
    # sliver of overlap.
    a = _rand_boxes(rng, n)
    b = a.copy()
    b[:, 3:5] = rng.uniform(0.5, 5.0, (n, 2))
    b[:, 4] = np.where(rng.random(n) < 0.5, a[:, 4], b[:, 4])
    kind = rng.integers(0, 3, n)
    du = 0.5 * (a[:, 3] + b[:, 3]) - np.where(kind == 2, 1e-3, 0.0)
    dv = np.where(kind == 1, 0.5 * (a[:, 4] + b[:, 4]), 0.0)
    b[:, 0:2] = _offset_in_frame(a, du, dv)[:, 0:2]
    cases["touching"] = (a, b)

    a = _rand_boxes(rng, n)
    b = a.copy()
    b[:, 0:2] += rng.uniform(-1, 1, (n, 2))
    which = rng.integers(0, 6, n)
    a[which == 0, 3] = 0.0
    a[which == 1, 4] = 0.0
    a[which == 2, 3:5] = 0.0
    b[which == 3, 3] = 0.0
    b[which == 4, 4] = 0.0
    a[which == 5, 3] = 0.0
    b[which == 5, 4] = 0.0
    cases["zero_area"] = (a, b)

    a = _rand_boxes(rng, n)
    b = _rand_boxes(rng, n)
    b[:, 0:2] += rng.choice([-1, 1], (n, 2)) * rng.uniform(20, 1000, (n, 2))
    cases["far_apart"] = (a, b)

    a = _rand_boxes(rng, n, centre=50.0, dims=(1e-3, 1e-2))
    b = a.copy()
    b[:, 3:5] = rng.uniform(1e-3, 1e-2, (n, 2))
    b[:, 0:2] += rng.uniform(-5e-3, 5e-3, (n, 2))
    b[:, 6] = rng.uniform(-math.pi, math.pi, n)
    cases["tiny"] = (a, b)

    a = _rand_boxes(rng, n, centre=500.0, dims=(100.0, 1000.0))
    b = a.copy()
    b[:, 3:5] = rng.uniform(100.0, 1000.0, (n, 2))
    b[:, 0:2] += rng.uniform(-300, 300, (n, 2))
    b[:, 6] = rng.uniform(-math.pi, math.pi, n)
    cases["huge"] = (a, b)

    # Yaw multiples of pi/2 on an integer grid: many collinear edges and coincident corners.
    a = np.zeros((n, 7))
    b = np.zeros((n, 7))
    for boxes in (a, b):
        boxes[:, 0:2] = rng.integers(-2, 3, (n, 2))
        boxes[:, 3:6] = rng.integers(1, 5, (n, 3))
        boxes[:, 6] = rng.integers(-4, 5, n) * (math.pi / 2)
    cases["right_angles"] = (a, b)

    a = _rand_boxes(rng, n)
    b = a.copy()
    b[:, 3:5] = rng.uniform(0.5, 5.0, (n, 2))
    b[:, 0:2] += rng.uniform(-0.5, 0.5, (n, 2))
    b[:, 6] += rng.choice([-1, 1], n) * 10.0 ** rng.uniform(-9, -3, n) + \
        rng.integers(0, 4, n) * (math.pi / 2)
    cases["near_parallel"] = (a, b)
    return cases


def shapely_overlap_iou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BEV intersection area and IoU of row-paired boxes, by shapely in float64.

    The overlay runs on a fine grid (1e-12 of the coordinates' magnitude): GEOS's plain floating
    overlay can fail on edges shared up to the last bit (on the "touching" case it returned the
    whole smaller box as the intersection of two boxes that only share an edge).
    """
    import shapely
    from shapely.geometry import Polygon

    ca = boxes_bev_corners(np.asarray(a, dtype=np.float64))
    cb = boxes_bev_corners(np.asarray(b, dtype=np.float64))
    area_a = np.abs(a[:, 3] * a[:, 4])
    area_b = np.abs(b[:, 3] * b[:, 4])
    inter = np.zeros(len(a))
    for k in range(len(a)):
        if area_a[k] > 0 and area_b[k] > 0:  # shapely may reject degenerate rings
            grid = 1e-12 * max(np.abs(ca[k]).max(), np.abs(cb[k]).max())
            inter[k] = shapely.intersection(Polygon(ca[k]), Polygon(cb[k]), grid_size=grid).area
    union = area_a + area_b - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return inter, iou


def _paired(fn, a: torch.Tensor, b: torch.Tensor, block: int = 250) -> torch.Tensor:
    """fn(a[k], b[k]) for a pairwise (N, M) op, from the diagonals of (block, block) calls."""
    return torch.cat([fn(a[i:i + block], b[i:i + block]).diagonal()
                      for i in range(0, a.shape[0], block)])


@pytest.fixture(scope="session")
def paired():
    """paired(fn, a, b) -> fn(a[k], b[k]) for each k, with fn a pairwise (N, M) op."""
    return _paired


@pytest.fixture(scope="session")
def box_pair_cases():
    """{dtype: {case: (a, b, overlap, iou)}}: a, b (1000, 7) tensors of that dtype, and the
    shapely overlap and IoU (float64 numpy) of those exact (rounded) values. 10 cases."""
    pytest.importorskip("shapely")
    out = {}
    for dtype in (torch.float64, torch.float32):
        out[dtype] = {}
        for name, (a, b) in make_box_pairs().items():
            ta, tb = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
            out[dtype][name] = (ta, tb, *shapely_overlap_iou(ta.double().numpy(),
                                                             tb.double().numpy()))
    return out
