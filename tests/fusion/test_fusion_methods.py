"""Fusion methods through real bytes: loss degrades to ego-only, pose errors move features."""
import copy
import dataclasses
import inspect

import pytest
import torch

from v2xfuse.builder import build_detector
from v2xfuse.comm.batch_link import BatchChannel
from v2xfuse.comm.channel import Channel, LinkConfig
from v2xfuse.datasets.batch import HistoryBatch
from v2xfuse.fusion.base import FusionState, Received
from v2xfuse.structures.bev import BevGrid
from v2xfuse.models.detector import run_handshake
from v2xfuse.registry import FUSION
from v2xfuse.structures.transforms import pose_from_xyz_rpy

INTERMEDIATE = ["max", "attfuse", "where2comm", "codefilling"]


def _poses(n_agents=3):
    return [pose_from_xyz_rpy(3.0 * i, -2.0 * i, 0.0, 0.0, 0.0, 0.3 * i) for i in range(n_agents)]


@pytest.mark.parametrize("method", INTERMEDIATE + ["late", "late_tc"])
def test_full_packet_loss_gives_the_ego_only_result(method, tiny_detector_cfg, random_points_batch):
    torch.manual_seed(0)
    model = build_detector(tiny_detector_cfg(method)).eval()
    ego_only = copy.deepcopy(model)
    ego_only.fusion = FUSION.get("none")()
    batch = random_points_batch(_poses())
    if model.fusion.contract.history_frames:  # one empty earlier observation per collaborator
        batch = dataclasses.replace(batch, history=HistoryBatch(
            torch.zeros(0, 5), torch.tensor([1, 2]), torch.tensor([1, 1]),
            torch.eye(4, dtype=torch.float64).repeat(2, 1, 1), torch.tensor([-100_000] * 2),
            torch.tensor([0, 1, 1])))
    lossy = BatchChannel(Channel(0, LinkConfig(loss=1.0)))
    with torch.no_grad():
        got = model.predict(model(batch, channel=lossy))[0]
        want = ego_only.predict(ego_only(batch))[0]
        ideal = model.predict(model(batch, channel=BatchChannel(Channel(0))))[0]
    assert lossy.ledger.mean_bytes() > 0  # messages were sent (and counted), then lost
    torch.testing.assert_close(got.boxes, want.boxes)
    torch.testing.assert_close(got.scores, want.scores)
    if not method.startswith("late"):  # with the link up, what arrives changes the result
        assert len(ideal.scores) != len(want.scores) or not torch.allclose(ideal.scores,
                                                                           want.scores)


@pytest.mark.parametrize("method", INTERMEDIATE)
def test_a_perturbed_sender_pose_moves_the_fused_features(method, tiny_detector_cfg,
                                                         random_points_batch):
    torch.manual_seed(0)
    grid = BevGrid(-12.8, -12.8, 12.8, 12.8, 0.8)
    channels = 4
    cls = FUSION.get(method)
    shapes = {"channels": channels, "grid": grid}  # what the builder injects
    fusion = cls(**{k: v for k, v in shapes.items() if k in inspect.signature(cls).parameters})
    fusion.eval()
    ego = torch.zeros(1, channels, grid.ny, grid.nx)
    collab = torch.zeros(1, channels, grid.ny, grid.nx)
    collab[0, :, 10:13, 14:16] = 1.0  # a blob in the collaborator's map
    batch = random_points_batch(_poses(2))
    state = FusionState(batch, torch.cat([ego, collab]), grid,
                        {"confidence": torch.cat([ego[:, :1], collab[:, :1]])})
    if fusion.contract.handshake:  # report and request, straight through
        run_handshake(fusion, state, [1])
    payload = fusion.encode(state, [1])[0]
    identity = torch.eye(4)
    shifted = identity.clone()
    shifted[0, 3] = 2 * grid.cell  # the sender believed to be 1.6 m further along x
    base = fusion.fuse(state, [Received(0, 1, payload, identity)])[0]
    moved = fusion.fuse(state, [Received(0, 1, payload, shifted)])[0]
    assert base.abs().sum() > 0
    torch.testing.assert_close(moved[:, :, 2:], base[:, :, :-2], atol=1e-5, rtol=0)
    assert not torch.allclose(moved, base)


def test_reported_bytes_are_the_serialised_lengths(tiny_detector_cfg, random_points_batch):
    torch.manual_seed(0)
    model = build_detector(tiny_detector_cfg("max")).eval()
    channel = BatchChannel(Channel(0))
    with torch.no_grad():
        model(random_points_batch(_poses()), channel=channel)
    records = channel.ledger.records if hasattr(channel.ledger, "records") else None
    total = sum(channel.ledger.bytes_per_frame())
    # two collaborators each send one (C, H, W) float32 map plus the message header
    c, h, w = 8, 32, 32
    assert total >= 2 * c * h * w * 4
    assert total < 2 * (c * h * w * 4 + 400)
    if records is not None:
        assert total == sum(r.num_bytes for r in records)


@pytest.mark.parametrize("method", ["late", "late_tc"])
def test_late_fusion_trains_exactly_as_the_ego_alone(tiny_detector_cfg, random_points_batch,
                                                     method):
    # single-agent training: neither the collaborators nor (late_tc) anyone's earlier
    # observations are encoded, so they cannot move the batch-norm statistics of a model
    # supervised on the ego's current view only
    from v2xfuse.fusion.basic import LateFusion
    from v2xfuse.fusion.late_tc import TimeCompensatedLateFusion
    assert TimeCompensatedLateFusion.senders is LateFusion.senders
    poses = [pose_from_xyz_rpy(0, 0, 0, 0, 0, 0), pose_from_xyz_rpy(6.0, -3.0, 0, 0, 0, 0.4),
             pose_from_xyz_rpy(-8.0, 5.0, 4.0, 0, 0, 1.2)]
    batch = random_points_batch(poses, seed=3)
    batch.gt_boxes = [torch.tensor([[4.0, 2.0, -1.0, 4.5, 1.9, 1.6, 0.3]])]
    # one earlier observation of every agent, points unlike the current ones
    gen = torch.Generator().manual_seed(11)
    past = torch.cat([torch.rand(300, 4, generator=gen) * torch.tensor([40.0, 40.0, 3.0, 1.0])
                      - torch.tensor([20.0, 20.0, 2.0, 0.0]) for _ in range(3)])
    obs = torch.arange(3).repeat_interleave(300)[:, None].float()
    batch = dataclasses.replace(batch, history=HistoryBatch(
        points=torch.cat([obs, past], 1), agent=torch.arange(3), steps=torch.ones(3, dtype=torch.long),
        agent_from_past=torch.eye(4, dtype=torch.float64).repeat(3, 1, 1),
        timestamp_us=torch.zeros(3, dtype=torch.long), length=torch.ones(3, dtype=torch.long)))
    states = []
    for fusion in ("none", method):
        torch.manual_seed(0)
        model = build_detector(tiny_detector_cfg(fusion))
        model.train()
        out = model(batch)
        model.loss(out, batch)["loss"].backward()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()}
                      | {"grad." + n: p.grad.clone() for n, p in model.named_parameters()
                         if p.grad is not None})
        if fusion != "none":
            assert model.fusion.senders(batch) == []
            model.eval()
            assert model.fusion.senders(batch) == [1, 2]  # and everybody sends at inference
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
