"""CUDA kernels against the CPU kernels and the references (skipped without a GPU)."""
import math

import numpy as np
import pytest
import torch

from v2xfuse import ops
from v2xfuse.ops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")


def crowded_scene(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([-10, -10, -1, 1, 1, 1, -math.pi], dtype=torch.float64)
    hi = torch.tensor([10, 10, 1, 5, 3, 2, math.pi], dtype=torch.float64)
    boxes = lo + (hi - lo) * torch.rand(n, 7, generator=g, dtype=torch.float64)
    dup = torch.randint(0, n, (n // 3,), generator=g)
    boxes[n - n // 3:] = boxes[dup] + 0.2 * torch.randn(n // 3, 7, generator=g,
                                                          dtype=torch.float64)
    scores = torch.randint(0, 20, (n,), generator=g).to(dtype) / 20
    return boxes.to(dtype), scores


def test_extension_has_cuda_kernels():
    assert ops.extension_available() and ops.extension_with_cuda(), \
        "rebuild v2xfuse._C where torch has CUDA (pip install --no-build-isolation -e .)"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_iou_bev_matches_shapely_and_cpu(dtype, box_pair_cases, paired):
    for name, (a, b, overlap_ref, iou_ref) in box_pair_cases[dtype].items():
        iou_cuda = paired(ops.boxes_iou_bev, a.to(CUDA), b.to(CUDA))
        assert iou_cuda.device.type == "cuda" and iou_cuda.dtype == dtype
        err = np.abs(iou_cuda.double().cpu().numpy() - iou_ref).max()
        assert err <= 1e-4, f"{name}: max IoU error {err:.3g}"
        torch.testing.assert_close(iou_cuda.cpu(), paired(ops.boxes_iou_bev, a, b),
                                   atol=1e-5, rtol=0)
        overlap_cuda = paired(ops.boxes_overlap_bev, a.to(CUDA), b.to(CUDA)).double().cpu()
        scale = torch.maximum((a[:, 3] * a[:, 4]).abs(), (b[:, 3] * b[:, 4]).abs()).double()
        rel = (overlap_cuda - torch.from_numpy(overlap_ref)).abs() / scale.clamp(min=1e-300)
        assert rel.max() <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_pairwise_matrices_cuda_equal_cpu_and_reference(dtype):
    a, _ = crowded_scene(300, 0, dtype)
    b, _ = crowded_scene(257, 1, dtype)
    for op_fn, ref_fn in ((ops.boxes_overlap_bev, reference.boxes_overlap_bev),
                          (ops.boxes_iou_bev, reference.boxes_iou_bev),
                          (ops.boxes_iou_3d, reference.boxes_iou_3d)):
        got = op_fn(a.to(CUDA), b.to(CUDA))
        torch.testing.assert_close(got.cpu(), op_fn(a, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, ref_fn(a.to(CUDA), b.to(CUDA)), atol=1e-5, rtol=1e-5)
    empty = ops.boxes_iou_3d(a[:0].to(CUDA), b.to(CUDA))
    assert empty.shape == (0, 257) and empty.device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("seed", range(4))
def test_nms_cuda_returns_the_cpu_and_reference_indices(seed, dtype):
    boxes, scores = crowded_scene(200 + 150 * seed, seed, dtype)  # crosses 64-box blocks
    for threshold in (0.05, 0.3, 0.5, 0.7):
        got = ops.nms_rotated(boxes.to(CUDA), scores.to(CUDA), threshold)
        assert got.device.type == "cuda" and got.dtype == torch.int64
        assert got.tolist() == ops.nms_rotated(boxes, scores, threshold).tolist()
        assert got.tolist() == reference.nms_rotated(boxes, scores, threshold).tolist()
    got = ops.nms_rotated(boxes.to(CUDA), scores.to(CUDA), 0.3, pre_max_size=100,
                          post_max_size=30)
    assert got.tolist() == reference.nms_rotated(boxes, scores, 0.3, 100, 30).tolist()
    assert ops.nms_rotated(boxes[:0].to(CUDA), scores[:0].to(CUDA), 0.5).shape == (0,)


def test_bev_pool_cuda_equals_cpu_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    batch_size, ny, nx, channels, n_points = 2, 31, 29, 16, 20000
    features = torch.randn(n_points, channels, generator=g)
    coords = torch.stack([torch.randint(0, batch_size, (n_points,), generator=g),
                          torch.randint(0, ny, (n_points,), generator=g),
                          torch.randint(0, nx, (n_points,), generator=g)], dim=1).int()
    coords[:3000] = torch.tensor([1, 3, 4], dtype=torch.int32)  # one crowded cell
    f_cpu = features.clone().requires_grad_(True)
    f_cuda = features.to(CUDA).requires_grad_(True)
    out_cpu = ops.bev_pool(f_cpu, coords, batch_size, ny, nx)
    out_cuda = ops.bev_pool(f_cuda, coords.to(CUDA), batch_size, ny, nx)
    # Same summation order on both devices (sorted by cell, then point index).
    torch.testing.assert_close(out_cuda.cpu(), out_cpu, atol=1e-6, rtol=1e-6)
    again = ops.bev_pool(f_cuda.detach(), coords.to(CUDA), batch_size, ny, nx)
    assert torch.equal(again, out_cuda.detach())  # deterministic
    grad = torch.randn(out_cpu.shape, generator=g)
    (out_cpu * grad).sum().backward()
    (out_cuda * grad.to(CUDA)).sum().backward()
    torch.testing.assert_close(f_cuda.grad.cpu(), f_cpu.grad, atol=0, rtol=0)
    ref = reference.bev_pool(features.to(CUDA), coords.to(CUDA), batch_size, ny, nx)
    torch.testing.assert_close(out_cuda.detach(), ref, atol=1e-4, rtol=1e-5)


def test_bev_pool_cuda_gradcheck_and_errors():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(30, 3, generator=g, dtype=torch.float64).to(CUDA).requires_grad_(True)
    coords = torch.randint(0, 3, (30, 3), generator=g).to(CUDA)
    assert torch.autograd.gradcheck(lambda f: ops.bev_pool(f, coords, 3, 3, 3), (features,))
    with pytest.raises(ValueError, match="outside the grid"):
        ops.bev_pool(features.detach(), coords, 2, 3, 3)
    with pytest.raises(ValueError, match="same device"):
        ops.bev_pool(features.detach(), coords.cpu(), 3, 3, 3)


def test_mixed_devices_raise():
    boxes, scores = crowded_scene(10, 0)
    with pytest.raises(ValueError, match="same device"):
        ops.boxes_iou_bev(boxes.to(CUDA), boxes)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.v2xfuse.nms_rotated(boxes.to(CUDA), scores, 0.5)
