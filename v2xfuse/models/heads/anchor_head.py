"""Anchor-based 3D detection head: anchors, target assignment, losses, decoding.

Anchors sit at every cell centre of the head's BEV grid with ``len(rotations)`` yaws and one
size. Assignment uses the IoU of the axis-aligned BEV hulls ("standup" boxes, as SECOND and
OpenCOOD do): positive above ``pos_iou`` or the best anchor of each box, negative below
``neg_iou`` for every box, ignored in between. Regression follows SECOND's box coder; yaw is
learned through the sine of the angle difference, with a 2-bin direction classifier to
resolve the remaining pi ambiguity.

With ``uncertainty`` the head also predicts, per anchor, the log-variances of its x, y and yaw
errors and of its classification logit, trained with the losses of
:mod:`~v2xfuse.models.heads.uncertainty`; decoded boxes carry them as variances in
``Detections.extras``, with the index of the anchor each box came from (what CoDynTrust's
trust modulus reads, and what stochastic passes gather at). ``dropout`` drops whole input
channels (``Dropout2d``) while training, and in the passes that ask for it (``mc=True``): Monte
Carlo dropout samples the dropout the head was trained with, and only in those passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import HEADS
from ...structures.boxes import wrap_angle
from ...structures.bev import BevGrid
from ...structures.detections import Detections
from .base import Head
from .uncertainty import attenuated_l2, sampled_logit_bce, von_mises_nll

__all__ = ["AnchorHead", "HeadOutput", "standup_iou", "encode_boxes", "decode_boxes",
           "ALEATORIC"]

#: the columns of ``Detections.extras["aleatoric"]`` (variances: m^2, m^2, rad^2, logit^2)
ALEATORIC = ("x", "y", "yaw", "logit")


@dataclass
class HeadOutput:
    """Raw head maps for B ego frames. A = anchors per cell.

    cls: (B, A, H, W) logits; reg: (B, A*7, H, W); dir: (B, A*2, H, W); with uncertainty
    ``log_var``: (B, A*3, H, W) log-variances of the encoded x, y and yaw errors and
    ``log_var_cls``: (B, A, H, W) of the logits (else None).
    """

    cls: torch.Tensor
    reg: torch.Tensor
    dir: torch.Tensor
    log_var: torch.Tensor | None = None
    log_var_cls: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.cls.shape[0]


def standup_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) IoU of the axis-aligned BEV hulls of rotated boxes (N, 7) and (M, 7)."""
    def hull(x):
        c, s = torch.cos(x[:, 6]).abs(), torch.sin(x[:, 6]).abs()
        hx = 0.5 * (x[:, 3] * c + x[:, 4] * s)
        hy = 0.5 * (x[:, 3] * s + x[:, 4] * c)
        return torch.stack([x[:, 0] - hx, x[:, 1] - hy, x[:, 0] + hx, x[:, 1] + hy], 1)
    ha, hb = hull(a), hull(b)
    lo = torch.maximum(ha[:, None, :2], hb[None, :, :2])
    hi = torch.minimum(ha[:, None, 2:], hb[None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area_a = (ha[:, 2:] - ha[:, :2]).prod(-1)
    area_b = (hb[:, 2:] - hb[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None] - inter).clamp(min=1e-9)


def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """SECOND box coder: (K, 7) boxes relative to (K, 7) anchors -> (K, 7) targets."""
    diag = torch.sqrt(anchors[:, 3] ** 2 + anchors[:, 4] ** 2)
    return torch.stack([
        (boxes[:, 0] - anchors[:, 0]) / diag, (boxes[:, 1] - anchors[:, 1]) / diag,
        (boxes[:, 2] - anchors[:, 2]) / anchors[:, 5],
        torch.log(boxes[:, 3] / anchors[:, 3]), torch.log(boxes[:, 4] / anchors[:, 4]),
        torch.log(boxes[:, 5] / anchors[:, 5]), boxes[:, 6] - anchors[:, 6]], dim=1)


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_boxes`."""
    diag = torch.sqrt(anchors[:, 3] ** 2 + anchors[:, 4] ** 2)
    dims = anchors[:, 3:6] * torch.exp(deltas[:, 3:6].clamp(max=4.0))
    return torch.stack([
        deltas[:, 0] * diag + anchors[:, 0], deltas[:, 1] * diag + anchors[:, 1],
        deltas[:, 2] * anchors[:, 5] + anchors[:, 2], dims[:, 0], dims[:, 1], dims[:, 2],
        deltas[:, 6] + anchors[:, 6]], dim=1)


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    w = alpha * targets + (1 - alpha) * (1 - targets)
    return w * (1 - p_t) ** gamma * ce


@HEADS.register("anchor")
class AnchorHead(Head):
    """1x1 conv heads over the fused ego BEV map.

    Args:
        in_channels: channels of the fused map.
        grid: the head's BEV grid (the fused map's extent and cell size).
        anchor_size: (l, w, h); anchor_z: anchor centre height in the ego LiDAR frame.
        anchor_sizes: several (l, w, h) instead of ``anchor_size`` (e.g. cars and trucks, whose
            boxes a car-sized anchor never overlaps by ``pos_iou``: each would train one
            anchor only); ``anchor_z`` is then one height or one per size. Every size comes in
            every rotation: A = sizes x rotations anchors per cell.
        rotations_deg: anchor yaws.
        uncertainty: also predict log-variances (module docstring); ``unc_weight`` weighs
            their losses (``loss_unc_reg``, ``loss_unc_cls``) in the total.
        dropout: channel dropout on the input maps in training and in ``mc`` passes.
        detach_uncertainty: the log-variance convs read the maps detached, so the uncertainty
            losses train those two convs only and never the shared features (their
            gradients into the features cost CoDynTrust more than half its AP@0.5 at the
            quickstart budget; README "AP against the collaborators' delay").
    """

    def __init__(self, in_channels: int, grid: BevGrid, anchor_size=(4.5, 1.9, 1.6), anchor_z: float = -1.1,
                 rotations_deg=(0.0, 90.0), pos_iou: float = 0.6, neg_iou: float = 0.45,
                 cls_weight: float = 1.0, reg_weight: float = 2.0, dir_weight: float = 0.2,
                 dir_offset: float = math.pi / 4, uncertainty: bool = False,
                 unc_weight: float = 1.0, dropout: float = 0.0, detach_uncertainty: bool = False,
                 anchor_sizes=None):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.head dropout must be in [0, 1), got {dropout}")
        self.uncertainty, self.unc_weight = bool(uncertainty), float(unc_weight)
        self.dropout = float(dropout)
        self.detach_uncertainty = bool(detach_uncertainty)
        self.grid = grid
        sizes = [tuple(anchor_size)] if anchor_sizes is None else [tuple(a) for a in anchor_sizes]
        heights = list(anchor_z) if isinstance(anchor_z, (list, tuple)) else [anchor_z] * len(sizes)
        bad_size = any(len(a) != 3 or min(a) <= 0 for a in sizes)
        if not sizes or bad_size or len(heights) != len(sizes):
            raise ValueError(f"model.head anchor_sizes must be (l, w, h) > 0 each, with one "
                             f"anchor_z or one per size; got {anchor_sizes}, {anchor_z}")
        self.num_anchors = len(sizes) * len(rotations_deg)
        self.cls = nn.Conv2d(in_channels, self.num_anchors, 1)
        self.reg = nn.Conv2d(in_channels, self.num_anchors * 7, 1)
        self.dir = nn.Conv2d(in_channels, self.num_anchors * 2, 1)
        nn.init.constant_(self.cls.bias, -math.log((1 - 0.01) / 0.01))  # prior 0.01
        nn.init.normal_(self.reg.weight, std=0.001)
        nn.init.zeros_(self.reg.bias)
        if self.uncertainty:
            self.log_var = nn.Conv2d(in_channels, self.num_anchors * 3, 1)
            self.log_var_cls = nn.Conv2d(in_channels, self.num_anchors, 1)
            for conv in (self.log_var, self.log_var_cls):
                nn.init.normal_(conv.weight, std=0.001)
                nn.init.zeros_(conv.bias)
        self.pos_iou, self.neg_iou = pos_iou, neg_iou
        self.cls_weight, self.reg_weight, self.dir_weight = cls_weight, reg_weight, dir_weight
        self.dir_offset = dir_offset
        xs, ys = grid.centres()
        n = self.num_anchors
        rot = torch.tensor([math.radians(r) for r in rotations_deg])
        anchors = torch.zeros(grid.ny, grid.nx, len(sizes), len(rot), 7)
        anchors[..., 0] = xs[..., None, None]
        anchors[..., 1] = ys[..., None, None]
        anchors[..., 2] = torch.tensor(heights, dtype=torch.float32)[:, None]
        anchors[..., 3:6] = torch.tensor(sizes, dtype=torch.float32)[:, None]
        anchors[..., 6] = rot
        anchors = anchors.view(grid.ny, grid.nx, n, 7)  # each size in every rotation
        # (H, W, A, 7) -> flat in (A, H, W) order, matching the maps' channel layout.
        self.register_buffer("anchors", anchors.permute(2, 0, 1, 3).reshape(-1, 7), persistent=False)

    def forward(self, x: torch.Tensor, mc: bool = False) -> HeadOutput:
        """(B, C, H, W) maps -> raw outputs; ``mc``: a Monte Carlo pass, dropout on whatever
        the module's mode (the module stays as it is)."""
        if self.dropout > 0 and (self.training or mc):
            x = F.dropout2d(x, self.dropout, training=True)
        convs = self._convs()
        if self.uncertainty and self.detach_uncertainty and torch.is_grad_enabled():
            return HeadOutput(*self._conv(x, convs[:3]), *self._conv(x.detach(), convs[3:]))
        return HeadOutput(*self._conv(x, convs))

    @staticmethod
    def _conv(x: torch.Tensor, convs: list[nn.Conv2d]) -> tuple[torch.Tensor, ...]:
        """The 1x1 ``convs`` applied to ``x`` as one conv over their concatenated weights: the
        input map is read once instead of once per output (the separate convs made the head
        1.5x OpenCOOD's); the parameters stay separate, so checkpoints keep their names."""
        weight = torch.cat([c.weight for c in convs])
        bias = torch.cat([c.bias for c in convs])
        return F.conv2d(x, weight, bias).split([c.out_channels for c in convs], dim=1)

    def _convs(self) -> list[nn.Conv2d]:
        """The 1x1 convs in :class:`HeadOutput`'s field order."""
        convs = [self.cls, self.reg, self.dir]
        return convs + [self.log_var, self.log_var_cls] if self.uncertainty else convs

    def confidence(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) per-agent features -> (N, 1, H, W) max anchor probability per cell
        (Where2comm's spatial confidence map, from this same head)."""
        return torch.sigmoid(self.cls(x)).amax(dim=1, keepdim=True)

    def _per_anchor(self, maps: torch.Tensor, b: int, k: int) -> torch.Tensor:
        """(B, A*k, H, W) -> (A*H*W, k) rows of sample ``b`` in anchor order."""
        return maps[b].view(self.num_anchors, k, *maps.shape[2:]).permute(0, 2, 3, 1).reshape(-1, k)

    def _flat(self, out: HeadOutput, b: int):
        """Per-anchor (K,), (K, 7), (K, 2) predictions of sample ``b`` in anchor order."""
        return out.cls[b].reshape(-1), self._per_anchor(out.reg, b, 7), self._per_anchor(out.dir, b, 2)

    @torch.no_grad()
    def assign(self, gt: torch.Tensor, ignore: torch.Tensor | None = None):
        """Labels (K,) in {1 positive, 0 negative, -1 ignore} and matched gt index (K,).
        ``ignore``: (K,) bool anchors that are neither positive nor negative whatever the
        boxes (e.g. outside the region where the ground truth is complete)."""
        k = len(self.anchors)
        labels = torch.zeros(k, dtype=torch.long, device=gt.device)
        matched = torch.zeros(k, dtype=torch.long, device=gt.device)
        if len(gt) == 0:
            if ignore is not None:
                labels[ignore] = -1
            return labels, matched
        iou = standup_iou(self.anchors, gt)
        best, matched = iou.max(dim=1)
        labels[(best >= self.neg_iou) & (best < self.pos_iou)] = -1
        labels[best >= self.pos_iou] = 1
        per_gt_best = iou.argmax(dim=0)
        ok = iou[per_gt_best, torch.arange(len(gt), device=gt.device)] > 0
        labels[per_gt_best[ok]] = 1
        matched[per_gt_best[ok]] = torch.arange(len(gt), device=gt.device)[ok]
        if ignore is not None:
            labels[ignore & (labels == 0)] = -1
        return labels, matched

    def loss(self, out: HeadOutput, gt_boxes: list[torch.Tensor],
             ignore: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Focal classification, smooth-L1 regression (sine yaw) and direction losses, each
        normalised by the positives of its map and averaged over the B maps.

        Args:
            gt_boxes: B tensors (M_b, 7) in each map's frame.
            ignore: optional B region rules (see :meth:`Head.loss`), applied to the anchor
                centres: anchors there are never negatives (see assign).
        """
        cls_losses, reg_losses, dir_losses, unc_reg, unc_cls = [], [], [], [], []
        for b, gt in enumerate(gt_boxes):
            cls, reg, dir_ = self._flat(out, b)
            skip = None if ignore is None else ignore[b](self.anchors[:, :2])
            labels, matched = self.assign(gt, skip)
            pos = labels == 1
            n_pos = max(int(pos.sum()), 1)
            care = labels >= 0
            cls_losses.append(sigmoid_focal_loss(cls[care], pos[care].float()).sum() / n_pos)
            if self.uncertainty:
                unc_cls.append(self._cls_variance_loss(out, b, cls, pos, care))
            if pos.any():
                anchors = self.anchors[pos]
                target = encode_boxes(gt[matched[pos]], anchors)
                pred = reg[pos]
                yaw_error = pred[:, 6] - target[:, 6]
                # Sine of the yaw difference: pred yaw and target yaw compared modulo pi.
                p_sin = torch.sin(pred[:, 6]) * torch.cos(target[:, 6])
                t_sin = torch.cos(pred[:, 6]) * torch.sin(target[:, 6])
                pred = torch.cat([pred[:, :6], p_sin[:, None]], 1)
                target = torch.cat([target[:, :6], t_sin[:, None]], 1)
                reg_losses.append(F.smooth_l1_loss(pred, target, beta=1 / 9, reduction="sum") / n_pos)
                if self.uncertainty:
                    log_var = self._per_anchor(out.log_var, b, 3)[pos]
                    unc_reg.append((attenuated_l2(pred[:, :2] - target[:, :2], log_var[:, :2]).sum()
                                    + von_mises_nll(yaw_error, log_var[:, 2]).sum()) / n_pos)
                dir_target = (wrap_angle(gt[matched[pos], 6] - self.dir_offset) > 0).long()
                dir_losses.append(F.cross_entropy(dir_[pos], dir_target, reduction="sum") / n_pos)
            else:
                reg_losses.append(reg.sum() * 0.0)
                dir_losses.append(dir_.sum() * 0.0)
                if self.uncertainty:
                    unc_reg.append(out.log_var[b].sum() * 0.0)
        cls_l = torch.stack(cls_losses).mean()
        reg_l = torch.stack(reg_losses).mean()
        dir_l = torch.stack(dir_losses).mean()
        total = self.cls_weight * cls_l + self.reg_weight * reg_l + self.dir_weight * dir_l
        losses = {"loss_cls": cls_l.detach(), "loss_reg": reg_l.detach(), "loss_dir": dir_l.detach()}
        if self.uncertainty:
            unc_reg_l, unc_cls_l = torch.stack(unc_reg).mean(), torch.stack(unc_cls).mean()
            total = total + self.unc_weight * (unc_reg_l + unc_cls_l)
            losses.update(loss_unc_reg=unc_reg_l.detach(), loss_unc_cls=unc_cls_l.detach())
        return {"loss": total, **losses}

    def _cls_variance_loss(self, out: HeadOutput, b: int, cls: torch.Tensor, pos: torch.Tensor,
                           care: torch.Tensor) -> torch.Tensor:
        """Mean over positives plus mean over negatives of :func:`sampled_logit_bce` (the
        negatives outnumber the positives a thousandfold: each class weighs half)."""
        log_var = out.log_var_cls[b].reshape(-1)
        neg = care & ~pos
        loss = sampled_logit_bce(cls[care], log_var[care], pos[care].float())
        parts = [loss[pos[care]].mean() if pos.any() else None,
                 loss[neg[care]].mean() if neg.any() else None]
        parts = [p for p in parts if p is not None]
        return torch.stack(parts).mean() if parts else log_var.sum() * 0.0

    @torch.no_grad()
    def decode(self, out: HeadOutput, b: int, score_threshold: float = 0.1,
               pre_max: int = 1000) -> Detections:
        """Boxes (K, 7) and scores (K,) of sample ``b`` in its map's frame before NMS, best
        first."""
        cls, reg, dir_ = self._flat(out, b)
        scores = torch.sigmoid(cls)
        keep = scores >= score_threshold
        idx = torch.nonzero(keep).squeeze(1)
        if len(idx) > pre_max:
            idx = idx[scores[idx].topk(pre_max).indices]
        idx = idx[scores[idx].argsort(descending=True)]
        boxes = self._boxes_at(reg, dir_, idx)
        if out.log_var is None:
            return Detections(boxes, scores[idx])
        # variances in the boxes' units: encoded x, y are metres over the anchor's diagonal
        anchors = self.anchors[idx]
        diag2 = anchors[:, 3] ** 2 + anchors[:, 4] ** 2
        log_var = self._per_anchor(out.log_var, b, 3)[idx]
        aleatoric = torch.stack([torch.exp(log_var[:, 0]) * diag2, torch.exp(log_var[:, 1]) * diag2,
                                 torch.exp(log_var[:, 2]),
                                 torch.exp(out.log_var_cls[b].reshape(-1)[idx])], 1)
        return Detections(boxes, scores[idx], extras={"anchor": idx, "aleatoric": aleatoric})

    def _boxes_at(self, reg: torch.Tensor, dir_: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(K, 7) boxes decoded at anchors ``idx`` from per-anchor ``reg``, ``dir_``."""
        boxes = decode_boxes(reg[idx], self.anchors[idx])
        # Resolve the pi ambiguity with the direction bin: bin 1 means yaw - dir_offset lies
        # in (0, pi), bin 0 in [-pi, 0] (see ``loss``).
        r = torch.remainder(boxes[:, 6] - self.dir_offset, math.pi)
        label = dir_[idx].argmax(1).to(r.dtype)
        boxes[:, 6] = wrap_angle(r + self.dir_offset - math.pi * (1.0 - label))
        return boxes

    @torch.no_grad()
    def decode_at(self, out: HeadOutput, b: int, anchors: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``b``'s (K,) scores and (K, 7) boxes at the anchors ``anchors`` (K,) int64
        (``Detections.extras["anchor"]``): what another pass predicts for the same boxes."""
        cls, reg, dir_ = self._flat(out, b)
        return torch.sigmoid(cls[anchors]), self._boxes_at(reg, dir_, anchors)
