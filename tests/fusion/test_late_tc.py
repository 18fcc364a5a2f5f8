"""Time-compensated late fusion (TCLF): velocity from the sender's previous observation (the
detector's history service), boxes moved to the ego's time, the reference's matching rule, and
the extra payload counted as bytes."""
import dataclasses
import math

import numpy as np
import torch

from v2xfuse.comm.batch_link import BatchChannel
from v2xfuse.comm.channel import Channel
from v2xfuse.datasets import collate
from v2xfuse.datasets.batch import HistoryBatch
from v2xfuse.datasets.pipeline import Sample
from v2xfuse.fusion.base import FusionState
from v2xfuse.fusion.late_tc import TimeCompensatedLateFusion, fuse_matched, match_centres
from v2xfuse.models.detector import CoopDetector, Detections
from v2xfuse.structures.transforms import invert_transform, pose_from_xyz_rpy

WORLD_FROM_EGO = pose_from_xyz_rpy(5.0, -3.0, 0.0, 0.0, 0.0, 0.2)
WORLD_FROM_SENDER = pose_from_xyz_rpy(30.0, 10.0, 0.0, 0.0, 0.0, math.pi / 2)


def _batch(sequence: str, sender_time_us: int, delay_s: float):
    """Ego + one collaborator whose observation is ``delay_s`` old."""
    ego_from_sender = invert_transform(WORLD_FROM_EGO) @ WORLD_FROM_SENDER
    poses = np.stack([np.eye(4), ego_from_sender])
    empty = np.zeros((0, 4), np.float32)
    sample = Sample([empty, empty], poses, np.zeros((0, 7)), np.zeros(0, np.int64),
                    ["ego", "rsu"], ["vehicle", "infrastructure"],
                    np.array([0, round(delay_s * 1e6)]),
                    ("dair_v2x_c", sequence, str(sender_time_us)),
                    world_from_agent=np.stack([WORLD_FROM_EGO, WORLD_FROM_SENDER]),
                    timestamp_us=np.array([sender_time_us + int(delay_s * 1e6), sender_time_us]))
    return collate([sample])


def _with_history(batch, age_us: int, agent_from_past=None):
    """``batch`` whose collaborator (stacked index 1) has one earlier observation ``age_us``
    older than its current one."""
    now = int(batch.frames[0].timestamp_us[1])
    history = HistoryBatch(
        points=torch.zeros(0, 5), agent=torch.tensor([1]), steps=torch.tensor([1]),
        agent_from_past=torch.from_numpy(np.eye(4) if agent_from_past is None
                                         else agent_from_past)[None],
        timestamp_us=torch.tensor([now - age_us]), length=torch.tensor([0, 1]))
    return dataclasses.replace(batch, history=history)


def _send(method, batch, boxes, channel=None, previous=None):
    """The collaborator (stacked index 1) detected ``boxes`` (its frame), and ``previous`` on
    its earlier observation (``batch.history``): encode, transmit, fuse with an ego that
    detected nothing. Returns (payloads, (boxes, scores) fused)."""
    state = FusionState(batch, None, None, nms=lambda d: d, point="detections")
    if previous is not None:
        state.extras["history_detections"] = {0: Detections(
            torch.tensor(previous, dtype=torch.float32), torch.full((len(previous),), 0.9))}
    state.extras["detections"] = [Detections(torch.tensor(boxes, dtype=torch.float32),
                                             torch.full((len(boxes),), 0.9))]
    state.extras["ego_detections"] = [Detections(torch.zeros(0, 7), torch.zeros(0))]
    payloads = method.encode(state, [1])
    received = (channel.transmit(method.wire(), batch, [1], payloads) if channel is not None
                else CoopDetector.direct(batch, [1], payloads))
    fused = method.fuse(state, received)[0]
    return payloads, (fused.boxes, fused.scores)


def test_a_moving_object_is_moved_to_the_egos_time():
    method = TimeCompensatedLateFusion().eval()
    car = [10.0, 0.0, -1.0, 4.5, 1.8, 1.5, 0.0]
    # t = 0: seen at x = 10 in the sender's frame; t = 0.1 s: at x = 11 (10 m/s along its x).
    first, _ = _send(method, _batch("seq0", 0, 0.3), [car])
    assert "prev_boxes" not in first[0]  # no earlier observation
    moved = list(car)
    moved[0] = 11.0
    batch = _with_history(_batch("seq0", 100_000, 0.3), 100_000)
    payloads, (boxes, _) = _send(method, batch, [moved], previous=[car])
    assert payloads[0]["prev_dt"].item() == np.float32(0.1)
    # 0.3 s after the sender saw it, the car is at x = 14 in the sender's frame.
    ego_from_sender = invert_transform(WORLD_FROM_EGO) @ WORLD_FROM_SENDER
    want = ego_from_sender @ np.array([14.0, 0.0, -1.0, 1.0])
    np.testing.assert_allclose(boxes[0, :3].numpy(), want[:3], atol=1e-4)


def test_without_delay_or_memory_the_boxes_are_not_moved():
    method = TimeCompensatedLateFusion().eval()
    car = [10.0, 0.0, -1.0, 4.5, 1.8, 1.5, 0.0]
    ego_from_sender = invert_transform(WORLD_FROM_EGO) @ WORLD_FROM_SENDER
    want = (ego_from_sender @ np.array([10.0, 0.0, -1.0, 1.0]))[:3]
    _, (boxes, _) = _send(method, _batch("seq0", 0, 0.3), [car])       # no earlier observation
    np.testing.assert_allclose(boxes[0, :3].numpy(), want, atol=1e-4)
    moved = list(car)
    moved[0] = 9.0
    batch = _with_history(_batch("seq0", 100_000, 0.0), 100_000)      # no delay: not moved
    _, (boxes, _) = _send(method, batch, [car], previous=[moved])
    np.testing.assert_allclose(boxes[0, :3].numpy(), want, atol=1e-4)
    batch = _with_history(_batch("seq0", 3_000_000, 0.3), 2_000_000)  # older than max_history_s
    payloads, _ = _send(method, batch, [car], previous=[moved])
    assert "prev_boxes" not in payloads[0]


def test_the_previous_boxes_are_moved_into_the_senders_current_frame():
    method = TimeCompensatedLateFusion().eval()
    car = [10.0, 0.0, -1.0, 4.5, 1.8, 1.5, 0.0]
    # the sender's earlier frame lies 2 m along its current x: the car seen at x = 8 then is at
    # x = 10 now, in its current frame
    agent_from_past = pose_from_xyz_rpy(2.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    before = list(car)
    before[0] = 8.0
    batch = _with_history(_batch("seq0", 100_000, 0.3), 100_000, agent_from_past)
    payloads, _ = _send(method, batch, [car], previous=[before])
    np.testing.assert_allclose(payloads[0]["prev_boxes"][0, :3].numpy(), [10.0, 0.0, -1.0],
                               atol=1e-5)


def test_the_previous_boxes_are_counted_as_bytes():
    method = TimeCompensatedLateFusion().eval()
    link = BatchChannel(Channel(0))
    car = [10.0, 0.0, -1.0, 4.5, 1.8, 1.5, 0.0]
    _send(method, _batch("seq0", 0, 0.0), [car], link)
    _send(method, _with_history(_batch("seq0", 100_000, 0.0), 100_000), [car, car], link,
          previous=[car])
    first, second = link.ledger.bytes_per_frame()
    # the second message carries 1 box + 1 score more (7 * 4 + 4 bytes), and two more arrays,
    # each with its header: the 1 previous box (7 * 4 bytes) and its dt (4 bytes).
    array_header = lambda name, ndim: 3 + 4 * ndim + len(name)  # noqa: E731
    extra = (7 * 4 + 4 + 7 * 4 + array_header("prev_boxes.data", 2)
             + 4 + array_header("prev_dt.data", 1))
    assert second - first == extra


def test_the_reference_matching_rule():
    ego = torch.tensor([[0.0, 0.0, 0, 4.5, 1.8, 1.5, 0.0], [30.0, 0.0, 0, 4.5, 1.8, 1.5, 0.0]])
    other = torch.tensor([[0.8, 0.3, 0, 4.5, 1.8, 1.5, 0.1],     # the ego's first car
                          [-20.0, 5.0, 0, 4.5, 1.8, 1.5, 0.0],   # only the collaborator saw it
                          [30.0, 2.5, 0, 4.5, 1.8, 1.5, 0.0]])   # beyond the y gate of car 2
    rows, cols = match_centres(ego, other)
    assert rows.tolist() == [0] and cols.tolist() == [0]
    boxes, scores = fuse_matched(ego, torch.tensor([0.9, 0.8]), other,
                                 torch.tensor([0.5, 0.5, 0.7]))
    torch.testing.assert_close(boxes, torch.cat([ego, other[1:]]))
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.8, 0.2, 0.28]))
