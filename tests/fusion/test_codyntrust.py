"""CoDynTrust: box tracks and their extrapolation, the trust modulus and its delay decay, the
box-flow gating mask, gradients to the trust MLP, bytes on the wire against the formula, and
hostile messages dropped and counted."""
import math

import numpy as np
import pytest
import torch

from v2xfuse.builder import build_detector
from v2xfuse.comm import Message, encode
from v2xfuse.comm.batch_link import BatchChannel
from v2xfuse.comm.channel import Channel
from v2xfuse.datasets import collate
from v2xfuse.datasets.pipeline import PastObs, Sample
from v2xfuse.fusion.codyntrust import KIND, CoDynTrust, message_bytes
from v2xfuse.fusion.trust import (TrustModulus, box_flow, extrapolate, match_tracks,
                                  resample_along, track_velocity)
from v2xfuse.structures.bev import BevGrid
from v2xfuse.structures.transforms import pose_from_xyz_rpy

GRID = BevGrid(-12.8, -12.8, 12.8, 12.8, 0.8)  # 32 x 32 cells


def _box(x, y, yaw=0.0, dx=4.0, dy=2.0):
    return [x, y, -1.0, dx, dy, 1.5, yaw]


def test_tracks_match_by_distance_and_heading_and_extrapolate_exactly():
    previous = torch.tensor([_box(0.0, 0.0), _box(10.0, 5.0), _box(-6.0, -6.0),
                             _box(5.0, -8.0, yaw=math.pi / 2)])
    current = torch.tensor([
        _box(2.0, 0.0),                    # 2 m along its heading: the same car
        _box(10.0, 7.0),                   # 2 m sideways of its heading: another object
        _box(-6.0, -5.7),                  # 0.3 m sideways: standing, matched
        _box(5.0, -10.5, yaw=math.pi / 2),  # reversing along its heading (modulo pi)
        _box(-20.0, 0.0)])                 # nothing within 5 m
    rows, cols = match_tracks(current, previous)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 0), (2, 2), (3, 3)]
    velocity, _, _ = track_velocity(current, previous, 0.1)
    torch.testing.assert_close(velocity, torch.tensor([[20.0, 0.0], [0.0, 0.0], [0.0, 3.0],
                                                       [0.0, -25.0], [0.0, 0.0]]))
    moved = extrapolate(current, velocity, 0.3)
    torch.testing.assert_close(moved[:, :2], torch.tensor([[8.0, 0.0], [10.0, 7.0], [-6.0, -4.8],
                                                           [5.0, -18.0], [-20.0, 0.0]]))
    torch.testing.assert_close(moved[:, 2:], current[:, 2:])
    # the nearest admissible pair wins; each box is used once
    rows, cols = match_tracks(torch.tensor([_box(1.0, 0.0), _box(1.5, 0.0)]),
                              torch.tensor([_box(0.0, 0.0)]))
    assert (rows.tolist(), cols.tolist()) == ([0], [0])
    velocity, _, _ = track_velocity(current, previous, 0.0)  # no time between: no motion
    assert not velocity.any()


def test_trust_decays_exponentially_with_the_messages_age():
    modulus = TrustModulus(decay_per_s=0.2).eval()
    inputs = torch.tensor([[0.5, 1.0, 0.5, 1.0, 1.0],     # through the MLP
                           [0.9, 0.0, 0.0, 0.0, 0.0]])    # reliable once standardised
    modulus.mean.copy_(torch.tensor([0.5, 1.0, 0.5, 1.0, 1.0]))
    with torch.no_grad():
        now = modulus(inputs, 0.0)
        ages = [0.1, 0.3, 0.5]
        later = [modulus(inputs, a) for a in ages]
    assert float(now[1]) == 1.0 and 0.0 < float(now[0]) < 1.0
    for a, t in zip(ages, later):
        torch.testing.assert_close(t, now * math.exp(-0.2 * a))
    assert all(float(a[0]) > float(b[0]) for a, b in zip(later, later[1:]))
    modulus.reliable_score = None  # no shortcut: the MLP decides for both
    with torch.no_grad():
        assert float(modulus(inputs, 0.0)[1]) < 1.0


def test_the_mask_is_the_trust_inside_each_moved_box_and_zero_elsewhere():
    boxes = torch.tensor([_box(2.0, 1.2), _box(-6.0, -6.0, yaw=math.pi / 2)])
    displacement = torch.tensor([[4.0, 0.0], [0.0, 0.0]])  # 5 cells along x; standing
    trust = torch.tensor([0.7, 0.4])
    mask, source = box_flow(boxes, displacement, trust, GRID, margin_m=0.0)
    xs, ys = GRID.centres()
    in_first = ((xs - 6.0).abs() <= 2.0) & ((ys - 1.2).abs() <= 1.0)
    in_second = ((xs + 6.0).abs() <= 1.0) & ((ys + 6.0).abs() <= 2.0)
    want = torch.zeros(GRID.ny, GRID.nx)
    want[in_first], want[in_second] = 0.7, 0.4
    torch.testing.assert_close(mask[0], want)
    assert in_first.sum() == 5 * 3 and in_second.sum() == 3 * 5
    # features move with their box: every cell of the moved box holds what the cell 5
    # columns back held; cells outside both boxes are zero after gating
    features = torch.arange(2 * GRID.ny * GRID.nx, dtype=torch.float32).view(2, GRID.ny, GRID.nx)
    gated = resample_along(features, source, GRID) * mask
    rows, cols = torch.nonzero(in_first, as_tuple=True)
    torch.testing.assert_close(gated[:, rows, cols], 0.7 * features[:, rows, cols - 5])
    rows, cols = torch.nonzero(in_second, as_tuple=True)
    torch.testing.assert_close(gated[:, rows, cols], 0.4 * features[:, rows, cols])
    assert not gated[:, ~(in_first | in_second)].any()


def _cfg(**fusion):
    return {"dataset": {"type": "opv2v"},
            "pipeline": {"lidar_range": [-12.8, -12.8, -4.0, 12.8, 12.8, 2.0]},
            "model": {"encoder": {"type": "pointpillars", "voxel_size": [0.8, 0.8],
                                  "out_channels": 8},
                      "backbone": {"layer_strides": [1], "layer_channels": [8],
                                   "layer_nums": [1], "upsample_channels": [8], "out_stride": 1},
                      "fusion": {"type": "codyntrust", "passes": 3, **fusion},
                      "head": {"type": "anchor", "anchor": {"dropout": 0.1}},
                      "post": {"score_threshold": 0.0}}}


def _batch(n=3, delay_us=0):
    """Random points around ``n`` agents, each with one earlier observation 100 ms before
    (1 m behind); collaborators ``delay_us`` late."""
    rng = np.random.default_rng(0)
    points = [np.c_[rng.uniform(-12, 12, (800, 2)), rng.uniform(-3, 1, (800, 1)),
                    rng.uniform(0, 1, (800, 1))].astype(np.float32) for _ in range(n)]
    poses = np.stack([pose_from_xyz_rpy(3.0 * i, -2.0 * i, 0.0, 0.0, 0.0, 0.3 * i)
                      for i in range(n)])
    stamps = np.array([1_000_000] + [1_000_000 - delay_us] * (n - 1), np.int64)
    history = [[PastObs(p, pose_from_xyz_rpy(-1.0, 0.0, 0.0), int(t) - 100_000)]
               for p, t in zip(points, stamps)]
    sample = Sample(points, poses, np.array([_box(5.0, 1.0, 0.2, 4.5, 1.9)]),
                    np.zeros(1, np.int64), [f"agent{i}" for i in range(n)], ["vehicle"] * n,
                    1_000_000 - stamps, ("synthetic", "s0", "000010"), timestamp_us=stamps,
                    history=history)
    return collate([sample])


def test_a_training_step_reaches_the_trust_mlp_and_messages_cost_their_formula():
    torch.manual_seed(0)
    model = build_detector(_cfg())
    assert model.head.uncertainty  # the method's contract turned the head's on
    batch = _batch()
    out = model(batch)
    losses = model.loss(out, batch)
    assert math.isfinite(float(losses["loss"].detach())) and "loss_unc_reg" in losses
    losses["loss"].backward()
    for layer in model.fusion.trust.mlp:
        if isinstance(layer, torch.nn.Linear):
            assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    received = out.rounds["bev"]
    assert [r.sender for r in received] == [1, 2]
    assert all(r.payload["velocity"].abs().sum() > 0 for r in received)  # tracks found

    model.eval()
    link = BatchChannel(Channel(0))
    with torch.no_grad():
        out = model(_batch(delay_us=300_000), channel=link)
    sent = {r.sender: r for r in out.rounds["bev"]}
    assert sorted(sent) == [1, 2] and all(r.delay_us == 300_000 for r in sent.values())
    channels, height, width = out.state.features.shape[1:]
    ids = out.state.batch.frames[0].agent_ids
    for record in link.ledger.records:
        r = sent[ids.index(record.sender)]
        want = message_bytes(record.sender, len(r.payload["boxes"]), int(r.payload["cells"].sum()),
                             channels, height, width)
        assert record.kind == KIND and record.num_bytes == want
    assert link.ledger.rejected.total() == 0


def test_every_parameter_gets_a_gradient_even_when_no_box_arrives():
    """DDP runs without searching for unused parameters (tests/engine/test_distributed.py)."""
    torch.manual_seed(0)
    model = build_detector(_cfg()).train()
    for batch in (_batch(n=1), _batch()):  # the ego alone: nothing arrives
        model.zero_grad(set_to_none=True)
        model.loss(model(batch), batch)["loss"].backward()
        assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("cells", [3, 32 * 32])  # flat indices, then the bit mask
def test_the_bytes_formula_is_the_serialised_length(cells):
    method = CoDynTrust(channels=16, grid=GRID)
    wire = method.wire()
    mask = torch.zeros(32 * 32, dtype=torch.bool)
    mask[torch.randperm(32 * 32)[:cells]] = True
    payload = {"boxes": torch.zeros(7, 7), "velocity": torch.zeros(7, 2),
               "trust_inputs": torch.zeros(7, 5), "cells": mask.view(32, 32),
               "features": torch.zeros(16, cells)}
    entries = {}
    for name, t in payload.items():
        entries.update(wire.codec(name).encode(t))
    msg = Message("cav_42", KIND, 0, np.eye(4), entries)
    assert len(encode(msg)) == message_bytes("cav_42", 7, cells, 16, 32, 32)
    # the closed form of the module docstring
    closed = (260 + 6 + 56 * 7 + (4 * 16 + 2) * cells if cells < 64 else
              261 + 6 + 56 * 7 + 4 * 16 * cells + 32 * 32 // 8)
    assert len(encode(msg)) == closed


def _state_and_payload(model, batch):
    with torch.no_grad():
        out = model(batch)
    good = {k: v.detach().clone() for k, v in out.rounds["bev"][0].payload.items()}
    return out.state, good


@pytest.mark.parametrize("field, corrupt, reason", [
    ("trust_inputs", lambda t: t.index_fill(1, torch.tensor([2]), float("nan")), "nonfinite"),
    ("trust_inputs", lambda t: t.index_fill(1, torch.tensor([0]), 1.5), "bounds"),
    ("trust_inputs", lambda t: t.index_fill(1, torch.tensor([3]), -1.0), "bounds"),
    ("velocity", lambda t: t + 500.0, "bounds"),
    ("boxes", lambda t: t.index_fill(1, torch.tensor([3]), -2.0), "bounds"),
    ("features", lambda t: t[:, :-1], "shape"),
    ("velocity", lambda t: t[:-1], "shape"),
    ("cells", lambda t: t[:-1], "shape"),
    ("features", lambda t: t * 1e5, "bounds"),
])
def test_hostile_messages_are_dropped_and_counted(field, corrupt, reason):
    torch.manual_seed(0)
    model = build_detector(_cfg()).eval()
    batch = _batch()
    state, good = _state_and_payload(model, batch)
    bad = {**good, field: corrupt(good[field])}
    link = BatchChannel(Channel(0))
    arrived = link.transmit(model.fusion.wire(), batch, [1, 2], [good, bad], state=state)
    assert [r.sender for r in arrived] == [1]
    assert link.ledger.rejected.as_dict() == {reason: 1}


def test_every_tampering_attack_is_refused_and_the_ego_fuses_as_if_the_message_was_lost():
    from v2xfuse.comm.attack import AttackConfig
    from v2xfuse.comm.channel import LinkConfig

    torch.manual_seed(0)
    model = build_detector(_cfg()).eval()
    batch = _batch(delay_us=100_000)

    def run(**channel):
        link = BatchChannel(Channel(0, **channel))
        with torch.no_grad():
            return model.predict(model(batch, channel=link))[0], link.ledger.rejected.as_dict()

    lost, _ = run(link=LinkConfig(loss=1.0))
    clean, _ = run()
    assert not torch.equal(clean.scores, lost.scores)  # the collaborators matter
    for attack in ("nan", "inf", "huge", "nonrigid_pose", "far_pose", "spoof_ego", "stale",
                   "truncate", "wrong_shape"):  # bad_index may hit a mask byte already 255
        got, rejected = run(attack=AttackConfig(type=attack, fraction=1.0))
        assert sum(rejected.values()) == 2, (attack, rejected)  # both collaborators' messages
        assert torch.equal(got.boxes, lost.boxes) and torch.equal(got.scores, lost.scores), attack


def test_a_separate_agent_head_serves_the_senders_and_the_fused_head_learns_alone():
    """model.agent_head: separate: the senders' boxes and the single-agent loss come from a
    second head; the main head only sees fused maps (no single-agent gradient reaches it)."""
    torch.manual_seed(0)
    cfg = _cfg()
    cfg["model"].update(agent_loss_weight=1.0, agent_head="separate")
    model = build_detector(cfg)
    assert model.agent_head is not model.head and model.agent_head.uncertainty
    calls = []
    model.agent_head.register_forward_hook(lambda *a: calls.append("agent"))
    model.head.register_forward_hook(lambda *a: calls.append("main"))
    batch = _batch()
    out = model(batch)
    assert calls.count("main") == 1 and calls.count("agent") >= 1  # senders: the agent head
    losses = model.loss(out, batch)
    assert "loss_agent" in losses
    features = out.state.features.detach().requires_grad_()
    agent = model.agent_loss(features, out.state.batch)["loss"]
    grads = torch.autograd.grad(agent, list(model.head.parameters()), allow_unused=True)
    assert all(g is None for g in grads)
    assert any(g is not None for g in torch.autograd.grad(
        model.agent_loss(features, out.state.batch)["loss"], list(model.agent_head.parameters()),
        allow_unused=True))
    assert any(k.startswith("own_head.") for k in model.state_dict())  # saved with the model
    with pytest.raises(ValueError, match="model.agent_head"):
        cfg["model"]["agent_head"] = "both"
        build_detector(cfg)
