"""OpenCOOD-style AP: reference test vectors, limits, thresholds, rotation, options."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from v2xfuse.evaluation import OpenCOODEvaluator, average_precision, match_frame, voc_ap


def _evaluate(frames, **kwargs) -> OpenCOODEvaluator:
    ev = OpenCOODEvaluator(**kwargs)
    for frame_id, det, scores, gt in frames:
        ev.add(frame_id, det, scores, gt)
    return ev


def test_reference_vectors_local(opencood_vectors):
    # Local order = each frame in its score order, frames concatenated:
    #   f1: 0.9 TP(A, IoU 1), 0.8 FP, 0.3 TP(B, IoU .778);  f2: 0.95 FP, 0.6 TP(C, IoU .6)/FP at .7
    # IoU 0.3 and 0.5: flags T F T F T, 3 GT
    #   cumTP 1 1 2 2 3, prec 1 1/2 2/3 1/2 3/5, rec 1/3 1/3 2/3 2/3 1
    #   envelope 1 2/3 2/3 3/5 3/5 -> AP = 1/3*1 + 1/3*2/3 + 1/3*3/5 = 0.75556
    # IoU 0.7: flags T F T F F -> AP = 1/3*1 + 1/3*2/3 = 0.55556
    ap = _evaluate(opencood_vectors).compute("local")
    assert ap[0.3] == pytest.approx(1 / 3 + 2 / 9 + 1 / 5)
    assert ap[0.5] == pytest.approx(1 / 3 + 2 / 9 + 1 / 5)
    assert ap[0.7] == pytest.approx(1 / 3 + 2 / 9)
    assert [round(ap[t], 4) for t in (0.3, 0.5, 0.7)] == [0.7556, 0.7556, 0.5556]


def test_reference_vectors_global(opencood_vectors):
    # Global order by score: 0.95 F, 0.9 T, 0.8 F, 0.6 T(.6), 0.3 T(.778)
    # IoU 0.3 and 0.5: cumTP 0 1 1 2 3, prec 0 1/2 1/3 1/2 3/5, rec 0 1/3 1/3 2/3 1
    #   envelope 3/5 everywhere -> AP = 3/5
    # IoU 0.7: flags F T F F T: prec 0 1/2 1/3 1/4 2/5, rec 0 1/3 1/3 1/3 2/3
    #   envelope 1/2 1/2 2/5 2/5 2/5 -> AP = 1/3*1/2 + 1/3*2/5 = 0.3
    ap = _evaluate(opencood_vectors).compute("global")
    assert ap[0.3] == pytest.approx(0.6)
    assert ap[0.5] == pytest.approx(0.6)
    assert ap[0.7] == pytest.approx(0.3)


def test_compute_is_repeatable_and_records(opencood_vectors):
    ev = _evaluate(opencood_vectors)
    first = ev.compute("local")
    ev.compute("global")
    assert ev.compute("local") == first  # OpenCOOD's local mode mutated its lists in place
    r = ev.result("local", dataset="toy", split="test", method="none")
    assert (r.protocol, r.sort_mode, r.iou_type, r.num_frames, r.num_gt, r.num_det) == \
        ("opencood", "local", "bev", 2, 3, 5)
    assert r.ap_at(0.7) == pytest.approx(1 / 3 + 2 / 9)
    assert r.range is None and r.range_name == "all"


@pytest.mark.parametrize("iou_type", ["bev", "3d"])
@pytest.mark.parametrize("order", ["local", "global"])
def test_perfect_detections_give_one(iou_type, order):
    rng = np.random.default_rng(0)
    ev = OpenCOODEvaluator(iou_type=iou_type)
    for f in range(4):
        gt = np.column_stack([rng.uniform(-50, 50, (6, 2)) + 20 * np.arange(6)[:, None],
                              rng.uniform(-1, 0, 6), rng.uniform(3, 5, 6),
                              rng.uniform(1.5, 2, 6), rng.uniform(1.4, 1.8, 6),
                              rng.uniform(-math.pi, math.pi, 6)])
        ev.add(f, torch.from_numpy(gt), torch.from_numpy(rng.uniform(0.2, 1, 6)), gt)
    assert all(v == pytest.approx(1.0) for v in ev.compute(order).values())


@pytest.mark.parametrize("order", ["local", "global"])
def test_no_detections_give_zero_and_no_gt_gives_nan(order, aabb):
    ev = OpenCOODEvaluator()
    ev.add(0, np.zeros((0, 7)), np.zeros(0), [aabb(0, 0, 4, 2)])
    ev.add(1, None, None, [aabb(10, 0, 14, 2)])
    assert ev.compute(order) == {0.3: 0.0, 0.5: 0.0, 0.7: 0.0}
    assert ev.num_gt == 2  # ground truth counts in frames without detections
    empty = OpenCOODEvaluator()
    empty.add(0, [aabb(0, 0, 4, 2)], [0.5], [])
    assert all(math.isnan(v) for v in empty.compute(order).values())


def test_iou_threshold_boundary_is_inclusive(aabb):
    # [0,0,4,1] inside [0,0,4,2]: IoU = 4/8 = 0.5 exactly; shifted by 1 m: 6/10 = 0.6 exactly.
    gt = np.array([aabb(0, 0, 4, 2)])
    for det, iou in ((aabb(0, 0, 4, 1), 0.5), (aabb(1, 0, 5, 2), 0.6)):
        at = match_frame(np.array([det]), np.array([0.9]), gt, (iou, math.nextafter(iou, 1.0)))
        assert at.tp[:, 0].tolist() == [True, False]  # TP at IoU >= thr, FP just above


def test_rotated_iou_sanity():
    # A 2 x 2 square and the same square turned 45 degrees overlap in a regular octagon of area
    # 4 (2 sqrt2 - 2); IoU = 1/sqrt2 = 0.7071. A heading flipped by pi is the same BEV polygon.
    gt = np.array([[0, 0, 0, 2, 2, 1.5, 0.0]])
    turned = np.array([[0, 0, 0, 2, 2, 1.5, math.pi / 4]])
    flipped = np.array([[0, 0, 0, 2, 2, 1.5, math.pi]])
    m = match_frame(turned, np.array([1.0]), gt, (0.7, 0.71))
    assert m.tp[:, 0].tolist() == [True, False]
    assert match_frame(flipped, np.array([1.0]), gt, (0.99,)).tp[0, 0]
    ev = OpenCOODEvaluator(iou_thresholds=(0.7, 0.71))
    ev.add(0, turned, [1.0], gt)
    assert ev.compute() == {0.7: 1.0, 0.71: 0.0}


def test_greedy_matching_is_score_ordered_and_one_to_one(aabb):
    gt = np.array([aabb(0, 0, 4, 2)])
    # The higher-scored detection takes the GT although the other overlaps it better; a second
    # detection of the same object is a false positive.
    det = np.array([aabb(1, 0, 5, 2), aabb(0, 0, 4, 2)])
    m = match_frame(det, np.array([0.9, 0.5]), gt, (0.5,))
    assert m.scores.tolist() == [0.9, 0.5] and m.tp[0].tolist() == [True, False]
    # A detection goes to its best remaining GT: both GT boxes overlap it, the better one wins.
    gt2 = np.array([aabb(0, 0, 4, 2), aabb(1, 0, 5, 2)])
    m = match_frame(np.array([aabb(1.2, 0, 5.2, 2), aabb(0, 0, 4, 2)]), np.array([0.9, 0.8]), gt2,
                    (0.5,))
    assert m.tp[0].tolist() == [True, True]


def test_iou_type_3d_uses_height(aabb):
    # Same footprint, raised by 0.75 of a 1.5 m height: BEV IoU 1, 3D IoU 0.75/2.25 = 1/3.
    gt = np.array([aabb(0, 0, 4, 2)])
    det = np.array([aabb(0, 0, 4, 2, z=0.75)])
    assert match_frame(det, np.array([1.0]), gt, (0.7,), "bev").tp[0, 0]
    assert not match_frame(det, np.array([1.0]), gt, (0.7,), "3d").tp[0, 0]
    assert match_frame(det, np.array([1.0]), gt, (0.33,), "3d").tp[0, 0]


def test_range_filter_drops_boxes_outside_and_is_recorded(aabb):
    ev = OpenCOODEvaluator(eval_range=[-10, -10, -3, 10, 10, 1], range_name="20m box")
    # Inside: one GT, matched. Outside (all corners rule): a GT crossing x = 10 and a FP far off.
    ev.add(0, [aabb(0, 0, 4, 2), aabb(30, 0, 34, 2)], [0.5, 0.9],
           [aabb(0, 0, 4, 2), aabb(8, 0, 12, 2)])
    assert ev.num_gt == 1 and ev.num_det == 1
    assert ev.compute() == {0.3: 1.0, 0.5: 1.0, 0.7: 1.0}
    r = ev.result()
    assert r.range == [-10, -10, -3, 10, 10, 1] and r.range_rule == "all_corners_bev"
    assert r.range_name == "20m box"
    centre = OpenCOODEvaluator(eval_range=[-10, -10, -3, 10, 10, 1], range_rule="centre_bev")
    centre.add(0, [], [], [aabb(8, 0, 12, 2)])  # centre x = 10 lies on the bound: kept
    assert centre.num_gt == 1


def test_voc_ap_and_average_precision_direct():
    # rec .5 then 1, prec 1 then .5: envelope 1, .5 -> .5*1 + .5*.5
    assert voc_ap(np.array([0.5, 1.0]), np.array([1.0, 0.5])) == pytest.approx(0.75)
    assert voc_ap(np.zeros(0), np.zeros(0)) == 0.0
    tp, scores = np.array([False, True]), np.array([0.1, 0.9])
    assert average_precision(tp, scores, 1, "local") == pytest.approx(0.5)
    assert average_precision(tp, scores, 1, "global") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sort_mode"):
        average_precision(tp, scores, 1, "random")


def test_bytes_latency_and_input_checks(aabb):
    ev = OpenCOODEvaluator()
    ev.add("a", [], [], [aabb(0, 0, 4, 2)], payload_bytes=100, latency_ms=10.0)
    ev.add("b", [], [], [], payload_bytes=300)
    r = ev.result()
    assert r.bytes_per_frame == 200.0 and r.latency_ms == 10.0
    with pytest.raises(ValueError, match="already added"):
        ev.add("a", [], [], [])
    with pytest.raises(ValueError, match=r"det_boxes must be \(N, 7\)"):
        ev.add("c", [[0, 0, 0, 1, 1, 1]], [0.5], [])
    with pytest.raises(ValueError, match="det_scores"):
        ev.add("d", [aabb(0, 0, 1, 1)], [0.5, 0.4], [])
    with pytest.raises(ValueError, match="non-finite"):
        ev.add("e", [], [], [[0, 0, 0, 1, 1, math.nan, 0]])
    assert len(ev.frames) == 2  # rejected frames are not counted
    with pytest.raises(ValueError, match="range"):
        OpenCOODEvaluator(eval_range=[0, 0, 0, 1, 1])


def test_range_m_scores_only_boxes_in_the_distance_band():
    """``range_m``: ground truth and detections filtered by the BEV distance of their centres
    from the ego, on a constructed frame whose AP is worked out by hand."""
    from v2xfuse.evaluation.opencood import OpenCOODEvaluator as Evaluator

    def box(x, y):
        return [x, y, 0.0, 4.0, 2.0, 1.5, 0.0]

    gt = np.array([box(10, 0), box(40, 0), box(0, -50), box(18, 24)])
    det = np.array([box(35, 0), box(10, 0), box(40, 0), box(0, -50), box(18, 24)])
    score = np.array([0.95, 0.9, 0.8, 0.3, 0.2])  # the first a false positive at 35 m
    # the last pair sits at exactly 30 m: in the far band, not the near one

    def ap(range_m):
        ev = Evaluator(eval_range=None, range_m=range_m)
        ev.add("f0", det, score, gt)
        return ev, ev.compute("global")[0.5]

    ev, far = ap([30, float("inf")])
    # far: GT at 40, 50, 30 m; detections FP (0.95), TP, TP, TP -> precision 0, 1/2, 2/3, 3/4
    assert ev.num_gt == 3 and ev.num_det == 4
    assert far == pytest.approx(0.75)
    ev, near = ap([0, 30])
    assert ev.num_gt == 1 and ev.num_det == 1 and near == pytest.approx(1.0)
    _, everything = ap(None)  # FP first, then four TPs: precision 4/5 from recall 0.25 on
    assert everything == pytest.approx(0.8)
    assert ap(["30", "inf"])[1] == far  # YAML or --set may give strings
    result = Evaluator(eval_range=None, range_m=[30, float("inf")]).result()
    assert result.extra["range_m"] == [30.0, None] and "30-inf m" in result.range_name
    for bad in ([30], [40, 30], [-1, 10], "far", [float("nan"), 5]):
        with pytest.raises(ValueError, match="eval.range_m"):
            Evaluator(range_m=bad)
