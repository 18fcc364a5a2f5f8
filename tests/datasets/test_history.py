"""History (dataset.history_frames): every agent's older observations from its own sequence,
shorter at a sequence's start and said so, starting behind a delay, moved by augmentation like
the current frame, and a bad older file a bad sample."""
import shutil

import numpy as np
import pytest
import torch

from v2xfuse.datasets import (CoopSampler, DairV2XCAdapter, Opv2vAdapter, PipelineConfig,
                              V2XSeqAdapter, collate)
from v2xfuse.datasets.base import DatasetError
from v2xfuse.sim import SimConfig, generate_dataset
from v2xfuse.sim.write_dair import WORLD_SHIFT
from v2xfuse.structures.transforms import invert_transform

WIDE = [-200.0, -200.0, -50.0, 200.0, 200.0, 50.0]  # crops nothing


def _opv2v(root, **kw):
    return Opv2vAdapter(root, "train", comm_range=200.0, **kw)


def test_histories_are_shorter_at_the_sequence_start_and_the_batch_says_so(camera_opv2v_root):
    adapter, plain = _opv2v(camera_opv2v_root, history_frames=2), _opv2v(camera_opv2v_root)
    assert len(adapter) == 3  # one scenario of 3 frames
    for idx in range(3):
        frame = adapter.load(idx)
        for agent in frame.agents:
            assert len(agent.history) == min(idx, 2)
            for j, past in enumerate(agent.history, start=1):  # newest first
                then = plain.load(idx - j).agent(agent.agent_id)
                assert past.timestamp_us == then.timestamp_us < agent.timestamp_us
                assert np.array_equal(past.points, then.points)
                np.testing.assert_array_equal(past.world_from_lidar, then.world_from_lidar)
                assert past.history == []
    data = CoopSampler(adapter, PipelineConfig.from_dict({"lidar_range": WIDE}), train=False)
    batch = collate([data[i] for i in range(3)])
    hist = batch.history
    per_sample = batch.record_len.tolist()
    assert hist.length.tolist() == [0] * per_sample[0] + [1] * per_sample[1] + [2] * per_sample[2]
    assert hist.num_observations == int(hist.length.sum())
    assert torch.equal(torch.bincount(hist.agent, minlength=batch.num_agents), hist.length)
    assert hist.steps[hist.agent == hist.agent[-1]].tolist() == [1, 2]
    assert set(hist.points[:, 0].long().tolist()) == set(range(hist.num_observations))
    assert hist.cameras is None  # no pipeline.cameras
    # each older frame into the agent's current one: the agent's own poses
    for h in range(hist.num_observations):
        i = int(hist.agent[h])
        sample = int(batch.sample_of_agent()[i])
        j = i - int(batch.ego_index()[sample])
        idx, step = sample, int(hist.steps[h])
        now, then = plain.load(idx).agents[j], plain.load(idx - step).agents[j]
        np.testing.assert_allclose(hist.agent_from_past[h].numpy(),
                                   invert_transform(now.world_from_lidar) @ then.world_from_lidar,
                                   atol=1e-12)
        assert int(hist.timestamp_us[h]) == then.timestamp_us
    assert batch.history.to("cpu").length.tolist() == hist.length.tolist()


def test_a_delayed_collaborator_s_history_starts_behind_its_delay(camera_opv2v_root):
    adapter, plain = _opv2v(camera_opv2v_root, history_frames=2), _opv2v(camera_opv2v_root)
    times = {a.agent_id: [plain.load(k).agent(a.agent_id).timestamp_us for k in range(3)]
             for a in plain.load(0).agents}
    ego = adapter.load(0).ego_id
    for idx in range(3):
        data = CoopSampler(adapter, PipelineConfig.from_dict({"lidar_range": WIDE, "delay_frames": 1}),
                           train=False)
        frame = data.load(idx)
        for agent in frame.agents:
            delay = 0 if agent.agent_id == ego else 1
            served = max(idx - delay, 0)
            assert agent.timestamp_us == times[agent.agent_id][served]
            want = [times[agent.agent_id][k] for k in range(idx - delay - 1, -1, -1)][:2]
            assert [p.timestamp_us for p in agent.history] == want
    # a delay reaching past the start serves the first frame, with nothing older
    late = adapter.load(2, {a: 5 for a in times if a != ego})
    assert all(a.history == [] and a.timestamp_us == times[a.agent_id][0] for a in late.agents[1:])
    assert len(late.ego.history) == 2


def test_augmentation_moves_older_frames_and_their_cameras_with_the_current_one(camera_opv2v_root):
    adapter = _opv2v(camera_opv2v_root, history_frames=2, load_images=True)
    cfg = {"lidar_range": WIDE, "cameras": {"image_size": [24, 40]}}
    plain = CoopSampler(adapter, PipelineConfig.from_dict(cfg), train=False)[2]
    aug = CoopSampler(adapter, PipelineConfig.from_dict({**cfg, "flip_prob": 1.0, "rotate_deg": 30.0,
                                                         "scale": [0.9, 1.1]}), train=True)[2]
    # the similarity A, from the ego's points (nothing is cropped, so rows correspond)
    p0, p1 = plain.points[0][:, :3].astype(np.float64), aug.points[0][:, :3].astype(np.float64)
    a = np.eye(4)
    a[:3, :3] = np.linalg.lstsq(p0, p1, rcond=None)[0].T
    assert np.linalg.det(a[:3, :3]) < 0  # flipped
    for i, (past0, past1) in enumerate(zip(plain.history, aug.history)):
        assert len(past0) == len(past1) == 2
        for h0, h1 in zip(past0, past1):
            assert h0.timestamp_us == h1.timestamp_us
            # older points in the ego frame, through the sample's own transforms
            e0 = plain.true_ego_from_agent[i] @ h0.agent_from_past
            e1 = aug.true_ego_from_agent[i] @ h1.agent_from_past
            w0 = h0.points[:, :3] @ e0[:3, :3].T + e0[:3, 3]
            w1 = h1.points[:, :3] @ e1[:3, :3].T + e1[:3, 3]
            np.testing.assert_allclose(w1, w0 @ a[:3, :3].T, atol=2e-3)
            np.testing.assert_allclose(h1.agent_from_past[:3, :3] @ h1.agent_from_past[:3, :3].T,
                                       np.eye(3), atol=1e-9)  # still rigid
            assert len(h1.cameras) == len(h0.cameras) > 0
            for c0, c1 in zip(h0.cameras, h1.cameras):
                assert c1.image.shape == (24, 40, 3) and np.array_equal(c0.image, c1.image)
                np.testing.assert_allclose(c1.lidar_from_camera, a @ c0.lidar_from_camera, atol=1e-4)
    batch = collate([aug])
    hist = batch.history
    assert hist.cameras is not None and hist.cameras.images.shape[1:] == (3, 24, 40)
    assert torch.equal(torch.unique(hist.cameras.agent), torch.arange(hist.num_observations))


def test_a_bad_older_frame_makes_its_sample_bad_naming_the_file(camera_opv2v_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(camera_opv2v_root, root)
    first = _opv2v(root).load(0)
    agent = first.agents[1].agent_id
    bad = next(root.glob(f"train/*/{agent}/{first.frame_id}.pcd"))
    bad.write_text("not a point cloud")
    assert len(_opv2v(root, history_frames=1).load(2).ego.history) == 1  # frame 0 not needed
    with pytest.raises(DatasetError, match=str(bad)):
        _opv2v(root, history_frames=2).load(1)  # frame 0 is in every agent's history
    assert len(_opv2v(root).load(1).agents) == len(first.agents)  # without history: fine
    skipped = CoopSampler(_opv2v(root, history_frames=2, skip_bad_frames=True), PipelineConfig(),
                          train=False)[1]
    assert str(bad) in skipped.reason


@pytest.fixture(scope="module", params=["dair", "v2xseq"])
def pair_data(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    cfg = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 256, "beams": 8},
                               "rsu_lidar": {"azimuth_steps": 256, "beams": 8}})
    cfg.cameras = False
    _, kept = generate_dataset(request.param, out, n_scenes=2, n_frames=3, seed=7, cfg=cfg,
                               splits={"train": 0.5, "val": 0.5}, progress=False, keep_frames=True)
    cls = DairV2XCAdapter if request.param == "dair" else V2XSeqAdapter
    return cls, out, kept


def test_dair_and_v2x_seq_histories_follow_each_side_s_segment(pair_data):
    cls, out, kept = pair_data
    for split, (_, frames, _) in zip(("train", "val"), kept):
        adapter, plain = cls(out, split, history_frames=2), cls(out, split)
        for idx in range(len(frames)):
            for delay in (0, 1):
                frame = adapter.load(idx, {"infrastructure": delay})
                reference = plain.load(idx, {"infrastructure": delay})
                for side, (agent, ref) in enumerate(zip(frame.agents, reference.agents)):
                    late = delay if side == 1 else 0
                    steps = list(range(idx - late - 1, -1, -1))[:2]
                    assert len(agent.history) == len(steps)
                    for past, k in zip(agent.history, steps):
                        truth = frames[k][0].agents[side]
                        assert past.timestamp_us == truth.timestamp_us
                        np.testing.assert_allclose(past.points[:, :3], truth.points[:, :3], atol=1e-4)
                    # the pose an older frame gets is the one a delay to it would give
                    if side == 1 and agent.history:
                        older = plain.load(idx, {"infrastructure": late + 1}).agents[1]
                        np.testing.assert_allclose(agent.history[0].world_from_lidar,
                                                   older.world_from_lidar, atol=1e-9)
                    if side == 0 and agent.history:
                        np.testing.assert_allclose(
                            agent.history[0].world_from_lidar,
                            WORLD_SHIFT @ frames[idx - 1][0].agents[0].world_from_lidar, atol=1e-6)
                    assert agent.timestamp_us == ref.timestamp_us
