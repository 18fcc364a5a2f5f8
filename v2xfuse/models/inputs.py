"""What a per-sensor encoder reads: one typed record for the N agents it encodes.

An encoder maps :class:`AgentInputs` to ``(N, C, ny, nx)`` BEV maps on its grid, one per
agent, in each agent's own LiDAR frame. Agents are numbered ``0..N-1`` as in the batch
(``CoopBatch.points[:, 0]``); an agent with no data for the encoder's sensor gets a zero map.

Auxiliary training losses of encoders (the camera encoder's depth loss) travel with the call
that produced them, never as module state: the detector, in training, gives the inputs of the
agents' current observations an :class:`AuxLosses` sink; an encoder that has such a loss (and
is in training mode) adds its weighted terms there while it runs, whether it is called alone or
inside a ``MultiSensorEncoder``; the detector hands the sink's terms to its ``loss`` through
``DetectorOutput.encoder_losses``. Inputs without a sink (evaluation, history, early fusion)
make no auxiliary loss, and nothing of one forward pass can reach another.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..datasets.batch import CameraBatch, CoopBatch
# SENSORS: what an encoder's ``sensor`` may be, in the order the fuser sees their maps
from ..structures.coop import SENSORS

__all__ = ["AgentInputs", "AuxLosses", "SENSORS"]


class AuxLosses:
    """Named, weighted training losses that encoders add during one forward pass (module
    docstring). Names are ``loss_<what>`` and unique: adding one twice raises."""

    def __init__(self) -> None:
        self.terms: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        """``value``: a scalar, already multiplied by its weight (the encoder's config)."""
        if name in self.terms:
            raise KeyError(f"auxiliary loss {name!r} added twice in one forward pass")
        self.terms[name] = value


@dataclass
class AgentInputs:
    """The sensor data of N agents, as one encoder call sees it.

    Attributes:
        num_agents: N, the number of maps to produce (agents without data included).
        points: (P, 5) float32 [agent, x, y, z, intensity], xyz in that agent's LiDAR frame,
            or None when no agent has a LiDAR input.
        cameras: the agents' cameras (:class:`~v2xfuse.datasets.batch.CameraBatch`: images
            (K, 3, H, W) uint8, agent (K,) int64 in ``0..N-1``, intrinsics (K, 3, 3),
            lidar_from_camera (K, 4, 4) into that agent's LiDAR frame), or None.
        losses: where encoders in training mode add their auxiliary losses for this call
            (:class:`AuxLosses`), or None: then they compute none.
    """

    num_agents: int
    points: torch.Tensor | None = None
    cameras: CameraBatch | None = None
    losses: AuxLosses | None = None

    @classmethod
    def from_batch(cls, batch: CoopBatch, losses: AuxLosses | None = None) -> "AgentInputs":
        """Every agent of ``batch`` with its current observation; ``losses``: the sink for the
        encoders' auxiliary losses (training), or None."""
        return cls(batch.num_agents, batch.points, batch.cameras, losses)

    @classmethod
    def of_history(cls, batch: CoopBatch) -> "AgentInputs":
        """The batch's older observations as H "agents" (``batch.history``; H may be 0): an
        encoder maps them to (H, C, ny, nx) in their own frames, which
        ``history.agent_from_past`` takes to their agents' current frames (e.g.
        :func:`~v2xfuse.structures.bev.warp_to_ego`)."""
        history = batch.history
        if history is None:
            raise ValueError("the batch has no history (dataset.history_frames)")
        return cls(history.num_observations, history.points, history.cameras)

    @classmethod
    def early(cls, batch: CoopBatch, points: torch.Tensor) -> "AgentInputs":
        """Early fusion's inputs: one "agent" per sample, the points its ego gathered (P, 5)
        [sample, x, y, z, intensity] in the ego frame, and the ego's own cameras (raw points
        are what early fusion sends; images stay with their agent)."""
        cameras = batch.cameras
        if cameras is not None:
            ego = batch.ego_index()
            cameras = cameras.select(torch.isin(cameras.agent, ego))
            cameras.agent = torch.searchsorted(ego, cameras.agent)
        return cls(batch.batch_size, points, cameras)

    @property
    def device(self) -> torch.device:
        """Where the inputs live: their points' device, else their cameras', else the CPU."""
        if self.points is not None:
            return self.points.device
        return self.cameras.agent.device if self.cameras is not None else torch.device("cpu")

    def present(self, sensor: str) -> torch.Tensor:
        """(N,) bool: which agents have data of ``sensor`` (``"lidar"``: a point; ``"camera"``: a
        camera)."""
        if sensor == "lidar":
            owner = None if self.points is None else self.points[:, 0].long()
        elif sensor == "camera":
            owner = None if self.cameras is None else self.cameras.agent
        else:
            raise KeyError(f"unknown sensor {sensor!r}; known: {SENSORS}")
        if owner is None:  # on the device of the data there is: the mask meets it later
            return torch.zeros(self.num_agents, dtype=torch.bool, device=self.device)
        return torch.bincount(owner, minlength=self.num_agents)[:self.num_agents] > 0

    def only(self, agents: torch.Tensor) -> "AgentInputs":
        """The same N agents with the data of those not in ``agents`` (K,) int64 removed (their
        maps come out zero); the numbering and the loss sink are unchanged."""
        points, cameras = self.points, self.cameras
        if points is not None:
            points = points[torch.isin(points[:, 0].long(), agents)]
        if cameras is not None:
            cameras = cameras.select(torch.isin(cameras.agent, agents))
        return AgentInputs(self.num_agents, points, cameras, self.losses)
