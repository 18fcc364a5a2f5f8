"""Pieces shared by the OpenCOOD-style and DAIR-V2X-official evaluators.

Boxes are ``(N, 7) [x, y, z, dx, dy, dz, yaw]`` (z at the box centre) in the ego / vehicle LiDAR
frame, as in :mod:`v2xfuse.structures.boxes`. Evaluation works in float64 numpy; only the
pairwise IoU goes through the rotated-IoU ops of :mod:`v2xfuse.ops`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from v2xfuse import ops
from v2xfuse.structures import BOX_DIM, box_corners

__all__ = [
    "IOU_TYPES",
    "RANGE_RULES",
    "as_boxes",
    "as_scores",
    "pairwise_iou",
    "IOU_BLOCK_ELEMENTS",
    "iou_row_blocks",
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


def as_boxes(boxes, name: str = "boxes") -> np.ndarray:
    """Checked float64 copy of a box array.

    Args:
        boxes: (N, 7) array-like (numpy, torch, nested lists); (0,) or None means no boxes.
    Returns:
        (N, 7) float64 numpy array.
    Raises:
        ValueError: wrong shape, non-finite values or negative sizes.
    """
    if boxes is None:
        return np.zeros((0, BOX_DIM))
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, BOX_DIM))
    if arr.ndim != 2 or arr.shape[1] != BOX_DIM:
        raise ValueError(f"{name} must be (N, {BOX_DIM}) [x, y, z, dx, dy, dz, yaw], "
                         f"got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds non-finite values (NaN or inf)")
    if (arr[:, 3:6] < 0).any():
        raise ValueError(f"{name} holds negative sizes dx, dy or dz")
    return arr


def as_scores(scores, num_boxes: int, name: str = "scores") -> np.ndarray:
    """Checked float64 copy of detection scores, (num_boxes,)."""
    if scores is None:
        scores = np.zeros(0)
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.shape[0] != num_boxes:
        raise ValueError(f"{name} must be ({num_boxes},), one per box, got {arr.shape[0]} values")
    if not np.isfinite(arr).all():
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
        (N, M) float64 IoU in [0, 1].
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if len(boxes_a) == 0 or len(boxes_b) == 0:
        return np.zeros((len(boxes_a), len(boxes_b)))
    a = torch.from_numpy(np.ascontiguousarray(boxes_a, dtype=np.float64))
    b = torch.from_numpy(np.ascontiguousarray(boxes_b, dtype=np.float64))
    fn = ops.boxes_iou_bev if iou_type == "bev" else ops.boxes_iou_3d
    return fn(a, b).numpy()


# IoU values a matcher holds at once (8 MiB of float64). A crowded frame's N x M matrix is never
# made whole: the matchers walk it a block of rows at a time (see iou_row_blocks).
IOU_BLOCK_ELEMENTS = 1 << 20


def iou_row_blocks(boxes_a: np.ndarray, boxes_b: np.ndarray, iou_type: str = "bev",
                   max_elements: int | None = None):
    """The rows of ``pairwise_iou(boxes_a, boxes_b)``, a block at a time.

    Args:
        boxes_a: (N, 7) float64, the rows; boxes_b: (M, 7) float64, the columns.
        max_elements: IoU values per block, default :data:`IOU_BLOCK_ELEMENTS`; a block has at
            least one row, so it holds at most ``max(max_elements, M)`` values.
    Yields:
        ``(start, block)``: ``block`` (R, M) float64 is rows ``start .. start + R`` of the full
        matrix, each value the same as the full matrix's (every pair is computed on its own).
    """
    limit = int(max_elements or IOU_BLOCK_ELEMENTS)
    rows = max(1, limit // max(len(boxes_b), 1))
    for start in range(0, len(boxes_a), rows):
        yield start, pairwise_iou(boxes_a[start:start + rows], boxes_b, iou_type)


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
            if value is not None and not (np.isfinite(value) and value >= 0):
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
