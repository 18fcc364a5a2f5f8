"""The lift-splat camera encoder: a point seen by a camera goes back through the lift at its true
depth bin into its own BEV cell, for OPV2V and DAIR-V2X calibrations, before and after
augmentation; what leaves the grid is dropped; depth targets and the depth loss come from each
camera's own agent's LiDAR and reach the detector's loss only in training."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from v2xfuse.builder import build_detector, build_encoder
from v2xfuse.datasets.batch import CameraBatch
from v2xfuse.datasets.images import CameraConfig, fit_image, project_points
from v2xfuse.datasets.pipeline import augmentation_matrix
from v2xfuse.models.encoders.lss import LiftSplat, camera_to_lidar
from v2xfuse.models.inputs import AgentInputs, AuxLosses
from v2xfuse.sim.config import default_vehicle_cameras
from v2xfuse.sim.sensors import camera_intrinsic, lidar_from_camera
from v2xfuse.structures.coop import CameraObs
from v2xfuse.structures.transforms import make_transform

# DAIR-V2X issue #64, infrastructure frame 000009 virtuallidar_to_camera: det 0.813, kept as given
# (the adapter inverts it as a matrix); the translation of tests/datasets/test_dair_adapter.py.
DAIR_CAM_FROM_LIDAR = make_transform(np.array(
    [[-0.0638033225610772, -0.9910914864003576, -0.04429948490729328],
     [-0.2102873406178483, 0.043997692433495696, -0.7987692871343754],
     [0.97575114561348, -0.06031492538699515, -0.17158543199893228]]), (-5.78, 6.04, 1.06))
DAIR_K = np.array([[2000.0, 0, 960], [0, 2000.0, 540], [0, 0, 1]])

# calibration -> (encoder settings, image size, object boxes (M, 7) in the LiDAR frame)
SETUPS = {
    # the generator's OPV2V rig (front, right-rear, left-rear, back; LiDAR 1.9 m up), 300 x 400
    # images fitted to 128 x 192 (scaled by 0.48, 16 rows cropped off the top)
    "opv2v": (dict(point_range=(-25.6, -25.6, -4.0, 25.6, 25.6, 2.0), cell=1.6, stride=4,
                   depth=(1.0, 31.0, 0.25)), (128, 192),
              np.array([[9.0, 0.5, -1.1, 4.5, 1.9, 1.6, 0.1], [-10.0, 3.5, -1.1, 4.2, 1.8, 1.5, 3.0],
                        [5.0, -6.0, -1.1, 4.6, 2.0, 1.7, -0.6], [14.0, 7.0, -1.0, 10.0, 2.5, 3.0, 0.0],
                        [-6.0, -8.0, -1.1, 4.4, 1.9, 1.5, 1.4], [1.0, 9.0, -1.1, 4.5, 1.9, 1.6, 0.0]])),
    # a DAIR-V2X roadside camera 7.3 m above the virtual LiDAR's origin, 1080 x 1920 fitted to
    # 128 x 224 (scaled by 0.1185, 4 columns cropped off each side)
    "dair": (dict(point_range=(0.0, -25.6, -4.0, 51.2, 25.6, 4.0), cell=1.6, stride=4,
                  depth=(1.0, 61.0, 0.5)), (128, 224),
             np.array([[20.0, -4.0, 0.0, 4.5, 1.9, 1.6, 0.3], [30.0, -12.0, 0.5, 4.5, 1.9, 1.6, 1.6],
                       [40.0, -3.0, 0.0, 10.0, 2.5, 3.0, 0.0], [16.0, -9.0, -0.5, 4.4, 1.8, 1.5, 2.8]])),
}
AUGMENTATIONS = {"none": None, "flip_rotate_scale": (True, 0.5, 1.05), "rotate_shrink": (False, -0.7, 0.95)}


def _cameras(calibration: str, image_size) -> list[CameraObs]:
    """The cameras as the pipeline serves them: images fitted to ``image_size`` (intrinsics
    moved with the pixels), before augmentation."""
    if calibration == "opv2v":
        raw = [CameraObs(s.name, camera_intrinsic(s), lidar_from_camera(s), (s.height, s.width),
                         np.zeros((s.height, s.width, 3), np.uint8)) for s in default_vehicle_cameras()]
    else:
        raw = [CameraObs("front", DAIR_K, np.linalg.inv(DAIR_CAM_FROM_LIDAR), (1080, 1920),
                         np.zeros((1080, 1920, 3), np.uint8))]
    return [fit_image(c, CameraConfig(image_size)) for c in raw]


def _surface_points(boxes: np.ndarray, per_edge: int = 9) -> np.ndarray:
    """(M, 3) points on the six faces of the boxes (M, 7), a per_edge x per_edge grid on each."""
    t = np.linspace(-0.5, 0.5, per_edge)
    a, b = (g.reshape(-1) for g in np.meshgrid(t, t))
    unit = []
    for axis in range(3):
        u, v = (i for i in range(3) if i != axis)
        for side in (-0.5, 0.5):
            face = np.zeros((len(a), 3))
            face[:, axis], face[:, u], face[:, v] = side, a, b
            unit.append(face)
    unit = np.concatenate(unit)
    out = []
    for x, y, z, dx, dy, dz, yaw in boxes:
        rot = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
        out.append((unit * [dx, dy, dz]) @ rot.T + [x, y, z])
    return np.concatenate(out)


def _cells(xyz: np.ndarray, enc: LiftSplat) -> np.ndarray:
    g = enc.grid
    return np.stack([np.floor((xyz[:, 1] - g.y_min) / g.cell), np.floor((xyz[:, 0] - g.x_min) / g.cell)],
                    1).astype(np.int64)


def _border_distance(xyz: np.ndarray, enc: LiftSplat) -> np.ndarray:
    """Distance in x, y from each point to the border of its BEV cell (and in z to the range's)."""
    g = enc.grid
    fx = (xyz[:, 0] - g.x_min) / g.cell % 1.0
    fy = (xyz[:, 1] - g.y_min) / g.cell % 1.0
    z0, z1 = enc.z_range
    return np.minimum.reduce([fx * g.cell, (1 - fx) * g.cell, fy * g.cell, (1 - fy) * g.cell,
                              xyz[:, 2] - z0, z1 - xyz[:, 2]])


def test_the_frustum_sits_on_feature_pixel_centres_at_bin_centres():
    enc = LiftSplat((-8.0, -8.0, -3.0, 8.0, 8.0, 1.0), cell=1.0, stride=8, depth=(2.0, 5.0, 1.0))
    base = enc.base_frustum((16, 24), "cpu")
    assert base.shape == (3, 2, 3, 3)
    d = base[..., 2]
    torch.testing.assert_close(d[:, 0, 0], torch.tensor([2.5, 3.5, 4.5]))
    torch.testing.assert_close(base[1, 1, :, 0] / d[1, 1], torch.tensor([3.5, 11.5, 19.5]))  # j s + 3.5
    torch.testing.assert_close(base[1, :, 2, 1] / d[1, :, 2], torch.tensor([3.5, 11.5]))
    assert enc.base_frustum((16, 24), "cpu") is base  # cached
    assert enc.base_frustum((32, 24), "cpu").shape == (3, 4, 3, 3)


@pytest.mark.parametrize("augment", AUGMENTATIONS, ids=str)
@pytest.mark.parametrize("calibration", SETUPS)
def test_a_point_on_an_object_goes_back_through_the_lift_into_its_own_cell(calibration, augment):
    """ACCEPTANCE. Each point on an object that a camera sees: projected to its pixel and depth,
    then given weight one at its true depth bin in its feature pixel, the lift-splat puts it
    into the BEV cell the point itself is in (whenever the bin and pixel discretisation cannot
    cross that cell's border), and exactly into the cell of the frustum point of that bin and
    pixel computed here independently, in float64."""
    settings, image_size, boxes = SETUPS[calibration]
    enc = LiftSplat(**settings, out_channels=4)
    cams = _cameras(calibration, image_size)
    points = _surface_points(boxes)
    if AUGMENTATIONS[augment] is not None:
        # what CoopSampler does to an agent's frame: points to A p, cameras to A @ L, pixels kept
        a = augmentation_matrix(*AUGMENTATIONS[augment])
        points = points @ a[:3, :3].T + a[:3, 3]
        cams = [replace(c, lidar_from_camera=a @ c.lidar_from_camera) for c in cams]
    s, bins = enc.stride, enc.bins
    h, w = image_size[0] // s, image_size[1] // s
    own_cell = exact_cell = 0
    for cam in cams:
        k64, l64 = cam.intrinsic, cam.lidar_from_camera
        uv, depth = project_points(points, k64, l64)
        # the exact pixel and depth go back onto the point
        uvd = np.c_[uv * depth[:, None], depth]
        front = depth > bins.d_min
        back = camera_to_lidar(torch.from_numpy(k64)[None], torch.from_numpy(l64)[None],
                               torch.from_numpy(uvd[front]))[0].double().numpy()
        np.testing.assert_allclose(back, points[front], atol=2e-4)
        col, row = np.floor((uv[:, 0] + 0.5) / s), np.floor((uv[:, 1] + 0.5) / s)
        b = bins.index(torch.from_numpy(depth)).numpy()
        seen = front & (col >= 0) & (col < w) & (row >= 0) & (row < h) & (b >= 0)
        col, row, b, p = col[seen].astype(int), row[seen].astype(int), b[seen], points[seen]
        # one point per feature pixel (a channel each below), the nearest
        order = np.lexsort((depth[seen], row * w + col))
        _, first = np.unique((row * w + col)[order], return_index=True)
        pick = order[first]
        col, row, b, p = col[pick], row[pick], b[pick], p[pick]
        n = len(p)
        assert n >= 10, (calibration, cam.name, n)
        # the frustum point of (b, row, col), in float64 here
        centre = np.c_[col * s + (s - 1) / 2, row * s + (s - 1) / 2, np.ones(n)]
        d_c = bins.d_min + (b + 0.5) * bins.step
        q = (centre * d_c[:, None]) @ np.linalg.inv(k64).T @ l64[:3, :3].T + l64[:3, 3]
        # weight 1 at (b, row, col) and a context channel of its own for each point
        weights = torch.zeros(1, bins.count, h, w)
        weights[0, b, row, col] = 1.0
        context = torch.zeros(1, n, h, w)
        context[0, np.arange(n), row, col] = 1.0
        cells = enc.frustum_cells(torch.from_numpy(k64)[None], torch.from_numpy(l64)[None],
                                  torch.zeros(1, dtype=torch.long), image_size)
        bev = enc.splat(weights, context, cells, 1)[0]                 # (n, ny, nx)
        landed = bev.flatten(1).nonzero()
        assert torch.equal(landed[:, 0], torch.unique(landed[:, 0]))    # at most one cell each
        where = {int(i): (int(c) // enc.grid.nx, int(c) % enc.grid.nx) for i, c in landed}
        q_margin, p_margin = _border_distance(q, enc), _border_distance(p, enc)
        for i in range(n):
            if q_margin[i] > 1e-3:  # float32 geometry agrees with float64 away from borders
                want = tuple(_cells(q[i:i + 1], enc)[0]) if inside(q[i], enc) else None
                assert where.get(i) == want, (i, where.get(i), want)
                exact_cell += 1
            if inside(p[i], enc) and p_margin[i] > np.linalg.norm(q[i] - p[i]):  # stays in its cell
                assert where.get(i) == tuple(_cells(p[i:i + 1], enc)[0]), i
                own_cell += 1
    assert exact_cell >= 100 and own_cell >= 20, (exact_cell, own_cell)


def inside(xyz: np.ndarray, enc: LiftSplat) -> bool:
    g, (z0, z1) = enc.grid, enc.z_range
    return bool(g.x_min <= xyz[0] < g.x_max and g.y_min <= xyz[1] < g.y_max and z0 <= xyz[2] < z1)
