"""CoDynTrust's pieces that are not the fusion itself: per-box trust inputs, box tracks over a
collaborator's two latest observations, the learned trust modulus and the box flow that gates
and moves a collaborator's features (shared/reference/fusion-methods.md section 6).

All boxes are ``(D, 7) [x, y, z, dx, dy, dz, yaw]`` in the sender's frame; maps are
``(C, H, W)`` on the sender's :class:`~v2xfuse.structures.bev.BevGrid` (row index grows with y,
column index with x).

Trust inputs, one row per box (:data:`TRUST_INPUTS`), in natural units (the reference turns
them into "deviation ratios" against dataset statistics it computes offline; here the modulus
standardises them with running statistics it keeps while training, saved with the weights):

* ``score``: the detection score;
* ``u_cls_data``: the standard deviation of the logit the head predicts (aleatoric);
* ``u_cls_model``: the binary entropy (bits) of the mean score over K dropout passes
  (epistemic);
* ``u_reg_data``: ``sqrt(var_x + var_y) + sqrt(var_yaw)`` of the head's predicted variances
  (metres + radians, aleatoric);
* ``u_reg_model``: ``sqrt(var_x + var_y) + std_yaw`` of the centres and yaws the K passes
  predict for the box (epistemic; yaw differences taken modulo pi).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..structures.bev import BevGrid
from ..structures.boxes import wrap_angle
from ..structures.detections import Detections

__all__ = ["TRUST_INPUTS", "trust_inputs", "match_tracks", "track_velocity", "extrapolate",
           "inside_boxes", "roi_cells", "box_flow", "resample_along", "TrustModulus"]

TRUST_INPUTS = ("score", "u_cls_data", "u_cls_model", "u_reg_data", "u_reg_model")


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


def trust_inputs(dets: Detections) -> torch.Tensor:
    """(D, 5) :data:`TRUST_INPUTS` of each box (module docstring). ``dets.extras`` must hold
    ``"aleatoric"`` (D, 4) [var_x, var_y, var_yaw, var_logit]; ``"pass_scores"`` (D, K) and
    ``"pass_boxes"`` (D, K, 7) when K dropout passes were run (else the epistemic terms are 0).
    """
    var = dets.extras["aleatoric"].to(dets.scores.dtype)
    u_cls_data = var[:, 3].clamp_min(0).sqrt()
    u_reg_data = (var[:, 0] + var[:, 1]).clamp_min(0).sqrt() + var[:, 2].clamp_min(0).sqrt()
    if "pass_scores" in dets.extras and dets.extras["pass_scores"].shape[1] > 0:
        u_cls_model = _entropy_bits(dets.extras["pass_scores"].mean(1))
        passes = dets.extras["pass_boxes"].to(dets.scores.dtype)
        xy_var = passes[..., :2].var(1, unbiased=False).sum(1)
        yaw = wrap_angle(passes[..., 6] - dets.boxes[:, None, 6], math.pi)
        u_reg_model = xy_var.sqrt() + yaw.pow(2).mean(1).sqrt()
    else:
        u_cls_model = u_reg_model = torch.zeros_like(dets.scores)
    return torch.stack([dets.scores, u_cls_data, u_cls_model, u_reg_data, u_reg_model], 1)


def match_tracks(current: torch.Tensor, previous: torch.Tensor, max_distance_m: float = 5.0,
                 max_angle_rad: float = 0.785, static_m: float = 0.5
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which box of the previous observation each current box continues (the reference's
    matcher: centre distance, then a heading test).

    A pair is admissible when the centres are less than ``max_distance_m`` apart and either
    moved less than ``static_m`` (a standing car: its displacement says nothing of its
    heading) or moved along the current box's heading: the angle between the displacement and
    the heading axis, modulo pi (a car may reverse), is below ``max_angle_rad``. Pairs are taken
    greedily by increasing distance, each box at most once.

    Args:
        current: (D, 7) boxes now; previous: (J, 7) boxes of the earlier observation, in the
            same frame.
    Returns:
        (rows into current, cols into previous) of the matched pairs, int64.
    """
    empty = torch.zeros(0, dtype=torch.int64)
    if len(current) == 0 or len(previous) == 0:
        return empty, empty
    cur, prev = current.detach().double().cpu(), previous.detach().double().cpu()
    delta = cur[:, None, :2] - prev[None, :, :2]                       # (D, J, 2)
    dist = delta.norm(dim=-1)
    heading = torch.atan2(delta[..., 1], delta[..., 0])
    off = wrap_angle(heading - cur[:, None, 6], math.pi).abs()
    ok = (dist < max_distance_m) & ((dist < static_m) | (off < max_angle_rad))
    cost = torch.where(ok, dist, torch.full_like(dist, math.inf))
    rows, cols = [], []
    used_r, used_c = set(), set()
    for flat in torch.argsort(cost.flatten()).tolist():
        r, c = divmod(flat, cost.shape[1])
        if not math.isfinite(float(cost[r, c])):
            break
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        rows.append(r)
        cols.append(c)
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(cols, dtype=torch.int64)


def track_velocity(current: torch.Tensor, previous: torch.Tensor, dt_s: float, **match
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(D, 2) xy velocity of each current box from its match in ``previous`` (``dt_s``
    seconds earlier, same frame), zero where unmatched or ``dt_s <= 0``; and the matched
    (rows, cols) of :func:`match_tracks` (``match``: its keyword arguments)."""
    velocity = current.new_zeros(len(current), 2)
    rows, cols = match_tracks(current, previous, **match) if dt_s > 0 else \
        (torch.zeros(0, dtype=torch.int64),) * 2
    if len(rows):
        r, c = rows.to(current.device), cols.to(current.device)
        velocity[r] = (current[r, :2] - previous[c, :2].to(current.dtype)) / dt_s
    return velocity, rows, cols


def extrapolate(boxes: torch.Tensor, velocity: torch.Tensor, age_s) -> torch.Tensor:
    """(D, 7) boxes moved linearly by ``velocity * age_s`` (age: scalar or (D,))."""
    out = boxes.clone()
    age = torch.as_tensor(age_s, dtype=boxes.dtype, device=boxes.device)
    out[:, :2] = boxes[:, :2] + velocity.to(boxes.dtype) * (age[:, None] if age.dim() else age)
    return out


def inside_boxes(xy: torch.Tensor, boxes: torch.Tensor, margin_m: float = 0.0) -> torch.Tensor:
    """(P, D) bool: which of the points ``xy`` (P, 2) lie in the BEV footprint of each box,
    grown by ``margin_m`` on every side."""
    d = xy[:, None, :] - boxes[None, :, :2].to(xy.dtype)
    c, s = torch.cos(boxes[:, 6]).to(xy.dtype), torch.sin(boxes[:, 6]).to(xy.dtype)
    along = d[..., 0] * c + d[..., 1] * s
    across = -d[..., 0] * s + d[..., 1] * c
    return ((along.abs() <= boxes[:, 3].to(xy.dtype) / 2 + margin_m)
            & (across.abs() <= boxes[:, 4].to(xy.dtype) / 2 + margin_m))


def _cell_centres(grid: BevGrid, like: torch.Tensor) -> torch.Tensor:
    xs, ys = grid.centres(device=like.device, dtype=like.dtype)
    return torch.stack([xs, ys], -1).reshape(-1, 2)              # (H*W, 2), row-major (y, x)


def roi_cells(boxes: torch.Tensor, grid: BevGrid, margin_m: float) -> torch.Tensor:
    """(H, W) bool: the cells whose centre lies in a box grown by ``margin_m``."""
    if len(boxes) == 0:
        return torch.zeros(grid.ny, grid.nx, dtype=torch.bool, device=boxes.device)
    xy = _cell_centres(grid, boxes.float())
    return inside_boxes(xy, boxes.float(), margin_m).any(1).view(grid.ny, grid.nx)


def box_flow(boxes: torch.Tensor, displacement: torch.Tensor, trust: torch.Tensor,
             grid: BevGrid, margin_m: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gating mask and the sampling positions that move each box's features along its flow.

    Each box ``k`` moves by ``displacement[k]``; a cell whose centre ``p`` lies in moved box
    ``k`` (grown by ``margin_m``) takes its features from ``p - displacement[k]`` and its mask
    value is ``trust[k]`` (where moved boxes overlap, the most trusted one); every other cell
    has mask 0. The mask is differentiable in ``trust``.

    Args:
        boxes: (D, 7); displacement: (D, 2) metres; trust: (D,).
    Returns:
        (mask (1, H, W), source (H, W, 2) xy in metres where each cell samples).
    """
    xy = _cell_centres(grid, trust if trust.is_floating_point() else boxes.float())
    if len(boxes) == 0:
        return xy.new_zeros(1, grid.ny, grid.nx), xy.view(grid.ny, grid.nx, 2)
    moved = boxes.to(xy.dtype).clone()
    moved[:, :2] = moved[:, :2] + displacement.to(xy.dtype)
    inside = inside_boxes(xy, moved, margin_m)                            # (H*W, D)
    weighted = inside.to(xy.dtype) * trust.to(xy.dtype)[None]
    mask, best = weighted.max(1)
    shift = torch.where(inside.any(1, keepdim=True), displacement.to(xy.dtype)[best],
                        torch.zeros_like(xy))
    return mask.view(1, grid.ny, grid.nx), (xy - shift).view(grid.ny, grid.nx, 2)


def resample_along(features: torch.Tensor, source: torch.Tensor, grid: BevGrid) -> torch.Tensor:
    """(C, H, W) map sampled (bilinear, zeros outside) at ``source`` (H, W, 2) xy metres."""
    norm = torch.stack([(source[..., 0] - grid.x_min) / (grid.x_max - grid.x_min),
                        (source[..., 1] - grid.y_min) / (grid.y_max - grid.y_min)], -1) * 2 - 1
    return F.grid_sample(features[None], norm[None].to(features.dtype), mode="bilinear",
                         padding_mode="zeros", align_corners=False)[0]


class TrustModulus(nn.Module):
    """Dynamic feature trust modulus of each box: 1 for a "reliable" box, else a small MLP of
    its standardised :data:`TRUST_INPUTS`; times ``exp(-decay_per_s * age_s)``.

    Args:
        hidden: widths of the MLP's hidden layers (the reference's 5 -> 10 -> 20 -> 1).
        decay_per_s: lambda of the delay decay, per second (the reference's 0.02 per 100 ms
            frame is 0.2 per second).
        reliable_score: a box is reliable when its score is at least this and each of its
            four uncertainties lies at least ``reliable_z`` standard deviations below the mean
            of the training boxes (z <= reliable_z); None: no shortcut.
        momentum: of the running statistics, updated in training from the boxes seen.
    """

    def __init__(self, hidden=(10, 20), decay_per_s: float = 0.2,
                 reliable_score: float | None = 0.67, reliable_z: float = -0.15,
                 momentum: float = 0.01):
        super().__init__()
        layers, width = [], len(TRUST_INPUTS)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))
        nn.init.constant_(self.mlp[-1].bias, 2.0)  # untrained: trust about 0.88, not 0.5
        self.decay_per_s = float(decay_per_s)
        self.reliable_score = None if reliable_score is None else float(reliable_score)
        self.reliable_z, self.momentum = float(reliable_z), float(momentum)
        self.register_buffer("mean", torch.zeros(len(TRUST_INPUTS)))
        self.register_buffer("var", torch.ones(len(TRUST_INPUTS)))

    def standardised(self, inputs: torch.Tensor) -> torch.Tensor:
        """(D, 5) -> (D, 5) z-scores against the running statistics (updated in training)."""
        if self.training and len(inputs) > 1:
            with torch.no_grad():
                x = inputs.detach().to(self.mean.dtype)
                self.mean.lerp_(x.mean(0), self.momentum)
                self.var.lerp_(x.var(0, unbiased=False), self.momentum)
        return (inputs - self.mean.to(inputs)) / (self.var.to(inputs) + 1e-6).sqrt()

    def forward(self, inputs: torch.Tensor, age_s) -> torch.Tensor:
        """(D, 5) trust inputs, the message's age in seconds -> (D,) trust in [0, 1]."""
        z = self.standardised(inputs)
        trust = torch.sigmoid(self.mlp(z)[:, 0])
        if self.reliable_score is not None:
            reliable = (inputs[:, 0] >= self.reliable_score) & (z[:, 1:] <= self.reliable_z).all(1)
            trust = torch.where(reliable, torch.ones_like(trust), trust)
        age = torch.as_tensor(age_s, dtype=trust.dtype, device=trust.device).clamp_min(0)
        return trust * torch.exp(-self.decay_per_s * age)
