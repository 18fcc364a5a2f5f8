"""Encoders per sensor: the camera encoder reads images through their calibration, the fuser
gives every agent one map whatever sensors it has, and the modality mask says which it had."""
import numpy as np
import pytest
import torch

from v2xfuse.builder import build_detector, build_encoder
from v2xfuse.datasets.batch import CameraBatch
from v2xfuse.models.encoders.camera_bev import CameraBev
from v2xfuse.models.encoders.fuser import MultiSensorEncoder, modality_mask
from v2xfuse.models.inputs import AgentInputs

RANGE = (-12.8, -12.8, -4.0, 12.8, 12.8, 2.0)
LIDAR = {"type": "pointpillars", "voxel_size": [0.8, 0.8], "out_channels": 8}
CAMERA = {"type": "camera_bev", "out_channels": 4, "hidden_channels": 4}


def _front_camera(x: float = 0.0, yaw: float = 0.0) -> np.ndarray:
    """(4, 4) lidar_from_camera of a camera at (x, 0, 0) looking along the LiDAR's yaw."""
    cv_axes = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # OpenCV x, y, z in x-fwd/y-left/z-up
    c, s = np.cos(yaw), np.sin(yaw)
    out = np.eye(4)
    out[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ cv_axes
    out[0, 3] = x
    return out


def _cameras(agents, poses, h=32, w=48, seed=0) -> CameraBatch:
    torch.manual_seed(seed)
    k = torch.tensor([[24.0, 0, 23.5], [0, 24.0, 15.5], [0, 0, 1]], dtype=torch.float64)
    return CameraBatch(torch.randint(0, 256, (len(agents), 3, h, w), dtype=torch.uint8),
                       torch.tensor(agents), k.expand(len(agents), 3, 3).clone(),
                       torch.from_numpy(np.stack(poses)))


def test_the_camera_encoder_sees_only_cells_in_front_of_its_cameras_and_follows_the_images():
    enc = CameraBev(RANGE, cell=0.8, out_channels=4, hidden_channels=4).eval()
    cams = _cameras([0, 2], [_front_camera(), _front_camera(yaw=np.pi)])
    out = enc(AgentInputs(3, cameras=cams))
    assert out.shape == (3, 4, 32, 32)
    xs, _ = enc.grid.centres()
    seen = out.abs().sum(1) > 0
    assert seen[0].any() and not seen[1].any() and seen[2].any()  # agent 1 has no camera
    assert (xs[seen[0]] > 0).all() and (xs[seen[2]] < 0).all()  # front and rear cameras
    # other pixels, other features; a camera moved along x moves what it sees
    other = enc(AgentInputs(3, cameras=_cameras([0, 2], [_front_camera(), _front_camera(yaw=np.pi)], seed=1)))
    assert not torch.allclose(out[0], other[0])
    moved = enc(AgentInputs(3, cameras=_cameras([0, 2], [_front_camera(x=4.0), _front_camera(yaw=np.pi)])))
    assert (xs[moved[0].abs().sum(0) > 0] > 4.0).all()


def test_a_reflected_frame_projects_like_the_original():
    """A flip augmentation reflects the LiDAR frame and lidar_from_camera with it: the map is
    the original one mirrored across the x axis, cell for cell."""
    enc = CameraBev(RANGE, cell=0.8, out_channels=4, hidden_channels=4).eval()
    pose = _front_camera(x=1.0, yaw=0.4)
    flip = np.diag([1.0, -1.0, 1.0, 1.0])
    plain = enc(AgentInputs(1, cameras=_cameras([0], [pose])))
    flipped = enc(AgentInputs(1, cameras=_cameras([0], [flip @ pose])))
    torch.testing.assert_close(flipped, plain.flip(-2), atol=1e-5, rtol=1e-5)


def test_every_agent_gets_a_fused_map_and_a_modality_mask():
    model = {"encoders": {"lidar": LIDAR, "camera": CAMERA}, "sensor_fuser": {"out_channels": 6}}
    enc = build_encoder(model, RANGE)
    assert isinstance(enc, MultiSensorEncoder) and enc.sensors == ("lidar", "camera")
    assert enc.out_channels == 6 and enc.encoders["camera"].grid == enc.encoders["lidar"].grid
    pts = torch.tensor([[0, 3.0, 1.0, -1.0, 0.5], [2, -4.0, 2.0, 0.0, 0.2]])
    # agent 0: LiDAR and camera; agent 1: camera only (a roadside unit); agent 2: LiDAR only
    inputs = AgentInputs(3, pts, _cameras([0, 1], [_front_camera(), _front_camera()]))
    out = enc(inputs)
    assert out.shape == (3, 6, 32, 32) and torch.isfinite(out).all()
    assert modality_mask(enc, inputs).tolist() == [[True, True], [False, True], [True, False]]
    assert modality_mask(enc.encoders["lidar"], inputs).tolist() == [[True], [False], [True]]
    out.sum().backward()
    grads = {n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("encoders.camera.image_net") for n in grads)
    assert any(n.startswith("encoders.lidar.pfn") for n in grads)


def test_the_builder_checks_sensors_grids_and_images():
    cfg = {"pipeline": {"lidar_range": list(RANGE)},
           "model": {"encoder": None, "encoders": {"lidar": LIDAR, "camera": CAMERA},
                     "backbone": {"layer_strides": [1], "layer_channels": [8], "layer_nums": [1],
                                  "upsample_channels": [8], "out_stride": 1}}}
    with pytest.raises(KeyError, match="set pipeline.cameras"):
        build_detector(cfg)
    cfg["pipeline"]["cameras"] = {"image_size": [32, 48]}
    model = build_detector(cfg)
    assert model.encoder.out_channels == 8 and model.feature_grid.nx == 32  # widest input
    with pytest.raises(KeyError, match="encodes lidar, not camera"):
        build_encoder({"encoders": {"camera": LIDAR}}, RANGE)
    with pytest.raises(KeyError, match="either `encoder`"):
        build_encoder({"encoder": LIDAR, "encoders": {"lidar": LIDAR}}, RANGE)
    with pytest.raises(ValueError, match="differs"):
        build_encoder({"encoders": {"lidar": LIDAR, "camera": {**CAMERA, "cell": 0.4}}}, RANGE)
    with pytest.raises(KeyError, match="sensors must be among"):
        build_encoder({"encoders": {"radar": LIDAR}}, RANGE)
    only_camera = build_encoder({"encoders": {"camera": {**CAMERA, "cell": 0.8}}}, RANGE)
    assert isinstance(only_camera, CameraBev)  # one sensor: no fuser layer


def test_a_lidar_camera_detector_trains_on_a_batch_with_camera_only_agents(tiny_detector_cfg,
                                                                        random_points_batch):
    from dataclasses import replace

    from v2xfuse.structures.transforms import pose_from_xyz_rpy

    cfg = tiny_detector_cfg("max", encoder=None, encoders={"lidar": LIDAR, "camera": CAMERA})
    cfg["pipeline"]["cameras"] = {"image_size": [32, 48]}
    torch.manual_seed(0)
    model = build_detector(cfg)
    batch = random_points_batch([pose_from_xyz_rpy(3.0 * i, 1.0 * i, 0, 0, 0, 0.2 * i) for i in range(3)])
    keep = batch.points[:, 0] != 1  # agent 1 is camera-only
    batch = replace(batch, points=batch.points[keep],
                    cameras=_cameras([0, 1, 1], [_front_camera(), _front_camera(), _front_camera(yaw=2.0)]))
    assert model.modality_mask(batch).tolist() == [[True, True], [False, True], [True, False]]
    out = model(batch)
    loss = model.loss(out, batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert model.encoder.encoders["camera"].image_net[0].weight.grad.abs().sum() > 0


def test_early_fusion_keeps_each_ego_s_own_cameras_numbered_by_sample(random_points_batch):
    from dataclasses import replace

    from v2xfuse.structures.transforms import pose_from_xyz_rpy

    batch = random_points_batch([pose_from_xyz_rpy(i, 0, 0, 0, 0, 0) for i in range(3)])
    batch = replace(batch, record_len=torch.tensor([1, 2]),  # sample 0: agent 0; 1: agents 1, 2
                    cameras=_cameras([0, 1, 2, 2], [_front_camera()] * 4))
    fused = torch.zeros((0, 5))
    inputs = AgentInputs.early(batch, fused)
    assert inputs.num_agents == 2 and inputs.cameras.agent.tolist() == [0, 1]
    assert torch.equal(inputs.cameras.images, batch.cameras.images[:2])
    only_ego = AgentInputs.from_batch(batch).only(batch.ego_index())
    assert only_ego.cameras.agent.tolist() == [0, 1] and only_ego.num_agents == 3
    assert set(only_ego.points[:, 0].long().tolist()) == {0, 1}
