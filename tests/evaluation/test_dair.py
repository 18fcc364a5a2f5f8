"""DAIR-V2X official mode on hand cases (rules: reference/dair-v2x.md §4)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from v2xfuse.evaluation import (DAIR_RANGES, DairEvaluator, boxes_in_range, dair_ap,
                                dair_match_frame, match_frame)


def test_first_recall_step_is_not_counted(aabb):
    # compute_ap sums (r[i+1] - r[i]) p[i+1]: the step from 0 to r[0] never counts.
    one = DairEvaluator()
    one.add(0, [aabb(10, 0, 14, 2)], [0.9], [aabb(10, 0, 14, 2)])
    assert one.compute()["bev"]["overall"][0.5] == 0.0
    two = DairEvaluator()
    two.add(0, [aabb(10, 0, 14, 2), aabb(20, 0, 24, 2)], [0.9, 0.8],
            [aabb(10, 0, 14, 2), aabb(20, 0, 24, 2)])
    assert two.compute()["3d"]["0-30"][0.7] == pytest.approx(0.5)
    assert math.isnan(two.compute()["3d"]["30-50"][0.7])  # no ground truth there
    assert dair_ap(np.zeros(0), np.zeros(0, bool), 3) == 0.0


def test_matching_is_ground_truth_centric(aabb):
    # GT A = [0,4], B = [1,5] (x, 2 m wide). d1 = [0.8,4.8] (score .9): IoU(A) = 3.2/4.8 = .667,
    # IoU(B) = 3.8/4.2 = .905. d2 = [2,6] (score .8): IoU(A) = 2/6 = .333, IoU(B) = 3/5 = .6.
    # DAIR: A first takes d1 (its only IoU >= .5), then B takes d2: 2 TP.
    # OpenCOOD: d1 takes its best GT, B; d2 is left with A at .333: 1 TP.
    gt = np.array([aabb(0, 0, 4, 2), aabb(1, 0, 5, 2)])
    det = np.array([aabb(0.8, 0, 4.8, 2), aabb(2, 0, 6, 2)])
    scores = np.array([0.9, 0.8])
    s, tp = dair_match_frame(det, scores, gt, 0.5, "bev")
    assert s.tolist() == [0.9, 0.8] and tp.tolist() == [True, True]
    assert match_frame(det, scores, gt, (0.5,)).tp[0].tolist() == [True, False]
    # Ties in IoU go to the later prediction in score order (`iou >= mx`).
    twins = np.array([aabb(0, 0, 4, 2), aabb(0, 0, 4, 2)])
    s, tp = dair_match_frame(twins, np.array([0.9, 0.4]), gt[:1], 0.5, "bev")
    assert s.tolist() == [0.4, 0.9] and tp.tolist() == [True, False]  # TPs first, then FPs


def test_any_corner_range_rule(aabb):
    r0_30, r30_50 = DAIR_RANGES["0-30"], DAIR_RANGES["30-50"]
    straddling = np.array([aabb(28, 0, 32, 2)])
    assert boxes_in_range(straddling, r0_30, "any_corner_3d")[0]
    assert boxes_in_range(straddling, r30_50, "any_corner_3d")[0]
    assert not boxes_in_range(straddling, r0_30, "all_corners_bev")[0]
    on_top = np.array([aabb(10, 0, 14, 2, z=1.75)])      # bottom face at z = 1 = zmax: outside
    on_bottom = np.array([aabb(10, 0, 14, 2, z=-3.75)])  # top face at z = -3 = zmin: inside
    assert not boxes_in_range(on_top, r0_30, "any_corner_3d")[0]
    assert boxes_in_range(on_bottom, r0_30, "any_corner_3d")[0]
    behind = np.array([aabb(-6, 0, -2, 2)])
    assert not boxes_in_range(behind, DAIR_RANGES["overall"], "any_corner_3d")[0]


def _hand_case(aabb) -> DairEvaluator:
    """Two frames, 4 GT, 6 predictions (4 x 2 x 1.5 m boxes, z = 0 unless said).

    f1 GT: g1 x[8,12] (0-30), g2 x[38,42] (30-50), g3 x[68,72] (50-100)
       p1 = g1 (.9) | p6 FP x[43,47] y[10,12] (.85, 30-50) | p2 = g2 raised 0.6 m (.8):
       BEV IoU 1, 3D IoU 8*.9/(24-7.2) = .4286 | p3 FP x[18,22] (.7, 0-30) |
       p4 = g3 shifted 1 m (.6): IoU 6/10 = .6 in BEV and 3D | a FP behind the car (x < 0): dropped
    f2 GT: g4 x[13,17] (0-30); p5 = g4 (.95)
    """
    ev = DairEvaluator()
    ev.add("f1", [aabb(8, 0, 12, 2), aabb(43, 10, 47, 12), aabb(38, 0, 42, 2, z=0.6),
                  aabb(18, 0, 22, 2), aabb(69, 0, 73, 2), aabb(-10, 0, -6, 2)],
           [0.9, 0.85, 0.8, 0.7, 0.6, 0.99],
           [aabb(8, 0, 12, 2), aabb(38, 0, 42, 2), aabb(68, 0, 72, 2)], payload_bytes=72)
    ev.add("f2", [aabb(13, 0, 17, 2)], [0.95], [aabb(13, 0, 17, 2)], payload_bytes=144)
    return ev


def test_hand_case_per_range_and_view(aabb):
    ap = _hand_case(aabb).compute()
    # overall, score order p5 p1 p6 p2 p3 p4, 4 GT:
    #  BEV .3/.5 (and 3D .3): T T F T F T  cumTP 1 2 2 3 3 4, rec 1/4 1/2 1/2 3/4 3/4 1,
    #    prec 1 1 2/3 3/4 3/5 2/3 -> envelope 1 1 3/4 3/4 2/3 2/3
    #    AP = (1/2-1/4)*1 + (3/4-1/2)*3/4 + (1-3/4)*2/3 = 29/48 (first step 0 -> 1/4 not counted)
    #  BEV .7: T T F T F F -> 1/4*1 + 1/4*3/4 = 7/16
    #  3D .5: T T F F F T  rec 1/4 1/2 1/2 1/2 1/2 3/4, prec .. 3/6 -> 1/4*1 + 1/4*1/2 = 3/8
    #  3D .7: T T F F F F -> 1/4
    assert ap["bev"]["overall"][0.3] == pytest.approx(29 / 48)
    assert ap["bev"]["overall"][0.5] == pytest.approx(29 / 48)
    assert ap["bev"]["overall"][0.7] == pytest.approx(7 / 16)
    assert ap["3d"]["overall"][0.3] == pytest.approx(29 / 48)
    assert ap["3d"]["overall"][0.5] == pytest.approx(3 / 8)
    assert ap["3d"]["overall"][0.7] == pytest.approx(1 / 4)
    # 0-30: g1 g4; p5 T, p1 T, p3 F -> rec 1/2 1 1: AP = 1/2 at every threshold and view
    for view in ("bev", "3d"):
        assert all(v == pytest.approx(0.5) for v in ap[view]["0-30"].values())
    # 30-50: g2; p6 F (.85) then p2 (.8): T in BEV -> rec 0 1, prec 0 1/2 -> AP 1/2;
    # in 3D p2 is T at .3 only (IoU .4286)
    assert ap["bev"]["30-50"] == pytest.approx({0.3: 0.5, 0.5: 0.5, 0.7: 0.5})
    assert ap["3d"]["30-50"] == pytest.approx({0.3: 0.5, 0.5: 0.0, 0.7: 0.0})
    # 50-100: g3 alone with p4, a single first step: 0 by the official formula
    assert ap["bev"]["50-100"] == {0.3: 0.0, 0.5: 0.0, 0.7: 0.0}


def test_hand_case_results_records(aabb):
    results = _hand_case(aabb).results(dataset="dair-v2x-c", split="val", method="late")
    assert [(r.iou_type, r.range_name) for r in results] == \
        [(v, n) for v in ("3d", "bev") for n in ("overall", "0-30", "30-50", "50-100")]
    overall = results[4]
    assert (overall.protocol, overall.sort_mode, overall.range_rule) == \
        ("dair", "dair", "any_corner_3d")
    assert overall.range == list(DAIR_RANGES["overall"])
    assert overall.num_gt == 4 and overall.num_det == 6  # the one behind the car is dropped
    assert overall.num_frames == 2 and overall.bytes_per_frame == 108.0
    assert overall.ap_at(0.5) == pytest.approx(29 / 48)


def test_zero_size_ground_truth_is_skipped(aabb):
    ev = DairEvaluator()
    ev.add(0, [], [], [aabb(10, 0, 14, 2), [20, 1, 0, 0, 0, 0, 0]])
    assert ev.results()[0].num_gt == 1
