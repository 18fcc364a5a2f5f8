"""DAIR-V2X official evaluation (OpenDAIRV2X ``v2x/eval.py``), reimplemented from its rules.

Every rule below is from reference/dair-v2x.md §4 ("Official evaluation"):

* Class: the "car" superclass (Car, Van, Truck, Bus merged). This module takes boxes that are
  already that class; adapters map the label types with :data:`DAIR_CAR_TYPES`.
* Ranges, in the vehicle LiDAR frame, x only (the benchmark scripts' ``--extended-range``):
  overall x in [0, 100], 0-30, 30-50, 50-100, all with y in [-39.68, 39.68] and z in [-3, 1].
  A box belongs to a range when **any of its 8 corners** lies inside the range box (GT in
  ``VICDataset``, predictions inside the model; here both, in :class:`DairEvaluator`).
  Ground-truth boxes of zero size are skipped.
* IoU thresholds 0.3 / 0.5 / 0.7; two views: "3d" (BEV polygon intersection x height overlap over
  the union volume, upright boxes) and "bev" (polygon IoU). Views are matched independently.
* Matching (``compute_type``), per frame, per threshold, per view, **ground-truth centric**:
  predictions sorted by score (stable); for each GT box in input order, the remaining prediction
  with the highest IoU >= threshold is its TP (``iou >= mx`` with mx starting at the threshold,
  so an equal IoU later in score order wins) and leaves the pool. Leftover predictions are FP.
  The frame's list is its TPs in GT order, then its FPs in score order.
* AP (``compute_ap``), all frames pooled: stable sort by score, cumulative TP, precision =
  TP / rank, recall = TP / num_gt, precision made monotone from the right, then
  ``AP = sum over i with r[i+1] != r[i] of (r[i+1] - r[i]) * p[i+1]``. The first recall step
  (0 -> r[0]) is never counted: 1 GT + 1 perfect prediction gives AP 0, 2 + 2 gives 0.5.
  No R11/R40 interpolation, no difficulty levels. No ground truth gives NaN. The official tool
  prints AP x100; this module returns fractions.

These numbers are not comparable with OpenCOOD-style AP on DAIR-V2X-C (different matching, AP
formula, range and range rule; reference §4 last paragraph).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from . import common
from .common import BatchedEvaluator, boxes_in_range, keep_rows, threshold_key
from .matching import frame_edges, greedy_match
from .result import EvalResult

__all__ = [
    "DAIR_CAR_TYPES",
    "DAIR_RANGES",
    "DAIR_IOU_THRESHOLDS",
    "DAIR_VIEWS",
    "dair_match_frame",
    "dair_match_frame_thresholds",
    "dair_match_frames",
    "dair_ap",
    "DairEvaluator",
]

DAIR_CAR_TYPES = ("car", "van", "truck", "bus")
DAIR_IOU_THRESHOLDS = (0.3, 0.5, 0.7)
DAIR_VIEWS = ("3d", "bev")
_Y, _Z = (-39.68, 39.68), (-3.0, 1.0)
DAIR_RANGES: dict[str, tuple[float, ...]] = {
    name: (x0, _Y[0], _Z[0], x1, _Y[1], _Z[1])
    for name, (x0, x1) in (("overall", (0.0, 100.0)), ("0-30", (0.0, 30.0)),
                           ("30-50", (30.0, 50.0)), ("50-100", (50.0, 100.0)))
}
_RANGE_RULE = "any_corner_3d"


def dair_match_frame(det_boxes: np.ndarray, det_scores: np.ndarray, gt_boxes: np.ndarray,
                     iou_threshold: float, view: str) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth-centric greedy matching of one frame, one threshold, one view.

    Args:
        det_boxes: (N, 7) float64; det_scores: (N,); gt_boxes: (M, 7), in GT input order.
    Returns:
        scores (N,) and tp (N,) bool in the official per-frame order: TPs in GT order, then
        FPs in score order.
    """
    return dair_match_frame_thresholds(det_boxes, det_scores, gt_boxes, (iou_threshold,), view)[0]


def dair_match_frame_thresholds(det_boxes: np.ndarray, det_scores: np.ndarray,
                                gt_boxes: np.ndarray, iou_thresholds: Sequence[float],
                                view: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`dair_match_frame` at several thresholds from one pass over the IoUs.

    Returns:
        one ``(scores (N,), tp (N,) bool)`` per threshold, in the official per-frame order.
    """
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 7)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 7)
    return dair_match_frames(det_boxes, np.asarray(det_scores, dtype=np.float64).reshape(-1),
                             np.array([len(det_boxes)]), gt_boxes, np.array([len(gt_boxes)]),
                             iou_thresholds, (view,))[view]


def dair_match_frames(det_boxes: np.ndarray, det_scores: np.ndarray, det_counts: np.ndarray,
                      gt_boxes: np.ndarray, gt_counts: np.ndarray,
                      iou_thresholds: Sequence[float], views: Sequence[str] = DAIR_VIEWS
                      ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """:func:`dair_match_frame` of many frames, thresholds and views in one call.

    Per GT box in input order, the official scan (``iou >= mx``, mx starting at the threshold,
    predictions in score order) picks the last of the remaining predictions with the highest
    IoU, if that IoU reaches the threshold: a greedy match with GT boxes proposing, ties to the
    later prediction in score order (:func:`v2xfuse.evaluation.matching.greedy_match`).

    Args:
        det_boxes: (N, 7) float64, frames one after another; det_scores: (N,);
            det_counts: (F,) predictions per frame.
        gt_boxes: (M, 7) float64, in label order within a frame; gt_counts: (F,).
        views: "3d" and/or "bev".
    Returns:
        ``{view: [(scores (N,), tp (N,) bool) per threshold]}``: per frame, in frame order, its
        TPs in GT order, then its FPs in score order.
    """
    det_counts = np.asarray(det_counts, dtype=np.int64)
    frame = np.repeat(np.arange(len(det_counts)), det_counts)
    order = np.lexsort((-det_scores, frame))  # per frame by descending score, stable
    scores = det_scores[order]
    gt_idx, pos, ious = frame_edges(gt_boxes, gt_counts, det_boxes[order], det_counts,
                                    tuple(views), min(iou_thresholds, default=1.0),
                                    common.IOU_BLOCK_ELEMENTS)
    out = {}
    for view in views:
        taken = greedy_match(gt_idx, pos, ious[view], -pos, iou_thresholds, len(gt_boxes))
        out[view] = []
        for t in range(len(iou_thresholds)):
            tp_pos = taken[t][taken[t] >= 0]  # in GT order
            left = np.ones(len(order), dtype=bool)
            left[tp_pos] = False
            fp_pos = np.flatnonzero(left)
            idx = np.concatenate([tp_pos, fp_pos])
            is_tp = np.arange(len(idx)) < len(tp_pos)
            # frame by frame: its TPs (already in GT order), then its FPs (in score order)
            regroup = np.lexsort((~is_tp, frame[idx]))  # frame is sorted, so frame[pos] is pos's
            out[view].append((scores[idx[regroup]], is_tp[regroup]))
    return out


def dair_ap(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> float:
    """Official AP of predictions pooled over frames (see the module docstring).

    Args:
        scores: (K,) prediction scores, frames concatenated in order.
        tp: (K,) bool, same order.
        num_gt: ground-truth boxes over all frames.
    Returns:
        AP in [0, 1]; NaN when num_gt is 0; 0 without predictions.
    """
    if num_gt == 0:
        return math.nan
    if len(scores) == 0:
        return 0.0
    tp = tp[np.argsort(-scores, kind="stable")]
    num_tp = np.cumsum(tp, dtype=np.float64)
    precision = num_tp / np.arange(1, len(tp) + 1)
    recall = num_tp / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


class DairEvaluator(BatchedEvaluator):
    """Accumulates frames and computes DAIR-V2X official AP-3D and AP-BEV per range.

    ``add(frame_id, det_boxes, det_scores, gt_boxes, payload_bytes=None, latency_ms=None)``
    takes "car" boxes (N, 7) in the vehicle LiDAR frame, ground truth in label-file order (which
    decides the matching), and the bytes sent for the frame (DAIR's AB metric) if measured; see
    :class:`~v2xfuse.evaluation.common.BatchedEvaluator`.

    Args:
        ranges: {name: [xmin, ymin, zmin, xmax, ymax, zmax]} in the vehicle LiDAR frame,
            default :data:`DAIR_RANGES` (overall, 0-30, 30-50, 50-100).
        iou_thresholds: default (0.3, 0.5, 0.7), the "car" thresholds.
        filter_predictions: drop predictions outside each range by the same any-corner rule (the
            official models do this before the evaluator sees them).
    """

    def __init__(self, ranges: Mapping[str, Sequence[float]] | None = None,
                 iou_thresholds: Sequence[float] = DAIR_IOU_THRESHOLDS,
                 filter_predictions: bool = True) -> None:
        super().__init__()
        self.ranges = {k: [float(v) for v in b] for k, b in (ranges or DAIR_RANGES).items()}
        for bounds in self.ranges.values():
            boxes_in_range(np.zeros((0, 7)), bounds, _RANGE_RULE)  # validate now
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self.filter_predictions = filter_predictions
        # (view, range, threshold) -> (scores, tp) per batch of frames, frames in order
        self._pool: dict[tuple[str, str, float], list[tuple[np.ndarray, np.ndarray]]] = {
            (v, r, t): [] for v in DAIR_VIEWS for r in self.ranges for t in self.iou_thresholds}
        self._num_gt = {r: 0 for r in self.ranges}
        self._num_det = {r: 0 for r in self.ranges}

    def _match(self, det: np.ndarray, score: np.ndarray, det_counts: np.ndarray, gt: np.ndarray,
               gt_counts: np.ndarray) -> None:
        # zero-size label boxes are skipped
        gt_counts, (gt,) = keep_rows((gt[:, 3:6] > 0).all(axis=1), gt_counts, gt)
        for name, bounds in self.ranges.items():
            counts_r, (gt_r,) = keep_rows(boxes_in_range(gt, bounds, _RANGE_RULE), gt_counts, gt)
            if self.filter_predictions:
                inside = boxes_in_range(det, bounds, _RANGE_RULE)
                det_counts_r, (det_r, scores_r) = keep_rows(inside, det_counts, det, score)
            else:
                det_counts_r, det_r, scores_r = det_counts, det, score
            self._num_gt[name] += len(gt_r)
            self._num_det[name] += len(det_r)
            matches = dair_match_frames(det_r, scores_r, det_counts_r, gt_r, counts_r,
                                        self.iou_thresholds, DAIR_VIEWS)
            for view, per_threshold in matches.items():
                for thr, match in zip(self.iou_thresholds, per_threshold):
                    self._pool[view, name, thr].append(match)

    def compute(self) -> dict[str, dict[str, dict[float, float]]]:
        """``{view: {range_name: {threshold: AP}}}``, views "3d" and "bev"."""
        self._match_pending()
        out: dict[str, dict[str, dict[float, float]]] = {}
        for view in DAIR_VIEWS:
            out[view] = {}
            for name in self.ranges:
                out[view][name] = {}
                for thr in self.iou_thresholds:
                    pool = self._pool[view, name, thr]
                    scores = np.concatenate([s for s, _ in pool]) if pool else np.zeros(0)
                    tp = np.concatenate([t for _, t in pool]) if pool else np.zeros(0, bool)
                    out[view][name][thr] = dair_ap(scores, tp, self._num_gt[name])
        return out

    def results(self, dataset: str = "", split: str = "", method: str = "") -> list[EvalResult]:
        """One :class:`EvalResult` per view and range."""
        table = self.compute()
        return [
            EvalResult(dataset=dataset, split=split, method=method, protocol="dair",
                       sort_mode="dair", iou_type=view, range_name=name,
                       range=self.ranges[name], range_rule=_RANGE_RULE,
                       ap={threshold_key(t): v for t, v in table[view][name].items()},
                       num_frames=len(self.frames), num_gt=self._num_gt[name],
                       num_det=self._num_det[name], bytes_per_frame=self.frames.mean_bytes,
                       latency_ms=self.frames.mean_latency_ms)
            for view in DAIR_VIEWS for name in self.ranges
        ]

