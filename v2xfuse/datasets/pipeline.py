"""From a :class:`CoopFrame` to a training/evaluation sample: delays, pose noise, augmentation, crop.

Order matters and is fixed: (1) per-agent time delay (the adapter serves older observations:
fixed, uniform or binomial, see :func:`draw_delays`), (2) localisation noise on the poses the ego *receives* (points stay true, so features land in
the wrong place, as with a real GNSS error), (3) augmentation, (4) range crop, (5) images
resized and cropped to ``pipeline.cameras.image_size`` (:mod:`v2xfuse.datasets.images`).

Augmentation is one similarity ``A`` (flip about x, rotation about z, uniform scale) applied
in every agent's own LiDAR frame; the pairwise transforms become ``A @ T @ inv(A)``, which is
still rigid, so warping features between agents stays exact. Poses are re-expressed with the
augmented ego frame as the world.

Cameras follow the LiDAR frame and the images stay as they are: ``lidar_from_camera`` becomes
``A @ lidar_from_camera``, so ``K @ inv(A @ L) @ (A p) = K @ inv(L) @ p``: an augmented point
projects onto the pixel that saw it. After a flip the augmented LiDAR frame is left-handed and
``A @ L`` contains a reflection (and the scale); it is an affine map, not a rigid pose, and
code that projects must invert it as a matrix (never transpose its rotation). Not flipping the
images keeps every pixel a real view and the projection exact.

History (``dataset.history_frames``): each agent's older observations (see
:mod:`v2xfuse.datasets.base`) become :class:`PastObs`: points in the LiDAR frame of their own
moment, and ``agent_from_past`` from the agent's own poses (its localisation; the noise of (2)
is the ego's view of others). The same ``A`` augments them (points, cameras, and
``agent_from_past`` becomes ``A T inv(A)``), the same crop applies (height through
``ego_from_agent @ agent_from_past``), and images are fitted alike.

Randomness comes from an explicit generator seeded by ``(seed, epoch, index)``: reproducible
with any number of DataLoader workers, and nothing reseeds a global RNG.

A bad frame (any :class:`~v2xfuse.datasets.base.DatasetError`) is raised, or, when the adapter
has ``skip_bad_frames``, returned as a :class:`~v2xfuse.datasets.base.SkippedSample` that
:func:`~v2xfuse.datasets.batch.collate` drops and counts (why a marker and not a substitute
frame: :mod:`v2xfuse.datasets.base`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from ..structures.boxes import transform_boxes, wrap_angle
from ..structures.coop import CoopFrame
from ..structures.transforms import invert_transform, make_transform, rotation_z
from .base import CoopAdapter, DatasetError, SkippedSample
from .images import CameraConfig, fit_image

__all__ = ["PipelineConfig", "Sample", "PastObs", "CoopSampler", "augmentation_matrix",
           "draw_delays", "DELAY_MODES"]


@dataclass
class PipelineConfig:
    """Settings of :class:`CoopSampler` (all distances in metres, angles in degrees)."""

    lidar_range: tuple[float, ...] = (-51.2, -51.2, -8.0, 51.2, 51.2, 3.0)
    gt_range: tuple[float, ...] | None = None     # default: lidar_range (box centres, ego frame)
    flip_prob: float = 0.0
    rotate_deg: float = 0.0                        # uniform in [-rotate_deg, rotate_deg]
    scale: tuple[float, float] = (1.0, 1.0)
    loc_noise_xyz_std: float = 0.0
    loc_noise_yaw_std_deg: float = 0.0
    delay_frames: int = 0                          # max delay of each non-ego agent, in samples
    delay_mode: str = "fixed"                      # "fixed": every collaborator late by delay_frames;
                                                   # "uniform": each one late by U{0..delay_frames};
                                                   # "binomial": Binomial(delay_frames, delay_p)
    delay_p: float = 0.0                           # p of the binomial mode
    cameras: CameraConfig | None = None            # images in the batch (None: LiDAR only,
                                                   # no image is decoded)

    @classmethod
    def from_dict(cls, d: dict | None) -> "PipelineConfig":
        d = dict(d or {})
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise KeyError(f"pipeline config: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        for k in ("lidar_range", "gt_range", "scale"):
            if d.get(k) is not None:
                d[k] = tuple(float(v) for v in d[k])
        d["cameras"] = CameraConfig.from_dict(d.get("cameras"))
        return cls(**d)

    def __post_init__(self):
        if self.delay_mode not in DELAY_MODES:
            raise ValueError(f"pipeline.delay_mode must be one of {DELAY_MODES}, "
                             f"got {self.delay_mode!r}")
        if not 0.0 <= float(self.delay_p) <= 1.0 or int(self.delay_frames) < 0:
            raise ValueError(f"pipeline: delay_frames {self.delay_frames} must be >= 0 and "
                             f"delay_p {self.delay_p} in [0, 1]")


@dataclass
class PastObs:
    """One older observation of an agent, processed like the current one.

    Attributes:
        points: (P, 4) float32 [x, y, z, intensity] in the agent's LiDAR frame at that time
            (augmented, cropped).
        agent_from_past: (4, 4) float64, that frame into the agent's current one (augmented:
            ``A T inv(A)``, rigid).
        timestamp_us: its sensor time.
        cameras: its CameraObs (``lidar_from_camera`` into that older frame, augmented; images
            fitted when the pipeline has cameras).
    """

    points: np.ndarray
    agent_from_past: np.ndarray
    timestamp_us: int
    cameras: list = field(default_factory=list)


@dataclass
class Sample:
    """One processed sample (numpy), the unit :func:`v2xfuse.datasets.batch.collate` stacks.

    Attributes:
        points: per agent (N_i, 4) float32 [x, y, z, intensity] in that agent's LiDAR frame.
        ego_from_agent: (L, 4, 4) float64 transforms into the ego frame, as the ego believes them.
        gt_boxes: (M, 7) ego frame; gt_ids: (M,) int64.
        agent_ids, agent_kinds: per agent (kinds: "vehicle" | "infrastructure").
        delay_us: (L,) int64 how old each agent's observation is relative to the ego's, in
            microseconds.
        frame: the source frame's (dataset, sequence_id, frame_id).
        cameras: per agent, its CameraObs with ``lidar_from_camera`` following the augmentation
            (see the module docstring); their images resized and cropped to ``image_size``
            when the pipeline has cameras, else as the adapter gave them (usually none).
        true_ego_from_agent: (L, 4, 4) the true transforms (before localisation noise).
        world_from_agent: (L, 4, 4) each agent's own pose in the dataset's world frame, as that
            agent knows it (its own localisation; the noise the ego sees is not on it).
        timestamp_us: (L,) int64 each agent's sensor time. Methods with memory across frames
            (time-compensated late fusion) use these two on the sender side.
        image_size: (H, W) of every image when the pipeline has cameras, else None (collate
            then stacks no camera).
        history: per agent, its :class:`PastObs` newest first (possibly fewer than
            ``history_frames``, none at a sequence start), or None without history.
    """

    points: list[np.ndarray]
    ego_from_agent: np.ndarray
    gt_boxes: np.ndarray
    gt_ids: np.ndarray
    agent_ids: list[str]
    agent_kinds: list[str]
    delay_us: np.ndarray
    frame: tuple[str, str, str]
    cameras: list = field(default_factory=list)
    true_ego_from_agent: np.ndarray | None = None
    world_from_agent: np.ndarray | None = None
    timestamp_us: np.ndarray | None = None
    image_size: tuple[int, int] | None = None
    history: list[list[PastObs]] | None = None


def augmentation_matrix(flip: bool, rotate_rad: float, scale: float) -> np.ndarray:
    """(4, 4) ``A = scale * Rz(rotate) @ diag(1, -1 if flip else 1, 1)``."""
    a = make_transform(rotation_z(rotate_rad), (0.0, 0.0, 0.0))
    if flip:
        a = a @ np.diag([1.0, -1.0, 1.0, 1.0])
    a[:3, :3] *= scale
    return a


def _apply_similarity_to_boxes(a: np.ndarray, boxes: np.ndarray, flip: bool, scale: float) -> np.ndarray:
    out = boxes.copy()
    if flip:
        out[:, 1] *= -1.0
        out[:, 6] *= -1.0
    rigid = a.copy()
    rigid[:3, :3] /= scale
    if flip:
        rigid = rigid @ np.diag([1.0, -1.0, 1.0, 1.0])
    out = transform_boxes(rigid, out)
    out[:, :6] *= scale
    out[:, 6] = wrap_angle(out[:, 6])
    return out


class CoopSampler:
    """Turns adapter frames into :class:`Sample` objects; also a ``torch`` map-style dataset."""

    def __init__(self, adapter: CoopAdapter, cfg: PipelineConfig, train: bool, seed: int = 0):
        self.adapter = adapter
        self.cfg = cfg
        self.train = train
        self.seed = seed

    def __len__(self) -> int:
        return len(self.adapter)

    def rng(self, idx: int, epoch: int = 0) -> np.random.Generator:
        """The draws of sample ``idx`` in ``epoch`` (delays, pose noise, augmentation)."""
        return np.random.default_rng([self.seed, epoch if self.train else 0, idx])

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | SkippedSample:
        """``key``: a sample index (epoch 0), or an ``(epoch, index)`` pair. The epoch travels
        with the key, not as state, so a DataLoader worker that outlives an epoch still draws
        the right augmentation.

        Returns the processed sample, or a :class:`SkippedSample` for a bad frame when the
        adapter has ``skip_bad_frames`` (never another frame in its place: that one would count
        twice). Without ``skip_bad_frames`` a bad frame raises :class:`DatasetError`.
        """
        epoch, idx = key if isinstance(key, tuple) else (0, key)
        try:
            frame = self.load(idx, epoch)
        except DatasetError as e:
            if not self.adapter.skip_bad_frames:
                raise
            return self.adapter.skip(idx, e)
        return self.process(frame, self.rng(idx, epoch))

    def load(self, idx: int, epoch: int = 0) -> CoopFrame:
        cfg = self.cfg
        delays = None
        if cfg.delay_frames > 0:
            rng = self.rng(idx, epoch)
            with self.adapter.sample_errors(idx):
                ids = self.adapter.agent_ids(idx)
            delays = {a: d for a, d in zip(ids[1:], draw_delays(cfg, rng, len(ids) - 1))}
        return self.adapter.load(idx, delays)

    def process(self, frame: CoopFrame, rng: np.random.Generator) -> Sample:
        cfg = self.cfg
        ego = frame.ego
        ego_from_world = invert_transform(ego.world_from_lidar)
        true_ego_from_agent = np.stack([ego_from_world @ a.world_from_lidar for a in frame.agents])
        ego_from_agent = true_ego_from_agent.copy()
        # (2) localisation noise on collaborators' poses (as received by the ego).
        if cfg.loc_noise_xyz_std > 0 or cfg.loc_noise_yaw_std_deg > 0:
            for i in range(1, len(frame.agents)):
                noise = make_transform(rotation_z(math.radians(rng.normal(0, cfg.loc_noise_yaw_std_deg))),
                                       (*rng.normal(0, cfg.loc_noise_xyz_std, 2), 0.0))
                ego_from_agent[i] = ego_from_agent[i] @ noise
        points = [a.points for a in frame.agents]
        cameras = [a.cameras for a in frame.agents]
        gt = frame.gt_boxes
        history = ([[PastObs(p.points, invert_transform(agent.world_from_lidar) @ p.world_from_lidar,
                             p.timestamp_us, p.cameras) for p in agent.history]
                    for agent in frame.agents] if self.adapter.history_frames else None)
        # (3) augmentation, training only.
        if self.train and (cfg.flip_prob > 0 or cfg.rotate_deg > 0 or cfg.scale != (1.0, 1.0)):
            flip = bool(rng.random() < cfg.flip_prob)
            rot = math.radians(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
            scale = float(rng.uniform(*cfg.scale))
            a = augmentation_matrix(flip, rot, scale)
            a_inv = np.linalg.inv(a)
            if history is not None:
                history = [[PastObs(_transform_xyz(a, p.points), a @ p.agent_from_past @ a_inv,
                                    p.timestamp_us, [_move_camera(a, c) for c in p.cameras])
                            for p in past] for past in history]
            points = [_transform_xyz(a, p) for p in points]
            ego_from_agent = np.einsum("ab,nbc,cd->nad", a, ego_from_agent, a_inv)
            true_ego_from_agent = np.einsum("ab,nbc,cd->nad", a, true_ego_from_agent, a_inv)
            gt = _apply_similarity_to_boxes(a, gt, flip, scale)
            cameras = [[_move_camera(a, c) for c in cams] for cams in cameras]
        # (4) crop: points by x, y in each agent's own frame and by height above the ego's LiDAR
        # (z plus the agent's height in the ego frame: a roadside LiDAR 6 m up sees the ground at
        # -6 m, which a crop in its own frame would cut off with the cars on it); boxes by centre
        # in the ego frame.
        lr = cfg.lidar_range
        points = [_crop(p, lr, dz) for p, dz in zip(points, ego_from_agent[:, 2, 3].astype(np.float32))]
        if history is not None:
            history = [[replace(p, points=_crop(p.points, lr, np.float32((pose @ p.agent_from_past)[2, 3])))
                        for p in past] for past, pose in zip(history, ego_from_agent)]
        gr = cfg.gt_range or lr
        keep = (gt[:, 0] >= gr[0]) & (gt[:, 0] < gr[3]) & (gt[:, 1] >= gr[1]) & (gt[:, 1] < gr[4])
        gt, gt_ids = gt[keep], frame.gt_ids[keep]
        # (5) images, last: nothing above moves a pixel.
        if cfg.cameras is not None:
            cameras = [[fit_image(c, cfg.cameras) for c in cams] for cams in cameras]
            if history is not None:
                history = [[replace(p, cameras=[fit_image(c, cfg.cameras) for c in p.cameras])
                            for p in past] for past in history]
        delay_us = np.array([ego.timestamp_us - a.timestamp_us for a in frame.agents], np.int64)
        return Sample(points, ego_from_agent, gt, gt_ids, [a.agent_id for a in frame.agents],
                      [a.kind for a in frame.agents], delay_us,
                      (frame.dataset, frame.sequence_id, frame.frame_id),
                      cameras, true_ego_from_agent,
                      np.stack([a.world_from_lidar for a in frame.agents]),
                      np.array([a.timestamp_us for a in frame.agents], dtype=np.int64),
                      None if cfg.cameras is None else cfg.cameras.image_size, history)


DELAY_MODES = ("fixed", "uniform", "binomial")


def draw_delays(cfg: PipelineConfig, rng: np.random.Generator, count: int) -> list[int]:
    """How many samples late each of ``count`` collaborators is (``cfg.delay_mode``).

    ``"binomial"`` is the asynchrony protocol of the CoBEVFlow and CoDynTrust evaluations
    (shared/reference/fusion-methods.md section 6.6): each collaborator's latest observation is
    ``Binomial(n = delay_frames, p = delay_p)`` samples old, so the expected delay is
    ``n * p`` samples (n = 10, p = 0.3 at 10 Hz: 300 ms). The draws come from the sample's own
    generator (seeded by ``(seed, epoch, index)``), so one seed gives the same delays however
    the frames are loaded. Where a sequence starts later than the draw, the adapter serves its
    first frame (the realised delay is then shorter: ``Sample.delay_us`` says what it was).
    Consecutive frames may be served the same observation of a collaborator (the latest one
    available); a channel's replay check (``channel.checks.duplicate_window``) refuses it the
    second time, so evaluations under these delays turn that check off (tools/bench_delay.py).
    """
    n = cfg.delay_frames
    if cfg.delay_mode == "fixed":
        return [n] * count
    if cfg.delay_mode == "uniform":
        return [int(rng.integers(0, n + 1)) for _ in range(count)]
    if cfg.delay_mode == "binomial":
        return [int(d) for d in rng.binomial(n, cfg.delay_p, size=count)]
    raise ValueError(f"pipeline.delay_mode must be one of {DELAY_MODES}, got {cfg.delay_mode!r}")


def _crop(points: np.ndarray, lr, dz) -> np.ndarray:
    """(P, 4) points of one LiDAR frame inside ``lidar_range`` in x, y and in height above the
    ego's LiDAR (z plus ``dz``, the frame's height in the ego frame)."""
    return points[(points[:, 0] >= lr[0]) & (points[:, 0] < lr[3]) & (points[:, 1] >= lr[1])
                  & (points[:, 1] < lr[4]) & (points[:, 2] + dz >= lr[2]) & (points[:, 2] + dz < lr[5])]


def _move_camera(a: np.ndarray, cam):
    """The camera of a LiDAR frame moved by ``a``: ``A @ lidar_from_camera`` (module docstring)."""
    return replace(cam, lidar_from_camera=a @ cam.lidar_from_camera)


def _transform_xyz(a: np.ndarray, points: np.ndarray) -> np.ndarray:
    out = points.copy()
    out[:, :3] = points[:, :3] @ a[:3, :3].T.astype(np.float32) + a[:3, 3].astype(np.float32)
    return out
