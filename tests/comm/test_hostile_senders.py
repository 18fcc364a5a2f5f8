"""Hostile collaborators: every fusion method x every attack the channel can play.

The ego must do at least as well as alone: a message that fails the receiver's checks is
dropped (counted by reason) and the ego's detections are exactly those it makes without that
collaborator; nothing raises out of the receive path.
"""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from v2xfuse.builder import build_detector
from v2xfuse.comm.attack import ATTACKS, AttackConfig
from v2xfuse.comm.batch_link import BatchChannel
from v2xfuse.comm.channel import Channel, LinkConfig
from v2xfuse.datasets import collate
from v2xfuse.datasets.batch import HistoryBatch
from v2xfuse.datasets.pipeline import Sample
from v2xfuse.registry import FUSION
from v2xfuse.structures.transforms import pose_from_xyz_rpy

METHODS = ["early", "late", "late_tc", "max", "attfuse", "where2comm", "codefilling"]
FRAME_US = 100_000
# rejected in every frame, whatever the method sends
ALWAYS_REJECTED = {"nan", "inf", "huge", "nonrigid_pose", "far_pose", "spoof_ego", "stale",
                   "truncate", "wrong_shape"}
# methods whose payloads carry indices the attack can push out of range
HAS_INDICES = {"where2comm", "codefilling"}


def _frames(n_frames: int = 2) -> list:
    """One collated batch per frame of one sequence: the ego ("0") and a collaborator ("1")
    8 m ahead and turned, 800 random points each, sensor times 100 ms apart."""
    poses = np.stack([np.eye(4), pose_from_xyz_rpy(8.0, 3.0, 0.0, 0.0, 0.0, 0.4)])
    out = []
    for t in range(n_frames):
        rng = np.random.default_rng(t)
        points = [np.c_[rng.uniform(-12, 12, (800, 2)), rng.uniform(-3, 1, (800, 1)),
                        rng.uniform(0, 1, (800, 1))].astype(np.float32) for _ in range(2)]
        world = poses.copy()
        world[:, 0, 3] += t  # both move 1 m per frame
        batch = collate([Sample(points, poses, np.zeros((0, 7)), np.zeros(0, np.int64),
                                ["0", "1"], ["vehicle"] * 2, np.zeros(2),
                                ("synthetic", "s0", f"{t:06d}"), world_from_agent=world,
                                timestamp_us=np.full(2, t * FRAME_US, np.int64))])
        if t == 0:  # the sequence starts: no earlier observation (history of length 0)
            batch = dataclasses.replace(batch, history=HistoryBatch(
                torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64),
                torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4, 4, dtype=torch.float64),
                torch.zeros(0, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)))
        else:  # each agent's previous frame, for methods with history (late_tc)
            prev = out[-1]
            world_past = world.copy()
            world_past[:, 0, 3] -= 1.0
            agent_from_past = np.linalg.inv(world) @ world_past
            batch = dataclasses.replace(batch, history=HistoryBatch(
                prev.points, torch.tensor([0, 1]), torch.tensor([1, 1]),
                torch.from_numpy(agent_from_past), torch.full((2,), (t - 1) * FRAME_US),
                torch.tensor([1, 1])))
        out.append(batch)
    return out


def _run(model, channel, frames):
    model.fusion.reset()
    with torch.no_grad():
        return [model.predict(model(b, channel=channel))[0] for b in frames]


def _same(a, b) -> bool:
    return a.boxes.shape == b.boxes.shape and torch.allclose(a.boxes, b.boxes) and \
        torch.allclose(a.scores, b.scores)


@pytest.fixture(scope="module")
def frames():
    return _frames()


@pytest.mark.parametrize("method", METHODS)
def test_every_attack_leaves_the_ego_at_least_as_good_as_alone(method, tiny_detector_cfg,
                                                                frames):
    torch.manual_seed(0)
    model = build_detector(tiny_detector_cfg(method)).eval()
    ego_only = copy.deepcopy(model)
    ego_only.fusion = FUSION.get("none")()
    alone = _run(ego_only, None, frames)
    clean = _run(model, BatchChannel(Channel(0)), frames)
    lost = _run(model, BatchChannel(Channel(0, LinkConfig(loss=1.0))), frames)
    for a, b in zip(lost, alone):  # losing the collaborator is being alone
        assert _same(a, b)
    assert not all(_same(c, a) for c, a in zip(clean, alone)), "the collaborator must matter"
    for attack in ATTACKS:
        if attack == "scale":
            continue  # finite content within the bounds: its own test below
        link = BatchChannel(Channel(0, attack=AttackConfig(type=attack, fraction=1.0)))
        got = _run(model, link, frames)
        rejected = link.ledger.rejected.as_dict()
        what = f"{method} under {attack}: rejected {rejected}"
        if attack in ALWAYS_REJECTED or (attack == "bad_index" and method in HAS_INDICES):
            assert rejected, what
            assert all(_same(g, a) for g, a in zip(got, alone)), what
        elif attack == "replay":  # frame 0 sends its own first message; frame 1 replays it
            assert rejected == {"duplicate": 1}, what
            assert _same(got[0], clean[0]) and _same(got[1], alone[1]), what
        elif attack == "duplicate":  # the first copy is used, the second refused
            assert rejected.get("duplicate", 0) >= len(frames), what
            assert all(_same(g, c) for g, c in zip(got, clean)), what
        else:  # bad_index on a payload without indices: nothing to tamper
            assert not rejected, what
            assert all(_same(g, c) for g, c in zip(got, clean)), what


@pytest.mark.parametrize("method", ["max", "attfuse", "where2comm"])
def test_amplified_features_are_refused_or_clamped_to_the_trained_range(method, tiny_detector_cfg,
                                                                        frames):
    """A sender amplifying its features passes the value checks (finite, within 100 spans of
    the trained range): x100 is refused as far stronger than the ego's own map; x3 passes and
    is clamped to the range the senders produced in training, value by value."""
    torch.manual_seed(0)
    model = build_detector(tiny_detector_cfg(method))
    model.train()
    with torch.no_grad():  # "training": the detector shows the method what senders send
        for batch in frames:
            model(batch)
    model.eval()
    rng = model.fusion.feature_range
    assert rng.known and (rng.hi >= rng.lo).all()
    link = BatchChannel(Channel(0, attack=AttackConfig(type="scale", fraction=1.0, factor=100.0)))
    _run(model, link, frames[:1])
    assert link.ledger.rejected.as_dict() == {"bounds": 1}
    seen = {}

    def spy(state, received):
        seen["features"] = [r.payload["features"] for r in received]
        return fuse(state, received)

    fuse = model.fusion.fuse
    model.fusion.fuse = spy
    link = BatchChannel(Channel(0, attack=AttackConfig(type="scale", fraction=1.0, factor=3.0)))
    _run(model, link, frames[:1])
    assert not link.ledger.rejected.as_dict() and seen["features"]
    for f in seen["features"]:
        view = (-1,) + (1,) * (f.dim() - 1)
        assert (f <= rng.hi.view(view) + 1e-6).all() and (f >= rng.lo.view(view) - 1e-6).all()
    # without the strength check, x100 reaches fusion (clamped): what the check is for
    model.fusion.max_strength_ratio = 0.0
    link = BatchChannel(Channel(0, attack=AttackConfig(type="scale", fraction=1.0, factor=100.0)))
    _run(model, link, frames[:1])
    assert not link.ledger.rejected.as_dict()


def test_strength_check_compares_like_with_like():
    from v2xfuse.comm.checks import Rejected
    from v2xfuse.fusion.payload_checks import expect_magnitude

    ego = torch.zeros(4, 10, 10)
    ego[:, :2, :5] = 2.0  # 10 strong cells, the rest empty
    expect_magnitude("f", torch.full((4, 10), 2.0), ego, 10.0)     # 10 cells as strong: fine
    expect_magnitude("f", torch.full((4, 100), 0.2), ego, 10.0)    # the whole map, as weak
    with pytest.raises(Rejected) as err:
        expect_magnitude("f", torch.full((4, 10), 25.0), ego, 10.0)
    assert err.value.reason == "bounds"


def test_attacks_hit_the_requested_fraction_of_senders_and_are_deterministic():
    from v2xfuse.comm.attack import Attacker

    frames = [("synthetic", "s0", f"{t:06d}") for t in range(300)]
    senders = ["1", "2", "3"]
    attacker = Attacker(AttackConfig(type="nan", fraction=1 / 3, seed=4))
    hits = [attacker.hostile(f, s) for f in frames for s in senders]
    assert 0.28 < np.mean(hits) < 0.39
    again = Attacker(AttackConfig(type="nan", fraction=1 / 3, seed=4))
    assert hits == [again.hostile(f, s) for f in frames for s in senders]
    assert not any(Attacker(AttackConfig(type="nan", fraction=0.0)).hostile(f, "1")
                   for f in frames)


def test_attack_config_rejects_unknown_types_and_keys():
    with pytest.raises(ValueError, match="channel.attack.type"):
        AttackConfig(type="gremlins")
    with pytest.raises(KeyError, match="fractoin"):
        AttackConfig.from_dict({"type": "nan", "fractoin": 0.5})
