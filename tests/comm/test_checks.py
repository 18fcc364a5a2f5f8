"""The receiver's checks, one by one: poses, payload fields, counting, and the channel's drops."""
import math

import numpy as np
import pytest
import torch

from v2xfuse.comm import Channel, Message, encode
from v2xfuse.comm.checks import ReceiveChecks, Rejected, RejectionLog, check_rigid_pose
from v2xfuse.fusion.basic import EarlyFusion, LateFusion
from v2xfuse.fusion.late_tc import TimeCompensatedLateFusion
from v2xfuse.fusion.payload_checks import FeatureRange

CHECKS = ReceiveChecks()


def _pose(yaw=0.3, xyz=(20.0, -5.0, 1.0)):
    p = np.eye(4)
    p[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
    p[:3, 3] = xyz
    return p


@pytest.mark.parametrize("change, reason", [
    (lambda p: p[:3, :3].__imul__(2.0), "pose"),                     # scaled by 2
    (lambda p: p.__setitem__((0, 1), p[0, 1] + 0.2), "pose"),        # sheared
    (lambda p: p[:3, :3].__imul__(1.06), "pose"),                    # scaled by 6 %
    (lambda p: p[:, 1].__imul__(-1.0), "pose"),                      # reflected (det -1)
    (lambda p: p[:3, :3].__imul__(0.0), "pose"),                     # singular
    (lambda p: p.__setitem__((0, 3), 1e300), "far"),                 # finite, absurdly far
    (lambda p: p.__setitem__((1, 3), 400.0), "far"),                 # beyond 300 m
    (lambda p: p.__setitem__((2, 2), float("nan")), "pose"),
])
def test_non_rigid_or_far_poses_are_rejected(change, reason):
    pose = _pose()
    change(pose)
    with pytest.raises(Rejected) as err:
        check_rigid_pose(pose, CHECKS, receiver_xyz=np.zeros(3))
    assert err.value.reason == reason


def test_rigid_poses_pass_including_dair_style_near_orthonormal_rotations():
    check_rigid_pose(_pose(), CHECKS, receiver_xyz=np.zeros(3))
    # DAIR-V2X poses are orthonormal to about 1e-3..1e-2: accepted as given
    pose = _pose()
    pose[:3, :3] += 5e-3 * np.random.default_rng(0).standard_normal((3, 3))
    check_rigid_pose(pose, CHECKS, receiver_xyz=np.zeros(3))
    # no receiver position: no range check (a world-frame pose may be far from the origin)
    check_rigid_pose(_pose(xyz=(5000.0, 0.0, 0.0)), CHECKS)


def test_channel_drops_bad_bytes_and_wrong_senders_and_counts_them():
    ch = Channel(0)
    msg = Message("cav1", "boxes", 0, _pose(), {"b": np.zeros((2, 7), np.float32)})
    assert len(ch.transmit(0, [msg], receiver="ego", receiver_xyz=np.zeros(3))) == 1
    far = Message("cav1", "boxes", 1, _pose(xyz=(1e6, 0, 0)), {})
    assert ch.transmit(1, [far], receiver="ego", receiver_xyz=np.zeros(3)) == []
    old = Message("cav1", "boxes", -5_000_000, _pose(), {})
    assert ch.transmit(2, [old], receiver="ego", now_us=0) == []
    again = Message("cav1", "boxes", 0, _pose(), {})  # a timestamp already accepted
    assert ch.transmit(3, [again], receiver="ego") == []
    assert ch.ledger.rejected.as_dict() == {"far": 1, "stale": 1, "duplicate": 1}
    assert ch.ledger.summary()["rejected"] == 3
    assert encode(msg)  # unchanged message still encodes


def test_rejection_log_counts_every_drop_and_logs_each_reason_once(caplog):
    log = RejectionLog()
    for _ in range(3):
        log.add(Rejected("nonfinite", "payload 'x'"), "cav1", "features")
    log.add(Rejected("pose", "not a rotation"), "cav2", "features")
    assert log.as_dict() == {"pose": 1, "nonfinite": 3} and log.total() == 4
    assert sum("dropped" in r.message for r in caplog.records) == 2
    with pytest.raises(ValueError):
        Rejected("mystery", "x")


def _late_payload(k=3, **over):
    boxes = torch.tensor([[5.0, 1.0, 0.0, 4.0, 2.0, 1.5, 0.1]]).repeat(k, 1)
    return {"boxes": boxes, "scores": torch.full((k,), 0.7), **over}


@pytest.mark.parametrize("payload, reason", [
    (_late_payload(scores=torch.ones(2)), "shape"),
    (_late_payload(k=1, boxes=torch.tensor([[5.0, 1.0, 0.0, -4.0, 2.0, 1.5, 0.1]])), "bounds"),
    (_late_payload(k=1, boxes=torch.tensor([[5.0, 1.0, 0.0, 4.0, 2.0, float("nan"), 0.1]])),
     "nonfinite"),
    (_late_payload(scores=torch.full((3,), 1e30)), "bounds"),
    (_late_payload(scores=torch.full((3,), -0.5)), "bounds"),
    (_late_payload(k=600), "bounds"),
    (_late_payload(boxes=torch.zeros(3, 8)), "shape"),
    ({"scores": torch.ones(2)}, "shape"),
    (_late_payload(extra=torch.ones(1)), "shape"),
])
def test_late_fusion_refuses_impossible_boxes_and_scores(payload, reason):
    with pytest.raises(Rejected) as err:
        LateFusion().check_payload("boxes", payload, None)
    assert err.value.reason == reason


def test_late_fusion_accepts_valid_boxes_and_late_tc_checks_its_history():
    assert LateFusion().check_payload("boxes", _late_payload(), None)["boxes"].shape == (3, 7)
    tc = TimeCompensatedLateFusion()
    ok = _late_payload(prev_boxes=_late_payload()["boxes"], prev_dt=torch.tensor([0.1]))
    tc.check_payload("boxes", ok, None)
    with pytest.raises(Rejected, match="prev_dt"):
        tc.check_payload("boxes", {**ok, "prev_dt": torch.tensor([-3.0])}, None)


def test_early_fusion_caps_points_per_sender_and_refuses_far_or_nan_points():
    fusion = EarlyFusion(max_points=100_000)
    pts = torch.rand(2_000_000, 4) * 50
    capped = fusion.check_payload("points", {"points": pts}, None)["points"]
    assert len(capped) <= 100_000 and torch.equal(capped[1], pts[20])  # a uniform stride
    bad = pts[:10].clone()
    bad[3, 0] = 1e5
    with pytest.raises(Rejected, match="points"):
        fusion.check_payload("points", {"points": bad}, None)
    bad[3, 0] = float("inf")
    with pytest.raises(Rejected) as err:
        fusion.check_payload("points", {"points": bad}, None)
    assert err.value.reason == "nonfinite"


def test_feature_range_clamps_within_and_rejects_far_beyond_what_training_saw():
    rng = FeatureRange(2, reject_factor=10.0)
    x = torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.0, 1.0]])
    assert torch.equal(rng.sanitise("f", x * 1000), x * 1000)  # nothing observed: unknown range
    rng.observe(x)
    assert rng.known and rng.lo.tolist() == [0.0, -1.0] and rng.hi.tolist() == [2.0, 1.0]
    got = rng.sanitise("f", x * 3)
    assert torch.equal(got, torch.tensor([[0.0, 2.0, 2.0], [-1.0, 0.0, 1.0]]))
    with pytest.raises(Rejected) as err:
        rng.sanitise("f", x * 100)
    assert err.value.reason == "bounds"
    # a checkpoint from before ranges were kept loads with the range unknown
    fresh = FeatureRange(2)
    fresh.load_state_dict({}, strict=True)
    assert not fresh.known
    fresh.load_state_dict(rng.state_dict())
    assert fresh.known
