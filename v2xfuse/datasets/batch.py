"""Collating samples into the one batch object the detector consumes."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..structures.coop import CameraObs
from .base import SkippedSample
from .pipeline import PastObs, Sample

__all__ = ["CoopBatch", "CameraBatch", "HistoryBatch", "collate"]

KIND_CODES = {"vehicle": 0, "infrastructure": 1}


@dataclass
class CameraBatch:
    """K camera images of a batch, each tied to the stacked observation it belongs to.

    Attributes:
        images: (K, 3, H, W) uint8 RGB, resized and cropped by the pipeline
            (``pipeline.cameras``).
        agent: (K,) int64 index of the observation (a stacked agent of ``CoopBatch``) whose
            LiDAR frame ``lidar_from_camera`` refers to.
        intrinsics: (K, 3, 3) float64 K of the resized, cropped image: ``[u, v, 1]^T ~ K p_cam``.
        lidar_from_camera: (K, 4, 4) float64, the camera (OpenCV axes) into that LiDAR frame as
            the batch has it, augmentation included: an augmented frame is ``A`` times the
            sensor's (a similarity that may reflect and scale), so this is ``A @ L`` and not
            rigid; ``K @ inv(lidar_from_camera) @ p`` still lands on the pixel that saw ``p``.
    """

    images: torch.Tensor
    agent: torch.Tensor
    intrinsics: torch.Tensor
    lidar_from_camera: torch.Tensor

    @property
    def num_cameras(self) -> int:
        return len(self.agent)

    @classmethod
    def stack(cls, owners: list[int], cameras: list[CameraObs],
              image_size: tuple[int, int]) -> "CameraBatch":
        """``cameras[k]`` (with pixels of ``image_size``) belongs to observation ``owners[k]``."""
        h, w = image_size
        images = np.zeros((len(cameras), h, w, 3), np.uint8)
        for k, cam in enumerate(cameras):
            if cam.image is None or cam.image.shape[:2] != (h, w):
                got = None if cam.image is None else cam.image.shape[:2]
                raise ValueError(f"camera {cam.name}: expected a {h}x{w} image, got {got}")
            images[k] = cam.image
        return cls(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                   torch.tensor(owners, dtype=torch.int64).reshape(-1),
                   torch.from_numpy(np.array([c.intrinsic for c in cameras]).reshape(-1, 3, 3)),
                   torch.from_numpy(np.array([c.lidar_from_camera for c in cameras]).reshape(-1, 4, 4)))

    def select(self, keep: torch.Tensor) -> "CameraBatch":
        """The cameras where ``keep`` (K,) bool is true."""
        return CameraBatch(self.images[keep], self.agent[keep], self.intrinsics[keep],
                           self.lidar_from_camera[keep])

    def to(self, device) -> "CameraBatch":
        return CameraBatch(*(getattr(self, f.name).to(device, non_blocking=True)
                             for f in fields(self)))


@dataclass
class HistoryBatch:
    """The older observations of a batch's N stacked agents: H in all, each agent's newest
    first (``dataset.history_frames``).

    Attributes:
        points: (Q, 5) float32 [obs, x, y, z, intensity]; ``obs`` indexes the H observations;
            xyz in that observation's own LiDAR frame (augmented like the current points).
        agent: (H,) int64 the stacked agent each observation belongs to.
        steps: (H,) int64 its place in its agent's history: 1 the newest, 2 the next...
        agent_from_past: (H, 4, 4) float64, the observation's LiDAR frame into its agent's
            current one (rigid; with ``CoopBatch.ego_from_agent`` it gives ``ego_from_past``).
        timestamp_us: (H,) int64 sensor times.
        length: (N,) int64 observations per agent: ``history_frames``, or fewer where the
            agent's sequence starts later (0 at its first frame). Never padded.
        cameras: their cameras (``agent`` indexing the H observations, ``lidar_from_camera``
            into each one's own frame), or None without ``pipeline.cameras``.
    """

    points: torch.Tensor
    agent: torch.Tensor
    steps: torch.Tensor
    agent_from_past: torch.Tensor
    timestamp_us: torch.Tensor
    length: torch.Tensor
    cameras: CameraBatch | None = None

    @property
    def num_observations(self) -> int:
        return len(self.agent)

    def ego_from_past(self, ego_from_agent: torch.Tensor) -> torch.Tensor:
        """(H, 4, 4) float64 each observation's frame into its sample's ego frame, given the
        batch's (N, 4, 4) ``ego_from_agent``."""
        return ego_from_agent[self.agent].to(torch.float64) @ self.agent_from_past

    @classmethod
    def stack(cls, history: list[list[PastObs]], agents: list[int],
              image_size: tuple[int, int] | None) -> "HistoryBatch":
        """``history[i]``: the older observations of stacked agent ``agents[i]``, newest first;
        ``image_size``: that of their images, None when the pipeline has no cameras."""
        points, agent, steps, poses, times, owners, cams = [], [], [], [], [], [], []
        for a, past in zip(agents, history):
            for j, obs in enumerate(past):
                h = len(agent)
                points.append(np.concatenate([np.full((len(obs.points), 1), h, np.float32),
                                              obs.points[:, :4]], axis=1))
                agent.append(a)
                steps.append(j + 1)
                poses.append(obs.agent_from_past)
                times.append(obs.timestamp_us)
                cams += obs.cameras
                owners += [h] * len(obs.cameras)
        return cls(torch.from_numpy(np.concatenate(points).astype(np.float32)) if points
                   else torch.zeros((0, 5)),
                   torch.tensor(agent, dtype=torch.int64), torch.tensor(steps, dtype=torch.int64),
                   torch.from_numpy(np.array(poses, np.float64).reshape(-1, 4, 4)),
                   torch.tensor(times, dtype=torch.int64),
                   torch.tensor([len(p) for p in history], dtype=torch.int64),
                   None if image_size is None else CameraBatch.stack(owners, cams, image_size))

    def to(self, device) -> "HistoryBatch":
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True)
                 for f in fields(self) if f.name != "cameras"}
        return HistoryBatch(**moved, cameras=None if self.cameras is None else self.cameras.to(device))


@dataclass(frozen=True)
class FrameRecord:
    """Which frame a sample is and what its agents know of themselves.

    Attributes:
        dataset, sequence, frame: the source frame's ids (``key`` is the three together).
        agent_ids: the L agents' dataset ids, ego first.
        world_from_agent: (L, 4, 4) float64 each agent's own pose in the dataset's world (its
            own localisation, without the noise the ego sees), or None when the dataset has
            none.
        timestamp_us: (L,) int64 each agent's sensor time, or None.
    """

    dataset: str
    sequence: str
    frame: str
    agent_ids: tuple[str, ...]
    world_from_agent: np.ndarray | None = None
    timestamp_us: np.ndarray | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.dataset, self.sequence, self.frame)


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
        delay_us: (N,) int64 age of each agent's observation relative to its ego's, in
            microseconds.
        gt_boxes: B tensors (M_b, 7) in the ego frame; gt_ids: B tensors (M_b,) int64.
        frames: per sample, its :class:`FrameRecord` (which frame, which agents, their own
            poses and sensor times).
        true_ego_from_agent: (N, 4, 4) float32 without localisation noise (for supervision
            in each agent's frame; never used by fusion).
        cameras: every agent's cameras (:class:`CameraBatch`, ``agent`` indexing the N
            stacked agents), or None when the pipeline loads no images (``pipeline.cameras``).
        history: the agents' older observations (:class:`HistoryBatch`, with their count per
            agent in ``history.length``), or None without ``dataset.history_frames``.
        skipped: the :class:`SkippedSample` markers this batch's indices produced (bad frames
            dropped under ``skip_bad_frames``, each with its file and reason). They are not in
            the batch, so ``batch_size`` may be smaller than the loader's (0 when every
            sample was bad: a consumer skips such a batch).
    """

    points: torch.Tensor
    record_len: torch.Tensor
    ego_from_agent: torch.Tensor
    agent_kind: torch.Tensor
    delay_us: torch.Tensor
    gt_boxes: list[torch.Tensor]
    gt_ids: list[torch.Tensor]
    frames: list[FrameRecord]
    true_ego_from_agent: torch.Tensor | None = None
    skipped: list[SkippedSample] = field(default_factory=list)
    cameras: CameraBatch | None = None
    history: HistoryBatch | None = None

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
            elif isinstance(v, (CameraBatch, HistoryBatch)):
                v = v.to(device)
            elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                v = [t.to(device, non_blocking=True) for t in v]
            moved[f.name] = v
        return CoopBatch(**moved)


def collate(samples: list[Sample | SkippedSample]) -> CoopBatch:
    """Stack samples into one :class:`CoopBatch`; :class:`SkippedSample` markers are left out
    and listed in ``CoopBatch.skipped`` (so no other frame is ever served in a bad one's place)."""
    skipped = [s for s in samples if isinstance(s, SkippedSample)]
    samples = [s for s in samples if not isinstance(s, SkippedSample)]
    points, ego_from_agent, kinds, delays, frames, true_pose = [], [], [], [], [], []
    camera_owners, cameras = [], []
    agent = 0
    for s in samples:
        for i, p in enumerate(s.points):
            idx = np.full((len(p), 1), agent, dtype=np.float32)
            points.append(np.concatenate([idx, p[:, :4]], axis=1))
            if s.image_size is not None:
                cameras += s.cameras[i]
                camera_owners += [agent] * len(s.cameras[i])
            agent += 1
        ego_from_agent.append(s.ego_from_agent)
        true_pose.append(s.ego_from_agent if s.true_ego_from_agent is None
                         else s.true_ego_from_agent)
        kinds += [KIND_CODES[k] for k in s.agent_kinds]
        delays.append(np.asarray(s.delay_us, dtype=np.int64))
        frames.append(FrameRecord(*s.frame, tuple(str(a) for a in s.agent_ids),
                                  s.world_from_agent, s.timestamp_us))
    def stacked(arrays: list[np.ndarray], empty_shape: tuple[int, ...]) -> torch.Tensor:
        if not arrays:
            return torch.zeros(empty_shape)
        return torch.from_numpy(np.concatenate(arrays).astype(np.float32))

    sizes = {s.image_size for s in samples if s.image_size is not None}
    if len(sizes) > 1:
        raise ValueError(f"collate: samples with images of different sizes {sorted(sizes)}")
    image_size = next(iter(sizes)) if sizes else None
    history = None
    if samples and any(s.history is not None for s in samples):
        if any(s.history is None for s in samples):
            raise ValueError("collate: samples with and without history")
        history = HistoryBatch.stack([h for s in samples for h in s.history],
                                     list(range(agent)), image_size)
    return CoopBatch(
        points=stacked(points, (0, 5)),
        record_len=torch.tensor([len(s.points) for s in samples], dtype=torch.int64),
        ego_from_agent=stacked(ego_from_agent, (0, 4, 4)),
        agent_kind=torch.tensor(kinds, dtype=torch.int64),
        delay_us=torch.from_numpy(np.concatenate(delays) if delays else np.zeros(0, np.int64)),
        gt_boxes=[torch.from_numpy(s.gt_boxes.astype(np.float32)) for s in samples],
        gt_ids=[torch.from_numpy(s.gt_ids.astype(np.int64)) for s in samples],
        frames=frames,
        true_ego_from_agent=stacked(true_pose, (0, 4, 4)),
        skipped=skipped,
        cameras=CameraBatch.stack(camera_owners, cameras, image_size) if image_size else None,
        history=history,
    )
