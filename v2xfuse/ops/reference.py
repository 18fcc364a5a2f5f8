"""Pure-PyTorch references for the ops in :mod:`v2xfuse.ops`.

They are the fallback when the ``v2xfuse._C`` extension is not built and the oracle its tests
compare against, so they favour being obviously right over being fast: batched tensor code on
any device, no Python loop over box pairs (NMS keeps its inherently sequential greedy loop).

Boxes are ``(N, 7) [x, y, z, dx, dy, dz, yaw]`` (:mod:`v2xfuse.structures.boxes`): ``z`` is the
box centre, ``dx`` the length along the heading, ``yaw`` counter-clockwise from +x.

The BEV intersection clips box A's quad, expressed in box B's frame (where B is the axis-aligned
rectangle ``|u| <= dx_b / 2, |v| <= dy_b / 2``), by B's four half-planes (Sutherland-Hodgman).
Clipping keeps the vertex order, so the shoelace formula applies without an angular sort.
"""
from __future__ import annotations

import torch

__all__ = [
    "boxes_overlap_bev",
    "boxes_iou_bev",
    "boxes_iou_3d",
    "nms_rotated",
    "bev_pool",
    "bev_pool_weighted",
    "check_box_pair",
]

# Clipping a convex n-gon by a half-plane adds at most one vertex (4 -> 8); the slack absorbs
# extra crossings that rounding can create on near-degenerate quads.
_MAX_VERTICES = 16
# Box pairs clipped per batch, to bound the memory of the (pairs, vertices, 2) buffers.
_PAIRS_PER_CHUNK = 1 << 16


def check_box_pair(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two box tensors and bring them to one floating dtype; ValueError if unusable."""
    for name, boxes in (("boxes_a", boxes_a), ("boxes_b", boxes_b)):
        if not isinstance(boxes, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
        if boxes.dim() != 2 or boxes.shape[1] != 7:
            raise ValueError(f"{name} must be (N, 7) [x, y, z, dx, dy, dz, yaw], "
                             f"got shape {tuple(boxes.shape)}")
    if boxes_a.device != boxes_b.device:
        raise ValueError(f"boxes_a and boxes_b must be on the same device, "
                         f"got {boxes_a.device} and {boxes_b.device}")
    dtype = torch.promote_types(boxes_a.dtype, boxes_b.dtype)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"boxes must be float32 or float64, got {boxes_a.dtype} and {boxes_b.dtype}")
    return boxes_a.to(dtype).contiguous(), boxes_b.to(dtype).contiguous()


def _clip(pts: torch.Tensor, n: torch.Tensor, axis: int, sign: float, h: torch.Tensor):
    """Clip polygons by the half-planes ``sign * pts[..., axis] <= h``.

    Args:
        pts: (K, V, 2) vertices; the first ``n[k]`` of row k are the polygon, in order.
        n: (K,) int64 vertex counts.
        h: (K,) offsets of the half-planes.
    Returns:
        (K, V', 2) clipped polygons with V' = min(2V, _MAX_VERTICES), and their (K,) counts.
    """
    k_pairs, v = pts.shape[:2]
    slot = torch.arange(v, device=pts.device)
    valid = slot[None] < n[:, None]
    prev = (slot[None] - 1) % n.clamp(min=1)[:, None]  # cyclic predecessor of each vertex
    q = pts
    p = torch.gather(pts, 1, prev[..., None].expand(k_pairs, v, 2))
    dq = h[:, None] - sign * q[..., axis]
    dp = h[:, None] - sign * p[..., axis]
    q_in, p_in = dq >= 0, dp >= 0
    cross = valid & (p_in != q_in)
    # dp and dq have opposite signs where the edge crosses, so t is in [0, 1] there.
    t = dp / torch.where(cross, dp - dq, torch.ones_like(dp))
    crossing = p + t[..., None] * (q - p)
    on_line = (sign * h)[:, None].expand(k_pairs, v)
    crossing = torch.stack([on_line, crossing[..., 1]] if axis == 0 else [crossing[..., 0], on_line],
                           dim=-1)
    # Each edge p -> q emits its crossing point (if any), then q (if inside).
    candidates = torch.stack([crossing, q], dim=2).reshape(k_pairs, 2 * v, 2)
    emitted = torch.stack([cross, valid & q_in], dim=2).reshape(k_pairs, 2 * v)
    order = torch.sort((~emitted).to(torch.uint8), dim=1, stable=True).indices
    v_out = min(2 * v, _MAX_VERTICES)
    order = order[:, :v_out]
    out = torch.gather(candidates, 1, order[..., None].expand(k_pairs, v_out, 2))
    return out, emitted.sum(dim=1).clamp(max=v_out)


def _shoelace(pts: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """(K,) areas of the polygons ``pts[k, :n[k]]``, fanned from the first vertex."""
    rel = pts - pts[:, :1]
    x, y = rel[..., 0], rel[..., 1]
    cross = x[:, 1:-1] * y[:, 2:] - x[:, 2:] * y[:, 1:-1]
    used = (torch.arange(2, pts.shape[1], device=pts.device)[None] < n[:, None])
    return 0.5 * torch.where(used, cross, torch.zeros_like(cross)).sum(dim=1).abs()


def _paired_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """BEV intersection areas of row-paired boxes a[k], b[k]: (K, 7), (K, 7) -> (K,)."""
    hxa, hya = 0.5 * a[:, 3].abs(), 0.5 * a[:, 4].abs()
    hxb, hyb = 0.5 * b[:, 3].abs(), 0.5 * b[:, 4].abs()
    ca, sa = torch.cos(a[:, 6]), torch.sin(a[:, 6])
    cb, sb = torch.cos(b[:, 6]), torch.sin(b[:, 6])
    ddx, ddy = a[:, 0] - b[:, 0], a[:, 1] - b[:, 1]
    # A's centre and half axes in B's frame; cos/sin of yaw_a - yaw_b.
    cx, cy = cb * ddx + sb * ddy, -sb * ddx + cb * ddy
    c, s = ca * cb + sa * sb, sa * cb - ca * sb
    ux, uy = c * hxa, s * hxa
    vx, vy = -s * hya, c * hya
    # Corners counter-clockwise from front-right, as box_corners() orders them.
    px = torch.stack([cx + ux - vx, cx + ux + vx, cx - ux + vx, cx - ux - vx], dim=1)
    py = torch.stack([cy + uy - vy, cy + uy + vy, cy - uy + vy, cy - uy - vy], dim=1)
    pts = torch.stack([px, py], dim=-1)
    n = torch.full((a.shape[0],), 4, dtype=torch.int64, device=a.device)
    for axis, sign, h in ((0, 1.0, hxb), (1, 1.0, hyb), (0, -1.0, hxb), (1, -1.0, hyb)):
        pts, n = _clip(pts, n, axis, sign, h)
    area = torch.where(n >= 3, _shoelace(pts, n), torch.zeros_like(hxa))
    area = torch.minimum(area, torch.minimum(4 * hxa * hya, 4 * hxb * hyb))
    proper = (hxa > 0) & (hya > 0) & (hxb > 0) & (hyb > 0)
    return torch.where(proper, area, torch.zeros_like(area))


def _safe_iou(inter: torch.Tensor, size_a: torch.Tensor, size_b: torch.Tensor) -> torch.Tensor:
    union = size_a + size_b - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)),
                       torch.zeros_like(inter))


def _pairwise(boxes_a: torch.Tensor, boxes_b: torch.Tensor, mode: str) -> torch.Tensor:
    a, b = check_box_pair(boxes_a, boxes_b)
    out = a.new_zeros((a.shape[0], b.shape[0]))
    if out.numel() == 0:
        return out
    # Only pairs whose bounding circles meet can overlap; the rest stay 0.
    radius_a = 0.5 * torch.hypot(a[:, 3], a[:, 4])
    radius_b = 0.5 * torch.hypot(b[:, 3], b[:, 4])
    dist2 = (a[:, None, 0] - b[None, :, 0]) ** 2 + (a[:, None, 1] - b[None, :, 1]) ** 2
    rows, cols = torch.nonzero(dist2 <= (radius_a[:, None] + radius_b[None]) ** 2, as_tuple=True)
    area_a = a[:, 3].abs() * a[:, 4].abs()
    area_b = b[:, 3].abs() * b[:, 4].abs()
    for start in range(0, rows.numel(), _PAIRS_PER_CHUNK):
        i = rows[start:start + _PAIRS_PER_CHUNK]
        j = cols[start:start + _PAIRS_PER_CHUNK]
        inter = _paired_overlap(a[i], b[j])
        if mode == "overlap_bev":
            value = inter
        elif mode == "iou_bev":
            value = _safe_iou(inter, area_a[i], area_b[j])
        else:
            za, hza = a[i, 2], 0.5 * a[i, 5].abs()
            zb, hzb = b[j, 2], 0.5 * b[j, 5].abs()
            dz = (torch.minimum(za + hza, zb + hzb) - torch.maximum(za - hza, zb - hzb)).clamp(min=0)
            value = _safe_iou(inter * dz, area_a[i] * 2 * hza, area_b[j] * 2 * hzb)
        out[i, j] = value
    return out


def boxes_overlap_bev(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """BEV intersection areas: (N, 7), (M, 7) -> (N, M); z and dz are ignored."""
    return _pairwise(boxes_a, boxes_b, "overlap_bev")


def boxes_iou_bev(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Rotated BEV IoU: (N, 7), (M, 7) -> (N, M); 0 where both boxes have zero area."""
    return _pairwise(boxes_a, boxes_b, "iou_bev")


def boxes_iou_3d(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """3D IoU of yaw-rotated boxes: BEV overlap x height overlap (z +- dz/2) over the union."""
    return _pairwise(boxes_a, boxes_b, "iou_3d")


def nms_rotated(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float,
                pre_max_size: int | None = None, post_max_size: int | None = None) -> torch.Tensor:
    """Greedy rotated NMS in BEV.

    Args:
        boxes: (N, 7) [x, y, z, dx, dy, dz, yaw].
        scores: (N,) floating.
        iou_threshold: a box is dropped when its BEV IoU with a kept box is > this.
        pre_max_size: consider only the this many best-scoring boxes.
        post_max_size: return at most this many indices.
    Returns:
        (K,) int64 indices into boxes of the kept boxes, by descending score; equal scores are
        taken in index order (stable sort).
    """
    boxes, _ = check_box_pair(boxes, boxes)
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must be (N,) with N = {boxes.shape[0]}, got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    order = torch.sort(scores, descending=True, stable=True).indices
    if pre_max_size is not None:
        order = order[:pre_max_size]
    sorted_boxes = boxes[order]
    above = (boxes_iou_bev(sorted_boxes, sorted_boxes) > iou_threshold).cpu()
    suppressed = torch.zeros(order.numel(), dtype=torch.bool)
    keep = []
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= above[i]
    kept = order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]
    return kept if post_max_size is None else kept[:post_max_size]


def check_bev_pool_args(features: torch.Tensor, coords: torch.Tensor, batch_size: int, ny: int,
                        nx: int) -> None:
    """ValueError unless features (P, C) floating, coords (P, 3) integer, same device."""
    if features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features must be floating (P, C), got {features.dtype} "
                         f"{tuple(features.shape)}")
    if coords.dim() != 2 or coords.shape[1] != 3 or coords.shape[0] != features.shape[0]:
        raise ValueError(f"coords must be (P, 3) [batch, y, x] with P = {features.shape[0]}, "
                         f"got {tuple(coords.shape)}")
    if coords.is_floating_point() or coords.is_complex() or coords.dtype == torch.bool:
        raise ValueError(f"coords must be an integer tensor, got {coords.dtype}")
    if coords.device != features.device:
        raise ValueError(f"features and coords must be on the same device, "
                         f"got {features.device} and {coords.device}")
    if batch_size < 0 or ny <= 0 or nx <= 0:
        raise ValueError(f"need batch_size >= 0, ny > 0 and nx > 0, got {batch_size}, {ny}, {nx}")


def flat_cells(coords: torch.Tensor, ny: int, nx: int) -> torch.Tensor:
    """(P,) int64 flat index ``(batch * ny + y) * nx + x`` of coords (P, 3) [batch, y, x]."""
    c = coords.long()
    return (c[:, 0] * ny + c[:, 1]) * nx + c[:, 2]


def bev_pool(features: torch.Tensor, coords: torch.Tensor, batch_size: int, ny: int,
             nx: int) -> torch.Tensor:
    """Sum point features into a BEV grid (lift-splat pooling); differentiable in features.

    Args:
        features: (P, C) floating.
        coords: (P, 3) integer [batch, y, x] cell of each point.
    Returns:
        (batch_size, C, ny, nx); cells without points are 0.
    """
    check_bev_pool_args(features, coords, batch_size, ny, nx)
    c = coords.long()
    bad = ((c < 0) | (c >= torch.tensor([batch_size, ny, nx], device=c.device))).any(dim=1)
    if bool(bad.any()):
        row = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"bev_pool: coords[{row}] = {c[row].tolist()} is outside the grid; need "
                         f"0 <= batch < {batch_size}, 0 <= y < {ny}, 0 <= x < {nx}")
    cells = flat_cells(c, ny, nx)
    flat = features.new_zeros((batch_size * ny * nx, features.shape[1]))
    flat = flat.index_add(0, cells, features)
    return flat.view(batch_size, ny, nx, -1).permute(0, 3, 1, 2).contiguous()


def check_bev_pool_weighted_args(weights: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                                 coords: torch.Tensor, batch_size: int, ny: int, nx: int) -> None:
    """ValueError unless weights (P,) and values (R, C) floating of one dtype, rows (P,) integer
    within [0, R), all on coords' device, and coords what :func:`check_bev_pool_args` takes for
    P rows."""
    if weights.dim() != 1 or values.dim() != 2 or not values.is_floating_point() \
            or weights.dtype != values.dtype:
        raise ValueError(f"weights (P,) and values (R, C) must be floating of one dtype, got "
                         f"{weights.dtype} {tuple(weights.shape)} and {values.dtype} "
                         f"{tuple(values.shape)}")
    if rows.shape != weights.shape or rows.is_floating_point() or rows.dtype == torch.bool:
        raise ValueError(f"rows must be integer of the weights' shape {tuple(weights.shape)}, got "
                         f"{rows.dtype} {tuple(rows.shape)}")
    if not (weights.device == values.device == rows.device == coords.device):
        raise ValueError("weights, values, rows and coords must be on the same device")
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(values)):
        bad = int(torch.nonzero((rows < 0) | (rows >= len(values)))[0, 0])
        raise ValueError(f"bev_pool_weighted: rows[{bad}] = {int(rows[bad])} is not a row of the "
                         f"{len(values)} values")
    check_bev_pool_args(weights[:, None], coords, batch_size, ny, nx)


def bev_pool_weighted(weights: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                      coords: torch.Tensor, batch_size: int, ny: int, nx: int) -> torch.Tensor:
    """:func:`bev_pool` of the rows ``weights[:, None] * values[rows]`` (lift and splat)."""
    check_bev_pool_weighted_args(weights, values, rows, coords, batch_size, ny, nx)
    return bev_pool(weights[:, None] * values[rows.long()], coords, batch_size, ny, nx)
