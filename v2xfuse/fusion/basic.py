"""Baselines: no fusion (ego only), early fusion (raw points), F-Cooper max fusion."""
from __future__ import annotations

from collections import defaultdict

import torch

from ..models.bev import warp_to_ego
from ..registry import FUSION
from .base import FusionMethod, FusionState, Received

__all__ = ["NoFusion", "EarlyFusion", "MaxFusion", "group_by_sample"]


def group_by_sample(received: list[Received]) -> dict[int, list[Received]]:
    out: dict[int, list[Received]] = defaultdict(list)
    for r in received:
        out[r.sample].append(r)
    return out


@FUSION.register("none")
class NoFusion(FusionMethod):
    """Ego only: nothing is sent, the ego's own BEV features go to the head."""

    stage = "none"

    def senders(self, batch):
        return []

    def encode(self, state, senders):
        return []

    def fuse(self, state: FusionState, received):
        return state.features[state.batch.ego_index()]


@FUSION.register("early")
class EarlyFusion(FusionMethod):
    """Cooper-style early fusion: collaborators send their raw points; the ego encodes the union.

    Payload ``points``: (M, 4) float32 [x, y, z, intensity] in the sender's LiDAR frame.
    """

    stage = "early"
    message_kind = "points"
    codecs = {"points": "raw"}

    def encode(self, state: FusionState, senders: list[int]):
        pts = state.batch.points
        agent = pts[:, 0].long()
        return [{"points": pts[agent == i, 1:5].contiguous()} for i in senders]

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


@FUSION.register("max")
class MaxFusion(FusionMethod):
    """F-Cooper (Chen et al., 2019): element-wise max of the ego's and the warped collaborators'
    BEV feature maps. Payload ``features``: (C, H, W) float32, the whole map."""

    codecs = {"features": "float32"}

    def encode(self, state: FusionState, senders: list[int]):
        # unbind, not indexing: one backward node instead of a full-size zero gradient per sender.
        maps = state.features.unbind(0)
        return [{"features": maps[i]} for i in senders]

    def fuse(self, state: FusionState, received: list[Received]) -> torch.Tensor:
        ego = state.features[state.batch.ego_index()]
        out = []
        groups = group_by_sample(received)
        for b in range(len(ego)):
            msgs = groups.get(b, [])
            if not msgs:
                out.append(ego[b])
                continue
            feats = torch.stack([m.payload["features"].to(ego.dtype) for m in msgs])
            poses = torch.stack([m.ego_from_sender.to(ego.dtype) for m in msgs])
            fused = ego[b]
            for w in warp_to_ego(feats, poses, state.grid).unbind(0):
                fused = torch.maximum(fused, w)
            out.append(fused)
        return torch.stack(out)


@FUSION.register("late")
class LateFusion(FusionMethod):
    """Late fusion: each collaborator sends its own detections; the ego moves them into its
    frame and merges them with its own before NMS.

    Payload ``boxes``: (K, 7) float32 in the sender's LiDAR frame; ``scores``: (K,) float32.
    Training is single-agent (the ego's head on its own map); boxes are exchanged at inference.
    """

    stage = "late"
    message_kind = "boxes"
    codecs = {"boxes": "raw", "scores": "raw"}

    def encode(self, state: FusionState, senders: list[int]):
        dets = state.extras.get("detections")
        if dets is None:  # training: nothing to exchange
            return []
        return [{"boxes": d.boxes.float(), "scores": d.scores.float()} for d in dets]

    def fuse(self, state: FusionState, received: list[Received]):
        """-> per sample, (boxes (K, 7), scores (K,)) in the ego frame, or None."""
        from ..structures.boxes import transform_boxes

        out: list = [None] * state.batch.batch_size
        for b, msgs in group_by_sample(received).items():
            boxes = [transform_boxes(m.ego_from_sender.to(torch.float32),
                                     m.payload["boxes"].float()) for m in msgs]
            scores = [m.payload["scores"].float() for m in msgs]
            out[b] = (torch.cat(boxes), torch.cat(scores))
        return out
