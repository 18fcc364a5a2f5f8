"""Warping BEV maps into the ego grid: whole-cell shifts by slicing agree with resampling."""
import math

import numpy as np
import torch

from v2xfuse.structures.bev import BevGrid, _resample, warp_to_ego, whole_cell_shifts
from v2xfuse.structures.transforms import pose_from_xyz_rpy

GRID = BevGrid(-6.4, -4.0, 6.4, 4.0, 0.8)  # 16 x 10 cells


def _poses(*xyyaw):
    return torch.tensor(np.stack([pose_from_xyz_rpy(x, y, 1.5, 0.0, 0.0, yaw) for x, y, yaw in xyyaw]),
                        dtype=torch.float32)


def test_a_whole_cell_shift_moves_a_cell_by_that_many_cells():
    features = torch.zeros(1, 2, GRID.ny, GRID.nx)
    features[0, :, 5, 3] = 1.0
    out = warp_to_ego(features, _poses((1.6, -2.4, 0.0)), GRID)   # +2 columns, -3 rows
    assert out[0, :, 2, 5].tolist() == [1.0, 1.0]
    assert float(out.sum()) == 2.0


def test_shifts_by_slicing_match_resampling():
    torch.manual_seed(0)
    features = torch.randn(6, 3, GRID.ny, GRID.nx)
    poses = _poses((0.0, 0.0, 0.0), (0.8, 0.0, 0.0), (-2.4, 1.6, 0.0), (4.0, -3.2, 0.0),
                   (20.0, 0.0, 0.0), (-0.8 * 15, -0.8 * 9, 0.0))  # the last two: (almost) off the grid
    _, is_shift = whole_cell_shifts(poses, GRID)
    assert is_shift.all()
    torch.testing.assert_close(warp_to_ego(features, poses, GRID), _resample(features, poses, GRID, "bilinear"),
                               atol=1e-5, rtol=0)


def test_rotated_or_fractional_transforms_are_resampled_beside_shifted_ones():
    torch.manual_seed(1)
    features = torch.randn(4, 3, GRID.ny, GRID.nx)
    poses = _poses((1.6, 0.8, 0.0), (1.0, 0.3, 0.0), (0.0, 0.0, math.radians(30)), (-0.8, 0.0, 0.0))
    _, is_shift = whole_cell_shifts(poses, GRID)
    assert is_shift.tolist() == [True, False, False, True]
    got = warp_to_ego(features, poses, GRID)
    torch.testing.assert_close(got, _resample(features, poses, GRID, "bilinear"), atol=1e-5, rtol=0)
    assert not torch.allclose(got[1], features[1], atol=1e-2)  # the fractional one really moved


def test_gradients_flow_through_a_shift():
    features = torch.randn(1, 2, GRID.ny, GRID.nx, requires_grad=True)
    warp_to_ego(features, _poses((2.4, 0.0, 0.0)), GRID).sum().backward()
    grad = features.grad[0, 0]
    assert (grad[:, :GRID.nx - 3] == 1).all() and (grad[:, GRID.nx - 3:] == 0).all()
