"""Channel: byte accounting, loss, delay, pose noise, budget, determinism."""
from __future__ import annotations

import math

import numpy as np
import pytest

from v2xfuse.comm import Channel, LinkConfig, Message, encode
from v2xfuse.comm.channel import perturb_pose

FRAME_US = 100_000


def pose_at(t: int, agent: int = 0) -> np.ndarray:
    p = np.eye(4)
    yaw = 0.1 * t + agent
    p[:2, :2] = [[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]]
    p[:3, 3] = [10.0 * t, agent, 1.5]
    return p


def frame_messages(t: int, n: int = 3) -> list[Message]:
    return [Message(f"cav{i}", "bev_features", t * FRAME_US, pose_at(t, i),
                    {"x": np.full((i + 1, 8), t, np.float32)}) for i in range(n)]


def test_reported_bytes_are_serialised_lengths():
    ch = Channel(np.random.default_rng(0))
    expect = []
    for t in range(5):
        msgs = frame_messages(t)
        msgs.append(Message("rsu", "boxes", t * FRAME_US, np.eye(4), {"b": np.zeros((t, 7), np.float32)}))
        expect.append(sum(len(encode(m)) for m in msgs))
        rx = ch.transmit(t, msgs, method="max")
        assert len(rx) == 4
    led = ch.ledger
    assert led.bytes_per_frame() == expect
    assert led.mean_bytes() == pytest.approx(np.mean(expect))
    assert led.percentile_bytes(95) == pytest.approx(np.percentile(expect, 95))
    assert sum(led.per_link().values()) == sum(expect) == sum(led.per_kind().values())
    assert led.per_method() == {"max": sum(expect)}
    rsu = [len(encode(Message("rsu", "boxes", t * FRAME_US, np.eye(4),
                              {"b": np.zeros((t, 7), np.float32)}))) for t in range(5)]
    assert led.per_link()[("rsu", "ego")] == sum(rsu)
    s = led.summary()
    assert s["log2_mean_bytes"] == pytest.approx(math.log2(np.mean(expect)))
    assert s["mean_kb"] == pytest.approx(np.mean(expect) / 1000)
    assert s["delivered"] == 20 and s["sent"] == 20


def test_empty_frame_counts_as_zero_bytes():
    ch = Channel(1)
    ch.transmit("a", frame_messages(0))
    ch.transmit("b", [])
    assert ch.ledger.bytes_per_frame()[1] == 0 and ch.ledger.frames == ["a", "b"]


def test_total_loss_delivers_nothing_but_bytes_were_sent():
    ch = Channel(np.random.default_rng(0), LinkConfig(loss=1.0))
    for t in range(10):
        assert ch.transmit(t, frame_messages(t)) == []
    assert ch.ledger.count("lost") == 30 and ch.ledger.summary()["delivered"] == 0
    assert ch.ledger.bytes_per_frame()[0] == sum(len(encode(m)) for m in frame_messages(0))


def test_partial_loss_rate_and_per_link_override():
    ch = Channel(np.random.default_rng(0), LinkConfig(loss=0.3),
                 per_link={("cav0", "ego"): LinkConfig(loss=0.0)})
    got = {"cav0": 0, "cav1": 0, "cav2": 0}
    for t in range(400):
        for m in ch.transmit(t, frame_messages(t)):
            got[m.sender] += 1
    assert got["cav0"] == 400
    assert 0.6 < got["cav1"] / 400 < 0.8 and 0.6 < got["cav2"] / 400 < 0.8


@pytest.mark.parametrize("cfg", [LinkConfig(delay=2), LinkConfig(delay=150_000, delay_unit="us")])
def test_delay_delivers_the_older_message(cfg):
    ch = Channel(np.random.default_rng(0), cfg)
    for t in range(6):
        rx = ch.transmit(t, frame_messages(t))
        if t < 2:
            assert rx == []
            continue
        assert [m.sender for m in rx] == ["cav0", "cav1", "cav2"]
        for i, m in enumerate(rx):
            assert m.timestamp_us == (t - 2) * FRAME_US
            np.testing.assert_array_equal(m.world_from_lidar, pose_at(t - 2, i))
            assert (m.payload["x"] == t - 2).all()
    assert ch.ledger.summary()["not_ready"] == 6
    ch.reset()
    assert ch.transmit(6, frame_messages(6)) == []


def test_sampled_delay_within_range():
    ch = Channel(np.random.default_rng(3), LinkConfig(delay=(0, 3)))
    ages = []
    for t in range(200):
        ages += [t - m.timestamp_us // FRAME_US for m in ch.transmit(t, frame_messages(t))]
    assert set(ages) == {0, 1, 2, 3}


def test_pose_noise_statistics():
    xy_std, yaw_std = 0.4, 2.0
    ch = Channel(np.random.default_rng(7), LinkConfig(xy_std_m=xy_std, yaw_std_deg=yaw_std))
    dxy, dyaw = [], []
    for t in range(700):
        sent = frame_messages(t)
        for s, r in zip(sent, ch.transmit(t, sent)):
            a, b = s.world_from_lidar, r.world_from_lidar
            dxy.append(b[:2, 3] - a[:2, 3])
            rel = b[:3, :3] @ a[:3, :3].T
            dyaw.append(math.degrees(math.atan2(rel[1, 0], rel[0, 0])))
            assert b[2, 3] == a[2, 3]
            np.testing.assert_allclose(b[:3, :3] @ b[:3, :3].T, np.eye(3), atol=1e-12)
    dxy, dyaw = np.array(dxy), np.array(dyaw)
    assert len(dyaw) == 2100
    np.testing.assert_allclose(dxy.std(0), xy_std, rtol=0.08)
    assert abs(dyaw.std() - yaw_std) < 0.08 * yaw_std
    assert np.abs(dxy.mean(0)).max() < 0.05 and abs(dyaw.mean()) < 0.2


def test_perturb_pose_is_rotation_about_world_z():
    p = pose_at(3, 1)
    q = perturb_pose(p, np.zeros(2), math.pi / 2)
    np.testing.assert_allclose(q[:3, 3], p[:3, 3])
    np.testing.assert_allclose(q[:3, 0], [-p[1, 0], p[0, 0], p[2, 0]], atol=1e-12)


def run(seed, cfg):
    ch = Channel(np.random.default_rng(seed), cfg, budget_bytes_per_frame=700)
    out = []
    for t in range(30):
        out.append([(m.sender, m.timestamp_us, m.world_from_lidar.tobytes())
                    for m in ch.transmit(t, frame_messages(t))])
    return out, ch.ledger.records


def test_deterministic_for_a_seed():
    cfg = LinkConfig(delay=(0, 2), loss=0.2, xy_std_m=0.3, yaw_std_deg=1.0)
    assert run(11, cfg) == run(11, cfg)
    assert run(11, cfg)[0] != run(12, cfg)[0]


def test_budget_order():
    msgs = frame_messages(0)  # sizes increase with the agent index
    sizes = [len(encode(m)) for m in msgs]
    budget = sizes[2] + sizes[0]
    ch = Channel(0, budget_bytes_per_frame=budget)
    rx = ch.transmit(0, msgs[::-1])  # given order: cav2, cav1 (does not fit), cav0
    assert [m.sender for m in rx] == ["cav2", "cav0"]
    assert [r.status for r in ch.ledger.records] == ["sent", "budget", "sent"]
    assert ch.ledger.bytes_per_frame() == [budget]
    ch = Channel(0, budget_bytes_per_frame=budget, budget_order="smallest_first")
    assert [m.sender for m in ch.transmit(0, msgs[::-1])] == ["cav1", "cav0"]
    assert ch.ledger.bytes_per_frame()[0] == sizes[0] + sizes[1] <= budget


def test_misuse_raises():
    ch = Channel(0)
    with pytest.raises(ValueError, match="receiver"):
        ch.transmit(0, [Message("ego", "k", 0, np.eye(4), {})])
    with pytest.raises(ValueError, match="two messages"):
        ch.transmit(0, frame_messages(0) + frame_messages(0)[:1])
    ch.transmit(1, frame_messages(1))
    with pytest.raises(ValueError, match="two messages"):
        ch.transmit(1, frame_messages(1))
    with pytest.raises(ValueError):
        LinkConfig(loss=1.5)
    with pytest.raises(ValueError):
        Channel(0, LinkConfig(delay=100), history=64)
