import math

import pytest
import torch

from v2xfuse import ops
from v2xfuse.ops import reference

needs_extension = pytest.mark.skipif(not ops.extension_available(),
                                     reason="v2xfuse._C is not built")

IMPLS = {"op": ops.nms_rotated, "reference": reference.nms_rotated}


def crowded_scene(n, seed, dtype=torch.float64):
    """n boxes in a 20 m square, many overlapping, scores with many exact ties."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.empty(n, 7, dtype=torch.float64)
    boxes[:, 0:2] = torch.rand(n, 2, generator=g, dtype=torch.float64) * 20 - 10
    boxes[:, 2] = torch.rand(n, generator=g, dtype=torch.float64)
    boxes[:, 3] = 1 + 4 * torch.rand(n, generator=g, dtype=torch.float64)
    boxes[:, 4] = 1 + 2 * torch.rand(n, generator=g, dtype=torch.float64)
    boxes[:, 5] = 1.5
    boxes[:, 6] = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    # Near-duplicates of earlier boxes, as a detector's overlapping proposals are.
    dup = torch.randint(0, n, (n // 3,), generator=g)
    boxes[n - n // 3:] = boxes[dup] + 0.3 * torch.randn(n // 3, 7, generator=g,
                                                          dtype=torch.float64) * \
        torch.tensor([1, 1, 0, 0.5, 0.5, 0, 0.3], dtype=torch.float64)
    scores = torch.randint(0, 20, (n,), generator=g).to(dtype) / 20  # ties on purpose
    return boxes.to(dtype), scores


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_hand_checked_case(impl):
    nms = IMPLS[impl]
    # 3 x 1 boxes along x: A at 0; B at 1 has IoU 0.5 with A exactly (overlap 2 of union 4);
    # C at 1.75 has IoU 1.25 / 4.75 with A and 2.25 / 3.75 = 0.6 with B; D far away.
    a = [0.0, 0, 0, 3, 1, 1, 0]
    b = [1.0, 0, 0, 3, 1, 1, 0]
    c = [1.75, 0, 0, 3, 1, 1, 0]
    d = [50.0, 50, 0, 3, 1, 1, 0]
    boxes = torch.tensor([c, b, a, d], dtype=torch.float64)
    scores = torch.tensor([0.7, 0.8, 0.9, 0.9], dtype=torch.float64)
    # D ties with A and comes after it (higher index); IoU(A, B) = 0.5 is not > 0.5, so B stays
    # and then suppresses C (IoU 0.6 > 0.5, while IoU(A, C) = 0.26).
    assert nms(boxes, scores, 0.5).tolist() == [2, 3, 1]
    # Below 0.5 A suppresses B, and C survives: a suppressed box suppresses nothing.
    assert nms(boxes, scores, 0.49).tolist() == [2, 3, 0]
    assert nms(boxes, scores, 0.49, post_max_size=2).tolist() == [2, 3]
    assert nms(boxes, scores, 0.49, pre_max_size=3).tolist() == [2, 3]
    assert nms(boxes, scores, 1.0).tolist() == [2, 3, 1, 0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("seed", range(6))
def test_op_returns_the_reference_indices(seed, dtype):
    boxes, scores = crowded_scene(300 + 50 * seed, seed, dtype)
    for threshold in (0.01, 0.1, 0.3, 0.5, 0.7):
        expected = reference.nms_rotated(boxes, scores, threshold)
        got = ops.nms_rotated(boxes, scores, threshold)
        assert got.dtype == torch.int64
        assert got.tolist() == expected.tolist(), threshold
        assert 0 < len(got) < len(boxes)
    got = ops.nms_rotated(boxes, scores, 0.3, pre_max_size=120, post_max_size=40)
    assert got.tolist() == reference.nms_rotated(boxes, scores, 0.3, 120, 40).tolist()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_result_is_a_greedy_nms(impl):
    boxes, scores = crowded_scene(400, 11)
    keep = IMPLS[impl](boxes, scores, 0.2)
    kept_scores = scores[keep]
    assert torch.all(kept_scores[:-1] >= kept_scores[1:])
    iou = reference.boxes_iou_bev(boxes[keep], boxes[keep])
    assert torch.all(iou.triu(diagonal=1) <= 0.2)
    # Every dropped box overlaps a kept box with a higher (or tied, lower-index) rank.
    dropped = torch.ones(len(boxes), dtype=torch.bool)
    dropped[keep] = False
    assert torch.all((reference.boxes_iou_bev(boxes[dropped], boxes[keep]) > 0.2).any(dim=1))


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_empty_and_single(impl):
    boxes, scores = crowded_scene(5, 0)
    empty = IMPLS[impl](boxes[:0], scores[:0], 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    assert IMPLS[impl](boxes[:1], scores[:1], 0.5).tolist() == [0]


def test_bad_arguments():
    boxes, scores = crowded_scene(5, 0)
    for nms in IMPLS.values():
        with pytest.raises(ValueError, match="scores"):
            nms(boxes, scores[:4], 0.5)
        with pytest.raises(ValueError, match=r"\(N, 7\)"):
            nms(boxes[:, :6], scores, 0.5)


@needs_extension
def test_kernel_checks_its_arguments():
    boxes, scores = crowded_scene(5, 0)
    with pytest.raises(RuntimeError, match="scores"):
        torch.ops.v2xfuse.nms_rotated(boxes, scores[:3], 0.5)
    with pytest.raises(RuntimeError, match="scores must be floating"):
        torch.ops.v2xfuse.nms_rotated(boxes, scores.long(), 0.5)
