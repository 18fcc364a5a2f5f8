"""One cooperative detector; the fusion method is a plug-in chosen by config.

    points of every agent -> encoder -> BEV backbone -> (sender) fusion.encode -> [channel]
                          -> (receiver) fusion.fuse -> head -> decode -> rotated NMS -> boxes
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..datasets.batch import CoopBatch
from ..fusion.base import FusionMethod, FusionState, Received
from .bev import BevGrid
from .heads.anchor_head import AnchorHead, HeadOutput

__all__ = ["CoopDetector", "DetectorOutput", "Detections"]


@dataclass
class Detections:
    """Boxes (K, 7) in the ego frame, scores (K,), best first."""

    boxes: torch.Tensor
    scores: torch.Tensor


@dataclass
class DetectorOutput:
    head: HeadOutput
    state: FusionState
    received: list[Received] = field(default_factory=list)


class CoopDetector(nn.Module):
    """
    Args:
        encoder: points (P, 5) [agent, x, y, z, i], num agents -> (N, C, H, W) BEV maps.
        backbone: (N, C, H, W) -> (N, C', H', W').
        fusion: the fusion method.
        head: detection head on the fused (B, C', H', W') maps.
        nms_iou, score_threshold, max_detections: post-processing.
    """

    def __init__(self, encoder: nn.Module, backbone: nn.Module, fusion: FusionMethod, head: AnchorHead,
                 nms_iou: float = 0.15, score_threshold: float = 0.1, max_detections: int = 100):
        super().__init__()
        self.encoder, self.backbone, self.fusion, self.head = encoder, backbone, fusion, head
        self.nms_iou, self.score_threshold, self.max_detections = nms_iou, score_threshold, max_detections
        self.feature_grid: BevGrid = encoder.grid.scaled(backbone.out_stride)

    def bev(self, points: torch.Tensor, num_agents: int) -> torch.Tensor:
        return self.backbone(self.encoder(points, num_agents))

    def forward(self, batch: CoopBatch, channel=None) -> DetectorOutput:
        """``channel``: None (tensors pass straight through), or an object with
        ``transmit(fusion, batch, senders, payloads) -> list[Received]`` that serialises,
        counts and perturbs the messages (see v2xfuse.comm)."""
        fusion = self.fusion
        if fusion.stage == "early":
            state = FusionState(batch, None, None)
        else:
            state = FusionState(batch, self.bev(batch.points, batch.num_agents), self.feature_grid)
        senders = fusion.senders(batch)
        payloads = fusion.encode(state, senders) if senders else []
        received = (channel.transmit(fusion, batch, senders, payloads) if channel is not None
                    else self.direct(batch, senders, payloads))
        fused = fusion.fuse(state, received)
        if fusion.stage == "early":
            fused = self.bev(fused, batch.batch_size)
        return DetectorOutput(self.head(fused), state, received)

    @staticmethod
    def direct(batch: CoopBatch, senders: list[int], payloads) -> list[Received]:
        """Deliver payloads without serialisation (training): poses from the batch."""
        sample = batch.sample_of_agent()
        return [Received(int(sample[i]), i, p, batch.ego_from_agent[i], float(batch.time_delay_s[i]))
                for i, p in zip(senders, payloads)]

    def loss(self, out: DetectorOutput, batch: CoopBatch) -> dict[str, torch.Tensor]:
        losses = self.head.loss(out.head, batch.gt_boxes)
        for k, v in self.fusion.aux_loss(out.state).items():
            losses["loss"] = losses["loss"] + v
            losses[k] = v.detach()
        return losses

    @torch.no_grad()
    def predict(self, out: DetectorOutput) -> list[Detections]:
        from ..ops import nms_rotated

        dets = []
        for b in range(out.head.cls.shape[0]):
            boxes, scores = self.head.decode(out.head, b, self.score_threshold)
            keep = nms_rotated(boxes, scores, self.nms_iou)[: self.max_detections]
            dets.append(Detections(boxes[keep], scores[keep]))
        return dets
