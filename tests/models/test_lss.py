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


# --- the encoder on small inputs -------------------------------------------------------------

RANGE = (-12.8, -12.8, -4.0, 12.8, 12.8, 2.0)
SMALL = dict(cell=0.8, out_channels=4, depth=(1.0, 21.0, 1.0), stride=8, image_channels=[8, 8, 8])
K_SMALL = np.array([[24.0, 0, 23.5], [0, 24.0, 15.5], [0, 0, 1]])  # 32 x 48 images, 90 deg wide


def _front_camera(x: float = 0.0, yaw: float = 0.0, z: float = 0.0, pitch: float = 0.0) -> np.ndarray:
    """(4, 4) lidar_from_camera of a camera at (x, 0, z) looking along yaw, pitched down by pitch."""
    cv_axes = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # OpenCV x, y, z in x-fwd/y-left/z-up
    c, s = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    look = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    return make_transform(look @ cv_axes, (x, 0.0, z))


def _camera_batch(agents, poses, k=K_SMALL, h=32, w=48, seed=0) -> CameraBatch:
    g = torch.Generator().manual_seed(seed)
    return CameraBatch(torch.randint(0, 256, (len(agents), 3, h, w), dtype=torch.uint8, generator=g),
                       torch.tensor(agents), torch.from_numpy(np.stack([k] * len(agents))),
                       torch.from_numpy(np.stack(poses)))


def test_frustum_points_outside_the_grid_or_the_height_range_are_dropped_before_pooling():
    """A camera 3 m up looking down and one looking sideways from the grid's edge: most of their
    frustums leave the +-12.8 m grid or its -4..2 m heights; exactly those points are dropped
    and the splat (whose bev_pool refuses a point outside the grid) runs."""
    enc = LiftSplat(RANGE, **SMALL)
    lidar_from_camera = np.stack([_front_camera(z=3.0, pitch=0.5), _front_camera(x=12.0, yaw=1.2)])
    cams = _camera_batch([0, 1], lidar_from_camera)
    cells = enc.frustum_cells(cams.intrinsics, cams.lidar_from_camera, cams.agent, (32, 48))
    xyz = camera_to_lidar(cams.intrinsics, cams.lidar_from_camera, enc.base_frustum((32, 48), "cpu"))
    xyz = xyz.reshape(-1, 3)
    inside_grid = ((xyz[:, 0] >= -12.8) & (xyz[:, 0] < 12.8) & (xyz[:, 1] >= -12.8) & (xyz[:, 1] < 12.8)
                   & (xyz[:, 2] >= -4.0) & (xyz[:, 2] < 2.0))
    assert torch.equal(cells.index, torch.nonzero(inside_grid).squeeze(1))
    assert 0 < len(cells.index) < 0.5 * len(xyz)
    assert (xyz[~inside_grid, 2] < -4.0).any() and (xyz[~inside_grid, 0] >= 12.8).any()
    assert cells.coords.dtype == torch.int32 and int(cells.coords[:, 1:].min()) >= 0
    assert int(cells.coords[:, 1:].max()) < 32
    assert cells.coords[:, 0].tolist() == (torch.div(cells.index, 20 * 4 * 6, rounding_mode="floor")).tolist()
    out = enc(AgentInputs(2, cameras=cams))
    assert out.shape == (2, 4, 32, 32) and torch.isfinite(out).all()


def test_agents_without_cameras_get_zero_maps_and_cameras_of_one_agent_add_up():
    enc = LiftSplat(RANGE, **SMALL).eval()
    assert torch.equal(enc(AgentInputs(3)), torch.zeros(3, 4, 32, 32))
    front, back = _front_camera(), _front_camera(yaw=np.pi)
    both = enc(AgentInputs(3, cameras=_camera_batch([0, 2, 2], [front, front, back])))
    assert both[0].abs().sum() > 0 and torch.equal(both[1], torch.zeros(4, 32, 32))
    xs, _ = enc.grid.centres()
    seen = both[2].abs().sum(0) > 0
    assert (xs[seen] > 0).any() and (xs[seen] < 0).any()  # agent 2's front and back cameras
    images = _camera_batch([0, 2, 2], [front, front, back]).images
    alone = [enc(AgentInputs(1, cameras=CameraBatch(images[i:i + 1], torch.tensor([0]),
                                                    torch.from_numpy(K_SMALL)[None],
                                                    torch.from_numpy(pose)[None])))[0]
             for i, pose in ((1, front), (2, back))]
    torch.testing.assert_close(both[2], alone[0] + alone[1], atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_image_backbone_and_the_depth_head():
    enc = LiftSplat(RANGE, **SMALL, depth_loss_weight=1.0)
    cams = _camera_batch([0, 1], [_front_camera(), _front_camera(yaw=2.0)])
    points = torch.tensor([[0, 6.0, 0.5, -0.5, 0.1], [1, -3.0, 5.0, 0.0, 0.1]])
    losses = AuxLosses()
    out = enc(AgentInputs(2, points, cams, losses))
    (out.square().sum() + losses.terms["loss_depth"]).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _reference_targets(points, cams, enc) -> np.ndarray:
    """Expected depth targets by numpy: project_points, nearest point per feature pixel."""
    s = enc.stride
    h, w = cams.images.shape[-2] // s, cams.images.shape[-1] // s
    out = np.full((cams.num_cameras, h, w), -1)
    for k in range(cams.num_cameras):
        own = points[points[:, 0] == cams.agent[k].item(), 1:4].double().numpy()
        uv, depth = project_points(own, cams.intrinsics[k].numpy(), cams.lidar_from_camera[k].numpy())
        for (u, v), d in sorted(zip(uv, depth), key=lambda x: -x[1]):  # nearest written last
            col, row = int(np.floor((u + 0.5) / s)), int(np.floor((v + 0.5) / s))
            if d > 0 and 0 <= col < w and 0 <= row < h and enc.bins.d_min <= d < enc.bins.d_max:
                out[k, row, col] = int(np.floor((d - enc.bins.d_min) / enc.bins.step))
    return out


def test_the_depth_target_puts_a_point_in_its_pixel_and_bin():
    enc = LiftSplat(RANGE, **SMALL)
    k = np.array([[24.0, 0, 19.5], [0, 24.0, 11.5], [0, 0, 1]])  # optical axis: feature (1, 2)'s centre
    cams = _camera_batch([0, 1], [_front_camera(), _front_camera()], k=k)
    # (10, 0, 0) is the camera's (0, 0, 10): pixel (19.5, 11.5) -> feature (row 1, col 2), bin 9;
    # (12, 0.1, 0): pixel (19.3, 11.5), the same feature pixel, further away; (5, -3, 1) is the
    # camera's (3, -1, 5): pixel (33.9, 6.7) -> feature (row 0, col 4), bin 4; (-5, 0, 0) is
    # behind. Agent 1 has no points; agent 2's points have no camera.
    points = torch.tensor([[0, 10.0, 0.0, 0.0, 0.5], [0, 12.0, 0.1, 0.0, 0.5], [0, 5.0, -3.0, 1.0, 0.5],
                           [0, -5.0, 0.0, 0.0, 0.5], [2, 8.0, 0.0, 0.0, 0.5]])
    target = enc.depth_targets(points, cams, (32, 48))
    assert target.shape == (2, 4, 6) and target.dtype == torch.int64
    hits = {tuple(i) for i in torch.nonzero(target >= 0).tolist()}
    assert hits == {(0, 1, 2), (0, 0, 4)}
    assert target[0, 1, 2] == 9 and target[0, 0, 4] == 4
    assert (target[1] == -1).all() and (enc.depth_targets(None, cams, (32, 48)) == -1).all()


@pytest.mark.parametrize("calibration", ["flipped", "dair"])
def test_depth_targets_invert_reflected_and_non_orthonormal_calibrations_as_matrices(calibration):
    enc = LiftSplat(RANGE, **SMALL)
    rng = np.random.default_rng(0)
    if calibration == "flipped":
        a = augmentation_matrix(True, 0.4, 1.1)
        cams = _camera_batch([0, 0], [a @ _front_camera(), a @ _front_camera(yaw=np.pi)])
        xyz = rng.uniform([-20, -20, -2], [20, 20, 1], (400, 3))
    else:
        enc = LiftSplat(SETUPS["dair"][0]["point_range"], **SMALL)
        k = DAIR_K * np.array([[0.025], [0.025], [1]])  # 1920 x 1080 -> 48 x 27, as a 48 x 32 crop
        cams = _camera_batch([0], [np.linalg.inv(DAIR_CAM_FROM_LIDAR)], k=k)
        xyz = rng.uniform([5, -20, -2], [40, 5, 1], (400, 3))
    points = torch.from_numpy(np.c_[np.zeros(400), xyz, np.ones(400)]).float()
    target = enc.depth_targets(points, cams, (32, 48))
    want = _reference_targets(points, cams, enc)
    assert (want >= 0).sum() >= 10
    np.testing.assert_array_equal(target.numpy(), want)


def test_the_depth_loss_needs_the_camera_s_own_lidar_training_and_a_sink():
    cams = _camera_batch([0, 1], [_front_camera(), _front_camera(yaw=2.0)])
    elsewhere = torch.tensor([[2, 6.0, 0.0, 0.0, 0.1]])  # agent 2 has points and no camera
    enc = LiftSplat(RANGE, **SMALL, depth_loss_weight=0.5)
    losses = AuxLosses()
    out = enc(AgentInputs(3, elsewhere, cams, losses))
    assert losses.terms["loss_depth"].item() == 0.0
    (out.sum() + losses.terms["loss_depth"]).backward()  # still part of the graph
    own = torch.tensor([[0, 6.0, 0.0, 0.0, 0.1], [0, 9.0, -1.0, -0.5, 0.1]])
    losses = AuxLosses()
    enc(AgentInputs(3, torch.cat([own, elsewhere]), cams, losses))
    loss = losses.terms["loss_depth"]
    assert loss > 0
    unweighted = LiftSplat(RANGE, **SMALL, depth_loss_weight=1.0)
    unweighted.load_state_dict(enc.state_dict())
    again = AuxLosses()
    unweighted(AgentInputs(3, torch.cat([own, elsewhere]), cams, again))
    torch.testing.assert_close(loss, 0.5 * again.terms["loss_depth"])
    with pytest.raises(KeyError, match="added twice"):
        enc(AgentInputs(3, own, cams, losses))
    for quiet, inputs in ((enc.eval(), AgentInputs(3, own, cams, AuxLosses())),
                          (LiftSplat(RANGE, **SMALL), AgentInputs(3, own, cams, AuxLosses()))):
        quiet(inputs)
        assert inputs.losses.terms == {}
    enc.train()(AgentInputs(3, own, cams))  # no sink: nothing to add to, nothing kept


def test_the_detector_adds_the_depth_loss_in_training_only(tiny_detector_cfg, random_points_batch):
    from v2xfuse.models.encoders.fuser import MultiSensorEncoder
    from v2xfuse.structures.transforms import pose_from_xyz_rpy

    camera = {"type": "lss", "out_channels": 4, "depth": [1.0, 21.0, 1.0], "stride": 8,
              "image_channels": [8, 8, 8], "depth_loss_weight": 0.5}
    lidar = {"type": "pointpillars", "voxel_size": [0.8, 0.8], "out_channels": 8}
    cfg = tiny_detector_cfg("max", encoder=None, encoders={"lidar": lidar, "camera": camera})
    cfg["pipeline"]["cameras"] = {"image_size": [32, 48]}
    torch.manual_seed(0)
    model = build_detector(cfg)
    assert isinstance(model.encoder, MultiSensorEncoder)
    assert isinstance(model.encoder.encoders["camera"], LiftSplat)  # cell: the LiDAR's
    batch = random_points_batch([pose_from_xyz_rpy(3.0 * i, 1.0 * i, 0, 0, 0, 0.2 * i) for i in range(3)])
    batch = replace(batch, cameras=_camera_batch([0, 1, 2], [_front_camera(), _front_camera(yaw=1.0),
                                                              _front_camera(yaw=-2.0)]))
    out = model(batch)
    assert set(out.encoder_losses) == {"loss_depth"}
    losses = model.loss(out, batch)
    assert losses["loss_depth"] > 0
    without = losses["loss"] - losses["loss_depth"]
    torch.testing.assert_close(without, model.head.loss(out.head, batch.gt_boxes)["loss"])
    losses["loss"].backward()
    assert model.encoder.encoders["camera"].depth_net[1].weight.grad.abs().sum() > 0
    second = model(batch)  # a new pass, a new sink
    assert second.encoder_losses["loss_depth"] is not out.encoder_losses["loss_depth"]
    model.eval()
    with torch.no_grad():
        evaluated = model(batch)
    assert evaluated.encoder_losses == {} and "loss_depth" not in model.loss(evaluated, batch)


def test_the_builder_and_the_encoder_check_their_settings():
    only_camera = build_encoder({"encoders": {"camera": {"type": "lss", "cell": 0.8}}}, RANGE)
    assert isinstance(only_camera, LiftSplat) and only_camera.bins.count == 44  # default 1..45 m
    assert only_camera.out_channels == 32 and only_camera.grid.nx == 32
    with pytest.raises(ValueError, match="give `cell`"):
        build_encoder({"encoders": {"camera": {"type": "lss"}}}, RANGE)
    with pytest.raises(ValueError, match="power of 2"):
        LiftSplat(RANGE, cell=0.8, stride=6)
    with pytest.raises(ValueError, match="3 widths"):
        LiftSplat(RANGE, cell=0.8, stride=8, image_channels=[8, 8])
    with pytest.raises(ValueError, match="min < max"):
        LiftSplat(RANGE, cell=0.8, depth=[5.0, 1.0, 1.0])
    enc = LiftSplat(RANGE, **SMALL)
    with pytest.raises(ValueError, match="multiple of the stride 8"):
        enc(AgentInputs(1, cameras=_camera_batch([0], [_front_camera()], h=30, w=48)))
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchvision is not installed"):
            LiftSplat(RANGE, cell=0.8, backbone="resnet18")
    else:
        net = LiftSplat(RANGE, cell=0.8, out_channels=4, backbone="resnet18", stride=8).eval()
        out = net(AgentInputs(1, cameras=_camera_batch([0], [_front_camera()])))
        assert out.shape == (1, 4, 32, 32)
