"""OpenCOOD / HEAL style AP: greedy score-ordered matching and VOC all-point AP.

The protocol, as OpenCOOD's ``eval_utils`` runs it (reference/opencood-opv2v.md §4.2-4.3):

1. Per frame, detections are sorted by descending score; each in turn takes the unmatched
   ground-truth box of highest IoU, a true positive when that IoU is >= the threshold (``< thr``
   is a false positive), a false positive when no ground truth is left. One-to-one, greedy.
   IoU is the rotated BEV polygon IoU (z ignored); ``iou_type="3d"`` is offered as an option.
2. Every ground-truth box counts in the recall denominator, also in frames without detections.
3. The per-frame TP/FP flags are then ordered in one of two ways before the cumulative sums:
   ``local``  the concatenation as is: frames in the order they were added, each frame's
              detections in its own score order (OpenCOOD default; not a true PR-curve order);
   ``global`` all detections re-sorted by score across the dataset (HEAL, CoAlign, OpenCOOD
              with ``--global_sort_detections``). The reference default, since local sorting
              moves AP in either direction depending on frame order.
4. VOC 2010 all-point AP: recall and precision prefixed with (0, 0) and suffixed with (1, 0), the
   precision envelope (running maximum from the right), then the area under the recall steps.

Deviations from OpenCOOD, both on ties only: detections of equal score keep their input order
(stable sort) where OpenCOOD's ``np.argsort(-score)`` leaves the order unspecified, and a detection
whose IoU ties two ground-truth boxes takes the first in input order (as ``np.argmax``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .common import FrameLog, as_boxes, as_scores, boxes_in_range, iou_row_blocks, threshold_key
from .result import EvalResult

__all__ = [
    "SORT_MODES",
    "DEFAULT_IOU_THRESHOLDS",
    "FrameMatch",
    "match_frame",
    "voc_ap",
    "average_precision",
    "OpenCOODEvaluator",
]

SORT_MODES = ("local", "global")
DEFAULT_IOU_THRESHOLDS = (0.3, 0.5, 0.7)


@dataclass
class FrameMatch:
    """Outcome of matching one frame.

    Attributes:
        scores: (N,) detection scores, descending.
        tp: (T, N) bool, ``tp[t, i]`` whether detection i (score order) is a true positive at
            threshold t; its complement is the false-positive flag.
        num_gt: ground-truth boxes in the frame.
    """

    scores: np.ndarray
    tp: np.ndarray
    num_gt: int


def match_frame(det_boxes: np.ndarray, det_scores: np.ndarray, gt_boxes: np.ndarray,
                iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                iou_type: str = "bev") -> FrameMatch:
    """Greedy score-ordered matching of one frame at several IoU thresholds.

    Args:
        det_boxes: (N, 7) float64 [x, y, z, dx, dy, dz, yaw].
        det_scores: (N,) float64.
        gt_boxes: (M, 7) float64.
        iou_thresholds: a detection is a TP at ``thr`` when its best remaining IoU is >= thr.
        iou_type: "bev" or "3d".
    """
    order = np.argsort(-det_scores, kind="stable")
    tp = np.zeros((len(iou_thresholds), len(order)), dtype=bool)
    free = np.ones((len(iou_thresholds), len(gt_boxes)), dtype=bool)
    num_free = [len(gt_boxes)] * len(iou_thresholds)
    # The (N, M) IoU matrix a block of detections at a time (memory bounded on crowded frames).
    for start, block in iou_row_blocks(det_boxes[order], gt_boxes, iou_type):
        if not any(num_free):
            break  # the rest are false positives at every threshold
        for r, row in enumerate(block):
            for t, thr in enumerate(iou_thresholds):
                if not num_free[t]:
                    continue
                masked = np.where(free[t], row, -1.0)
                j = int(np.argmax(masked))
                if masked[j] >= thr:
                    tp[t, start + r] = True
                    free[t, j] = False
                    num_free[t] -= 1
    return FrameMatch(scores=det_scores[order], tp=tp, num_gt=len(gt_boxes))


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2010 all-point AP: area under the precision envelope.

    Args:
        recall: (K,) cumulative recall in ranking order.
        precision: (K,) cumulative precision in the same order.
    """
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[steps] - mrec[steps - 1]) * mpre[steps]))


def average_precision(tp: np.ndarray, scores: np.ndarray, num_gt: int, sort_mode: str) -> float:
    """AP of detections pooled over frames.

    Args:
        tp: (K,) bool TP flags, concatenated frame by frame, each frame in its score order.
        scores: (K,) scores in the same order.
        num_gt: ground-truth boxes over all frames.
        sort_mode: "local" (keep the concatenation order) or "global" (re-sort by score).
    Returns:
        AP in [0, 1]; 0 without detections; NaN without ground truth (recall is undefined).
    """
    if sort_mode not in SORT_MODES:
        raise ValueError(f"sort_mode must be one of {SORT_MODES}, got {sort_mode!r}")
    if num_gt == 0:
        return math.nan
    if sort_mode == "global":
        tp = tp[np.argsort(-scores, kind="stable")]
    cum_tp = np.cumsum(tp, dtype=np.float64)
    cum_fp = np.cumsum(~tp, dtype=np.float64)
    return voc_ap(cum_tp / num_gt, cum_tp / np.maximum(cum_tp + cum_fp, 1.0))


class OpenCOODEvaluator:
    """Accumulates frames, then computes OpenCOOD-style AP at each IoU threshold.

    Example::

        ev = OpenCOODEvaluator(eval_range=[-140, -40, -3, 140, 40, 1])
        for frame in frames:
            ev.add(frame.id, det_boxes, det_scores, gt_boxes, payload_bytes=n)
        ev.compute("global")  # {0.3: ..., 0.5: ..., 0.7: ...}

    Args:
        iou_thresholds: IoU thresholds, default (0.3, 0.5, 0.7).
        iou_type: "bev" (OpenCOOD) or "3d".
        eval_range: [xmin, ymin, zmin, xmax, ymax, zmax] in the ego frame, or None for no filter.
            Ground truth and detections outside are dropped before matching, as OpenCOOD does
            with GT_RANGE (HEAL: ``gt_range``).
        range_rule: see :data:`v2xfuse.evaluation.common.RANGE_RULES`; OpenCOOD's is
            "all_corners_bev".
        range_name: label written into results, default "custom" with a range, "all" without.
    """

    def __init__(self, iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                 iou_type: str = "bev", eval_range: Sequence[float] | None = None,
                 range_rule: str = "all_corners_bev", range_name: str | None = None) -> None:
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
        if not all(0.0 < t <= 1.0 for t in self.iou_thresholds):
            raise ValueError(f"IoU thresholds must lie in (0, 1], got {self.iou_thresholds}")
        if iou_type not in ("bev", "3d"):
            raise ValueError(f"iou_type must be 'bev' or '3d', got {iou_type!r}")
        self.iou_type = iou_type
        self.eval_range = None if eval_range is None else [float(v) for v in eval_range]
        self.range_rule = range_rule
        if self.eval_range is not None:  # validates bounds and rule now, not at the first add
            boxes_in_range(np.zeros((0, 7)), self.eval_range, range_rule)
        self.range_name = range_name or ("all" if eval_range is None else "custom")
        self.frames = FrameLog()
        self._matches: list[FrameMatch] = []

    def add(self, frame_id, det_boxes, det_scores, gt_boxes, payload_bytes: float | None = None,
            latency_ms: float | None = None) -> None:
        """Match one frame.

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
        if self.eval_range is not None:
            keep = boxes_in_range(det, self.eval_range, self.range_rule)
            det, scores = det[keep], scores[keep]
            gt = gt[boxes_in_range(gt, self.eval_range, self.range_rule)]
        self._matches.append(match_frame(det, scores, gt, self.iou_thresholds, self.iou_type))

    @property
    def num_gt(self) -> int:
        return sum(m.num_gt for m in self._matches)

    @property
    def num_det(self) -> int:
        return sum(len(m.scores) for m in self._matches)

    def compute(self, sort_mode: str = "global") -> dict[float, float]:
        """AP per IoU threshold, ``{0.3: AP, 0.5: AP, 0.7: AP}``.

        Reads the stored matches without changing them, so it may be called for both sort modes
        (OpenCOOD's local mode rewrote its stored lists in place, reference §4.3 item 4).
        """
        if self._matches:
            scores = np.concatenate([m.scores for m in self._matches])
            tp = np.concatenate([m.tp for m in self._matches], axis=1)
        else:
            scores = np.zeros(0)
            tp = np.zeros((len(self.iou_thresholds), 0), dtype=bool)
        return {thr: average_precision(tp[t], scores, self.num_gt, sort_mode)
                for t, thr in enumerate(self.iou_thresholds)}

    def result(self, sort_mode: str = "global", dataset: str = "", split: str = "",
               method: str = "") -> EvalResult:
        """The :class:`EvalResult` record for one sort mode."""
        ap = self.compute(sort_mode)
        return EvalResult(
            dataset=dataset, split=split, method=method, protocol="opencood",
            sort_mode=sort_mode, iou_type=self.iou_type, range_name=self.range_name,
            range=self.eval_range, range_rule=None if self.eval_range is None else self.range_rule,
            ap={threshold_key(t): v for t, v in ap.items()}, num_frames=len(self.frames),
            num_gt=self.num_gt, num_det=self.num_det, bytes_per_frame=self.frames.mean_bytes,
            latency_ms=self.frames.mean_latency_ms)
