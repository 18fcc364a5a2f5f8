"""OPV2V/V2XSet adapter and the sampling pipeline on data written by the synthetic generator."""
import numpy as np
import pytest

from v2xfuse.datasets import CoopSampler, Opv2vAdapter, PipelineConfig, collate
from v2xfuse.datasets.base import DatasetError
from v2xfuse.sim import SimConfig, generate_dataset
from v2xfuse.structures import invert_transform, transform_boxes, transform_points, wrap_angle


@pytest.fixture(scope="module")
def opv2v(tmp_path_factory):
    out = tmp_path_factory.mktemp("opv2v")
    cfg = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 512, "beams": 16},
                               "rsu_lidar": {"azimuth_steps": 512, "beams": 24}})
    cfg.cameras = False
    _, kept = generate_dataset("opv2v", out, n_scenes=1, n_frames=3, seed=5, cfg=cfg,
                               splits={"train": 1.0}, progress=False, keep_frames=True)
    return out, kept


def test_ground_truth_and_poses_match_the_generator(opv2v):
    out, ((scene, frames, _),) = opv2v
    adapter = Opv2vAdapter(out, "train", max_agents=8, comm_range=1e3)
    assert len(adapter) == len(frames)
    for idx, (sim, _) in enumerate(frames):
        frame = adapter.load(idx)
        truth = {a.agent_id: a for a in sim.agents}
        ego = truth[int(frame.ego.agent_id)]
        assert ego.kind == "vehicle" and frame.ego.agent_id == str(min(
            a.agent_id for a in sim.agents if a.agent_id >= 0))
        for agent in frame.agents:
            t = truth[int(agent.agent_id)]
            np.testing.assert_allclose(agent.world_from_lidar, t.world_from_lidar, atol=1e-4)
            np.testing.assert_allclose(agent.points[:, :3], t.points[:, :3], atol=1e-4)
            assert agent.kind == ("infrastructure" if t.agent_id < 0 else "vehicle")
        # ground truth: the union of what every agent's yaml lists, in the ego frame
        ego_from_world = invert_transform(ego.world_from_lidar)
        ids = set()
        for t in sim.agents:
            ids |= set(int(i) for i in t.object_ids if i != t.agent_id)
        row_of = {int(i): r for r, i in enumerate(ego.object_ids)}
        expected = transform_boxes(ego_from_world, ego.object_boxes[[row_of[int(i)] for i in
                                                                      frame.gt_ids]])
        assert ids >= set(frame.gt_ids.tolist())
        np.testing.assert_allclose(frame.gt_boxes[:, :6], expected[:, :6], atol=1e-3)
        np.testing.assert_allclose(wrap_angle(frame.gt_boxes[:, 6] - expected[:, 6]), 0, atol=1e-3)


def test_max_agents_and_comm_range_keep_the_nearest(opv2v):
    out, _ = opv2v
    full = Opv2vAdapter(out, "train", max_agents=8, comm_range=1e3).load(0)
    ego_xy = full.ego.world_from_lidar[:2, 3]
    dist = {a.agent_id: np.hypot(*(a.world_from_lidar[:2, 3] - ego_xy)) for a in full.agents[1:]}
    nearest = sorted(dist, key=dist.get)
    two = Opv2vAdapter(out, "train", max_agents=2, comm_range=1e3).load(0)
    assert [a.agent_id for a in two.agents] == [full.ego.agent_id, nearest[0]]
    cut = (dist[nearest[0]] + dist[nearest[1]]) / 2
    ranged = Opv2vAdapter(out, "train", max_agents=8, comm_range=cut).load(0)
    assert [a.agent_id for a in ranged.agents[1:]] == nearest[:1]


def test_augmentation_is_consistent_across_agents(opv2v):
    out, _ = opv2v
    adapter = Opv2vAdapter(out, "train", max_agents=8, comm_range=1e3)
    plain = CoopSampler(adapter, PipelineConfig(lidar_range=(-500, -500, -50, 500, 500, 50)),
                        train=False)[0]
    aug = CoopSampler(adapter, PipelineConfig(lidar_range=(-500, -500, -50, 500, 500, 50),
                                              flip_prob=1.0, rotate_deg=90, scale=(0.9, 1.1)),
                      train=True, seed=1)[0]
    # The same physical point, taken to the ego frame through each sample's transforms, moves by
    # one similarity A for every agent: so A maps the plain ego-frame cloud onto the augmented one.
    a = None
    for i in range(len(plain.points)):
        p = transform_points(plain.ego_from_agent[i], plain.points[i][:, :3].astype(np.float64))
        q = transform_points(aug.ego_from_agent[i], aug.points[i][:, :3].astype(np.float64))
        if a is None:
            ones = np.c_[p, np.ones(len(p))]
            a = np.linalg.lstsq(ones, q, rcond=None)[0]
        np.testing.assert_allclose(np.c_[p, np.ones(len(p))] @ a, q, atol=2e-3)
    # boxes move with the same A: their centres
    np.testing.assert_allclose(np.c_[plain.gt_boxes[:, :3], np.ones(len(plain.gt_boxes))] @ a,
                               aug.gt_boxes[:, :3], atol=2e-3)
    batch = collate([plain, aug])
    assert batch.record_len.tolist() == [len(plain.points), len(aug.points)]


def test_crop_keeps_heights_relative_to_the_ego_lidar(opv2v):
    """A roadside LiDAR mounted high sees the ground far below itself; the z crop is applied at
    the ego's height reference, so its ground and the cars on it survive the crop."""
    out, _ = opv2v
    adapter = Opv2vAdapter(out, "train", max_agents=8, comm_range=1e3)
    lr = (-30.0, -30.0, -3.0, 30.0, 30.0, 1.0)
    sample = CoopSampler(adapter, PipelineConfig(lidar_range=lr), train=False)[0]
    frame = adapter.load(0)
    rsu = [i for i, k in enumerate(sample.agent_kinds) if k == "infrastructure"]
    assert rsu, "the synthetic scene has a roadside unit"
    for i in range(len(sample.points)):
        dz = sample.ego_from_agent[i][2, 3]
        z = sample.points[i][:, 2] + dz
        assert len(z) > 0 and z.min() >= lr[2] and z.max() < lr[5]
        raw = frame.agents[i].points
        inside = (np.abs(raw[:, 0]) < 30) & (np.abs(raw[:, 1]) < 30) & \
            (raw[:, 2] + dz >= lr[2]) & (raw[:, 2] + dz < lr[5])
        assert len(z) == int(inside.sum())
    i = rsu[0]
    assert sample.ego_from_agent[i][2, 3] > 3.0  # mounted well above the ego's LiDAR
    assert (sample.points[i][:, 2] < lr[2]).mean() > 0.5  # most kept points: below -3 m in its frame


def test_bad_files_name_the_file_and_skip_bad_frames_continues(opv2v, tmp_path):
    import shutil
    out, _ = opv2v
    root = tmp_path / "copy"
    shutil.copytree(out, root)
    scenario = next((root / "train").iterdir())
    ego_dir = sorted((p for p in scenario.iterdir() if p.is_dir() and int(p.name) >= 0),
                     key=lambda p: int(p.name))[0]
    first_pcd = sorted(ego_dir.glob("*.pcd"))[0]
    data = first_pcd.read_bytes()
    first_pcd.write_bytes(data[: len(data) // 2])
    adapter = Opv2vAdapter(root, "train", max_agents=8, comm_range=1e3)
    with pytest.raises(DatasetError, match=first_pcd.name):
        adapter.load(0)
    second_yaml = sorted(ego_dir.glob("*.yaml"))[1]
    second_yaml.write_text("lidar_pose: [1, 2\n")
    with pytest.raises(DatasetError, match=second_yaml.name):
        adapter.load(1)
    skipping = Opv2vAdapter(root, "train", max_agents=8, comm_range=1e3, skip_bad_frames=True)
    batch = collate([CoopSampler(skipping, PipelineConfig(), train=False)[i] for i in range(3)])
    assert [m.frame for m in batch.frames] == [sorted(p.stem for p in ego_dir.glob("*.yaml"))[2]]
    assert [s.index for s in batch.skipped] == [0, 1] and set(skipping.bad_frames) == {0, 1}
