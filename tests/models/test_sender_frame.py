"""Senders in the ego's axes (model.sender_frame: ego_aligned): same points, shift-only poses,
features independent of the sender's heading, the ego's pose message counted."""
import numpy as np
import pytest
import torch

from v2xfuse.builder import build_detector
from v2xfuse.comm.batch_link import BatchChannel
from v2xfuse.comm.channel import Channel, LinkConfig
from v2xfuse.models.detector import ego_aligned_frames
from v2xfuse.models.inputs import AgentInputs
from v2xfuse.structures.transforms import pose_from_xyz_rpy

CELL = 0.8  # the voxel size of the tiny_detector_cfg fixture (tests/conftest.py)


def _in_ego(batch, poses, agent):
    pts = batch.points[batch.points[:, 0] == agent, 1:4].double()
    t = poses[agent].double()
    return pts @ t[:3, :3].T + t[:3, 3]


def test_aligned_frames_keep_every_point_in_place_and_leave_whole_cell_shifts(random_points_batch):
    poses = [pose_from_xyz_rpy(0, 0, 0, 0, 0, 0),
             pose_from_xyz_rpy(7.3, -2.9, 4.1, 0.0, 0.0, 2.2),    # a roadside unit 4.1 m higher
             pose_from_xyz_rpy(-5.05, 11.61, 0.2, 0.02, -0.03, -1.1)]
    true = [p @ pose_from_xyz_rpy(0.3, -0.2, 0, 0, 0, 0.05) for p in poses]  # noisy vs true
    batch = random_points_batch(poses, true_poses=np.stack(true))
    out = ego_aligned_frames(batch, [1, 2], CELL)
    for i in range(3):
        torch.testing.assert_close(_in_ego(out, out.ego_from_agent, i),
                                   _in_ego(batch, batch.ego_from_agent, i), atol=1e-4, rtol=0)
        torch.testing.assert_close(_in_ego(out, out.true_ego_from_agent, i),
                                   _in_ego(batch, batch.true_ego_from_agent, i), atol=1e-4, rtol=0)
        pose = out.ego_from_agent[i].double()
        torch.testing.assert_close(pose[:3, :3], torch.eye(3, dtype=torch.float64),
                                   atol=1e-6, rtol=0)
        cells = pose[:2, 3] / CELL
        torch.testing.assert_close(cells, cells.round(), atol=1e-5, rtol=0)
        assert abs(float(pose[2, 3])) < 1e-6  # heights are relative to the ego's LiDAR
    # the roadside unit's points sit 4.1 m higher in its new frame: at the ego's height reference
    rsu_z = batch.points[batch.points[:, 0] == 1, 3]
    torch.testing.assert_close(out.points[out.points[:, 0] == 1, 3], rsu_z + 4.1, atol=1e-4, rtol=0)
    # agents not listed (the ego, or a sender whose pose message was lost) are untouched
    assert torch.equal(ego_aligned_frames(batch, [], CELL).points, batch.points)
    only2 = ego_aligned_frames(batch, [2], CELL)
    assert torch.equal(only2.ego_from_agent[1], batch.ego_from_agent[1])


def test_a_sender_s_features_do_not_depend_on_which_way_it_faces(tiny_detector_cfg,
                                                                random_points_batch):
    """The same world points seen by a collaborator at the same place facing 0 or 90 degrees:
    in its own frame the maps differ, in the ego-aligned frame they are the same map."""
    torch.manual_seed(0)
    model = build_detector(tiny_detector_cfg(sender_frame="ego_aligned"))
    rng = np.random.default_rng(1)
    world = np.c_[rng.uniform(-6, 14, (600, 2)), rng.uniform(-3, 1, (600, 1)),
                  rng.uniform(0, 1, (600, 1))].astype(np.float32)
    ego_pts = world.copy()
    maps = {}
    for yaw in (0.0, np.pi / 2):
        pose = pose_from_xyz_rpy(4.0, 0.0, 0.0, 0.0, 0.0, yaw)
        own = world.copy()
        own[:, :3] = (world[:, :3] - pose[:3, 3]) @ pose[:3, :3]  # agent_from_ego applied
        batch = random_points_batch([pose_from_xyz_rpy(0, 0, 0, 0, 0, 0), pose], [ego_pts, own])
        aligned = ego_aligned_frames(batch, [1], CELL)
        with torch.no_grad():
            maps[yaw, "own"] = model.encoder(AgentInputs(2, batch.points))[1]
            maps[yaw, "aligned"] = model.encoder(AgentInputs(2, aligned.points))[1]
    assert not torch.allclose(maps[0.0, "own"], maps[np.pi / 2, "own"], atol=1e-3)
    torch.testing.assert_close(maps[0.0, "aligned"], maps[np.pi / 2, "aligned"], atol=1e-4,
                               rtol=1e-4)


def test_the_ego_s_pose_message_is_counted_and_its_loss_falls_back_to_the_own_frame(
        tiny_detector_cfg, random_points_batch):
    torch.manual_seed(0)
    poses = [pose_from_xyz_rpy(3.0 * i, -2.0 * i, 0.0, 0.0, 0.0, 0.3 * i) for i in range(3)]
    batch = random_points_batch(poses)
    own = build_detector(tiny_detector_cfg(sender_frame="own")).eval()
    aligned = build_detector(tiny_detector_cfg(sender_frame="ego_aligned")).eval()
    aligned.load_state_dict(own.state_dict())
    links = {name: BatchChannel(Channel(0)) for name in ("own", "aligned")}
    with torch.no_grad():
        out_own = own(batch, channel=links["own"])
        out_aligned = aligned(batch, channel=links["aligned"])
    kinds = links["aligned"].ledger.per_kind()
    assert kinds.get("pose", 0) > 0 and "pose" not in links["own"].ledger.per_kind()
    pose_msgs = [r for r in links["aligned"].ledger.records if r.kind == "pose"]
    assert len(pose_msgs) == 2 and all(r.sender == "0" for r in pose_msgs)  # ego -> each sender
    assert sum(links["aligned"].ledger.bytes_per_frame()) == \
        sum(links["own"].ledger.bytes_per_frame()) + kinds["pose"]
    assert not torch.allclose(out_own.head.cls, out_aligned.head.cls)
    # the pose message lost on every link: each sender keeps its own frame, as with "own"
    lost = BatchChannel(Channel(0, LinkConfig(loss=1.0)))
    with torch.no_grad():
        fallback = aligned(batch, channel=lost)
    assert torch.equal(fallback.state.batch.points, batch.points)


@pytest.mark.parametrize("fusion", ["none", "late", "early"])
def test_methods_without_feature_messages_ignore_the_sender_frame(fusion, tiny_detector_cfg,
                                                                  random_points_batch):
    poses = [pose_from_xyz_rpy(3.0 * i, -2.0 * i, 0.0, 0.0, 0.0, 0.3 * i) for i in range(2)]
    batch = random_points_batch(poses)
    model = build_detector(tiny_detector_cfg(fusion, sender_frame="ego_aligned")).eval()
    link = BatchChannel(Channel(0))
    with torch.no_grad():
        out = model(batch, channel=link)
    assert "pose" not in link.ledger.per_kind()
    if out.state.features is not None:
        assert out.state.batch is batch
