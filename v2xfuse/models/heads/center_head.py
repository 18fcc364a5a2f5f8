"""Center-based 3D detection head (CenterPoint, Yin et al., CVPR 2021).

Objects are peaks of a class heatmap on the head's BEV grid. Each ground-truth box marks the
cell holding its centre with 1 and its neighbours with a gaussian of radius
:func:`gaussian_radius` (CornerNet's rule: a corner that far off still overlaps the box by
``min_overlap``); the heatmap learns it with CornerNet's penalty-reduced focal loss. At the
centre cell the regression branch learns the box itself, by ``yaw_code``:

    "sin_cos":        [du, dv, z, log dx, log dy, log dz, sin yaw, cos yaw]              (8)
    "axis_direction": [du, dv, z, log dx, log dy, log dz, sin 2yaw, cos 2yaw, front]     (9)

``du, dv`` in [0, 1): the centre's position inside its cell, in cells along x and y.
``sin_cos`` is CenterPoint's. Where an object's front and back look alike (a few LiDAR
returns on a car's side), its regression averages the two opposite headings and the decoded
yaw lands anywhere between them: on the quickstart, 14% of the matched boxes were off by
15-165 degrees (AP@0.5 0.73). ``axis_direction`` regresses the box's axis (2 yaw, on which
both ends agree) and a logit for which end is the front (1 where the heading is the axis
angle in (-90, 90] degrees, 0 where it is that plus 180), as the anchor head's direction bins
do: 1% off by 15-165 degrees, AP@0.5 0.83 (front and back swapped for 19%, which BEV IoU does
not see).

Decoding keeps cells that are the maximum of their 3x3 neighbourhood (no anchors, no NMS
needed for one class; the detector's rotated NMS still runs), best ``max_peaks``, above a
threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import HEADS
from ...structures.boxes import wrap_angle
from ...structures.detections import Detections
from ..backbone import conv_bn_relu
from ...structures.bev import BevGrid
from .base import Head, OutsideGrid

__all__ = ["CenterHead", "CenterOutput", "CenterTargets", "gaussian_radius", "centre_focal_loss"]

YAW_CODES = {"sin_cos": 8, "axis_direction": 9}  # -> regression channels


@dataclass
class CenterOutput:
    """Raw head maps for B frames: heatmap (B, 1, H, W) logits; reg (B, R, H, W) as in the
    module docstring (R = 8 or 9)."""

    heatmap: torch.Tensor
    reg: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.heatmap.shape[0]


@dataclass
class CenterTargets:
    """One map's targets for M boxes whose centre lies on the grid.

    heatmap: (1, H, W) in [0, 1], exactly 1 at each centre cell; index: (M,) int64 flat cell
    index ``row * W + col`` of each centre; reg: (M, R) regression targets at those cells
    (R = 8 or 9, see the module docstring).
    """

    heatmap: torch.Tensor
    index: torch.Tensor
    reg: torch.Tensor


def gaussian_radius(length: torch.Tensor, width: torch.Tensor, min_overlap: float) -> torch.Tensor:
    """CornerNet's radius (in the units of ``length``, ``width``): the smallest of the three
    corner shifts (both corners inward, both outward, one each way) at which a box displaced
    by it still has IoU ``min_overlap`` with the true one. (M,) -> (M,)."""
    hw, s, o = length * width, length + width, min_overlap

    def root(a, b, c):
        return (b + torch.sqrt((b * b - 4 * a * c).clamp(min=0))) / 2

    r1 = root(1.0, s, hw * (1 - o) / (1 + o))
    r2 = root(4.0, 2 * s, (1 - o) * hw)
    r3 = root(4.0 * o, -2 * o * s, (o - 1) * hw)
    return torch.minimum(torch.minimum(r1, r2), r3)


def centre_focal_loss(logits: torch.Tensor, target: torch.Tensor, positive: torch.Tensor,
                      care: torch.Tensor | None = None, alpha: float = 2.0,
                      beta: float = 4.0) -> torch.Tensor:
    """CornerNet's penalty-reduced focal loss, summed (divide by the number of positives).

    Args:
        logits, target: (...) heatmap logits and gaussian targets in [0, 1].
        positive: (...) bool, the centre cells (target 1).
        care: optional (...) bool, False where background must not be penalised.
    """
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = torch.sigmoid(logits)
    pos = -(1 - p) ** alpha * log_p
    neg = -(1 - target) ** beta * p ** alpha * log_not_p
    if care is not None:
        neg = neg * care
    return torch.where(positive, pos, neg).sum()


@HEADS.register("center")
class CenterHead(Head):
    """A shared 3x3 conv, then a heatmap branch and a box branch (3x3 conv, 1x1 out).

    Args:
        in_channels: channels of the fused map.
        grid: the head's BEV grid.
        head_channels: width of the head's 3x3 convolutions.
        min_radius: smallest gaussian radius in cells (CenterPoint: 2).
        min_overlap: IoU a box displaced by the radius keeps (CenterPoint: 0.1).
        heatmap_weight, reg_weight: weights of the focal and L1 losses (CenterPoint: 1, 0.25).
        max_peaks: peaks kept per map when decoding, best first (before the score threshold).
        yaw_code: ``"axis_direction"`` or CenterPoint's ``"sin_cos"`` (module docstring).
        direction_weight: weight of the front/back cross-entropy (``axis_direction``; the
            anchor head's dir_weight).
    """

    def __init__(self, in_channels: int, grid: BevGrid, head_channels: int = 64,
                 min_radius: int = 2, min_overlap: float = 0.1, heatmap_weight: float = 1.0,
                 reg_weight: float = 0.25, max_peaks: int = 500,
                 yaw_code: str = "axis_direction", direction_weight: float = 0.2):
        super().__init__()
        if yaw_code not in YAW_CODES:
            raise ValueError(f"yaw_code {yaw_code!r} is not one of {sorted(YAW_CODES)}")
        self.yaw_code, self.direction_weight = yaw_code, float(direction_weight)
        self.reg_channels = YAW_CODES[yaw_code]
        self.grid = grid
        self.min_radius, self.min_overlap = int(min_radius), float(min_overlap)
        self.heatmap_weight, self.reg_weight = float(heatmap_weight), float(reg_weight)
        self.max_peaks = int(max_peaks)
        self.shared = conv_bn_relu(in_channels, head_channels)
        self.heatmap = nn.Sequential(conv_bn_relu(head_channels, head_channels),
                                     nn.Conv2d(head_channels, 1, 1))
        self.reg = nn.Sequential(conv_bn_relu(head_channels, head_channels),
                                 nn.Conv2d(head_channels, self.reg_channels, 1))
        nn.init.constant_(self.heatmap[-1].bias, -2.19)  # prior 0.1, CenterPoint's init_bias
        xs, ys = grid.centres()
        self.register_buffer("cell_centres", torch.stack([xs, ys], -1).reshape(-1, 2),
                             persistent=False)  # (H * W, 2) in flat row-major order

    def forward(self, x: torch.Tensor) -> CenterOutput:
        shared = self.shared(x)
        return CenterOutput(self.heatmap(shared), self.reg(shared))

    def confidence(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, 1, H, W) heatmap probability (one class: the heatmap itself)."""
        return torch.sigmoid(self.heatmap(self.shared(x))).amax(dim=1, keepdim=True)

    @torch.no_grad()
    def targets(self, gt: torch.Tensor) -> CenterTargets:
        """Targets of one map from its boxes (M, 7) in the map's frame; boxes whose centre is
        off the grid have no peak (their gaussian tails still reach the cells they cover)."""
        g = self.grid
        u = (gt[:, 0] - g.x_min) / g.cell
        v = (gt[:, 1] - g.y_min) / g.cell
        col, row = torch.floor(u).long(), torch.floor(v).long()
        radius = gaussian_radius(gt[:, 3] / g.cell, gt[:, 4] / g.cell, self.min_overlap)
        radius = radius.floor().long().clamp(min=self.min_radius)
        sigma = (2 * radius + 1).to(gt.dtype) / 6
        # Each box's (2R+1)^2 window of cells (R: the largest radius), kept within its own
        # radius and the grid, max-combined where boxes' gaussians meet.
        r = int(radius.max()) if len(gt) else 0
        d = torch.arange(-r, r + 1, device=gt.device)
        dr, dc = (x.reshape(1, -1) for x in torch.meshgrid(d, d, indexing="ij"))
        rows, cols = row[:, None] + dr, col[:, None] + dc  # (M, (2R+1)^2)
        valid = (dr.abs() <= radius[:, None]) & (dc.abs() <= radius[:, None]) & \
            (rows >= 0) & (rows < g.ny) & (cols >= 0) & (cols < g.nx)
        value = torch.exp(-(dr * dr + dc * dc).to(gt.dtype) / (2 * sigma[:, None] ** 2))
        heatmap = gt.new_zeros(g.ny * g.nx).scatter_reduce(
            0, (rows * g.nx + cols)[valid], value[valid], reduce="amax")
        on = (col >= 0) & (col < g.nx) & (row >= 0) & (row < g.ny)
        b = gt[on]
        yaw = b[:, 6]
        if self.yaw_code == "sin_cos":
            code = [torch.sin(yaw), torch.cos(yaw)]
        else:
            sin2, cos2 = torch.sin(2 * yaw), torch.cos(2 * yaw)
            # Which end is the front, against the axis exactly as decode_boxes computes it.
            front = wrap_angle(yaw - torch.atan2(sin2, cos2) / 2).abs() < math.pi / 2
            code = [sin2, cos2, front.to(yaw.dtype)]
        reg = torch.stack([u[on] - col[on], v[on] - row[on], b[:, 2],
                           torch.log(b[:, 3]), torch.log(b[:, 4]), torch.log(b[:, 5]), *code],
                          dim=1)
        return CenterTargets(heatmap.view(1, g.ny, g.nx), row[on] * g.nx + col[on], reg)

    def loss(self, out: CenterOutput, gt_boxes: list[torch.Tensor],
             ignore: list[OutsideGrid] | None = None) -> dict[str, torch.Tensor]:
        """Focal heatmap loss, L1 box loss (and the front/back cross-entropy) at the centre
        cells, each divided by the map's number of centres and averaged over the B maps.

        Args:
            gt_boxes: B tensors (M_b, 7) in each map's frame.
            ignore: optional B region rules (see :meth:`Head.loss`) applied to the cell
                centres: no background loss there (centres there are still learned).
        """
        hm_losses, reg_losses, dir_losses = [], [], []
        for b, gt in enumerate(gt_boxes):
            t = self.targets(gt.to(out.heatmap.dtype))
            logits = out.heatmap[b].reshape(-1)
            positive = torch.zeros_like(logits, dtype=torch.bool)
            positive[t.index] = True
            care = None if ignore is None else ~ignore[b](self.cell_centres)
            n_pos = max(len(t.index), 1)
            hm = centre_focal_loss(logits, t.heatmap.reshape(-1), positive, care)
            hm_losses.append(hm / n_pos)
            pred = out.reg[b].reshape(self.reg_channels, -1)[:, t.index].T
            reg_losses.append(F.l1_loss(pred[:, :8], t.reg[:, :8], reduction="sum") / n_pos)
            if self.yaw_code == "axis_direction":
                dir_losses.append(F.binary_cross_entropy_with_logits(
                    pred[:, 8], t.reg[:, 8], reduction="sum") / n_pos)
        hm_l = torch.stack(hm_losses).mean()
        reg_l = torch.stack(reg_losses).mean()
        total = self.heatmap_weight * hm_l + self.reg_weight * reg_l
        losses = {"loss_heatmap": hm_l.detach(), "loss_reg": reg_l.detach()}
        if dir_losses:
            dir_l = torch.stack(dir_losses).mean()
            total = total + self.direction_weight * dir_l
            losses["loss_dir"] = dir_l.detach()
        return {"loss": total, **losses}

    @torch.no_grad()
    def decode(self, out: CenterOutput, b: int, score_threshold: float = 0.1) -> Detections:
        """Peaks of map ``b`` (local 3x3 maxima, best ``max_peaks``, score >= threshold) as
        boxes (K, 7) in the map's frame, best first."""
        heat = torch.sigmoid(out.heatmap[b:b + 1])
        peaks = heat * (heat == F.max_pool2d(heat, 3, stride=1, padding=1))
        scores, index = peaks.reshape(-1).topk(min(self.max_peaks, peaks.numel()))
        keep = scores >= score_threshold
        scores, index = scores[keep], index[keep]
        reg = out.reg[b].reshape(self.reg_channels, -1)[:, index].T
        return Detections(self.decode_boxes(reg, index), scores)

    def decode_boxes(self, reg: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(K, R) regression values at flat cells ``index`` (K,) -> boxes (K, 7) in the map's
        frame (the inverse of :meth:`targets`)."""
        g = self.grid
        col = (index % g.nx).to(reg.dtype)
        row = torch.div(index, g.nx, rounding_mode="floor").to(reg.dtype)
        dims = torch.exp(reg[:, 3:6].clamp(max=4.0))
        if self.yaw_code == "sin_cos":
            yaw = torch.atan2(reg[:, 6], reg[:, 7])
        else:  # the axis in (-90, 90] degrees, turned round where the front is the other end
            axis = torch.atan2(reg[:, 6], reg[:, 7]) / 2
            yaw = wrap_angle(axis + math.pi * (reg[:, 8] <= 0).to(reg.dtype))
        return torch.cat([(g.x_min + (col + reg[:, 0]) * g.cell)[:, None],
                          (g.y_min + (row + reg[:, 1]) * g.cell)[:, None],
                          reg[:, 2:3], dims, yaw[:, None]], dim=1)
