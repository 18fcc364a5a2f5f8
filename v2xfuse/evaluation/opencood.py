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

The evaluator matches frames in batches (all frames added since the last batch, in one call of
:func:`match_frames`): IoU only for box pairs that can overlap, the greedy loop decided for every
frame and threshold at once (:mod:`v2xfuse.evaluation.matching`). ``tools/bench_eval.py`` times it
against OpenCOOD's loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import common
from .common import BatchedEvaluator, boxes_in_range, keep_rows, threshold_key
from .matching import frame_edges, greedy_match
from .result import EvalResult

__all__ = [
    "check_distance_band",
    "in_distance_band",
    "SORT_MODES",
    "DEFAULT_IOU_THRESHOLDS",
    "FrameMatch",
    "match_frame",
    "match_frames",
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
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 7)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 7)
    scores, tp = match_frames(det_boxes, np.asarray(det_scores, dtype=np.float64).reshape(-1),
                              np.array([len(det_boxes)]), gt_boxes, np.array([len(gt_boxes)]),
                              iou_thresholds, iou_type)
    return FrameMatch(scores=scores, tp=tp, num_gt=len(gt_boxes))


def match_frames(det_boxes: np.ndarray, det_scores: np.ndarray, det_counts: np.ndarray,
                 gt_boxes: np.ndarray, gt_counts: np.ndarray,
                 iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                 iou_type: str = "bev") -> tuple[np.ndarray, np.ndarray]:
    """:func:`match_frame` of many frames in one call.

    Args:
        det_boxes: (N, 7) float64, the frames' detections one frame after another;
            det_scores: (N,); det_counts: (F,) detections per frame.
        gt_boxes: (M, 7) float64, frames in the same order; gt_counts: (F,).
    Returns:
        ``scores`` (N,): each frame's scores in descending order (stable), frames in order;
        ``tp`` (T, N) bool in that order: whether the detection is a TP at threshold t.
    """
    det_counts = np.asarray(det_counts, dtype=np.int64)
    frame = np.repeat(np.arange(len(det_counts)), det_counts)
    order = np.lexsort((-det_scores, frame))  # per frame by descending score, ties in input order
    det_sorted = det_boxes[order]
    if len(iou_thresholds) == 0:
        return det_scores[order], np.zeros((0, len(order)), dtype=bool)
    det_idx, gt_idx, ious = frame_edges(det_sorted, det_counts, gt_boxes, gt_counts, (iou_type,),
                                        min(iou_thresholds), common.IOU_BLOCK_ELEMENTS)
    # detections in score order take, of the free ground truth, the best IoU, first on ties
    taken = greedy_match(det_idx, gt_idx, ious[iou_type], gt_idx, iou_thresholds, len(order))
    return det_scores[order], taken >= 0


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


class OpenCOODEvaluator(BatchedEvaluator):
    """Accumulates frames, then computes OpenCOOD-style AP at each IoU threshold.

    Example::

        ev = OpenCOODEvaluator(eval_range=[-140, -40, -3, 140, 40, 1])
        for frame in frames:
            ev.add(frame.id, det_boxes, det_scores, gt_boxes, payload_bytes=n)
        ev.compute("global")  # {0.3: ..., 0.5: ..., 0.7: ...}

    Frames are checked when added and matched in batches (of
    :data:`~v2xfuse.evaluation.common.MATCH_BATCH_BOXES` boxes, or when results are asked for),
    which keeps memory bounded and the matching vectorised.

    Args:
        iou_thresholds: IoU thresholds, default (0.3, 0.5, 0.7).
        iou_type: "bev" (OpenCOOD) or "3d".
        eval_range: [xmin, ymin, zmin, xmax, ymax, zmax] in the ego frame, or None for no filter.
            Ground truth and detections outside are dropped before matching, as OpenCOOD does
            with GT_RANGE (HEAL: ``gt_range``).
        range_rule: see :data:`v2xfuse.evaluation.common.RANGE_RULES`; OpenCOOD's is
            "all_corners_bev".
        range_name: label written into results, default "custom" with a range, "all" without.
        range_m: ``[near, far]`` metres, or None: besides ``eval_range``, keep only ground truth
            and detections whose box centre lies at a BEV distance ``d`` from the ego's origin
            with ``near <= d < far`` (``far`` may be ``inf``): ``[30, inf]`` scores long range
            alone, as ACCO reports it. Both sides are filtered, as with ``eval_range``, so a
            detection just inside the band matched to a car just outside it counts as a false
            positive (OpenCOOD's range rule has the same edge).
    """

    def __init__(self, iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS,
                 iou_type: str = "bev", eval_range: Sequence[float] | None = None,
                 range_rule: str = "all_corners_bev", range_name: str | None = None,
                 range_m: Sequence[float] | None = None) -> None:
        super().__init__()
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
        self.range_m = None if range_m is None else check_distance_band(range_m)
        if self.range_m is not None and range_name is None:
            self.range_name += f" {self.range_m[0]:g}-{self.range_m[1]:g} m"
        self._scores: list[np.ndarray] = []  # per batch: scores, each frame in its score order
        self._tp: list[np.ndarray] = []      # per batch: (T, K) TP flags in that order
        self._num_gt = 0

    def _match(self, det: np.ndarray, score: np.ndarray, det_counts: np.ndarray, gt: np.ndarray,
               gt_counts: np.ndarray) -> None:
        """Range-filter and match a batch of frames."""
        if self.eval_range is not None:
            inside = boxes_in_range(det, self.eval_range, self.range_rule)
            det_counts, (det, score) = keep_rows(inside, det_counts, det, score)
            inside = boxes_in_range(gt, self.eval_range, self.range_rule)
            gt_counts, (gt,) = keep_rows(inside, gt_counts, gt)
        if self.range_m is not None:
            det_counts, (det, score) = keep_rows(in_distance_band(det, self.range_m),
                                                 det_counts, det, score)
            gt_counts, (gt,) = keep_rows(in_distance_band(gt, self.range_m), gt_counts, gt)
        sorted_scores, tp = match_frames(det, score, det_counts, gt, gt_counts,
                                         self.iou_thresholds, self.iou_type)
        self._scores.append(sorted_scores)
        self._tp.append(tp)
        self._num_gt += len(gt)

    @property
    def num_gt(self) -> int:
        self._match_pending()
        return self._num_gt

    @property
    def num_det(self) -> int:
        self._match_pending()
        return sum(len(s) for s in self._scores)

    def compute(self, sort_mode: str = "global") -> dict[float, float]:
        """AP per IoU threshold, ``{0.3: AP, 0.5: AP, 0.7: AP}``.

        Reads the stored matches without changing them, so it may be called for both sort modes
        (OpenCOOD's local mode rewrote its stored lists in place, reference §4.3 item 4).
        """
        if sort_mode not in SORT_MODES:
            raise ValueError(f"sort_mode must be one of {SORT_MODES}, got {sort_mode!r}")
        self._match_pending()
        scores = np.concatenate(self._scores) if self._scores else np.zeros(0)
        tp = (np.concatenate(self._tp, axis=1) if self._tp
              else np.zeros((len(self.iou_thresholds), 0), dtype=bool))
        if sort_mode == "global":  # one sort for every threshold
            tp = tp[:, np.argsort(-scores, kind="stable")]
        return {thr: average_precision(tp[t], scores, self._num_gt, "local")
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
            latency_ms=self.frames.mean_latency_ms,
            extra={} if self.range_m is None else  # JSON has no inf: null is "no far limit"
            {"range_m": [self.range_m[0], self.range_m[1] if np.isfinite(self.range_m[1])
                         else None]})



def check_distance_band(range_m: Sequence[float]) -> tuple[float, float]:
    """``eval.range_m`` -> ``(near, far)``: two numbers (``far`` may be ``inf`` or the string
    "inf"), 0 <= near < far; raises ValueError naming the field otherwise."""
    try:
        near, far = (float(v) for v in range_m)
    except (TypeError, ValueError):
        raise ValueError(f"eval.range_m must be [near, far] in metres (far may be inf), "
                         f"got {range_m!r}") from None
    if not (np.isfinite(near) and 0.0 <= near < far) or np.isnan(far):
        raise ValueError(f"eval.range_m must satisfy 0 <= near < far, got {range_m!r}")
    return near, far


def in_distance_band(boxes: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """(N, 7) boxes -> (N,) bool: BEV distance of the centre from the origin in [near, far)."""
    d = np.hypot(boxes[:, 0], boxes[:, 1]) if len(boxes) else np.zeros(0)
    return (d >= band[0]) & (d < band[1])
