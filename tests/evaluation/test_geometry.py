"""The evaluators' numpy geometry gives the compiled op's values, to the bit."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from v2xfuse import ops, structures
from v2xfuse.evaluation import geometry

_spec = importlib.util.spec_from_file_location(
    "v2xfuse_ops_cases", Path(__file__).resolve().parents[1] / "ops" / "conftest.py")
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
BOX_PAIRS = _cases.make_box_pairs(500, seed=3)


def _op(fn, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return fn(torch.from_numpy(a), torch.from_numpy(b)).numpy()


@pytest.mark.skipif(not ops.extension_available(), reason="v2xfuse._C is not built")
@pytest.mark.parametrize("case", sorted(BOX_PAIRS))
def test_paired_iou_is_the_op_bit_for_bit(case):
    a, b = BOX_PAIRS[case]
    got = geometry.paired_ious(a, b, ("bev", "3d"))
    np.testing.assert_array_equal(got["bev"], np.diagonal(_op(ops.boxes_iou_bev, a, b)))
    np.testing.assert_array_equal(got["3d"], np.diagonal(_op(ops.boxes_iou_3d, a, b)))
    np.testing.assert_array_equal(
        geometry.bev_overlap(geometry.PreparedBoxes(a), geometry.PreparedBoxes(b)),
        np.diagonal(_op(ops.boxes_overlap_bev, a, b)))
    np.testing.assert_array_equal(geometry.pairwise_iou(a[:40], b[:60], "3d"),
                                  _op(ops.boxes_iou_3d, a[:40], b[:60]))


def test_reach_test_never_drops_an_overlap():
    for a, b in BOX_PAIRS.values():
        pa, pb = geometry.PreparedBoxes(a), geometry.PreparedBoxes(b)
        overlap = geometry.bev_overlap(pa, pb)
        assert not (overlap[~geometry.reach_overlaps(pa, pb)] > 0).any()
        ia = np.arange(len(a))[::-1]
        np.testing.assert_array_equal(geometry.reach_overlaps(pa, pb, ia, ia),
                                      geometry.reach_overlaps(pa.take(ia), pb.take(ia)))


def test_box_layout_is_the_structures_one():
    assert geometry.BOX_DIM == structures.BOX_DIM
    np.testing.assert_array_equal(geometry._CORNER_SIGNS, structures.CORNER_SIGNS)
    boxes = np.concatenate([a for a, _ in BOX_PAIRS.values()])
    np.testing.assert_allclose(geometry.box_corners(boxes), structures.box_corners(boxes),
                               rtol=0, atol=1e-12)


def test_empty_and_degenerate_inputs():
    assert geometry.paired_iou(np.zeros((0, 7)), np.zeros((0, 7))).shape == (0,)
    assert geometry.pairwise_iou(np.zeros((0, 7)), np.ones((3, 7))).shape == (0, 3)
    flat = np.array([[0, 0, 0, 0, 2, 1, 0.3]])
    assert geometry.paired_iou(flat, flat).tolist() == [0.0]
    with pytest.raises(ValueError, match="iou_type"):
        geometry.paired_iou(flat, flat, "2d")
