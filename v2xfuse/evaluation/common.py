"""Pieces shared by the OpenCOOD-style and DAIR-V2X-official evaluators.

Boxes are ``(N, 7) [x, y, z, dx, dy, dz, yaw]`` (z at the box centre) in the ego / vehicle LiDAR
frame, as in :mod:`v2xfuse.structures.boxes`. Evaluation works in float64 numpy and never
imports torch (scoring a file should not wait 1.2 s for it): the rotated IoU is
:mod:`v2xfuse.evaluation.geometry`, which computes the values of the :mod:`v2xfuse.ops` kernels.
Torch tensors are still accepted wherever boxes or scores are.
"""
from __future__ import annotations

import math
import sys
from typing import Sequence

import numpy as np

from .geometry import BOX_DIM, box_corners
from .geometry import pairwise_iou as _pairwise_iou

__all__ = [
    "IOU_TYPES",
    "RANGE_RULES",
    "as_boxes",
    "as_scores",
    "pairwise_iou",
    "IOU_BLOCK_ELEMENTS",
    "MATCH_BATCH_BOXES",
    "PendingFrames",
    "keep_rows",
    "boxes_in_range",
    "threshold_key",
    "FrameLog",
]

IOU_TYPES = ("bev", "3d")

# How a box is judged inside an axis-aligned region [xmin, ymin, zmin, xmax, ymax, zmax]:
#   all_corners_bev  all 8 corners' (x, y) inside, bounds inclusive, z ignored: OpenCOOD/HEAL
#                    (`mask_boxes_outside_range_numpy` with min_num_corners=8, then the xy-only
#                    check of `generate_gt_bbx`; reference/opencood-opv2v.md §4.1 and §3 step 8).
#   any_corner_3d    at least one of the 8 corners inside, x and y inclusive, zmin <= z < zmax:
#                    DAIR-V2X official (`VICDataset` GT filter and the in-model prediction filter,
#                    reference/dair-v2x.md §4; `point_in_box` counts a point on the top plane as
#                    outside and one on the bottom plane as inside).
#   centre_bev       box centre (x, y) inside, inclusive.
RANGE_RULES = ("all_corners_bev", "any_corner_3d", "centre_bev")


def _tensor_to_numpy(value):
    """A torch tensor's values as numpy; anything else as it is. Looks torch up only when it
    is already imported (then the value may be a tensor), so numpy callers never import it."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def as_boxes(boxes, name: str = "boxes") -> np.ndarray:
    """Checked float64 copy of a box array.

    Args:
        boxes: (N, 7) array-like (numpy, torch, nested lists); (0,) or None means no boxes.
    Returns:
        (N, 7) float64 numpy array that shares no memory with ``boxes``.
    Raises:
        ValueError: wrong shape, non-finite values or negative sizes.
    """
    if boxes is None:
        return np.zeros((0, BOX_DIM))
    arr = np.array(_tensor_to_numpy(boxes), dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, BOX_DIM))
    if arr.ndim != 2 or arr.shape[1] != BOX_DIM:
        raise ValueError(f"{name} must be (N, {BOX_DIM}) [x, y, z, dx, dy, dz, yaw], "
                         f"got shape {arr.shape}")
    if not _all_finite(arr):
        raise ValueError(f"{name} holds non-finite values (NaN or inf)")
    if arr[:, 3:6].min() < 0:
        raise ValueError(f"{name} holds negative sizes dx, dy or dz")
    return arr


def _all_finite(arr: np.ndarray) -> bool:
    """Whether every value is finite, in one reduction when they are: a sum is finite only if
    every term is, or (rarely) when finite terms add up past float64's range."""
    return math.isfinite(arr.sum()) or bool(np.isfinite(arr).all())


def as_scores(scores, num_boxes: int, name: str = "scores") -> np.ndarray:
    """Checked float64 copy of detection scores, (num_boxes,)."""
    if scores is None:
        scores = np.zeros(0)
    arr = np.array(_tensor_to_numpy(scores), dtype=np.float64).reshape(-1)
    if arr.shape[0] != num_boxes:
        raise ValueError(f"{name} must be ({num_boxes},), one per box, got {arr.shape[0]} values")
    if not _all_finite(arr):
        raise ValueError(f"{name} holds non-finite values (NaN or inf)")
    return arr


def pairwise_iou(boxes_a: np.ndarray, boxes_b: np.ndarray, iou_type: str = "bev") -> np.ndarray:
    """Rotated IoU of every pair.

    Args:
        boxes_a: (N, 7) float64.
        boxes_b: (M, 7) float64.
        iou_type: "bev" (rotated polygon IoU in the xy plane, z and dz ignored: OpenCOOD, DAIR
            AP-BEV) or "3d" (BEV intersection x height overlap over the union volume: DAIR AP-3D).
    Returns:
        (N, M) float64 IoU in [0, 1], the values of ``ops.boxes_iou_bev`` / ``boxes_iou_3d``.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    return _pairwise_iou(np.asarray(boxes_a, dtype=np.float64).reshape(-1, BOX_DIM),
                         np.asarray(boxes_b, dtype=np.float64).reshape(-1, BOX_DIM), iou_type)


# Box pairs the matchers score at once (each costs about 100 bytes of temporaries, so a block
# stays near 25 MiB). A crowded frame is never scored whole: see matching.candidate_pairs.
IOU_BLOCK_ELEMENTS = 1 << 18


# Boxes (detections + ground truth) an evaluator holds before matching them as one batch:
# about 4 MiB, large enough that the per-batch costs vanish.
MATCH_BATCH_BOXES = 1 << 16


class PendingFrames:
    """Checked frames waiting to be matched as one batch, in the order they were added."""

    def __init__(self) -> None:
        self._frames: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.num_boxes = 0

    def add(self, det: np.ndarray, scores: np.ndarray, gt: np.ndarray) -> bool:
        """Queue a frame; True when the queue holds :data:`MATCH_BATCH_BOXES` boxes or more."""
        self._frames.append((det, scores, gt))
        self.num_boxes += len(det) + len(gt)
        return self.num_boxes >= MATCH_BATCH_BOXES

    def __len__(self) -> int:
        return len(self._frames)

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Empty the queue: ``det (N, 7), scores (N,), det_counts (F,), gt (M, 7),
        gt_counts (F,)``, frames one after another."""
        dets, scores, gts = zip(*self._frames)
        self._frames, self.num_boxes = [], 0
        return (np.concatenate(dets), np.concatenate(scores),
                np.array([len(d) for d in dets], dtype=np.int64), np.concatenate(gts),
                np.array([len(g) for g in gts], dtype=np.int64))


def keep_rows(mask: np.ndarray, counts: np.ndarray, *arrays: np.ndarray):
    """Drop rows of frames stored one after another.

    Args:
        mask: (N,) bool, the rows to keep; counts: (F,) rows per frame; arrays: each (N, ...).
    Returns:
        ``(new_counts (F,), (array[mask], ...))``.
    """
    frame = np.repeat(np.arange(len(counts)), counts)
    return (np.bincount(frame[mask], minlength=len(counts)).astype(np.int64),
            tuple(a[mask] for a in arrays))


def boxes_in_range(boxes: np.ndarray, bounds: Sequence[float], rule: str) -> np.ndarray:
    """Which boxes lie in an axis-aligned region, by one of :data:`RANGE_RULES`.

    Args:
        boxes: (N, 7) float64.
        bounds: 6 numbers [xmin, ymin, zmin, xmax, ymax, zmax] in the boxes' frame.
        rule: see :data:`RANGE_RULES`.
    Returns:
        (N,) bool.
    """
    lo, hi = _check_bounds(bounds)
    if rule not in RANGE_RULES:
        raise ValueError(f"range rule must be one of {RANGE_RULES}, got {rule!r}")
    if len(boxes) == 0:
        return np.zeros(0, dtype=bool)
    if rule == "centre_bev":
        xy = boxes[:, 0:2]
        return ((xy >= lo[:2]) & (xy <= hi[:2])).all(axis=1)
    corners = box_corners(boxes)  # (N, 8, 3)
    in_xy = ((corners[..., :2] >= lo[:2]) & (corners[..., :2] <= hi[:2])).all(axis=-1)
    if rule == "all_corners_bev":
        return in_xy.all(axis=1)
    in_z = (corners[..., 2] >= lo[2]) & (corners[..., 2] < hi[2])
    return (in_xy & in_z).any(axis=1)


def _check_bounds(bounds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(bounds, dtype=np.float64).reshape(-1)
    if arr.shape[0] != 6 or not np.isfinite(arr).all():
        raise ValueError(f"range must be 6 finite numbers [xmin, ymin, zmin, xmax, ymax, zmax], "
                         f"got {list(bounds)}")
    lo, hi = arr[:3], arr[3:]
    if (lo > hi).any():
        raise ValueError(f"range minimum exceeds maximum: {arr.tolist()}")
    return lo, hi


def threshold_key(threshold: float) -> str:
    """JSON key of an IoU threshold: 0.3 -> "0.3"."""
    return f"{threshold:g}"


def _finite_number(value) -> bool:
    if type(value) in (int, float):
        return math.isfinite(value)
    return bool(np.isfinite(value))


class FrameLog:
    """Frame ids in the order they were added, with optional bytes sent and latency per frame.

    Rejects a frame id seen before: adding a frame twice would count its ground truth twice.
    """

    def __init__(self) -> None:
        self.frame_ids: list = []
        self._seen: set = set()
        self._bytes: list[float] = []
        self._latency_ms: list[float] = []

    def add(self, frame_id, payload_bytes: float | None, latency_ms: float | None) -> None:
        if frame_id in self._seen:
            raise ValueError(f"frame {frame_id!r} was already added")
        for name, value in (("payload_bytes", payload_bytes), ("latency_ms", latency_ms)):
            if value is not None and not (_finite_number(value) and value >= 0):
                raise ValueError(f"frame {frame_id!r}: {name} must be a finite number >= 0, "
                                 f"got {value!r}")
        self._seen.add(frame_id)
        self.frame_ids.append(frame_id)
        if payload_bytes is not None:
            self._bytes.append(float(payload_bytes))
        if latency_ms is not None:
            self._latency_ms.append(float(latency_ms))

    def __len__(self) -> int:
        return len(self.frame_ids)

    @property
    def mean_bytes(self) -> float | None:
        """Mean payload bytes over the frames that reported it, None if none did."""
        return float(np.mean(self._bytes)) if self._bytes else None

    @property
    def mean_latency_ms(self) -> float | None:
        return float(np.mean(self._latency_ms)) if self._latency_ms else None
