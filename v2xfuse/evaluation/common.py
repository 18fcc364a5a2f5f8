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
    "BatchedEvaluator",
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
        self._chunks: list[tuple[np.ndarray, ...]] = []
        self.num_boxes = 0

    def add(self, det: np.ndarray, scores: np.ndarray, gt: np.ndarray) -> bool:
        """Queue a frame; True when the queue holds :data:`MATCH_BATCH_BOXES` boxes or more."""
        return self.add_frames(det, scores, np.array([len(det)]), gt, np.array([len(gt)]))

    def add_frames(self, det: np.ndarray, scores: np.ndarray, det_counts: np.ndarray,
                   gt: np.ndarray, gt_counts: np.ndarray) -> bool:
        """Queue frames stored one after another (see :meth:`take`); True as :meth:`add`."""
        self._chunks.append((det, scores, det_counts, gt, gt_counts))
        self.num_boxes += len(det) + len(gt)
        return self.num_boxes >= MATCH_BATCH_BOXES

    def __len__(self) -> int:
        return len(self._chunks)

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Empty the queue: ``det (N, 7), scores (N,), det_counts (F,), gt (M, 7),
        gt_counts (F,)``, frames one after another."""
        chunks, self._chunks, self.num_boxes = self._chunks, [], 0
        if len(chunks) == 1:
            return chunks[0]
        return tuple(np.concatenate(part) for part in zip(*chunks))


class BatchedEvaluator:
    """What the evaluators share: frames are checked when added and matched in batches, by
    the subclass's ``_match(det, scores, det_counts, gt, gt_counts)`` (arrays as
    :meth:`PendingFrames.take` gives them), when the queue is full or results are asked for.
    """

    def __init__(self) -> None:
        self.frames = FrameLog()
        self._pending = PendingFrames()

    def add(self, frame_id, det_boxes, det_scores, gt_boxes, payload_bytes: float | None = None,
            latency_ms: float | None = None) -> None:
        """Add one frame (checked now, matched with the next batch).

        Args:
            frame_id: any hashable id, unique over the evaluation.
            det_boxes: (N, 7) detections in the ego frame (numpy, torch or lists).
            det_scores: (N,) detection scores.
            gt_boxes: (M, 7) ground truth in the ego frame.
            payload_bytes: bytes the non-ego agents sent for this frame, if measured.
            latency_ms: this frame's latency, if measured.
        """
        det = as_boxes(det_boxes, f"frame {frame_id!r}: det_boxes")
        scores = as_scores(det_scores, len(det), f"frame {frame_id!r}: det_scores")
        gt = as_boxes(gt_boxes, f"frame {frame_id!r}: gt_boxes")
        self.frames.add(frame_id, payload_bytes, latency_ms)
        if self._pending.add(det, scores, gt):
            self._match_pending()

    def add_frames(self, frame_ids: Sequence, det_boxes, det_scores, det_counts, gt_boxes,
                   gt_counts, payload_bytes: Sequence | None = None,
                   latency_ms: Sequence | None = None) -> None:
        """Add many frames at once, as :meth:`add` for each but checked array-wise.

        Args:
            frame_ids: (F,) ids.
            det_boxes: (N, 7) the frames' detections, one frame after another;
                det_scores: (N,); det_counts: (F,) detections per frame.
            gt_boxes: (M, 7) likewise; gt_counts: (F,).
            payload_bytes, latency_ms: (F,) values or None each, or None for all.
        Raises:
            ValueError: as :meth:`add` would for the first bad frame (the frames before it are
                added, as a loop of :meth:`add` would).
        """
        det_counts = np.asarray(det_counts, dtype=np.int64).reshape(-1)
        gt_counts = np.asarray(gt_counts, dtype=np.int64).reshape(-1)
        num = len(frame_ids)
        payload_bytes = [None] * num if payload_bytes is None else list(payload_bytes)
        latency_ms = [None] * num if latency_ms is None else list(latency_ms)
        try:
            if not (len(det_counts) == len(gt_counts) == len(payload_bytes) == len(latency_ms)
                    == num) or (det_counts < 0).any() or (gt_counts < 0).any():
                raise ValueError("frames and counts disagree")
            det = as_boxes(det_boxes)
            scores = as_scores(det_scores, len(det))
            gt = as_boxes(gt_boxes)
            if det_counts.sum() != len(det) or gt_counts.sum() != len(gt):
                raise ValueError("frames and counts disagree")
            if not self.frames.can_add(frame_ids, payload_bytes, latency_ms):
                raise ValueError("a frame id or value to report")
        except ValueError:
            self._add_one_by_one(frame_ids, det_boxes, det_scores, det_counts, gt_boxes,
                                 gt_counts, payload_bytes, latency_ms)
            return
        for fid, nbytes, ms in zip(frame_ids, payload_bytes, latency_ms):
            self.frames.add(fid, nbytes, ms)
        if self._pending.add_frames(det, scores, det_counts, gt, gt_counts):
            self._match_pending()

    def _add_one_by_one(self, frame_ids, det_boxes, det_scores, det_counts, gt_boxes, gt_counts,
                        payload_bytes, latency_ms) -> None:
        """:meth:`add_frames` by :meth:`add`, which names the first bad frame."""
        if not len(det_counts) == len(gt_counts) == len(payload_bytes) == len(latency_ms) \
                == len(frame_ids):
            raise ValueError(f"add_frames: {len(frame_ids)} frame ids, {len(det_counts)} "
                             f"detection counts, {len(gt_counts)} ground-truth counts, "
                             f"{len(payload_bytes)} payload_bytes, {len(latency_ms)} latency_ms")
        det_end, gt_end = np.cumsum(det_counts), np.cumsum(gt_counts)
        if (det_counts < 0).any() or (gt_counts < 0).any() or det_end[-1:].sum() != \
                len(det_boxes) or gt_end[-1:].sum() != len(gt_boxes):
            raise ValueError(f"add_frames: counts must be >= 0 and add up to the boxes given "
                             f"({len(det_boxes)} detections, {len(gt_boxes)} ground truth)")
        for k, fid in enumerate(frame_ids):
            d = slice(det_end[k] - det_counts[k], det_end[k])
            g = slice(gt_end[k] - gt_counts[k], gt_end[k])
            self.add(fid, det_boxes[d], det_scores[d], gt_boxes[g], payload_bytes[k],
                     latency_ms[k])

    def _match_pending(self) -> None:
        if self._pending:
            self._match(*self._pending.take())

    def _match(self, det: np.ndarray, scores: np.ndarray, det_counts: np.ndarray, gt: np.ndarray,
               gt_counts: np.ndarray) -> None:
        raise NotImplementedError


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

    def can_add(self, frame_ids: Sequence, payload_bytes: Sequence, latency_ms: Sequence) -> bool:
        """Whether :meth:`add` would take each of these frames in turn (no id seen before or
        repeated, every value None or a finite number >= 0)."""
        ids = set(frame_ids)
        if len(ids) != len(frame_ids) or not ids.isdisjoint(self._seen):
            return False
        for values in (payload_bytes, latency_ms):
            given = [v for v in values if v is not None]
            if given and not all(type(v) in (int, float) for v in given):
                return False  # add() tells which
            arr = np.array(given, dtype=np.float64)
            if not (np.isfinite(arr).all() and (arr >= 0).all()):
                return False
        return True

    def __len__(self) -> int:
        return len(self.frame_ids)

    @property
    def mean_bytes(self) -> float | None:
        """Mean payload bytes over the frames that reported it, None if none did."""
        return float(np.mean(self._bytes)) if self._bytes else None

    @property
    def mean_latency_ms(self) -> float | None:
        return float(np.mean(self._latency_ms)) if self._latency_ms else None
