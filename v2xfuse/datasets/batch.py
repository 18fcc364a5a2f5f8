"""Collating samples into the one batch object the detector consumes."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .base import SkippedSample
from .pipeline import Sample

__all__ = ["CoopBatch", "collate"]

KIND_CODES = {"vehicle": 0, "infrastructure": 1}


@dataclass
class CoopBatch:
    """B samples with N = sum(record_len) agents stacked, each sample's ego first.

    Attributes:
        points: (P, 5) float32 [agent, x, y, z, intensity]; ``agent`` indexes the N stacked
            agents; xyz are in that agent's own LiDAR frame.
        record_len: (B,) int64 agents per sample.
        ego_from_agent: (N, 4, 4) float32, each agent into its sample's ego frame (as received,
            i.e. with localisation noise if any).
        agent_kind: (N,) int64, 0 vehicle, 1 infrastructure.
        time_delay_s: (N,) float32 age of each agent's observation.
        gt_boxes: B tensors (M_b, 7) in the ego frame; gt_ids: B tensors (M_b,) int64.
        meta: per sample, dict with dataset, sequence, frame and agent ids, and (None when the
            sample lacks them) ``world_from_agent`` (L, 4, 4) and ``timestamp_us`` (L,): each
            agent's own pose and sensor time, numpy.
        true_ego_from_agent: (N, 4, 4) float32 without localisation noise (for supervision
            in each agent's frame; never used by fusion).
        skipped: the :class:`SkippedSample` markers this batch's indices produced (bad frames
            dropped under ``skip_bad_frames``, each with its file and reason). They are not in
            the batch, so ``batch_size`` may be smaller than the loader's (0 when every
            sample was bad: a consumer skips such a batch).
    """

    points: torch.Tensor
    record_len: torch.Tensor
    ego_from_agent: torch.Tensor
    agent_kind: torch.Tensor
    time_delay_s: torch.Tensor
    gt_boxes: list[torch.Tensor]
    gt_ids: list[torch.Tensor]
    meta: list[dict]
    true_ego_from_agent: torch.Tensor | None = None
    skipped: list[SkippedSample] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.record_len)

    @property
    def num_agents(self) -> int:
        return int(self.record_len.sum())

    def sample_of_agent(self) -> torch.Tensor:
        """(N,) int64 index of the sample each stacked agent belongs to."""
        return torch.repeat_interleave(torch.arange(self.batch_size, device=self.record_len.device),
                                       self.record_len)

    def ego_index(self) -> torch.Tensor:
        """(B,) int64 stacked index of each sample's ego."""
        return torch.cumsum(self.record_len, 0) - self.record_len

    def to(self, device) -> "CoopBatch":
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
            elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                v = [t.to(device, non_blocking=True) for t in v]
            moved[f.name] = v
        return CoopBatch(**moved)


def collate(samples: list[Sample | SkippedSample]) -> CoopBatch:
    """Stack samples into one :class:`CoopBatch`; :class:`SkippedSample` markers are left out
    and listed in ``CoopBatch.skipped`` (so no other frame is ever served in a bad one's place)."""
    skipped = [s for s in samples if isinstance(s, SkippedSample)]
    samples = [s for s in samples if not isinstance(s, SkippedSample)]
    points, ego_from_agent, kinds, delays, meta, true_pose = [], [], [], [], [], []
    agent = 0
    for s in samples:
        for p in s.points:
            idx = np.full((len(p), 1), agent, dtype=np.float32)
            points.append(np.concatenate([idx, p[:, :4]], axis=1))
            agent += 1
        ego_from_agent.append(s.ego_from_agent)
        true_pose.append(s.ego_from_agent if s.true_ego_from_agent is None
                         else s.true_ego_from_agent)
        kinds += [KIND_CODES[k] for k in s.agent_kinds]
        delays.append(s.time_delay_s)
        meta.append({"dataset": s.frame[0], "sequence": s.frame[1], "frame": s.frame[2],
                     "agent_ids": list(s.agent_ids), "world_from_agent": s.world_from_agent,
                     "timestamp_us": s.timestamp_us})
    def stacked(arrays: list[np.ndarray], empty_shape: tuple[int, ...]) -> torch.Tensor:
        if not arrays:
            return torch.zeros(empty_shape)
        return torch.from_numpy(np.concatenate(arrays).astype(np.float32))

    return CoopBatch(
        points=stacked(points, (0, 5)),
        record_len=torch.tensor([len(s.points) for s in samples], dtype=torch.int64),
        ego_from_agent=stacked(ego_from_agent, (0, 4, 4)),
        agent_kind=torch.tensor(kinds, dtype=torch.int64),
        time_delay_s=stacked(delays, (0,)),
        gt_boxes=[torch.from_numpy(s.gt_boxes.astype(np.float32)) for s in samples],
        gt_ids=[torch.from_numpy(s.gt_ids.astype(np.int64)) for s in samples],
        meta=meta,
        true_ego_from_agent=stacked(true_pose, (0, 4, 4)),
        skipped=skipped,
    )
