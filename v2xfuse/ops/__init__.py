"""Rotated-box IoU, rotated NMS and BEV pooling.

Each op runs the ``v2xfuse._C`` kernels (registered as ``torch.ops.v2xfuse.*``; CPU always, CUDA
when the extension was built with it) and falls back to the pure-PyTorch reference in
:mod:`v2xfuse.ops.reference` when the extension is not built, with a one-time warning.

Boxes are ``(N, 7) [x, y, z, dx, dy, dz, yaw]`` as in :mod:`v2xfuse.structures.boxes`.
"""
from __future__ import annotations

import warnings

import torch
from torch.autograd.function import once_differentiable

from . import reference

try:  # loading the library registers torch.ops.v2xfuse.*
    from v2xfuse import _C
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _EXT_ERROR: ImportError | None = exc
else:
    _EXT_ERROR = None

__all__ = [
    "boxes_overlap_bev",
    "boxes_iou_bev",
    "boxes_iou_3d",
    "nms_rotated",
    "bev_pool",
    "bev_pool_weighted",
    "extension_available",
    "extension_with_cuda",
    "extension_with_openmp",
    "reference",
]

_warned = False


def extension_available() -> bool:
    """Whether the compiled ``v2xfuse._C`` ops are loaded."""
    return _C is not None


def extension_with_cuda() -> bool:
    """Whether the loaded extension has its CUDA kernels compiled in."""
    return _C is not None and bool(_C.with_cuda())


def extension_with_openmp() -> bool:
    """Whether the loaded extension's CPU kernels run their loops on torch's threads
    (``torch.set_num_threads``): compiled with OpenMP, as setup.py does on Linux."""
    return _C is not None and bool(getattr(_C, "with_openmp", lambda: False)())


def _use_extension() -> bool:
    global _warned
    if _C is not None:
        return True
    if not _warned:
        _warned = True
        warnings.warn(
            f"v2xfuse._C is not built ({_EXT_ERROR}); v2xfuse.ops uses its slower pure-PyTorch "
            "references. Build the extension with `pip install --no-build-isolation -e .` "
            "(or `python setup.py build_ext --inplace`) in the repository.",
            RuntimeWarning, stacklevel=3)
    return False


def boxes_overlap_bev(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """BEV intersection areas of rotated boxes (z and dz ignored).

    Args:
        boxes_a: (N, 7) [x, y, z, dx, dy, dz, yaw], float32 or float64.
        boxes_b: (M, 7), same device.
    Returns:
        (N, M) areas in the promoted dtype of the inputs.
    """
    a, b = reference.check_box_pair(boxes_a, boxes_b)
    if _use_extension():
        return torch.ops.v2xfuse.boxes_overlap_bev(a, b)
    return reference.boxes_overlap_bev(a, b)


def boxes_iou_bev(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Rotated bird's-eye-view IoU (z and dz ignored).

    Args:
        boxes_a: (N, 7) [x, y, z, dx, dy, dz, yaw], float32 or float64.
        boxes_b: (M, 7), same device.
    Returns:
        (N, M) IoU in [0, 1]; 0 where both boxes have zero area.
    """
    a, b = reference.check_box_pair(boxes_a, boxes_b)
    if _use_extension():
        return torch.ops.v2xfuse.boxes_iou_bev(a, b)
    return reference.boxes_iou_bev(a, b)


def boxes_iou_3d(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """3D IoU of yaw-rotated boxes: BEV intersection x height overlap over the union volume.

    Args:
        boxes_a: (N, 7) [x, y, z, dx, dy, dz, yaw], z the box centre.
        boxes_b: (M, 7), same device and a floating dtype.
    Returns:
        (N, M) IoU in [0, 1]; 0 where both boxes have zero volume.
    """
    a, b = reference.check_box_pair(boxes_a, boxes_b)
    if _use_extension():
        return torch.ops.v2xfuse.boxes_iou_3d(a, b)
    return reference.boxes_iou_3d(a, b)


def nms_rotated(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                pre_max_size: int | None = None, post_max_size: int | None = None) -> torch.Tensor:
    """Greedy rotated NMS in BEV.

    Args:
        boxes: (N, 7) [x, y, z, dx, dy, dz, yaw], float32 or float64.
        scores: (N,) floating, same device.
        iou_threshold: a box is dropped when its BEV IoU with a kept box is > this (strictly).
        pre_max_size: consider only this many best-scoring boxes.
        post_max_size: return at most this many indices.
    Returns:
        (K,) int64 indices into ``boxes`` of the kept boxes, by descending score; equal scores are
        taken in index order (stable sort). Same indices as :func:`reference.nms_rotated`.
    """
    if not _use_extension():
        return reference.nms_rotated(boxes, scores, iou_threshold, pre_max_size, post_max_size)
    boxes, _ = reference.check_box_pair(boxes, boxes)
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must be (N,) with N = {boxes.shape[0]}, got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    if pre_max_size is not None and pre_max_size < boxes.shape[0]:
        # The candidates are already in score order (ties by index), so the kernel's own stable
        # sort keeps that order and its indices map back through `order`.
        order = torch.sort(scores, descending=True, stable=True).indices[:pre_max_size]
        keep = order[torch.ops.v2xfuse.nms_rotated(boxes[order], scores[order],
                                                   float(iou_threshold))]
    else:
        keep = torch.ops.v2xfuse.nms_rotated(boxes, scores.contiguous(), float(iou_threshold))
    return keep if post_max_size is None else keep[:post_max_size]


class _BevPool(torch.autograd.Function):
    """Per-cell sum in point order forward; backward gathers each point's cell gradient.

    On CPU the points are grouped by cell once (``bev_pool_plan``: a counting sort into
    ``order`` (P,) and ``offsets`` (B * ny * nx + 1,), int32) and both passes reuse that grouping;
    the CUDA kernels group the points themselves from ``coords``.
    """

    @staticmethod
    def forward(ctx, features, coords, batch_size, ny, nx):
        if features.device.type == "cpu":
            order, offsets = torch.ops.v2xfuse.bev_pool_plan(coords, batch_size, ny, nx)
            ctx.save_for_backward(order, offsets)
            ctx.planned = True
            return torch.ops.v2xfuse.bev_pool_forward_planned(features, order, offsets,
                                                              batch_size, ny, nx)
        ctx.save_for_backward(coords)
        ctx.planned = False
        return torch.ops.v2xfuse.bev_pool_forward(features, coords, batch_size, ny, nx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_features = None
        if ctx.needs_input_grad[0]:
            if ctx.planned:
                order, offsets = ctx.saved_tensors
                grad_features = torch.ops.v2xfuse.bev_pool_backward_planned(
                    grad_out.contiguous(), order, offsets)
            else:
                (coords,) = ctx.saved_tensors
                grad_features = torch.ops.v2xfuse.bev_pool_backward(grad_out.contiguous(), coords)
        return grad_features, None, None, None, None


def bev_pool(features: torch.Tensor, coords: torch.Tensor, batch_size: int, ny: int,
             nx: int) -> torch.Tensor:
    """Sum point features into a BEV grid (lift-splat pooling); differentiable in ``features``.

    Deterministic: each cell adds its points in increasing point index on CPU and CUDA.

    Args:
        features: (P, C) floating.
        coords: (P, 3) integer [batch, y, x] cell of each point; every row must lie in the grid
            (ValueError otherwise).
    Returns:
        (batch_size, C, ny, nx); cells without points are 0.
    """
    reference.check_bev_pool_args(features, coords, batch_size, ny, nx)
    if not _use_extension():
        return reference.bev_pool(features, coords, batch_size, ny, nx)
    return _BevPool.apply(features.contiguous(), coords.contiguous(), int(batch_size), int(ny),
                          int(nx))


class _BevPoolWeighted(torch.autograd.Function):
    """Lift and splat on CPU without the lifted rows: ``weights[p] * values[rows[p]]`` summed per
    cell in point order (the products and order of :func:`bev_pool` on the lifted rows, so the
    same output bit for bit); backward gives both inputs their gradients in one walk over the
    same plan of cells, each row of the values' gradient summed in that walk's order."""

    @staticmethod
    def forward(ctx, weights, values, rows, coords, batch_size, ny, nx):
        order, offsets = torch.ops.v2xfuse.bev_pool_plan(coords, batch_size, ny, nx)
        ctx.save_for_backward(weights, values, rows, order, offsets)
        return torch.ops.v2xfuse.bev_pool_weighted_forward(weights, values, rows, order, offsets,
                                                           batch_size, ny, nx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        weights, values, rows, order, offsets = ctx.saved_tensors
        grad_w, grad_v = torch.ops.v2xfuse.bev_pool_weighted_backward(
            grad_out.contiguous(), weights, values, rows, order, offsets)
        return (grad_w if ctx.needs_input_grad[0] else None,
                grad_v if ctx.needs_input_grad[1] else None, None, None, None, None, None)


def bev_pool_weighted(weights: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                      coords: torch.Tensor, batch_size: int, ny: int, nx: int) -> torch.Tensor:
    """:func:`bev_pool` of ``weights[:, None] * values[rows]`` without forming those rows: lift
    and splat in one pass (LSS's depth x context per frustum point). Differentiable in
    ``weights`` and ``values``.

    Args:
        weights: (P,) floating, e.g. each kept frustum point's depth probability.
        values: (R, C) of the weights' dtype, e.g. the context features of every image pixel.
        rows: (P,) integer, each point's row of ``values`` (ValueError outside [0, R)).
        coords: (P, 3) integer [batch, y, x] cells, as for :func:`bev_pool`.
    Returns:
        (batch_size, C, ny, nx), equal to ``bev_pool(weights[:, None] * values[rows], ...)``
        (bit for bit on CPU; CUDA and builds without the extension compute exactly that).
    """
    reference.check_bev_pool_weighted_args(weights, values, rows, coords, batch_size, ny, nx)
    if not _use_extension() or values.device.type != "cpu":
        return bev_pool(weights[:, None] * values[rows.long()], coords, batch_size, ny, nx)
    return _BevPoolWeighted.apply(weights.contiguous(), values.contiguous(),
                                  rows.long().contiguous(), coords.contiguous(), int(batch_size),
                                  int(ny), int(nx))
