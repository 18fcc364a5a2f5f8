"""Time-compensated late fusion (DAIR-V2X's TCLF, Yu et al., CVPR 2022).

A collaborator's detections are as old as its observation (``Received.delay_us``). TCLF moves
them to the ego's time with each object's velocity, estimated from the collaborator's own
previous detections, then fuses them with the ego's boxes by matching rather than NMS.

What differs from the reference implementation (``late_fusion_utils.py``; see
shared/reference/dair-v2x.md section 4), and why:

* The reference runs the infrastructure detector again on frame ``i-2k`` to get the previous
  boxes. Here the sender runs its detector on its own previous observation (the detector's
  ``history`` service, ``dataset.history_frames >= 1``: the observation just before the one it
  sends, whatever the delay), moved into its current frame with its own poses
  (``history.agent_from_past``). No memory survives between frames, so the result does not
  depend on the order frames are evaluated in.
* Velocity: matched boxes (Hungarian on centre distance, gated per axis by the box size, as
  the reference) give ``(x_now - x_prev) / dt``; the reference fits a linear regression of the
  displacement on position for the unmatched ones; here an unmatched box is not moved (its
  motion is unknown).
* Fusion follows the reference: Hungarian on centre distance between the ego's boxes and the
  compensated ones (same gate); a matched pair keeps the ego's box and score, unmatched ego
  boxes are kept, unmatched collaborator boxes are kept with their score times
  ``unmatched_score_scale`` (0.4). Rotated NMS still runs afterwards, as for every method.

Payload: ``boxes`` (K, 7) and ``scores`` (K,) in the sender's LiDAR frame now, and when the
sender has a previous observation of the same sequence ``prev_boxes`` (J, 7) (moved into its
current frame with its own poses) and ``prev_dt`` (1,) seconds between the two observations.
All float32, all counted as message bytes.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..registry import FUSION
from ..structures.boxes import transform_boxes
from ..structures.detections import Detections
from .base import Contract, group_by_sample
from .basic import LateFusion, check_boxes
from .payload_checks import expect, expect_within

__all__ = ["TimeCompensatedLateFusion", "match_centres", "estimate_velocity", "fuse_matched"]


def match_centres(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of boxes ``a`` (N, 7) and ``b`` (M, 7) on BEV centre distance.

    A pair is admissible when ``|dx| <= a.dx`` and ``|dy| <= a.dy`` (the reference's gate: the
    centres differ by at most the box size on each axis, in the ego/sender axes).

    Returns:
        (rows into a, cols into b) of the matched pairs.
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a_np, b_np = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    delta = np.abs(a_np[:, None, :2] - b_np[None, :, :2])                  # (N, M, 2)
    size = np.maximum(a_np[:, None, 3:5], 1e-6)
    allowed = (delta <= size).all(-1)
    big = 1e9
    cost = np.where(allowed, np.hypot(delta[..., 0], delta[..., 1]), big)
    rows, cols = linear_sum_assignment(cost)
    ok = cost[rows, cols] < big
    return rows[ok].astype(np.int64), cols[ok].astype(np.int64)


def estimate_velocity(boxes: torch.Tensor, prev_boxes: torch.Tensor, dt: float) -> torch.Tensor:
    """(K, 2) xy velocity of each of ``boxes`` from its match in ``prev_boxes`` ``dt`` seconds
    earlier (same frame); zero for a box with no match or when ``dt <= 0``."""
    vel = boxes.new_zeros(len(boxes), 2)
    if dt <= 0 or len(prev_boxes) == 0:
        return vel
    rows, cols = match_centres(boxes, prev_boxes)
    if len(rows):
        r, c = torch.from_numpy(rows), torch.from_numpy(cols)
        vel[r] = (boxes[r, :2] - prev_boxes[c, :2].to(boxes.dtype)) / dt
    return vel


def fuse_matched(ego_boxes: torch.Tensor, ego_scores: torch.Tensor, other_boxes: torch.Tensor,
                 other_scores: torch.Tensor, unmatched_score_scale: float = 0.4):
    """The reference's fusion: keep the ego's boxes; add the collaborator's unmatched boxes with
    their scores scaled. Returns (boxes, scores)."""
    rows, cols = match_centres(ego_boxes, other_boxes.to(ego_boxes.dtype))
    unmatched = np.ones(len(other_boxes), bool)
    unmatched[cols] = False
    keep = torch.from_numpy(np.flatnonzero(unmatched))
    boxes = torch.cat([ego_boxes, other_boxes[keep].to(ego_boxes.dtype)])
    scores = torch.cat([ego_scores, other_scores[keep].to(ego_scores.dtype) * unmatched_score_scale])
    return boxes, scores


@FUSION.register("late_tc")
class TimeCompensatedLateFusion(LateFusion):
    """Late fusion with time compensation (TCLF). See the module docstring.

    Args:
        unmatched_score_scale: score factor of collaborator boxes no ego box matched.
        max_history_s: previous observations older than this are forgotten (no velocity).
        max_boxes, max_box_size_m, max_point_range_m: :class:`LateFusion`'s limits on received
            boxes (``prev_boxes`` are held to them too, ``prev_dt`` to (0, ``max_history_s``]).
    """

    contract = Contract(fuses_at=("detections",), services={"detections", "history"},
                        history_frames=1)
    codecs = {"boxes": "raw", "scores": "raw", "prev_boxes": "raw", "prev_dt": "raw"}

    def __init__(self, unmatched_score_scale: float = 0.4, max_history_s: float = 1.0,
                 max_boxes: int = 500, max_box_size_m: float = 30.0,
                 max_point_range_m: float = 300.0):
        super().__init__(max_boxes, max_box_size_m, max_point_range_m)
        self.unmatched_score_scale = float(unmatched_score_scale)
        self.max_history_s = float(max_history_s)

    def check_fields(self, kind, payload, state, sample=0):
        out = super().check_fields(kind, payload, state, sample)
        if "prev_boxes" in payload or "prev_dt" in payload:
            check_boxes(payload, "prev_boxes", self.max_boxes, self.max_box_size_m,
                        self.max_point_range_m)
            dt = expect(payload, "prev_dt", (1,))
            expect_within("prev_dt", dt, 1e-6, self.max_history_s)
        return out

    def encode(self, state, senders):
        payloads = super().encode(state, senders)
        if not payloads:
            return payloads
        batch = state.batch
        history, previous = batch.history, state.extras.get("history_detections", {})
        sample_of = batch.sample_of_agent().tolist()
        ego_index = batch.ego_index().tolist()
        for i, p in zip(senders, payloads):
            stamps = batch.frames[sample_of[i]].timestamp_us
            newest = [h for h in previous if int(history.agent[h]) == i
                      and int(history.steps[h]) == 1]
            if stamps is None or not newest:
                continue  # no sender time or no earlier observation: plain late fusion
            h = newest[0]
            age_us = int(stamps[i - ego_index[sample_of[i]]]) - int(history.timestamp_us[h])
            if 0 < age_us <= self.max_history_s * 1e6:
                p["prev_boxes"] = transform_boxes(history.agent_from_past[h],
                                                  previous[h].boxes.double()).float()
                p["prev_dt"] = torch.tensor([age_us / 1e6], dtype=torch.float32)
        return payloads

    def fuse(self, state, received):
        """-> per sample, the ego's detections (after the detector's NMS) with the received
        boxes moved to the ego's time and frame joined by matching (module docstring)."""
        groups = group_by_sample(received)
        out = []
        for b, own in enumerate(state.extras["ego_detections"]):
            msgs = groups.get(b)
            if not msgs:
                out.append(own)
                continue
            boxes, scores = self.compensated(msgs)
            own = state.nms(own)
            merged = fuse_matched(own.boxes, own.scores, boxes, scores, self.unmatched_score_scale)
            out.append(Detections(*merged))
        return out

    def compensated(self, msgs) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, 7) received boxes moved to the ego's time and frame, (K,) their scores."""
        boxes, scores = [], []
        for m in msgs:
            own = m.payload["boxes"].double()
            if "prev_boxes" in m.payload and m.delay_us > 0:
                dt = float(m.payload["prev_dt"].reshape(-1)[0])
                vel = estimate_velocity(own, m.payload["prev_boxes"].double(), dt)
                own = own.clone()
                own[:, :2] += vel * (m.delay_us / 1e6)
            boxes.append(transform_boxes(m.ego_from_sender.double(), own).float())
            scores.append(m.payload["scores"].float())
        return torch.cat(boxes), torch.cat(scores)
