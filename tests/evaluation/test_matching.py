"""The vectorised matching decides what a straightforward loop decides: random frames with tied
scores, tied IoUs, empty frames, frames without ground truth or without detections."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from v2xfuse import ops
from v2xfuse.evaluation import DairEvaluator, OpenCOODEvaluator, average_precision, common
from v2xfuse.evaluation.dair import dair_match_frames
from v2xfuse.evaluation.geometry import PreparedBoxes, reach_overlaps
from v2xfuse.evaluation.matching import candidate_pairs, greedy_match
from v2xfuse.evaluation.opencood import match_frames


def _loop_greedy(iou: np.ndarray, tie: np.ndarray, thr: float) -> np.ndarray:
    """Proposers (rows) in order each take the free item of highest IoU >= thr, lowest tie key
    among equals: the loop, one proposer and one item at a time."""
    free = np.ones(iou.shape[1], dtype=bool)
    out = np.full(iou.shape[0], -1)
    for p in range(iou.shape[0]):
        best = None
        for i in range(iou.shape[1]):
            if free[i] and iou[p, i] >= thr and (best is None or (-iou[p, i], tie[p, i]) <
                                                  (-iou[p, best], tie[p, best])):
                best = i
        if best is not None:
            out[p], free[best] = best, False
    return out


@pytest.mark.parametrize("seed", range(4))
def test_greedy_match_is_the_loop_on_tie_heavy_frames(seed):
    rng = np.random.default_rng(seed)
    thresholds = (0.25, 0.5, 0.75, 1.0)
    proposers, items, ious, ties, wants, starts = [], [], [], [], [], []
    start_p = start_i = 0
    for _ in range(60):  # frames, some empty on one side or both
        n_p, n_i = (int(v) for v in rng.integers(0, 9, 2))
        iou = np.round(rng.uniform(0, 1, (n_p, n_i)) * 4) / 4 * (rng.random((n_p, n_i)) < 0.6)
        tie = np.tile(np.arange(n_i), (n_p, 1)) * rng.choice([-1, 1])
        wants.append([_loop_greedy(iou, tie, t) for t in thresholds])
        p, i = np.nonzero(iou > 0)
        proposers.append(p + start_p)
        items.append(i + start_i)
        ious.append(iou[p, i])
        ties.append(tie[p, i])
        starts.append((start_p, start_i, n_p))
        start_p, start_i = start_p + n_p, start_i + n_i
    got = greedy_match(np.concatenate(proposers), np.concatenate(items), np.concatenate(ious),
                       np.concatenate(ties), thresholds, start_p)
    assert got.shape == (len(thresholds), start_p)
    for (first_p, first_i, n_p), want in zip(starts, wants):
        for t in range(len(thresholds)):
            local = got[t, first_p:first_p + n_p]
            np.testing.assert_array_equal(np.where(local >= 0, local - first_i, -1), want[t])


def _random_frames(seed: int, n_frames: int = 40):
    """[(det (N, 7), scores (N,), gt (M, 7))]: jittered copies of GT, duplicates, strays, scores
    rounded to 0.1 (ties), frames without GT, without detections, or empty."""
    rng = np.random.default_rng(seed)
    frames = []
    for f in range(n_frames):
        m = int(rng.integers(0, 12)) if f % 7 else 0
        gt = np.c_[rng.uniform(-20, 20, (m, 2)), rng.uniform(-1, 0, m), rng.uniform(3.5, 5, m),
                   rng.uniform(1.6, 2, m), rng.uniform(1.4, 1.8, m), rng.uniform(-3, 3, m)]
        det = np.concatenate([gt, gt[: m // 2]]) if m else np.zeros((0, 7))
        det = det + rng.normal(0, [0.4, 0.4, 0.1, 0.2, 0.1, 0.1, 0.1], det.shape)
        det[:, 3:6] = np.abs(det[:, 3:6])
        stray = np.c_[rng.uniform(-20, 20, (3, 2)), np.zeros(3), np.full((3, 3), 2.0),
                      np.zeros(3)]
        det = np.concatenate([det, stray[: int(rng.integers(0, 4))]])
        if f % 11 == 5:
            det = np.zeros((0, 7))
        if f % 13 == 6:  # exact copies: IoU 1 with two GT boxes at once, ties everywhere
            det = np.concatenate([det, gt, gt]) if m else det
        frames.append((det, np.round(rng.uniform(0, 1, len(det)), 1), gt))
    return frames


def _op_iou(a, b, iou_type):
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    fn = ops.boxes_iou_bev if iou_type == "bev" else ops.boxes_iou_3d
    return fn(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def _loop_opencood(det, scores, gt, thresholds, iou_type):
    """OpenCOOD's matching, one detection at a time, with the compiled op's IoU."""
    order = np.argsort(-scores, kind="stable")
    iou = _op_iou(det[order], gt, iou_type)
    tp = np.zeros((len(thresholds), len(order)), dtype=bool)
    for t, thr in enumerate(thresholds):
        free = list(range(len(gt)))
        for i in range(len(order)):
            if not free:
                break
            j = max(free, key=lambda g: (iou[i, g], -g))  # best IoU, first GT on ties
            if iou[i, j] >= thr:
                tp[t, i] = True
                free.remove(j)
    return scores[order], tp


def _concat(frames):
    return (np.concatenate([d for d, _, _ in frames]), np.concatenate([s for _, s, _ in frames]),
            np.array([len(d) for d, _, _ in frames]), np.concatenate([g for _, _, g in frames]),
            np.array([len(g) for _, _, g in frames]))


@pytest.mark.parametrize("iou_type", ["bev", "3d"])
@pytest.mark.parametrize("seed", range(3))
def test_opencood_batch_matching_is_the_loop(seed, iou_type, monkeypatch):
    monkeypatch.setattr(common, "IOU_BLOCK_ELEMENTS", 50)  # many blocks
    frames = _random_frames(seed)
    thresholds = (0.3, 0.5, 0.7)
    scores, tp = match_frames(*_concat(frames), thresholds, iou_type)
    loop = [_loop_opencood(d, s, g, thresholds, iou_type) for d, s, g in frames]
    np.testing.assert_array_equal(scores, np.concatenate([s for s, _ in loop]))
    np.testing.assert_array_equal(tp, np.concatenate([t for _, t in loop], axis=1))
    assert 0 < tp.mean() < 1
    num_gt = sum(len(g) for _, _, g in frames)
    ev = OpenCOODEvaluator(iou_type=iou_type)
    for f, (d, s, g) in enumerate(frames):
        ev.add(f, d, s, g)
    for order in ("local", "global"):
        want = {thr: average_precision(np.concatenate([t[k] for _, t in loop]),
                                       np.concatenate([s for s, _ in loop]), num_gt, order)
                for k, thr in enumerate(thresholds)}
        assert ev.compute(order) == want


def _loop_dair(det, scores, gt, thr, view):
    """The official scan: GT in order, each taking the last remaining prediction (score order)
    whose IoU is >= the best so far, starting from the threshold."""
    order = list(np.argsort(-scores, kind="stable"))
    iou = _op_iou(gt, det, view)
    tp_idx = []
    for g in range(len(gt)):
        best_iou, best = thr, None
        for k, i in enumerate(order):
            if iou[g, i] >= best_iou:
                best_iou, best = iou[g, i], k
        if best is not None:
            tp_idx.append(order.pop(best))
    idx = np.array(tp_idx + order, dtype=np.int64)
    return scores[idx], np.arange(len(idx)) < len(tp_idx)


@pytest.mark.parametrize("seed", range(3))
def test_dair_batch_matching_is_the_official_scan(seed, monkeypatch):
    monkeypatch.setattr(common, "IOU_BLOCK_ELEMENTS", 50)
    frames = _random_frames(seed + 10)
    thresholds = (0.3, 0.5, 0.7)
    got = dair_match_frames(*_concat(frames), thresholds, ("3d", "bev"))
    for view in ("3d", "bev"):
        for t, thr in enumerate(thresholds):
            loop = [_loop_dair(d, s, g, thr, view) for d, s, g in frames]
            np.testing.assert_array_equal(got[view][t][0], np.concatenate([s for s, _ in loop]))
            np.testing.assert_array_equal(got[view][t][1], np.concatenate([p for _, p in loop]))


def test_results_do_not_depend_on_the_batch_size(monkeypatch):
    frames = _random_frames(7, n_frames=30)

    def run():
        oc, dair = OpenCOODEvaluator(eval_range=[-15, -15, -3, 15, 15, 1]), DairEvaluator()
        for f, (d, s, g) in enumerate(frames):
            d = d + [20, 0, 0, 0, 0, 0, 0]  # in front of the car, where DAIR's ranges are
            g = g + [20, 0, 0, 0, 0, 0, 0]
            oc.add(f, d, s, g)
            dair.add(f, d, s, g)
        batches = len(oc._tp)
        return ({o: oc.compute(o) for o in ("local", "global")}, oc.num_gt, oc.num_det,
                dair.compute(), [r.num_det for r in dair.results()]), batches

    whole, batches = run()
    assert batches == 0  # all matched when asked for the results
    monkeypatch.setattr(common, "MATCH_BATCH_BOXES", 25)
    batched, batches = run()
    assert batches >= 10
    assert repr(batched) == repr(whole)  # NaN-safe equality


def test_candidate_pairs_hold_every_pair_that_can_overlap():
    rng = np.random.default_rng(5)
    counts_a, counts_b = rng.integers(0, 30, 50), rng.integers(0, 30, 50)
    a = np.c_[rng.uniform(-60, 60, (counts_a.sum(), 2)), np.zeros(counts_a.sum()),
              rng.uniform(0.5, 12, (counts_a.sum(), 3)), rng.uniform(-3, 3, counts_a.sum())]
    b = np.c_[rng.uniform(-60, 60, (counts_b.sum(), 2)), np.zeros(counts_b.sum()),
              rng.uniform(0.5, 12, (counts_b.sum(), 3)), rng.uniform(-3, 3, counts_b.sum())]
    pa, pb = PreparedBoxes(a), PreparedBoxes(b)
    blocks = list(candidate_pairs(pa, counts_a, pb, counts_b, max_pairs=100))
    ia, ib = np.concatenate([x for x, _ in blocks]), np.concatenate([y for _, y in blocks])
    assert all(len(x) <= max(100, counts_b.max()) for x, _ in blocks)
    fa, fb = np.repeat(np.arange(50), counts_a), np.repeat(np.arange(50), counts_b)
    assert (fa[ia] == fb[ib]).all()  # never across frames
    got = {(i, j) for i, j, ok in zip(ia, ib, reach_overlaps(pa, pb, ia, ib)) if ok}
    every_a, every_b = np.nonzero(fa[:, None] == fb[None, :])
    want = {(i, j) for i, j, ok in zip(every_a, every_b, reach_overlaps(pa, pb, every_a, every_b))
            if ok}
    assert got == want and len(want) > 100
    assert len(ia) < len(every_a) / 2  # the sweep spares most far pairs


def test_no_thresholds_and_no_boxes():
    empty = np.zeros((0, 7))
    scores, tp = match_frames(empty, np.zeros(0), np.array([0]), empty, np.array([0]), (0.5,))
    assert scores.shape == (0,) and tp.shape == (1, 0)
    assert greedy_match(np.zeros(0, int), np.zeros(0, int), np.zeros(0), np.zeros(0, int),
                        (0.5,), 3).tolist() == [[-1, -1, -1]]
    assert math.isnan(OpenCOODEvaluator().compute()[0.5])
