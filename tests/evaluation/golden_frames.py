"""Deterministic evaluation cases whose AP the evaluators must keep: the numbers in
``golden_ap.json`` were written by the per-detection matching loop that the vectorised matching
replaced (commit 7f79d38), so a change in any AP value is a change of results, not of speed."""
from __future__ import annotations

import math

import numpy as np

IOU_TYPES = ("bev", "3d")
SORT_MODES = ("local", "global")
RANGES = {"all": (None, "all_corners_bev"),
          "50x20_corners": ((-50.0, -20.0, -3.0, 50.0, 20.0, 1.0), "all_corners_bev"),
          "50x20_centre": ((-50.0, -20.0, -3.0, 50.0, 20.0, 1.0), "centre_bev"),
          "50x20_any3d": ((-50.0, -20.0, -3.0, 50.0, 20.0, 1.0), "any_corner_3d")}


def _cars(rng, n: int, xy_lo, xy_hi) -> np.ndarray:
    """n car-sized boxes (N, 7) with centres uniform in [xy_lo, xy_hi]."""
    return np.c_[rng.uniform(xy_lo[0], xy_hi[0], n), rng.uniform(xy_lo[1], xy_hi[1], n),
                 rng.uniform(-1.8, -0.6, n), rng.uniform(3.6, 5.0, n), rng.uniform(1.6, 2.1, n),
                 rng.uniform(1.4, 1.9, n), rng.uniform(-math.pi, math.pi, n)]


def golden_frames(seed: int = 7) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """[(frame_id, det_boxes (N, 7), det_scores (N,), gt_boxes (M, 7))], 48 frames.

    Street frames (cars over +-70 m x +-30 m, some crossing the 50 x 20 m range), crowded
    frames (cars packed on a 12 m patch, many overlaps), frames without ground truth, frames
    without detections, empty frames; detections are jittered copies of ground truth (some turned
    by pi, some duplicated) plus strays; scores rounded to 0.05 so that ties are common.
    """
    rng = np.random.default_rng(seed)
    frames = []
    for f in range(48):
        kind = f % 6
        if kind == 4:
            gt = _cars(rng, int(rng.integers(20, 60)), (1, -6), (13, 6))
        elif kind == 5 and f % 12 == 5:
            gt = np.zeros((0, 7))
        else:
            gt = _cars(rng, int(rng.integers(0, 25)), (-70, -30), (70, 30))
        hit = rng.random(len(gt)) < 0.85
        det = gt[hit].copy()
        det[:, 0:2] += rng.normal(0, 0.35, (len(det), 2))
        det[:, 2] += rng.normal(0, 0.15, len(det))
        det[:, 3:6] *= rng.normal(1, 0.06, (len(det), 3))
        det[:, 6] += rng.normal(0, 0.06, len(det)) + math.pi * (rng.random(len(det)) < 0.1)
        dup = det[rng.random(len(det)) < 0.15].copy()
        dup[:, 0:2] += rng.normal(0, 0.6, (len(dup), 2))
        stray = _cars(rng, int(rng.poisson(3)), (-70, -30), (70, 30))
        det = np.concatenate([det, dup, stray])
        scores = np.round(rng.uniform(0.05, 1.0, len(det)) / 0.05) * 0.05
        if kind == 3 and f % 12 == 3:
            det, scores = np.zeros((0, 7)), np.zeros(0)
        if f == 47:
            det, scores, gt = np.zeros((0, 7)), np.zeros(0), np.zeros((0, 7))
        frames.append((f"g{f:03d}", det, scores, gt))
    return frames


def opencood_aps(make_evaluator, frames) -> dict[str, float]:
    """``{"iou/range/order/threshold": AP}`` for every IoU type, range and sort mode."""
    out = {}
    for iou in IOU_TYPES:
        for name, (bounds, rule) in RANGES.items():
            ev = make_evaluator(iou_type=iou, eval_range=bounds, range_rule=rule)
            for fid, det, scores, gt in frames:
                ev.add(fid, det, scores, gt)
            for order in SORT_MODES:
                for thr, ap in ev.compute(order).items():
                    out[f"{iou}/{name}/{order}/{thr:g}"] = ap
    return out


def dair_aps(evaluator, frames) -> dict[str, float]:
    """``{"view/range/threshold": AP}`` of a DairEvaluator over the frames."""
    for fid, det, scores, gt in frames:
        evaluator.add(fid, det, scores, gt)
    return {f"{view}/{name}/{thr:g}": ap for view, ranges in evaluator.compute().items()
            for name, aps in ranges.items() for thr, ap in aps.items()}
