"""Baselines: no fusion (ego only), early fusion (raw points), F-Cooper max fusion."""
from __future__ import annotations

import torch

from ..comm.received import Received
from ..registry import FUSION
from ..structures.bev import _resample, shift_map, whole_cell_shifts
from ..structures.boxes import transform_boxes
from ..structures.detections import Detections
from ..utils.precision import full_precision
from .base import (Arrivals, Contract, FusionMethod, FusionState, fuse_each_sample,
                   group_by_sample)
from .payload_checks import FeatureRange, expect, expect_finite, expect_magnitude, expect_within

__all__ = ["NoFusion", "EarlyFusion", "MaxFusion", "DenseMapFusion", "LateFusion",
           "group_by_sample", "check_boxes"]


@FUSION.register("none")
class NoFusion(FusionMethod):
    """Ego only: nothing is sent, the ego's own BEV features go to the head."""

    contract = Contract(fuses_at=())

    def senders(self, batch):
        return []

    def encode(self, state, senders):
        return []

    def fuse(self, state: FusionState, received):
        raise RuntimeError("NoFusion fuses nowhere")


@FUSION.register("early")
class EarlyFusion(FusionMethod):
    """Cooper-style early fusion: collaborators send their raw points; the ego encodes the union.

    Payload ``points``: (M, 4) float32 [x, y, z, intensity] in the sender's LiDAR frame.

    Received points must be finite and within ``max_point_range_m`` of the sender; a sender
    that sends more than ``max_points`` has its cloud thinned to that many by a uniform stride
    (the ego's encoder would otherwise pay for whatever a collaborator chose to send).

    A collaborator without points (a camera-only roadside unit, ``dataset.sensors``, or nothing
    left in range) sends nothing: raw points are all early fusion exchanges, and its images
    stay with it.
    """

    contract = Contract(fuses_at=("points",))
    message_kind = "points"
    codecs = {"points": "raw"}

    def __init__(self, max_points: int = 300_000, max_point_range_m: float = 300.0):
        super().__init__()
        self.max_points, self.max_point_range_m = int(max_points), float(max_point_range_m)

    def check_fields(self, kind, payload, state, sample=0):
        pts = expect(payload, "points", (None, 4))  # finite: check_payload saw to it
        expect_within("points", pts[:, :3], -self.max_point_range_m, self.max_point_range_m)
        if len(pts) > self.max_points:
            stride = -(-len(pts) // self.max_points)
            pts = pts[::stride]
        return {"points": pts}

    def encode(self, state: FusionState, senders: list[int]):
        pts = state.batch.points
        agent = pts[:, 0].long()
        count = torch.bincount(agent, minlength=state.batch.num_agents)
        return [{"points": pts[agent == i, 1:5].contiguous()} if count[i] > 0 else None
                for i in senders]

    @full_precision
    def fuse(self, state: FusionState, received: list[Received]) -> torch.Tensor:
        """-> (P, 5) [sample, x, y, z, intensity], every point in its sample's ego frame."""
        batch = state.batch
        pts = batch.points
        agent = pts[:, 0].long()
        out = []
        for b, ego in enumerate(batch.ego_index().tolist()):
            own = pts[agent == ego, 1:5]
            out.append(torch.cat([torch.full_like(own[:, :1], b), own], 1))
        for r in received:
            p = r.payload["points"].to(pts.dtype)
            t = r.ego_from_sender.to(pts.dtype)
            xyz = p[:, :3] @ t[:3, :3].T + t[:3, 3]
            out.append(torch.cat([torch.full_like(p[:, :1], r.sample), xyz, p[:, 3:4]], 1))
        return torch.cat(out, 0)


class DenseMapFusion(FusionMethod):
    """A method whose senders send their whole BEV map, payload ``features`` (C, H, W).

    The receiver accepts a map of its own grid's shape whose values lie within what its
    senders produced in training (:class:`FeatureRange`), clamped to that range, and whose mean
    strength is at most ``max_strength_ratio`` times its own map's (:func:`expect_magnitude`).

    Args:
        channels: C (injected by the builder); None: no range is kept.
        clamp_features: clamp received features to the trained range (False: refuse only
            values far beyond it; for measuring the defence).
        max_strength_ratio: see :func:`expect_magnitude` (0: no such check).
    """

    codecs = {"features": "float32"}

    def __init__(self, channels: int | None = None, clamp_features: bool = True,
                 max_strength_ratio: float = 10.0):
        super().__init__()
        self.feature_range = FeatureRange(channels, clamp=clamp_features) if channels else None
        self.max_strength_ratio = float(max_strength_ratio)

    def encode(self, state: FusionState, senders: list[int]):
        # unbind, not indexing: one backward node instead of a full-size zero gradient per sender.
        maps = state.features.unbind(0)
        return [{"features": maps[i]} for i in senders]

    def fuse(self, state: FusionState, received: list[Received]) -> torch.Tensor:
        return fuse_each_sample(state, received, self.fuse_one)

    @staticmethod
    def fuse_one(arrived: Arrivals) -> torch.Tensor:
        """One sample's (C, H, W) fused map from what arrived for it."""
        raise NotImplementedError

    def observe(self, senders, payloads):
        if self.feature_range is not None:
            self.feature_range.observe_payloads(payloads)

    def check_fields(self, kind, payload, state, sample=0):
        shape = tuple(state.features.shape[1:]) if state.features is not None else (None,) * 3
        feats = expect(payload, "features", shape)  # finite: check_payload saw to it
        if self.max_strength_ratio > 0 and state.features is not None:
            ego = state.features[int(state.batch.ego_index()[sample])]
            expect_magnitude("features", feats.flatten(1), ego, self.max_strength_ratio)
        if self.feature_range is not None:
            feats = self.feature_range.sanitise("features", feats)
        return {"features": feats}


@FUSION.register("max")
class MaxFusion(DenseMapFusion):
    """F-Cooper (Chen et al., 2019): element-wise max of the ego's and the warped collaborators'
    BEV feature maps. Payload ``features``: (C, H, W) float32, the whole map."""

    @staticmethod
    def fuse_one(arrived: Arrivals) -> torch.Tensor:
        # The max of the ego's map and each warped map in turn, without stacking the payloads
        # or the warped maps: a map shifted by whole cells (ego-aligned senders) is one padded
        # copy; only rotated senders are stacked for the resampler.
        ego = arrived.ego
        shifts, is_shift = whole_cell_shifts(arrived.ego_from_sender, arrived.grid)
        is_shift = is_shift.tolist()
        rotated = [k for k, ok in enumerate(is_shift) if not ok]
        resampled = iter(())
        if rotated:
            maps = torch.stack([arrived.messages[k].payload["features"].to(ego.dtype) for k in rotated])
            resampled = iter(_resample(maps, arrived.ego_from_sender[rotated], arrived.grid,
                                       "bilinear").unbind(0))
        fused = ego
        for k, message in enumerate(arrived.messages):
            if is_shift[k]:
                dx, dy = shifts[k].tolist()
                warped = shift_map(message.payload["features"].to(ego.dtype), dx, dy)
            else:
                warped = next(resampled)
            fused = torch.maximum(fused, warped)
        return fused


@FUSION.register("late")
class LateFusion(FusionMethod):
    """Late fusion: each collaborator sends its own detections; the ego moves them into its
    frame and merges them with its own before NMS.

    Payload ``boxes``: (K, 7) float32 in the sender's LiDAR frame; ``scores``: (K,) float32.
    Training is single-agent (the ego's head on its own map); boxes are exchanged at inference,
    at the ``detections`` point: the received ones join the ego's (decoded, before NMS), and
    the detector's NMS runs on the union.

    The receiver accepts at most ``max_boxes`` boxes per message, each finite, with sizes in
    (0, ``max_box_size_m``] and centres within ``max_point_range_m`` of the sender, and scores
    in [0, 1] (what a sigmoid head gives): a sender cannot outvote the ego with scores of 1e30
    or hide NaN in what reaches NMS.
    """

    contract = Contract(fuses_at=("detections",), services={"detections"})
    message_kind = "boxes"
    codecs = {"boxes": "raw", "scores": "raw"}

    def __init__(self, max_boxes: int = 500, max_box_size_m: float = 30.0,
                 max_point_range_m: float = 300.0):
        super().__init__()
        self.max_boxes, self.max_box_size_m = int(max_boxes), float(max_box_size_m)
        self.max_point_range_m = float(max_point_range_m)

    def senders(self, batch):
        """Nobody in training: it is single-agent, and encoding the collaborators there anyway
        (for nothing) put their views into the batch-norm statistics of a model supervised on
        the ego's alone, which made it a worse sender (AP@0.5 0.642 against 0.716 for the same
        training without them, README "Results")."""
        return [] if self.training else super().senders(batch)

    def check_fields(self, kind, payload, state, sample=0):
        boxes = check_boxes(payload, "boxes", self.max_boxes, self.max_box_size_m,
                            self.max_point_range_m)
        scores = expect(payload, "scores", (len(boxes),))
        expect_within("scores", scores, 0.0, 1.0)
        return dict(payload)

    def encode(self, state: FusionState, senders: list[int]):
        dets = state.extras.get("detections")
        if dets is None:  # training: nothing to exchange
            return []
        return [{"boxes": d.boxes.float(), "scores": d.scores.float()} for d in dets]

    def fuse(self, state: FusionState, received: list[Received]) -> list:
        """-> per sample, the ego's detections and every received box in the ego frame."""
        groups = group_by_sample(received)
        out = []
        for b, own in enumerate(state.extras["ego_detections"]):
            msgs = groups.get(b)
            if msgs:
                boxes, scores = self.received_boxes(msgs)
                own = Detections.cat([own, Detections(boxes.to(own.boxes.dtype),
                                                      scores.to(own.scores.dtype))])
            out.append(own)
        return out

    def received_boxes(self, msgs: list[Received]) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, 7) boxes in the ego frame and (K,) scores of one sample's messages."""
        boxes = [transform_boxes(m.ego_from_sender.to(torch.float32), m.payload["boxes"].float())
                 for m in msgs]
        return torch.cat(boxes), torch.cat([m.payload["scores"].float() for m in msgs])


def check_boxes(payload: dict[str, torch.Tensor], name: str, max_boxes: int, max_size_m: float,
                max_range_m: float) -> torch.Tensor:
    """``payload[name]`` checked as at most ``max_boxes`` finite (K, 7) boxes with sizes in
    (0, ``max_size_m``] and centres within ``max_range_m``; raises Rejected."""
    from ..comm.checks import Rejected

    boxes = expect(payload, name, (None, 7))
    if len(boxes) > max_boxes:
        raise Rejected("bounds", f"payload {name!r}: {len(boxes)} boxes, at most {max_boxes}")
    expect_finite(name, boxes)
    expect_within(name, boxes[:, :3], -max_range_m, max_range_m)
    if len(boxes) and not bool(((boxes[:, 3:6] > 0) & (boxes[:, 3:6] <= max_size_m)).all()):
        raise Rejected("bounds", f"payload {name!r}: box sizes outside (0, {max_size_m}] m")
    return boxes
