"""Crowded frames: the matchers score box pairs in bounded blocks and score exactly what a
per-detection loop over the whole IoU matrix (of the compiled op) scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from v2xfuse import ops
from v2xfuse.evaluation import DairEvaluator, OpenCOODEvaluator, common, matching
from v2xfuse.evaluation.dair import dair_match_frame
from v2xfuse.evaluation.opencood import FrameMatch


def pairwise_iou(a: np.ndarray, b: np.ndarray, iou_type: str = "bev") -> np.ndarray:
    """(N, M) IoU by the compiled op, independent of the evaluators' numpy geometry."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    fn = ops.boxes_iou_bev if iou_type == "bev" else ops.boxes_iou_3d
    return fn(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def _crowd(rng, n: int, spread: float = 12.0) -> np.ndarray:
    """n cars packed on a spread x spread patch in front of the ego (many overlap)."""
    return np.c_[rng.uniform(1, 1 + spread, n), rng.uniform(-spread / 2, spread / 2, n),
                 rng.uniform(-1.5, -0.5, n), rng.uniform(3.5, 4.5, n), rng.uniform(1.6, 2.0, n),
                 rng.uniform(1.4, 1.6, n), rng.uniform(-np.pi, np.pi, n)]


def _frames(seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = []
    for f, (n_det, n_gt) in enumerate([(150, 90), (40, 120), (0, 10), (25, 0), (200, 200)]):
        gt = _crowd(rng, n_gt)
        # detections: jittered copies of GT boxes and strays, with tied scores in places
        base = gt[rng.integers(0, max(n_gt, 1), n_det)] if n_gt else _crowd(rng, n_det)
        det = base + rng.normal(0, [0.4, 0.4, 0.1, 0.2, 0.1, 0.05, 0.1], (n_det, 7))
        det[:, 3:6] = np.abs(det[:, 3:6])
        scores = np.round(rng.uniform(0, 1, n_det), 2)
        frames.append((f"f{f}", det, scores, gt))
    return frames


def _dense_opencood_match(det_boxes, det_scores, gt_boxes, thresholds, iou_type):
    """The matching as it was written with the whole (N, M) matrix."""
    order = np.argsort(-det_scores, kind="stable")
    iou = pairwise_iou(det_boxes[order], gt_boxes, iou_type)
    tp = np.zeros((len(thresholds), len(order)), dtype=bool)
    for t, thr in enumerate(thresholds):
        free = np.ones(len(gt_boxes), dtype=bool)
        for i in range(len(order)):
            if not free.any():
                break
            masked = np.where(free, iou[i], -1.0)
            j = int(np.argmax(masked))
            if masked[j] >= thr:
                tp[t, i] = True
                free[j] = False
    return FrameMatch(scores=det_scores[order], tp=tp, num_gt=len(gt_boxes))


def _dense_dair_match(det_boxes, det_scores, gt_boxes, iou_threshold, view):
    """The official scan, literally, over the whole (M, N) matrix."""
    order = list(np.argsort(-det_scores, kind="stable"))
    iou = pairwise_iou(gt_boxes, det_boxes, view)
    tp_idx = []
    for g in range(len(gt_boxes)):
        best_iou, best = iou_threshold, None
        for k, i in enumerate(order):
            if iou[g, i] >= best_iou:
                best_iou, best = iou[g, i], k
        if best is not None:
            tp_idx.append(order.pop(best))
    idx = np.array(tp_idx + order, dtype=np.int64)
    tp = np.zeros(len(idx), dtype=bool)
    tp[:len(tp_idx)] = True
    return det_scores[idx], tp


def _per_frame(counts: np.ndarray) -> list[slice]:
    ends = np.cumsum(counts)
    return [slice(e - c, e) for c, e in zip(counts, ends)]


def _dense_match_frames(det, scores, det_counts, gt, gt_counts, thresholds, iou_type):
    """opencood.match_frames, frame by frame with the whole-matrix loop."""
    matches = [_dense_opencood_match(det[d], scores[d], gt[g], thresholds, iou_type)
               for d, g in zip(_per_frame(det_counts), _per_frame(gt_counts))]
    return (np.concatenate([m.scores for m in matches]),
            np.concatenate([m.tp for m in matches], axis=1))


def _dense_dair_match_frames(det, scores, det_counts, gt, gt_counts, thresholds, views):
    """dair.dair_match_frames, frame by frame with the official scan."""
    out = {}
    for view in views:
        out[view] = []
        for thr in thresholds:
            per_frame = [_dense_dair_match(det[d], scores[d], gt[g], thr, view)
                         for d, g in zip(_per_frame(det_counts), _per_frame(gt_counts))]
            out[view].append((np.concatenate([s for s, _ in per_frame]),
                              np.concatenate([t for _, t in per_frame])))
    return out


def _score(frames):
    oc = {iou: OpenCOODEvaluator(iou_type=iou) for iou in ("bev", "3d")}
    dair = DairEvaluator()
    for f, det, scores, gt in frames:
        for ev in oc.values():
            ev.add(f, det, scores, gt)
        dair.add(f, det, scores, gt)
    return ({(iou, order): ev.compute(order) for iou, ev in oc.items()
             for order in ("local", "global")}, dair.compute())


@pytest.fixture
def iou_calls(monkeypatch):
    """(pairs, most boxes of a frame) of each block of candidate box pairs, blocks limited to
    64 pairs."""
    sizes = []
    real = matching.candidate_pairs

    def recording(a, counts_a, b, counts_b, max_pairs):
        for ia, ib in real(a, counts_a, b, counts_b, max_pairs):
            sizes.append((len(ia), int(np.max(counts_b))))
            yield ia, ib

    monkeypatch.setattr(matching, "candidate_pairs", recording)
    monkeypatch.setattr(common, "IOU_BLOCK_ELEMENTS", 64)
    return sizes


def test_blocked_matching_scores_what_the_whole_matrix_scores(iou_calls, monkeypatch):
    frames = _frames()
    blocked_oc, blocked_dair = _score(frames)
    assert iou_calls and all(size <= max(64, cols) for size, cols in iou_calls)

    from v2xfuse.evaluation import dair, opencood
    monkeypatch.setattr(opencood, "match_frames", _dense_match_frames)
    monkeypatch.setattr(dair, "dair_match_frames", _dense_dair_match_frames)
    dense_oc, dense_dair = _score(frames)
    checked = 0
    for key, aps in dense_oc.items():
        for thr, ap in aps.items():
            assert blocked_oc[key][thr] == pytest.approx(ap, abs=1e-12), (key, thr)
            checked += 0.0 < ap < 1.0
    for view, ranges in dense_dair.items():
        for name, aps in ranges.items():
            for thr, ap in aps.items():
                assert blocked_dair[view][name][thr] == pytest.approx(ap, abs=1e-12, nan_ok=True)
                checked += 0.0 < ap < 1.0
    assert checked > 10  # the frames are crowded enough that matching decides the numbers


def test_dair_frame_matching_keeps_the_official_order_in_blocks(iou_calls):
    (_, det, scores, gt), = _frames(seed=3)[:1]
    for thr in (0.3, 0.5, 0.7):
        got_scores, got_tp = dair_match_frame(det, scores, gt, thr, "bev")
        want_scores, want_tp = _dense_dair_match(det, scores, gt, thr, "bev")
        np.testing.assert_array_equal(got_scores, want_scores)
        np.testing.assert_array_equal(got_tp, want_tp)
