"""One cooperative detector; the fusion method is a plug-in chosen by config.

    points of every agent -> encoder -> BEV backbone -> (sender) fusion.encode -> [channel]
                          -> (receiver) fusion.fuse -> head -> decode -> rotated NMS -> boxes
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..datasets.batch import CoopBatch
from ..fusion.base import FusionMethod, FusionState, Received
from ..structures.boxes import transform_boxes
from ..structures.detections import Detections
from ..utils.timing import null_timer
from .bev import BevGrid
from .heads.base import Head, OutsideGrid

__all__ = ["CoopDetector", "DetectorOutput", "Detections", "run_handshake", "ego_aligned_frames",
           "SENDER_FRAMES"]

SENDER_FRAMES = ("own", "ego_aligned")


@dataclass
class DetectorOutput:
    head: object  # the head's output (its own dataclass, see heads.base.Head)
    state: FusionState
    received: list[Received] = field(default_factory=list)
    #: late fusion: per sample, (boxes (K, 7), scores (K,)) received, in the ego frame
    late_boxes: list | None = None


class CoopDetector(nn.Module):
    """
    Args:
        encoder: points (P, 5) [agent, x, y, z, i], num agents -> (N, C, H, W) BEV maps.
        backbone: (N, C, H, W) -> (N, C', H', W').
        fusion: the fusion method.
        head: detection head on the fused (B, C', H', W') maps.
        nms_iou, score_threshold, max_detections: post-processing.
        agent_loss_weight: weight of the single-agent auxiliary loss: the same head on every
            agent's own BEV map, against the ground truth moved into that agent's frame
            (where the agent's map reaches outside the ego's ground-truth range nothing is
            taught as background, since the labels there are incomplete: the head applies
            :class:`~.heads.base.OutsideGrid` to its own locations). It gives the shared
            encoder every agent's view as supervision each step; 0 disables it. Ignored for
            early fusion.
        sender_frame: the frame a sender of intermediate features encodes its points in.
            ``"own"``: its LiDAR frame (OpenCOOD's ``proj_first: false``); the ego rotates and
            shifts the map it receives. ``"ego_aligned"``: the ego's axes and LiDAR height,
            centred on the sender's own position snapped to the feature grid (see
            :func:`ego_aligned_frames`), so the ego only shifts the map by whole cells: the same
            features wherever a collaborator faces, and no resampling blur. The sender needs the
            ego's pose for it; the ego sends it as a header-only message of kind ``"pose"``
            (counted), and a sender whose pose message is lost falls back to its own frame.
    """

    def __init__(self, encoder: nn.Module, backbone: nn.Module, fusion: FusionMethod, head: Head,
                 nms_iou: float = 0.15, score_threshold: float = 0.1, max_detections: int = 100,
                 agent_loss_weight: float = 0.0, sender_frame: str = "own"):
        super().__init__()
        if sender_frame not in SENDER_FRAMES:
            raise ValueError(f"model.sender_frame: {sender_frame!r} is not one of {SENDER_FRAMES}")
        self.encoder, self.backbone, self.fusion, self.head = encoder, backbone, fusion, head
        self.nms_iou, self.score_threshold, self.max_detections = nms_iou, score_threshold, max_detections
        self.agent_loss_weight = float(agent_loss_weight)
        self.sender_frame = sender_frame
        self.feature_grid: BevGrid = encoder.grid.scaled(backbone.out_stride)

    def bev(self, points: torch.Tensor, num_agents: int) -> torch.Tensor:
        return self.backbone(self.encoder(points, num_agents))

    def forward(self, batch: CoopBatch, channel=None, timer=None) -> DetectorOutput:
        """``channel``: None (tensors pass straight through), or an object with
        ``transmit(fusion, batch, senders, payloads) -> list[Received]`` that serialises,
        counts and perturbs the messages (see v2xfuse.comm); for a handshake method also
        ``transmit(..., kind="report")`` and ``request`` (see :func:`run_handshake`), and with
        ``sender_frame="ego_aligned"`` ``request(..., kind="pose")`` for the ego's pose.

        ``timer``: optional ``timer(stage) -> context manager`` (see v2xfuse.utils.timing) around
        the stages "encode" (encoder, backbone, what senders compute for their messages),
        "channel", "fuse" and "head"."""
        fusion = self.fusion
        stage = timer or null_timer
        if self.sender_frame == "ego_aligned" and fusion.stage == "intermediate":
            batch = self._ego_aligned(batch, channel, stage)
        with stage("encode"):
            state, senders, payloads = self._encode(batch, channel)
        with stage("channel"):
            received = (channel.transmit(fusion, batch, senders, payloads, state=state)
                        if channel is not None else self.direct(batch, senders, payloads))
        with stage("fuse"):
            fused = fusion.fuse(state, received)
        if fusion.stage == "early":
            with stage("encode"):
                fused = self.bev(fused, batch.batch_size)
        with stage("head"):
            if fusion.stage == "late":  # the ego's own map; received boxes are merged in predict
                return DetectorOutput(self.head(state.features[batch.ego_index()]), state,
                                      received, late_boxes=fused)
            return DetectorOutput(self.head(fused), state, received)

    def _ego_aligned(self, batch: CoopBatch, channel, stage) -> CoopBatch:
        """The batch with every sender that knows the ego's pose in its ego-aligned frame; the
        ego's pose message is timed as "channel", the senders' point transform as "encode"."""
        senders = self.fusion.senders(batch)
        if channel is not None and senders:  # the ego's pose must reach each sender first
            with stage("channel"):
                arrived = channel.request(self.fusion, batch, senders, [{}] * len(senders),
                                          kind="pose")
            senders = [i for i in senders if i in arrived]
        with stage("encode"):
            return ego_aligned_frames(batch, senders, self.feature_grid.cell)

    def _encode(self, batch: CoopBatch, channel=None) -> tuple[FusionState, list[int], list[dict]]:
        """Every agent's BEV features and what each sender puts in its message (after the
        handshake rounds of a method that has them)."""
        fusion = self.fusion
        if fusion.stage == "early":
            state = FusionState(batch, None, None)
        elif fusion.stage == "none" and not (self.training and self.agent_loss_weight > 0):
            # Ego only: collaborators' points are never encoded (their maps stay zero).
            ego = batch.ego_index()
            agent = batch.points[:, 0].long()
            own = batch.points[torch.isin(agent, ego)]
            features = self.bev(own, batch.num_agents)
            state = FusionState(batch, features, self.feature_grid)
        else:
            state = FusionState(batch, self.bev(batch.points, batch.num_agents), self.feature_grid)
            if fusion.needs_confidence:
                state.extras["confidence"] = self.head.confidence(state.features)
        senders = fusion.senders(batch)
        if fusion.stage == "late" and senders and not self.training:
            state.extras["detections"] = self.detect_agents(state.features, senders)
        if fusion.handshake and senders:
            run_handshake(fusion, state, senders, channel)
        payloads = fusion.encode(state, senders) if senders else []
        if self.training and senders:
            fusion.observe(senders, payloads)
        return state, senders, payloads

    @torch.no_grad()
    def detect_agents(self, features: torch.Tensor, agents: list[int]) -> list[Detections]:
        """Each listed agent's own detections (its frame) from its own map, after NMS."""
        out = self.head(features[agents])
        return [self._nms(self.head.decode(out, k, self.score_threshold)) for k in range(len(agents))]

    def _nms(self, dets: Detections) -> Detections:
        """Rotated NMS over all labels together, best ``max_detections`` kept; every field
        (labels, extras) follows its box."""
        from ..ops import nms_rotated

        return dets.select(nms_rotated(dets.boxes, dets.scores, self.nms_iou)[: self.max_detections])

    @staticmethod
    def direct(batch: CoopBatch, senders: list[int], payloads) -> list[Received]:
        """Deliver payloads without serialisation (training): poses from the batch."""
        sample = batch.sample_of_agent()
        return [Received(int(sample[i]), i, p, batch.ego_from_agent[i], float(batch.time_delay_s[i]))
                for i, p in zip(senders, payloads) if p is not None]

    def loss(self, out: DetectorOutput, batch: CoopBatch) -> dict[str, torch.Tensor]:
        losses = self.head.loss(out.head, batch.gt_boxes)
        if self.agent_loss_weight > 0 and out.state.features is not None:
            agent = self.agent_loss(out.state.features, out.state.batch)
            losses["loss"] = losses["loss"] + self.agent_loss_weight * agent["loss"]
            losses["loss_agent"] = agent["loss"].detach()
        for k, v in self.fusion.aux_loss(out.state).items():
            losses["loss"] = losses["loss"] + v
            losses[k] = v.detach()
        return losses

    def agent_loss(self, features: torch.Tensor, batch: CoopBatch) -> dict[str, torch.Tensor]:
        """The head's loss on every agent's own (N, C, H, W) map, in that agent's frame."""
        poses = batch.true_ego_from_agent if batch.true_ego_from_agent is not None \
            else batch.ego_from_agent
        sample = batch.sample_of_agent().tolist()
        gts, ignore = [], []
        for i, b in enumerate(sample):
            ego_from_agent = poses[i].to(torch.float64)
            agent_from_ego = torch.linalg.inv(ego_from_agent).to(features.dtype)
            gts.append(transform_boxes(agent_from_ego, batch.gt_boxes[b]))
            ignore.append(OutsideGrid(ego_from_agent, self.head.grid))
        return self.head.loss(self.head(features), gts, ignore)

    @torch.no_grad()
    def predict(self, out: DetectorOutput, timer=None) -> list[Detections]:
        """Final boxes per sample in the ego frame: decode, merge any late-fusion boxes, NMS.
        ``timer``: as in :meth:`forward`, stages "head" (decoding) and "nms"."""
        stage = timer or null_timer
        dets = []
        for b in range(out.head.batch_size):
            with stage("head"):
                own = self.head.decode(out.head, b, self.score_threshold)
                if out.late_boxes is not None and out.late_boxes[b] is not None:
                    merge = getattr(self.fusion, "merge", None)
                    if merge is not None:  # the method's own rule (e.g. TCLF's matching),
                        own = self._nms(own)  # on the ego's final detections
                        own = Detections(*merge(own.boxes, own.scores, out.late_boxes[b]))
                    else:
                        extra_boxes, extra_scores = out.late_boxes[b]
                        own = Detections.cat([own, Detections(extra_boxes.to(own.boxes.dtype),
                                                              extra_scores.to(own.scores.dtype))])
            with stage("nms"):
                dets.append(self._nms(own))
        return dets


def run_handshake(fusion: FusionMethod, state: FusionState, senders: list[int],
                  channel=None) -> None:
    """The control rounds of a method with ``handshake`` (see v2xfuse.fusion.base): each sender's
    report to its ego, then the ego's request to each sender; fills ``state.requests``.

    With a channel both rounds are real messages (``channel.transmit(..., kind="report")``,
    ``channel.request``), counted and perturbed like the payload; without one (training) the
    tensors pass straight through.
    """
    batch = state.batch
    reports = fusion.report(state, senders)
    if channel is None:
        asks = fusion.request(state, senders, CoopDetector.direct(batch, senders, reports))
        state.requests = {i: a for i, a in zip(senders, asks) if a is not None}
    else:
        arrived = channel.transmit(fusion, batch, senders, reports, kind="report", state=state)
        state.requests = channel.request(fusion, batch, senders,
                                         fusion.request(state, senders, arrived), state=state)


def ego_aligned_frames(batch: CoopBatch, agents: list[int], cell: float) -> CoopBatch:
    """Re-express the listed agents' points in frames with the ego's axes.

    Agent ``i``'s new frame has the ego's orientation and its origin at the agent's own position
    with x and y rounded to multiples of ``cell`` and z at the ego's LiDAR height, so
    ``ego_from_new`` is a pure shift by whole cells: ``points' = A p`` with
    ``A = [R | t - s]`` for ``ego_from_agent = [R | t]`` and the snapped shift ``s``, and every
    pose (received and true) becomes ``pose @ inv(A)``. Works with whichever pose the ego sent
    and the sender believes (``ego_from_agent``, noisy or not); the true poses follow the same
    ``A`` so supervision stays exact.
    """
    if not agents:
        return batch
    pose = batch.ego_from_agent
    dtype = pose.dtype
    a = torch.eye(4, dtype=torch.float64, device=pose.device).repeat(len(pose), 1, 1)
    idx = torch.as_tensor(agents, dtype=torch.long, device=pose.device)
    p = pose[idx].to(torch.float64)
    shift = p[:, :3, 3].clone()
    shift[:, :2] = torch.round(shift[:, :2] / cell) * cell
    shift[:, 2] = 0.0
    a[idx, :3, :3] = p[:, :3, :3]
    a[idx, :3, 3] = p[:, :3, 3] - shift
    a_inv = torch.linalg.inv(a)
    pts = batch.points
    per_point = a[pts[:, 0].long()].to(pts.dtype)
    xyz = torch.einsum("pij,pj->pi", per_point[:, :3, :3], pts[:, 1:4]) + per_point[:, :3, 3]
    points = torch.cat([pts[:, :1], xyz, pts[:, 4:]], 1)
    true_pose = batch.true_ego_from_agent
    if true_pose is not None:
        true_pose = (true_pose.to(torch.float64) @ a_inv).to(true_pose.dtype)
    return replace(batch, points=points, ego_from_agent=(pose.to(torch.float64) @ a_inv).to(dtype),
                   true_ego_from_agent=true_pose)
