"""A model can use the batch's history: older observations encode like agents, and
``agent_from_past`` (kept right by ego_aligned_frames) takes their maps to the current frame."""
import numpy as np
import torch

from v2xfuse.builder import build_detector
from v2xfuse.datasets import collate
from v2xfuse.datasets.pipeline import PastObs, Sample
from v2xfuse.structures.bev import warp_to_ego
from v2xfuse.models.detector import ego_aligned_frames
from v2xfuse.models.inputs import AgentInputs
from v2xfuse.structures.transforms import invert_transform, pose_from_xyz_rpy

CELL = 0.8  # tests/conftest.py tiny_detector_cfg


def _lattice_world(rng) -> np.ndarray:
    """(P, 4) static world points at pillar centres of a 0.8 m lattice (no point sits near a
    pillar edge, whichever whole-cell offset the frames have)."""
    cells = rng.choice(30 * 30, 150, replace=False)
    x = (cells % 30 - 15 + 0.5) * CELL
    y = (cells // 30 - 15 + 0.5) * CELL
    return np.c_[x, y, rng.uniform(-2, 0, len(x)), rng.uniform(0, 1, len(x))].astype(np.float32)


def _in_frame(world: np.ndarray, world_from_frame: np.ndarray) -> np.ndarray:
    out = world.copy()
    t = invert_transform(world_from_frame)
    out[:, :3] = world[:, :3] @ t[:3, :3].T + t[:3, 3]
    return out


def test_older_maps_warped_by_agent_from_past_land_on_the_current_map(tiny_detector_cfg):
    rng = np.random.default_rng(0)
    world = _lattice_world(rng)
    # a car driving 2 and then 4 cells along x, a collaborator 3 cells sideways, static world
    now = [pose_from_xyz_rpy(4 * CELL, 0, 0, 0, 0, 0), pose_from_xyz_rpy(0, 3 * CELL, 0, 0, 0, 0)]
    past = [[pose_from_xyz_rpy(2 * CELL, 0, 0, 0, 0, 0), pose_from_xyz_rpy(0, 0, 0, 0, 0, 0)], []]
    history = [[PastObs(_in_frame(world, p), invert_transform(n) @ p, 1000 * (j + 1))
                for j, p in enumerate(ps)] for n, ps in zip(now, past)]
    ego_from_agent = np.stack([invert_transform(now[0]) @ n for n in now])
    sample = Sample([_in_frame(world, n) for n in now], ego_from_agent, np.zeros((0, 7)),
                    np.zeros(0, np.int64), ["0", "1"], ["vehicle"] * 2, np.zeros(2),
                    ("synthetic", "s", "0"), history=history)
    batch = collate([sample])
    assert batch.history.length.tolist() == [2, 0]
    torch.manual_seed(0)
    encoder = build_detector(tiny_detector_cfg()).encoder.eval()
    with torch.no_grad():
        current = encoder(AgentInputs.from_batch(batch))
        older = encoder(AgentInputs.of_history(batch))
    assert older.shape == (2, *current.shape[1:])
    warped = warp_to_ego(older, batch.history.agent_from_past.float(), encoder.grid)
    occupied_now = current[0].abs().sum(0) > 0
    inner = torch.zeros_like(occupied_now)
    inner[6:-6, 6:-6] = True  # away from the edges cells enter and leave by
    for h in range(2):
        occupied = warped[h].abs().sum(0) > 0
        assert occupied[inner].sum() > 20
        assert torch.equal(occupied[inner], occupied_now[inner])


def test_ego_aligned_frames_keep_older_frames_attached(random_points_batch):
    poses = [pose_from_xyz_rpy(0, 0, 0, 0, 0, 0), pose_from_xyz_rpy(5.3, -2.1, 0.4, 0, 0, 1.1)]
    batch = random_points_batch(poses)
    from dataclasses import replace

    from v2xfuse.datasets.batch import HistoryBatch

    older = PastObs(np.zeros((3, 4), np.float32), pose_from_xyz_rpy(-1.2, 0.1, 0, 0, 0, 0.05), 0)
    batch = replace(batch, history=HistoryBatch.stack([[older], [older]], [0, 1], None))
    before = batch.history.ego_from_past(batch.ego_from_agent)
    aligned = ego_aligned_frames(batch, [1], CELL)
    after = aligned.history.ego_from_past(aligned.ego_from_agent)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)  # the older frame stays put
    assert not torch.allclose(aligned.history.agent_from_past[1], batch.history.agent_from_past[1])
    assert torch.equal(aligned.history.agent_from_past[0], batch.history.agent_from_past[0])
