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

Image features travel the same way: a head that samples the cameras' image features (the query
head's ``sample_from: camera``) needs what the camera encoder's image backbone computed, not a
second pass of it. The detector then gives the inputs an :class:`ImageFeatureSink`; a camera
encoder that has one puts its backbone's output there, with the calibration it belongs to, as
:class:`CameraFeatures`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..datasets.batch import CameraBatch, CoopBatch
# SENSORS: what an encoder's ``sensor`` may be, in the order the fuser sees their maps
from ..structures.coop import SENSORS

__all__ = ["AgentInputs", "AuxLosses", "CameraFeatures", "ImageFeatureSink", "SENSORS"]


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
class CameraFeatures:
    """K cameras' image features, as a camera encoder's image backbone made them.

    Attributes:
        features: (K, C, h, w), h = H / stride, w = W / stride; feature pixel (i, j) covers image
            pixels [j stride, (j + 1) stride) x [i stride, (i + 1) stride), so a ``grid_sample``
            with ``align_corners=False`` reads image pixel u at ``(u + 0.5) / W * 2 - 1``
            (OpenCV pixel centres at integers, :mod:`v2xfuse.models.encoders.lss`).
        agent: (K,) int64 the map (agent) each camera belongs to, in the numbering of the maps
            the features go with.
        intrinsics: (K, 3, 3) float64 of the images as the batch has them (resized, cropped).
        lidar_from_camera: (K, 4, 4) float64 into its agent's frame as the batch has it
            (augmentation and ``ego_aligned`` moves included; inverted as a matrix).
        image_size: (H, W) of the images ``intrinsics`` refer to.
    """

    features: torch.Tensor
    agent: torch.Tensor
    intrinsics: torch.Tensor
    lidar_from_camera: torch.Tensor
    image_size: tuple[int, int]

    @property
    def num_cameras(self) -> int:
        return len(self.agent)

    def of_agents(self, agents) -> "CameraFeatures":
        """The cameras of the listed agents (M,), renumbered to their place in the list (the
        map index of ``maps[agents]``); cameras of other agents are left out."""
        agents = torch.as_tensor(agents, dtype=torch.long, device=self.agent.device).reshape(-1)
        size = int(max(int(agents.max()) if len(agents) else -1,
                       int(self.agent.max()) if len(self.agent) else -1)) + 1
        place = torch.full((size,), -1, dtype=torch.long, device=self.agent.device)
        place[agents] = torch.arange(len(agents), device=self.agent.device)
        new = place[self.agent]
        keep = new >= 0
        return CameraFeatures(self.features[keep], new[keep], self.intrinsics[keep],
                              self.lidar_from_camera[keep], self.image_size)


class ImageFeatureSink:
    """Where a camera encoder puts its image backbone's output during one call (module
    docstring). One camera encoder per call: a second ``put`` raises."""

    def __init__(self) -> None:
        self.cameras: CameraFeatures | None = None

    def put(self, cameras: CameraFeatures) -> None:
        if self.cameras is not None:
            raise ValueError("image features put twice in one encoder call (two camera encoders?)")
        self.cameras = cameras


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
        image_features: where a camera encoder puts its image features for this call
            (:class:`ImageFeatureSink`), or None: then it keeps none.
    """

    num_agents: int
    points: torch.Tensor | None = None
    cameras: CameraBatch | None = None
    losses: AuxLosses | None = None
    image_features: ImageFeatureSink | None = None

    @classmethod
    def from_batch(cls, batch: CoopBatch, losses: AuxLosses | None = None,
                   image_features: ImageFeatureSink | None = None) -> "AgentInputs":
        """Every agent of ``batch`` with its current observation; ``losses``: the sink for the
        encoders' auxiliary losses (training), or None; ``image_features``: the sink for the
        camera encoder's image features, or None."""
        return cls(batch.num_agents, batch.points, batch.cameras, losses, image_features)

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
    def early(cls, batch: CoopBatch, points: torch.Tensor,
              image_features: ImageFeatureSink | None = None) -> "AgentInputs":
        """Early fusion's inputs: one "agent" per sample, the points its ego gathered (P, 5)
        [sample, x, y, z, intensity] in the ego frame, and the ego's own cameras (raw points
        are what early fusion sends; images stay with their agent)."""
        cameras = batch.cameras
        if cameras is not None:
            ego = batch.ego_index()
            cameras = cameras.select(torch.isin(cameras.agent, ego))
            cameras.agent = torch.searchsorted(ego, cameras.agent)
        return cls(batch.batch_size, points, cameras, image_features=image_features)

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
        return AgentInputs(self.num_agents, points, cameras, self.losses, self.image_features)
