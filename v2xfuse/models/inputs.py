"""What a per-sensor encoder reads: one typed record for the N agents it encodes.

An encoder maps :class:`AgentInputs` to ``(N, C, ny, nx)`` BEV maps on its grid, one per
agent, in each agent's own LiDAR frame. Agents are numbered ``0..N-1`` as in the batch
(``CoopBatch.points[:, 0]``); an agent with no data for the encoder's sensor gets a zero map.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..datasets.batch import CoopBatch

__all__ = ["AgentInputs"]


@dataclass
class AgentInputs:
    """The sensor data of N agents, as one encoder call sees it.

    Attributes:
        num_agents: N, the number of maps to produce (agents without data included).
        points: (P, 5) float32 [agent, x, y, z, intensity], xyz in that agent's LiDAR frame,
            or None when no agent has a LiDAR input.
    """

    num_agents: int
    points: torch.Tensor | None = None

    @classmethod
    def from_batch(cls, batch: CoopBatch) -> "AgentInputs":
        """Every agent of ``batch`` with its current observation."""
        return cls(batch.num_agents, batch.points)

    @classmethod
    def early(cls, batch: CoopBatch, points: torch.Tensor) -> "AgentInputs":
        """Early fusion's inputs: one "agent" per sample, the points its ego gathered (P, 5)
        [sample, x, y, z, intensity] in the ego frame."""
        return cls(batch.batch_size, points)

    def only(self, agents: torch.Tensor) -> "AgentInputs":
        """The same N agents with the data of those not in ``agents`` (K,) int64 removed (their
        maps come out zero); the numbering is unchanged."""
        points = self.points
        if points is not None:
            points = points[torch.isin(points[:, 0].long(), agents)]
        return AgentInputs(self.num_agents, points)
