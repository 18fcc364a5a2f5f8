"""The multi-agent frame: what every dataset adapter produces and every model consumes.

A :class:`CoopFrame` is one instant of a cooperative scene as seen by one ego agent: each
agent's sensor data in its own LiDAR frame, each agent's pose in a shared world frame, and
the ground-truth boxes in the ego LiDAR frame. Conventions (axes, box layout, transform
names) are those of :mod:`v2xfuse.structures.boxes` and :mod:`v2xfuse.structures.transforms`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .boxes import BOX_DIM
from .transforms import relative_transform

__all__ = ["AGENT_KINDS", "SENSORS", "CameraObs", "AgentObs", "CoopFrame"]

AGENT_KINDS = ("vehicle", "infrastructure")
#: the sensors an agent may carry (``AgentObs.points``: lidar; ``AgentObs.cameras``: camera)
SENSORS = ("lidar", "camera")


def _check_matrix(value, shape: tuple[int, ...], name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or inf")
    return arr


@dataclass
class CameraObs:
    """One pinhole camera of an agent.

    Attributes:
        name: camera name as the dataset calls it (``camera0``, ``front``...).
        intrinsic: (3, 3) K; pixel ``[u, v, 1]^T ~ K @ p_cam``.
        lidar_from_camera: (4, 4); the camera frame is OpenCV's (x right, y down, z forward).
        image_size: (height, width) in pixels.
        image: (H, W, 3) uint8 RGB, or None when the adapter loads images lazily.
        image_path: file the image came from, if any.
    """

    name: str
    intrinsic: np.ndarray
    lidar_from_camera: np.ndarray
    image_size: tuple[int, int]
    image: np.ndarray | None = None
    image_path: str | None = None

    def __post_init__(self) -> None:
        self.intrinsic = _check_matrix(self.intrinsic, (3, 3), f"camera {self.name}: intrinsic")
        self.lidar_from_camera = _check_matrix(self.lidar_from_camera, (4, 4),
                                               f"camera {self.name}: lidar_from_camera")
        if self.image is not None:
            if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
                raise ValueError(f"camera {self.name}: image must be (H, W, 3) uint8, "
                                 f"got {self.image.shape} {self.image.dtype}")
            if tuple(self.image.shape[:2]) != tuple(self.image_size):
                raise ValueError(f"camera {self.name}: image is {self.image.shape[:2]}, "
                                 f"image_size says {self.image_size}")


@dataclass
class AgentObs:
    """What one agent observed at one instant.

    Attributes:
        agent_id: the dataset's id for the agent, as a string (``"1732"``, ``"-1"``, ``"vehicle"``).
        kind: ``"vehicle"`` or ``"infrastructure"``.
        world_from_lidar: (4, 4) float64 pose of the agent's LiDAR in the world frame.
        timestamp_us: sensor time in integer microseconds.
        points: (N, 4) float32 [x, y, z, intensity] in the agent's LiDAR frame, intensity in [0, 1];
            (0, 4) for an agent without a LiDAR (``dataset.sensors``).
        cameras: the agent's cameras ([] for an agent without one).
        boxes: (M, 7) boxes in the agent's LiDAR frame from the agent's own labels, if the
            dataset has per-agent labels.
        box_ids: (M,) int64 object ids of ``boxes`` (-1 where the dataset has none).
        speed_mps: the agent's own speed in m/s (0 for roadside units).
        history: the agent's older observations from the same sequence, newest first (empty
            unless the adapter has ``history_frames``; shorter at a sequence's start).
    """

    agent_id: str
    kind: str
    world_from_lidar: np.ndarray
    timestamp_us: int
    points: np.ndarray
    cameras: list[CameraObs] = field(default_factory=list)
    boxes: np.ndarray | None = None
    box_ids: np.ndarray | None = None
    speed_mps: float = 0.0
    history: list["AgentObs"] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.agent_id = str(self.agent_id)
        if self.kind not in AGENT_KINDS:
            raise ValueError(f"agent {self.agent_id}: kind must be one of {AGENT_KINDS}, got {self.kind!r}")
        self.world_from_lidar = _check_matrix(self.world_from_lidar, (4, 4),
                                              f"agent {self.agent_id}: world_from_lidar")
        self.timestamp_us = int(self.timestamp_us)
        pts = np.asarray(self.points)
        if pts.ndim != 2 or pts.shape[1] != 4:
            raise ValueError(f"agent {self.agent_id}: points must be (N, 4), got {pts.shape}")
        self.points = pts.astype(np.float32, copy=False)
        if self.boxes is not None:
            self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, BOX_DIM)
            ids = np.full(len(self.boxes), -1, np.int64) if self.box_ids is None else self.box_ids
            self.box_ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            if len(self.box_ids) != len(self.boxes):
                raise ValueError(f"agent {self.agent_id}: {len(self.boxes)} boxes but "
                                 f"{len(self.box_ids)} box_ids")


@dataclass
class CoopFrame:
    """One cooperative sample: all agents at one instant, seen from the ego.

    Attributes:
        dataset: adapter name (``"opv2v"``, ``"dair-v2x-c"``...).
        sequence_id: scenario / batch / sequence the frame belongs to.
        frame_id: the frame's id within the dataset (the ego's frame id).
        agents: every agent, the ego first.
        gt_boxes: (M, 7) float64 ground truth in the ego LiDAR frame.
        gt_ids: (M,) int64 object ids (-1 where the dataset has none).
        gt_classes: M class names as the dataset spells them, lower case.
    """

    dataset: str
    sequence_id: str
    frame_id: str
    agents: list[AgentObs]
    gt_boxes: np.ndarray
    gt_ids: np.ndarray | None = None
    gt_classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.agents:
            raise ValueError(f"frame {self.sequence_id}/{self.frame_id}: no agents")
        ids = [a.agent_id for a in self.agents]
        if len(set(ids)) != len(ids):
            raise ValueError(f"frame {self.sequence_id}/{self.frame_id}: duplicate agent ids {ids}")
        self.gt_boxes = np.asarray(self.gt_boxes, dtype=np.float64).reshape(-1, BOX_DIM)
        n = len(self.gt_boxes)
        self.gt_ids = (np.full(n, -1, np.int64) if self.gt_ids is None
                       else np.asarray(self.gt_ids, dtype=np.int64).reshape(-1))
        self.gt_classes = tuple(["car"] * n if self.gt_classes is None else self.gt_classes)
        if len(self.gt_ids) != n or len(self.gt_classes) != n:
            raise ValueError(f"frame {self.sequence_id}/{self.frame_id}: {n} gt_boxes but "
                             f"{len(self.gt_ids)} gt_ids and {len(self.gt_classes)} gt_classes")

    @property
    def ego(self) -> AgentObs:
        return self.agents[0]

    @property
    def ego_id(self) -> str:
        return self.agents[0].agent_id

    def agent(self, agent_id: str) -> AgentObs:
        for a in self.agents:
            if a.agent_id == str(agent_id):
                return a
        raise KeyError(f"frame {self.sequence_id}/{self.frame_id}: no agent {agent_id!r}")

    def ego_from_agent(self, agent_id: str) -> np.ndarray:
        """(4, 4) ``ego_lidar_from_agent_lidar``."""
        return relative_transform(self.ego.world_from_lidar, self.agent(agent_id).world_from_lidar)

    def pairwise_transforms(self) -> np.ndarray:
        """(L, L, 4, 4) with ``[i, j] = agent_i_lidar_from_agent_j_lidar``."""
        poses = np.stack([a.world_from_lidar for a in self.agents])
        inv = np.linalg.inv(poses)
        return np.einsum("iab,jbc->ijac", inv, poses)
