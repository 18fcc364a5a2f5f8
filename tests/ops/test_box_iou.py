import math
import warnings

import numpy as np
import pytest
import torch

from v2xfuse import ops
from v2xfuse.ops import reference

needs_extension = pytest.mark.skipif(not ops.extension_available(),
                                     reason="v2xfuse._C is not built")

IMPLS = {
    "op": (ops.boxes_overlap_bev, ops.boxes_iou_bev, ops.boxes_iou_3d),
    "reference": (reference.boxes_overlap_bev, reference.boxes_iou_bev, reference.boxes_iou_3d),
}


def random_scene(n, seed, dtype=torch.float64, spread=10.0):
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([-spread, -spread, -1.0, 0.5, 0.5, 0.5, -math.pi], dtype=torch.float64)
    hi = torch.tensor([spread, spread, 1.0, 5.0, 3.0, 2.0, math.pi], dtype=torch.float64)
    return (lo + (hi - lo) * torch.rand(n, 7, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_iou_bev_matches_shapely_on_10k_pairs(impl, dtype, box_pair_cases, paired):
    overlap_fn, iou_fn, _ = IMPLS[impl]
    for name, (a, b, overlap_ref, iou_ref) in box_pair_cases[dtype].items():
        iou = paired(iou_fn, a, b)
        overlap = paired(overlap_fn, a, b)
        assert iou.dtype == dtype and overlap.dtype == dtype
        err = np.abs(iou.double().numpy() - iou_ref).max()
        assert err <= 1e-4, f"{name}: max IoU error {err:.3g}"
        scale = torch.maximum((a[:, 3] * a[:, 4]).abs(), (b[:, 3] * b[:, 4]).abs()).double().numpy()
        rel = np.abs(overlap.double().numpy() - overlap_ref) / np.maximum(scale, 1e-300)
        assert rel.max() <= 1e-4, f"{name}: max overlap error {rel.max():.3g} of the box area"


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_iou_bev_special_values(impl, box_pair_cases, paired):
    _, iou_fn, _ = IMPLS[impl]
    cases = box_pair_cases[torch.float64]
    a, b, _, _ = cases["identical"]
    torch.testing.assert_close(paired(iou_fn, a, b), torch.ones(len(a), dtype=a.dtype),
                               atol=1e-9, rtol=0)
    a, b, _, _ = cases["nested"]
    area_a, area_b = a[:, 3] * a[:, 4], b[:, 3] * b[:, 4]
    expected = torch.minimum(area_a, area_b) / torch.maximum(area_a, area_b)
    torch.testing.assert_close(paired(iou_fn, a, b), expected, atol=1e-9, rtol=0)
    for exact_zero in ("far_apart", "zero_area"):
        a, b, _, _ = cases[exact_zero]
        assert torch.all(paired(iou_fn, a, b) == 0), exact_zero


def test_iou_bev_hand_cases():
    # Unit squares: shifted by half, rotated by 45 degrees, sharing an edge, sharing a corner.
    a = torch.tensor([[0.0, 0, 0, 1, 1, 1, 0]] * 4, dtype=torch.float64)
    b = torch.tensor([[0.5, 0, 0, 1, 1, 1, 0],
                      [0.0, 0, 0, 1, 1, 1, math.pi / 4],
                      [1.0, 0, 0, 1, 1, 1, 0],
                      [1.0, 1, 0, 1, 1, 1, math.pi / 2]], dtype=torch.float64)
    octagon = 2 * (math.sqrt(2) - 1)
    expected = torch.tensor([0.5 / 1.5, octagon / (2 - octagon), 0.0, 0.0], dtype=torch.float64)
    for _, iou_fn, _ in IMPLS.values():
        got = torch.stack([iou_fn(a[k:k + 1], b[k:k + 1])[0, 0] for k in range(4)])
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_pairwise_matrices_op_equals_reference(dtype):
    a, b = random_scene(150, 0, dtype), random_scene(170, 1, dtype)
    for op_fn, ref_fn in zip(IMPLS["op"], IMPLS["reference"]):
        torch.testing.assert_close(op_fn(a, b), ref_fn(a, b), atol=1e-5, rtol=1e-5)
    iou = ops.boxes_iou_bev(a, b)
    torch.testing.assert_close(iou, ops.boxes_iou_bev(b, a).T, atol=1e-6, rtol=0)
    assert (iou > 0).float().mean() > 0.02  # the scene really has overlaps


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_iou_3d_hand_cases(impl):
    _, _, iou3d_fn = IMPLS[impl]
    unit = [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    cases = [
        (unit, unit, 1.0),
        (unit, [0.5, 0, 0, 1, 1, 1, 0], 0.5 / 1.5),                   # half along x
        (unit, [0.5, 0, 0.5, 1, 1, 1, 0], 0.25 / 1.75),               # half along x and z
        (unit, [0, 0, 1.0, 1, 1, 1, 0], 0.0),                         # stacked, touching
        (unit, [0, 0, 0, 2, 2, 2, 0], 1.0 / 8.0),                     # nested, same centre
        (unit, [0, 0, 0.25, 1, 1, 0.5, math.pi / 2], 0.5),            # lower half, yaw 90 deg
        ([0, 0, 0, 2, 1, 1, 0], [0, 0, 0, 2, 1, 1, math.pi / 2], 1 / 3),  # cross of 2x1 boxes
        (unit, [0, 0, 0, 1, 1, 0, 0], 0.0),                           # zero height
    ]
    a = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    b = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    got = iou3d_fn(a, b).diagonal()
    torch.testing.assert_close(got, torch.tensor([c[2] for c in cases], dtype=torch.float64),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_iou_3d_matches_shapely_times_height(impl, box_pair_cases, paired):
    _, _, iou3d_fn = IMPLS[impl]
    for name in ("random_overlapping", "right_angles", "nested"):
        a, b, overlap, _ = box_pair_cases[torch.float64][name]
        an, bn = a.numpy(), b.numpy()
        dz = np.clip(np.minimum(an[:, 2] + an[:, 5] / 2, bn[:, 2] + bn[:, 5] / 2)
                     - np.maximum(an[:, 2] - an[:, 5] / 2, bn[:, 2] - bn[:, 5] / 2), 0, None)
        inter = overlap * dz
        union = np.prod(an[:, 3:6], axis=1) + np.prod(bn[:, 3:6], axis=1) - inter
        expected = inter / union
        err = np.abs(paired(iou3d_fn, a, b).numpy() - expected).max()
        assert err <= 1e-6, f"{name}: max 3D IoU error {err:.3g}"
        assert (expected > 0).any()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_empty_inputs_give_empty_results(impl):
    some = random_scene(3, 0)
    none = some[:0]
    for fn in IMPLS[impl]:
        assert fn(none, some).shape == (0, 3)
        assert fn(some, none).shape == (3, 0)
        assert fn(none, none).shape == (0, 0)
        assert fn(none, some).dtype == torch.float64


def test_dtypes_layouts_and_bad_arguments():
    a64, b64 = random_scene(20, 0), random_scene(30, 1)
    assert ops.boxes_iou_bev(a64.float(), b64.float()).dtype == torch.float32
    assert ops.boxes_iou_bev(a64.float(), b64).dtype == torch.float64  # promoted
    wide = torch.cat([a64, torch.zeros(20, 2, dtype=torch.float64)], dim=1)[:, :7]
    assert not wide.is_contiguous()
    torch.testing.assert_close(ops.boxes_iou_bev(wide, b64), ops.boxes_iou_bev(a64, b64))
    for fn in (ops.boxes_iou_bev, reference.boxes_iou_bev):
        with pytest.raises(ValueError, match=r"\(N, 7\)"):
            fn(a64[:, :6], b64)
        with pytest.raises(ValueError, match="float32 or float64"):
            fn(a64.long(), b64.long())


@needs_extension
def test_kernels_check_their_arguments():
    a = random_scene(4, 0)
    with pytest.raises(RuntimeError, match=r"\(N, 7\)"):
        torch.ops.v2xfuse.boxes_iou_bev(a[:, :5], a)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.v2xfuse.boxes_iou_3d(a, a.float())
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.v2xfuse.boxes_overlap_bev(a.half(), a.half())


def test_fallback_warns_once_and_uses_the_reference(monkeypatch):
    a, b = random_scene(10, 0), random_scene(12, 1)
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_warned", False)
    with pytest.warns(RuntimeWarning, match="not built"):
        got = ops.boxes_iou_bev(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.boxes_iou_3d(a, b)  # no second warning
    torch.testing.assert_close(got, reference.boxes_iou_bev(a, b))
