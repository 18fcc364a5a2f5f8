import math

import numpy as np
import pytest
import torch

from v2xfuse.structures import (AgentObs, CoopFrame, box_corners, corners_to_boxes, invert_transform,
                                points_in_boxes, pose_from_xyz_rpy, relative_transform,
                                rotation_from_rpy, rpy_from_rotation, transform_boxes,
                                transform_points, wrap_angle)


def random_poses(rng, n):
    return [pose_from_xyz_rpy(*rng.uniform(-100, 100, 3), *rng.uniform(-0.3, 0.3, 2),
                              rng.uniform(-math.pi, math.pi)) for _ in range(n)]


def test_rotation_is_z_y_x_euler():
    # A 90 degree yaw maps +x to +y (counter-clockwise seen from above, z up).
    r = rotation_from_rpy(0.0, 0.0, math.pi / 2)
    np.testing.assert_allclose(r @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    # A positive pitch tips +x downwards (right-hand rule about +y).
    r = rotation_from_rpy(0.0, math.pi / 2, 0.0)
    np.testing.assert_allclose(r @ [1, 0, 0], [0, 0, -1], atol=1e-12)
    # A positive roll lifts +y to +z.
    r = rotation_from_rpy(math.pi / 2, 0.0, 0.0)
    np.testing.assert_allclose(r @ [0, 1, 0], [0, 0, 1], atol=1e-12)


def test_rpy_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(100):
        rpy = rng.uniform([-1.5, -1.5, -3.1], [1.5, 1.5, 3.1])
        r = rotation_from_rpy(*rpy)
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(rpy_from_rotation(r), rpy, atol=1e-10)


def test_transform_round_trip_and_composition():
    rng = np.random.default_rng(1)
    world_from_a, world_from_b, world_from_c = random_poses(rng, 3)
    pts_c = rng.normal(size=(50, 4))
    a_from_c = relative_transform(world_from_a, world_from_c)
    a_from_b = relative_transform(world_from_a, world_from_b)
    b_from_c = relative_transform(world_from_b, world_from_c)
    np.testing.assert_allclose(a_from_b @ b_from_c, a_from_c, atol=1e-9)
    direct = transform_points(a_from_c, pts_c)
    chained = transform_points(a_from_b, transform_points(b_from_c, pts_c))
    np.testing.assert_allclose(direct, chained, atol=1e-9)
    np.testing.assert_allclose(direct[:, 3], pts_c[:, 3])  # extra columns untouched
    back = transform_points(invert_transform(a_from_c), direct)
    np.testing.assert_allclose(back, pts_c, atol=1e-9)


def test_corner_order_matches_diagram():
    box = np.array([[10.0, 5.0, 1.0, 4.0, 2.0, 1.5, 0.0]])
    c = box_corners(box)[0]
    expected = np.array([
        [12, 4, 0.25], [12, 6, 0.25], [8, 6, 0.25], [8, 4, 0.25],
        [12, 4, 1.75], [12, 6, 1.75], [8, 6, 1.75], [8, 4, 1.75],
    ])
    np.testing.assert_allclose(c, expected, atol=1e-12)
    # Bottom face is counter-clockwise seen from above: positive signed area.
    xy = c[:4, :2]
    area = 0.5 * np.sum(xy[:, 0] * np.roll(xy[:, 1], -1) - np.roll(xy[:, 0], -1) * xy[:, 1])
    assert area == pytest.approx(8.0)


def test_corners_follow_yaw():
    # yaw = +90 deg: the front (corners 0, 1) points to +y.
    c = box_corners(np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 1.0, math.pi / 2]]))[0]
    assert c[0, 1] == pytest.approx(2.0) and c[1, 1] == pytest.approx(2.0)
    assert c[0, 0] == pytest.approx(1.0) and c[1, 0] == pytest.approx(-1.0)


def test_corners_to_boxes_inverts_box_corners():
    rng = np.random.default_rng(2)
    boxes = np.concatenate([rng.uniform(-50, 50, (200, 3)), rng.uniform(0.5, 12, (200, 3)),
                            rng.uniform(-math.pi, math.pi, (200, 1))], axis=1)
    fitted = corners_to_boxes(box_corners(boxes))
    np.testing.assert_allclose(fitted[:, :6], boxes[:, :6], atol=1e-9)
    np.testing.assert_allclose(wrap_angle(fitted[:, 6] - boxes[:, 6]), 0, atol=1e-9)


def test_transform_boxes_agrees_with_corner_transform():
    rng = np.random.default_rng(3)
    a_from_b = pose_from_xyz_rpy(3.0, -7.0, 0.5, 0.0, 0.0, 0.8)
    boxes_b = np.concatenate([rng.uniform(-30, 30, (20, 3)), rng.uniform(1, 5, (20, 3)),
                              rng.uniform(-3, 3, (20, 1))], axis=1)
    boxes_a = transform_boxes(a_from_b, boxes_b)
    corners_a = transform_points(a_from_b, box_corners(boxes_b).reshape(-1, 3)).reshape(-1, 8, 3)
    np.testing.assert_allclose(box_corners(boxes_a), corners_a, atol=1e-9)
    back = transform_boxes(invert_transform(a_from_b), boxes_a)
    np.testing.assert_allclose(back[:, :6], boxes_b[:, :6], atol=1e-9)
    np.testing.assert_allclose(wrap_angle(back[:, 6] - boxes_b[:, 6]), 0, atol=1e-9)


def test_torch_and_numpy_agree():
    boxes = np.array([[1.0, 2.0, 0.5, 4.0, 1.8, 1.5, 0.3], [-5, 3, 1, 10, 2.5, 3, -2.0]])
    np.testing.assert_allclose(box_corners(torch.from_numpy(boxes)).numpy(), box_corners(boxes))
    assert isinstance(box_corners(torch.from_numpy(boxes)), torch.Tensor)


def test_points_in_boxes():
    boxes = np.array([[0.0, 0.0, 0.0, 4.0, 2.0, 2.0, math.pi / 2]])
    pts = np.array([[0.0, 1.9, 0.0], [1.9, 0.0, 0.0], [0.0, 0.0, 1.1]])
    np.testing.assert_array_equal(points_in_boxes(pts, boxes)[:, 0], [True, False, False])


def test_coop_frame_pairwise_and_validation():
    rng = np.random.default_rng(4)
    poses = random_poses(rng, 3)
    agents = [AgentObs(str(i), "vehicle", p, 0, np.zeros((5, 4), np.float32)) for i, p in enumerate(poses)]
    frame = CoopFrame("synthetic", "s0", "000000", agents, np.zeros((0, 7)))
    pw = frame.pairwise_transforms()
    np.testing.assert_allclose(pw[0, 2], frame.ego_from_agent("2"), atol=1e-9)
    np.testing.assert_allclose(pw[1, 1], np.eye(4), atol=1e-9)
    with pytest.raises(ValueError, match="world_from_lidar"):
        AgentObs("x", "vehicle", np.full((4, 4), np.nan), 0, np.zeros((0, 4)))
    with pytest.raises(ValueError, match="kind"):
        AgentObs("x", "drone", np.eye(4), 0, np.zeros((0, 4)))
    with pytest.raises(ValueError, match="duplicate agent ids"):
        CoopFrame("synthetic", "s0", "0", [agents[0], agents[0]], np.zeros((0, 7)))
