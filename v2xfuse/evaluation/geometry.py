"""Rotated-box geometry for evaluation in numpy, without torch.

Scoring a predictions file must not pay for importing torch (1.2 s of a 1.5 s run), so the
evaluators compute IoU here instead of through :mod:`v2xfuse.ops`. The arithmetic is the CPU
kernel's (``csrc/box_geometry.h``) step for step in float64, so the values are the op's: box A
is expressed in box B's frame, A's quad is clipped by B's four half-planes (Sutherland-Hodgman),
the area is the shoelace fanned from the first vertex. ``tests/evaluation/test_geometry.py``
holds the two to the same bits. That relies on numpy's float64 sin and cos giving the C
library's values, as they do on the build machines; numpy's own SIMD versions on other CPUs may
differ in the last bit, which moves an IoU by about 1e-16.

Boxes are ``(N, 7) [x, y, z, dx, dy, dz, yaw]`` as in :mod:`v2xfuse.structures.boxes`, which
owns the convention (importing it would import torch; the test above checks that the corner
order here is that module's).

Unlike the op, which fills an (N, M) matrix, :func:`paired_iou` takes row-paired boxes, so a
caller can score only the pairs that may overlap, over many frames in one call.
"""
from __future__ import annotations

import numpy as np

__all__ = ["BOX_DIM", "box_corners", "PreparedBoxes", "reach_overlaps", "bev_overlap", "paired_iou",
           "paired_ious", "pairwise_iou"]

BOX_DIM = 7

# Unit-box corner signs, bottom face counter-clockwise from front-right, then the top face
# (v2xfuse.structures.boxes.CORNER_SIGNS).
_CORNER_SIGNS = np.array([[+1, -1, -1], [+1, +1, -1], [-1, +1, -1], [-1, -1, -1],
                          [+1, -1, +1], [+1, +1, +1], [-1, +1, +1], [-1, -1, +1]],
                         dtype=np.float64)

# A convex n-gon clipped by one half-plane gains at most one vertex (4 -> 8 after four planes);
# the kernel's buffers hold 16 to absorb extra crossings that rounding can create.
_MAX_VERTICES = 16


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """(N, 8, 3) corners of (N, 7) float64 boxes, ordered as ``structures.box_corners``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, BOX_DIM)
    local = _CORNER_SIGNS[None] * (0.5 * b[:, None, 3:6])
    c, s = np.cos(b[:, 6])[:, None], np.sin(b[:, 6])[:, None]
    x = local[..., 0] * c - local[..., 1] * s
    y = local[..., 0] * s + local[..., 1] * c
    return np.stack([x, y, local[..., 2]], axis=-1) + b[:, None, 0:3]


class PreparedBoxes:
    """Per-box quantities of the kernel's ``make_rot_box``, computed once per box.

    Attributes (each (N,) float64): centre ``x, y, z``; half extents ``hx, hy, hz`` (made
    non-negative); ``c, s`` cos and sin of yaw; ``radius`` the BEV half diagonal; ``area`` the
    BEV area.
    """

    def __init__(self, boxes: np.ndarray) -> None:
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, BOX_DIM)
        self.x, self.y, self.z = boxes[:, 0], boxes[:, 1], boxes[:, 2]
        self.hx = np.abs(boxes[:, 3]) * 0.5
        self.hy = np.abs(boxes[:, 4]) * 0.5
        self.hz = np.abs(boxes[:, 5]) * 0.5
        self.s, self.c = np.sin(boxes[:, 6]), np.cos(boxes[:, 6])
        self.radius = np.sqrt(self.hx * self.hx + self.hy * self.hy)
        self.area = 4.0 * self.hx * self.hy

    def __len__(self) -> int:
        return len(self.x)

    def take(self, index: np.ndarray) -> "PreparedBoxes":
        """The boxes at ``index`` (an integer array), as one more PreparedBoxes."""
        out = object.__new__(PreparedBoxes)
        for name, value in vars(self).items():
            setattr(out, name, value[index])
        return out


def reach_overlaps(a: PreparedBoxes, b: PreparedBoxes, ia: np.ndarray | None = None,
                   ib: np.ndarray | None = None) -> np.ndarray:
    """(P,) bool: pairs of boxes whose BEV rectangles may overlap (the kernel's first test).

    The pairs are ``(a[k], b[k])``, or ``(a[ia[k]], b[ib[k]])`` given index arrays (which spares
    gathering every attribute of every pair). False means an overlap of 0: a box of zero area,
    or centres farther apart than the two half diagonals.
    """
    ia = slice(None) if ia is None else ia
    ib = slice(None) if ib is None else ib
    ddx = a.x[ia] - b.x[ib]
    ddy = a.y[ia] - b.y[ib]
    reach = a.radius[ia] + b.radius[ib]
    flat_a = (a.hx <= 0) | (a.hy <= 0)
    flat_b = (b.hx <= 0) | (b.hy <= 0)
    return ~(flat_a[ia] | flat_b[ib] | (ddx * ddx + ddy * ddy > reach * reach))


def _clip(px: np.ndarray, py: np.ndarray, n: np.ndarray, along_y: bool, sign: float,
          h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip each column's polygon (px, py)[:n] by the half-plane ``sign * coord <= h``.

    A polygon wholly inside comes out as it went in (the kernel writes back each vertex, in
    order), so only the others are clipped: a detection overlapping its ground truth crosses
    about two of the four sides.
    """
    rows = px.shape[0]
    if rows == 0:
        return px, py, n
    coord = py if along_y else px
    outside = (np.arange(rows)[:, None] < n) & (h - sign * coord < 0.0)
    cut = np.flatnonzero(outside.any(axis=0))
    if len(cut) == len(n):
        return _clip_all(px, py, n, along_y, sign, h)
    if len(cut) == 0:
        return px, py, n
    cx, cy, cn = _clip_all(px[:, cut], py[:, cut], n[cut], along_y, sign, h[cut])
    width = max(rows, cx.shape[0])
    ox = np.zeros((width, len(n)))
    oy = np.zeros((width, len(n)))
    ox[:rows], oy[:rows] = px, py
    ox[:, cut], oy[:, cut] = 0.0, 0.0
    ox[:cx.shape[0], cut], oy[:cy.shape[0], cut] = cx, cy
    m = n.copy()
    m[cut] = cn
    return ox, oy, m


def _clip_all(px: np.ndarray, py: np.ndarray, n: np.ndarray, along_y: bool, sign: float,
              h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_clip` of every column.

    Vertices are stored one per row, pairs along columns, so every step is a contiguous
    operation over all pairs. The kernel walks the vertices writing, per vertex, the edge's
    crossing (if the edge crosses the line) and then the vertex (if inside); here both
    candidates of every vertex are computed at once, in slots 2k and 2k + 1, and the written ones
    are packed in that order, stopping at the kernel's 16.

    Args:
        px, py: (K, P) vertices; n: (P,) vertex counts; h: (P,) half extents.
    Returns:
        (ox, oy, m): the clipped polygons (K', P) and their (P,) vertex counts.
    """
    rows, pairs = px.shape
    if rows == 0:
        return px, py, n
    ar = np.arange(pairs)
    last = np.maximum(n - 1, 0)
    coord = py if along_y else px
    dq = h - sign * coord                                # (K, P), >= 0 inside
    dp = np.concatenate([dq[last, ar][None], dq[:-1]])  # the previous vertex's, cyclically
    prev_x = np.concatenate([px[last, ar][None], px[:-1]])
    prev_y = np.concatenate([py[last, ar][None], py[:-1]])
    valid = np.arange(rows)[:, None] < n
    q_in = dq >= 0.0
    write = np.empty((2 * rows, pairs), dtype=bool)
    write[0::2] = valid & ((dp >= 0.0) != q_in)
    write[1::2] = valid & q_in
    on_line = np.broadcast_to(sign * h, (rows, pairs))
    vx = np.empty((2 * rows, pairs))
    vy = np.empty((2 * rows, pairs))
    with np.errstate(divide="ignore", invalid="ignore"):  # t is used only where the edge
        t = dp / (dp - dq)                                # crosses: then it lies in [0, 1]
        if along_y:
            vx[0::2], vy[0::2] = prev_x + t * (px - prev_x), on_line
        else:
            vx[0::2], vy[0::2] = on_line, prev_y + t * (py - prev_y)
    vx[1::2], vy[1::2] = px, py
    slot = np.cumsum(write, axis=0) - 1
    write &= slot < _MAX_VERTICES
    m = write.sum(axis=0)
    width = int(m.max(initial=0))
    ox = np.zeros((width, pairs))
    oy = np.zeros((width, pairs))
    src = np.nonzero(write)
    dst = (slot[src], src[1])
    ox[dst] = vx[src]
    oy[dst] = vy[src]
    return ox, oy, m


def bev_overlap(a: PreparedBoxes, b: PreparedBoxes) -> np.ndarray:
    """(P,) BEV intersection areas of row-paired boxes (``ops.boxes_overlap_bev``'s values)."""
    out = np.zeros(len(a))
    idx = np.flatnonzero(reach_overlaps(a, b))
    if len(idx) == 0:
        return out
    a, b = a.take(idx), b.take(idx)
    ddx, ddy = a.x - b.x, a.y - b.y
    # A's centre and half axes in B's frame; cos/sin of yaw_a - yaw_b by the difference formulas
    cx = b.c * ddx + b.s * ddy
    cy = -b.s * ddx + b.c * ddy
    c = a.c * b.c + a.s * b.s
    s = a.s * b.c - a.c * b.s
    ux, uy = c * a.hx, s * a.hx
    vx, vy = -s * a.hy, c * a.hy
    # corners counter-clockwise from front-right, as box_corners orders them
    px = np.stack([cx + ux - vx, cx + ux + vx, cx - ux + vx, cx - ux - vx])
    py = np.stack([cy + uy - vy, cy + uy + vy, cy - uy + vy, cy - uy - vy])
    n = np.full(len(idx), 4, dtype=np.int64)
    for along_y, sign, h in ((False, 1.0, b.hx), (True, 1.0, b.hy), (False, -1.0, b.hx),
                             (True, -1.0, b.hy)):
        px, py, n = _clip(px, py, n, along_y, sign, h)
    # shoelace fanned from the first vertex, summed in the kernel's order
    twice = np.zeros(len(idx))
    for k in range(1, px.shape[0] - 1):
        term = (px[k] - px[0]) * (py[k + 1] - py[0]) - (px[k + 1] - px[0]) * (py[k] - py[0])
        twice = np.where(k + 1 < n, twice + term, twice)
    area = np.abs(twice) * 0.5
    out[idx] = np.where(n < 3, 0.0, np.minimum(area, np.minimum(a.area, b.area)))
    return out


def _safe_iou(inter: np.ndarray, size_a: np.ndarray, size_b: np.ndarray) -> np.ndarray:
    union = size_a + size_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0.0, inter / np.where(union > 0.0, union, 1.0), 0.0)


def paired_iou(boxes_a, boxes_b, iou_type: str = "bev") -> np.ndarray:
    """IoU of row-paired boxes: ``out[k] = IoU(boxes_a[k], boxes_b[k])``.

    Args:
        boxes_a, boxes_b: (P, 7) float64, or :class:`PreparedBoxes` of P boxes each.
        iou_type: "bev" (polygon IoU in the xy plane) or "3d" (BEV intersection x height overlap
            over the union volume), as ``ops.boxes_iou_bev`` / ``ops.boxes_iou_3d``.
    Returns:
        (P,) float64 in [0, 1], the op's values; 0 where both boxes are degenerate.
    """
    return paired_ious(boxes_a, boxes_b, (iou_type,))[iou_type]


def paired_ious(boxes_a, boxes_b, iou_types=("bev",)) -> dict[str, np.ndarray]:
    """:func:`paired_iou` for several IoU types, ``{iou_type: (P,)}``, one BEV clipping."""
    for iou_type in iou_types:
        if iou_type not in ("bev", "3d"):
            raise ValueError(f"iou_type must be 'bev' or '3d', got {iou_type!r}")
    a = boxes_a if isinstance(boxes_a, PreparedBoxes) else PreparedBoxes(boxes_a)
    b = boxes_b if isinstance(boxes_b, PreparedBoxes) else PreparedBoxes(boxes_b)
    overlap = bev_overlap(a, b)
    out = {}
    if "bev" in iou_types:
        out["bev"] = _safe_iou(overlap, a.area, b.area)
    if "3d" in iou_types:
        top = np.minimum(a.z + a.hz, b.z + b.hz)
        bottom = np.maximum(a.z - a.hz, b.z - b.hz)
        dz = np.maximum(top - bottom, 0.0)
        inter = np.where(dz > 0.0, overlap * dz, 0.0)
        out["3d"] = _safe_iou(inter, a.area * 2.0 * a.hz, b.area * 2.0 * b.hz)
    return out


def pairwise_iou(boxes_a: np.ndarray, boxes_b: np.ndarray, iou_type: str = "bev") -> np.ndarray:
    """(N, M) IoU of every pair of (N, 7) and (M, 7) float64 boxes (see :func:`paired_iou`)."""
    n, m = len(boxes_a), len(boxes_b)
    rows, cols = np.repeat(np.arange(n), m), np.tile(np.arange(m), n)
    return paired_iou(boxes_a[rows], boxes_b[cols], iou_type).reshape(n, m)
