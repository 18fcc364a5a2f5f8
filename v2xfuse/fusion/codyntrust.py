"""CoDynTrust (Xu et al., ICRA 2025, "Robust Asynchronous Collaborative Perception via Dynamic
Feature Trust Modulus"): collaborators' features are kept only inside their detected boxes,
moved along each box's motion over the message's age and weighted by how far each box can be
trusted; multi-scale hybrid fusion (shared/reference/fusion-methods.md section 6).

One frame, per collaborator (its observation is ``delay`` old when it reaches the ego)::

    sender   its boxes on its latest observation, with the head's aleatoric uncertainty and
             K Monte Carlo dropout passes (the detector's services); its boxes on the
             observation before (history) moved into its current frame; tracks by centre
             distance and heading (trust.match_tracks), velocity from each pair, the five
             trust inputs averaged over the pair; sends boxes, velocities, trust inputs and
             its features in the cells of its boxes (grown by ``roi_margin_m``)
    ego      trust per box: 1 if reliable, else the learned MLP; times exp(-lambda * age);
             each box moved by velocity * age; the sender's features resampled along that box
             flow and multiplied by a mask that is the box's trust inside each moved box and 0
             everywhere else; warped into the ego frame and fused with the ego's map by
             max + mean hybrid fusion (spatial, then channel attention) at 1x, 2x and 4x
             pooling, concatenated and projected back to C channels.

The age is the message's (``Received.delay_us``: the ego's clock minus the observation's
timestamp), so the pipeline's delays (``pipeline.delay_mode``) and the channel's both count.
While training (no delay, as the reference: ``binomial_p 0``) the trust MLP learns from the
detection loss through the mask.

The senders' boxes come from the detector's shared head on each sender's own map (the
``detections`` service, in training too, without gradients), so the head must learn on
single-agent maps as well: train with ``model.agent_loss_weight > 0`` (the reference
pre-trains a separate single-agent detector and freezes it). The fused map the head also reads
is the output of the hybrid fusion, not a raw map.

Bytes of one message (what ``len(encode(message))`` is, :func:`message_bytes`), D boxes, K
cells, C channels, an H x W grid; each array costs ``3 + 4 * ndim + len(its key)`` of header::

    112 + len(sender id) + len("trust_rois")          message header
    + 21 + 28 D        boxes.data         (D, 7) float32
    + 24 +  8 D        velocity.data      (D, 2) float32
    + 28 + 20 D        trust_inputs.data  (D, 5) float32
    + 18 +  8          cells.shape        [H, W] uint32
    + 16 +  2 K        cells.idx          (K,) uint16 flat indices (4 K when H W > 65536),
      or 17 + ceil(H W / 8) cells.bits    the bit mask, whichever data is smaller
    + 23 +  4 C K      features.f32       (C, K) float32

= 260 + len(sender id) + 56 D + (4 C + 2) K bytes with indices (261 + len(sender id) + 56 D
+ 4 C K + ceil(H W / 8) with the mask): 56 bytes per box (the reference counts 40, box and
score only) and the features of the regions' cells.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..comm.checks import Rejected
from ..comm.received import Received
from ..registry import FUSION
from ..structures.bev import warp_to_ego
from ..structures.boxes import transform_boxes
from .attention import scatter_cells
from .base import Contract, FusionMethod, FusionState, group_by_sample
from .basic import check_boxes
from .payload_checks import FeatureRange, expect, expect_magnitude, expect_within
from .trust import TRUST_INPUTS, TrustModulus, box_flow, resample_along, roi_cells, \
    track_velocity, trust_inputs

__all__ = ["CoDynTrust", "HybridFusion", "MultiScaleHybridFusion", "message_bytes"]

KIND = "trust_rois"


def message_bytes(sender: str, boxes: int, cells: int, channels: int, height: int,
                  width: int) -> int:
    """``len()`` of one serialised CoDynTrust message (module docstring)."""
    header = 112 + len(sender.encode()) + len(KIND)
    per_array = lambda name, ndim: 3 + 4 * ndim + len(name)  # noqa: E731
    index_bytes = 2 if height * width <= 1 << 16 else 4
    by_index = per_array("cells.idx", 1) + index_bytes * cells
    by_mask = per_array("cells.bits", 1) + -(-height * width // 8)
    return (header + per_array("boxes.data", 2) + 28 * boxes
            + per_array("velocity.data", 2) + 8 * boxes
            + per_array("trust_inputs.data", 2) + 20 * boxes
            + per_array("cells.shape", 1) + 8
            + (by_mask if by_mask - per_array("cells.bits", 1)
               < by_index - per_array("cells.idx", 1) else by_index)
            + per_array("features.f32", 2) + 4 * channels * cells)


class HybridFusion(nn.Module):
    """Fuse L maps of one scale, ego first: per cell the max and the mean over the agents that
    cover it, weighed by a spatial attention (two sigmoid weights from the pair), then a
    squeeze-and-excitation channel attention (reduction 8).

    Args:
        channels: C; hidden: widths of the spatial attention's 1x1 convolutions.
    """

    def __init__(self, channels: int, hidden=(64, 32)):
        super().__init__()
        layers, width = [], 2 * channels
        for h in hidden:
            layers += [nn.Conv2d(width, h, 1), nn.Mish()]
            width = h
        self.spatial = nn.Sequential(*layers, nn.Conv2d(width, 2, 1))
        squeeze = max(channels // 8, 1)
        self.channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, squeeze, 1),
                                     nn.ReLU(), nn.Conv2d(squeeze, channels, 1), nn.Sigmoid())

    def forward(self, stack: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """stack: (L, C, H, W), ego first; valid: (L, 1, H, W) bool (the ego's all True).
        Returns (C, H, W)."""
        high = torch.where(valid, stack, torch.full_like(stack, -torch.inf)).amax(0)
        mean = (stack * valid).sum(0) / valid.sum(0).clamp_min(1)
        weights = torch.sigmoid(self.spatial(torch.cat([high, mean])[None]))[0]
        fused = weights[:1] * high + weights[1:] * mean
        return fused * self.channel(fused[None])[0]


class MultiScaleHybridFusion(nn.Module):
    """:class:`HybridFusion` at each of ``scales`` (average pooling of the maps, any-agent
    pooling of the coverage), upsampled back, concatenated and projected to C channels."""

    def __init__(self, channels: int, scales=(1, 2, 4)):
        super().__init__()
        self.scales = tuple(int(s) for s in scales)
        self.fuse = nn.ModuleList(HybridFusion(channels) for _ in self.scales)
        self.project = nn.Conv2d(channels * len(self.scales), channels, 1)

    def forward(self, stack: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        size = stack.shape[-2:]
        out = []
        for scale, fuse in zip(self.scales, self.fuse):
            if scale == 1:
                out.append(fuse(stack, valid))
                continue
            pooled = F.avg_pool2d(stack, scale, ceil_mode=True)
            covered = F.max_pool2d(valid.to(stack.dtype), scale, ceil_mode=True) > 0
            out.append(F.interpolate(fuse(pooled, covered)[None], size=size, mode="nearest")[0])
        return self.project(torch.cat(out)[None])[0]


@FUSION.register("codyntrust")
class CoDynTrust(FusionMethod):
    """CoDynTrust (module docstring: the message flow and its bytes).

    Args:
        channels: C (injected by the builder); grid: the feature grid (injected).
        passes: K Monte Carlo dropout passes for the epistemic uncertainties (0: none, the
            epistemic inputs are then 0); the head's own ``dropout`` is what they sample, else
            ``pass_dropout`` on the maps.
        decay_per_s, reliable_score, reliable_z, trust_hidden: :class:`TrustModulus`.
        roi_margin_m: each box's region grows by this on every side (default one cell: the
            reference's one-cell margin).
        max_match_m, max_heading_rad, static_m: :func:`~v2xfuse.fusion.trust.match_tracks`.
        max_history_s: an earlier observation older than this gives no velocity.
        scales: poolings of the multi-scale fusion.
        max_boxes, max_box_size_m, max_point_range_m, max_speed_mps, max_uncertainty: what the
            receiver accepts (boxes as :class:`~.basic.LateFusion`; velocities at most
            ``max_speed_mps``; scores in [0, 1]; uncertainties in [0, ``max_uncertainty``]).
        clamp_features, max_strength_ratio: as :class:`~.basic.DenseMapFusion`.
    """

    contract = Contract(fuses_at=("bev",), services={"detections", "passes", "history"},
                        passes=10, pass_dropout=0.1, history_frames=1, uncertainty=True,
                        detections_in_training=True)
    message_kind = KIND
    codecs = {"boxes": "raw", "velocity": "raw", "trust_inputs": "raw", "cells": "cells",
              "features": "float32"}

    def __init__(self, channels: int, grid, passes: int = 10, pass_dropout: float = 0.1,
                 decay_per_s: float = 0.2, reliable_score: float | None = 0.67,
                 reliable_z: float = -0.15, trust_hidden=(10, 20), roi_margin_m: float | None = None,
                 max_match_m: float = 5.0, max_heading_rad: float = 0.785, static_m: float = 0.5,
                 max_history_s: float = 1.0, scales=(1, 2, 4), max_boxes: int = 200,
                 max_box_size_m: float = 30.0, max_point_range_m: float = 300.0,
                 max_speed_mps: float = 70.0, max_uncertainty: float = 1e4,
                 clamp_features: bool = True, max_strength_ratio: float = 10.0):
        super().__init__()
        services = set(type(self).contract.services) - ({"passes"} if passes <= 0 else set())
        self.contract = replace(type(self).contract, services=services, passes=max(int(passes), 0),
                                pass_dropout=float(pass_dropout))
        self.grid = grid
        self.trust = TrustModulus(tuple(trust_hidden), decay_per_s, reliable_score, reliable_z)
        self.fusion = MultiScaleHybridFusion(channels, scales)
        self.feature_range = FeatureRange(channels, clamp=clamp_features)
        self.roi_margin_m = float(grid.cell if roi_margin_m is None else roi_margin_m)
        self.match = {"max_distance_m": float(max_match_m), "max_angle_rad": float(max_heading_rad),
                      "static_m": float(static_m)}
        self.max_history_s = float(max_history_s)
        self.max_boxes, self.max_box_size_m = int(max_boxes), float(max_box_size_m)
        self.max_point_range_m, self.max_speed_mps = float(max_point_range_m), float(max_speed_mps)
        self.max_uncertainty, self.max_strength_ratio = float(max_uncertainty), float(max_strength_ratio)

    # -- sender -------------------------------------------------------------------------------
    def encode(self, state: FusionState, senders: list[int]):
        dets = state.extras.get("detections") or []
        return [self.message(state, i, d) for i, d in zip(senders, dets)]

    def message(self, state: FusionState, sender: int, dets) -> dict | None:
        """One sender's payload from its detections ``dets`` (its frame); None: no box."""
        dets = dets.select(slice(0, self.max_boxes))
        if len(dets) == 0:
            return None
        boxes = dets.boxes.float()
        inputs = trust_inputs(dets).float()
        velocity = boxes.new_zeros(len(boxes), 2)
        previous = self._previous(state, sender)
        if previous is not None:
            prev_dets, agent_from_past, dt = previous
            prev_boxes = transform_boxes(agent_from_past, prev_dets.boxes.double()).float()
            velocity, rows, cols = track_velocity(boxes, prev_boxes, dt, **self.match)
            # a pair this far apart so soon is a wrong match, not a car: no motion is claimed
            velocity[velocity.norm(dim=1) > self.max_speed_mps] = 0.0
            if len(rows):  # the reference averages the trust inputs over the matched pair
                inputs = inputs.clone()
                inputs[rows] = 0.5 * (inputs[rows] + trust_inputs(prev_dets).float()[cols])
        cells = roi_cells(boxes, self.grid, self.roi_margin_m)
        flat = torch.nonzero(cells.flatten()).squeeze(1)
        return {"boxes": boxes, "velocity": velocity, "trust_inputs": inputs, "cells": cells,
                "features": state.features[sender].flatten(1)[:, flat]}

    def _previous(self, state: FusionState, sender: int):
        """(its detections, (4, 4) float64 ``agent_from_past``, seconds between the two) of the
        sender's observation before the one it sends, or None."""
        batch, previous = state.batch, state.extras.get("history_detections") or {}
        history = batch.history
        b = int(batch.sample_of_agent()[sender])
        stamps = batch.frames[b].timestamp_us
        for h, dets in previous.items():
            if int(history.agent[h]) == sender and int(history.steps[h]) == 1:
                if stamps is None:
                    return None
                now = int(stamps[sender - int(batch.ego_index()[b])])
                dt = (now - int(history.timestamp_us[h])) / 1e6
                if 0 < dt <= self.max_history_s:
                    return dets, history.agent_from_past[h], dt
        return None

    def observe(self, senders, payloads):
        self.feature_range.observe_payloads(payloads)

    # -- receiver -----------------------------------------------------------------------------
    def check_fields(self, kind, payload, state, sample=0):
        channels, height, width = state.features.shape[1:]
        boxes = check_boxes(payload, "boxes", self.max_boxes, self.max_box_size_m,
                            self.max_point_range_m)
        velocity = expect(payload, "velocity", (len(boxes), 2))
        if len(velocity) and float(velocity.norm(dim=1).max()) > self.max_speed_mps:
            raise Rejected("bounds", f"payload 'velocity': above {self.max_speed_mps} m/s")
        inputs = expect(payload, "trust_inputs", (len(boxes), len(TRUST_INPUTS)))
        expect_within("trust_inputs", inputs[:, 0], 0.0, 1.0)
        expect_within("trust_inputs", inputs[:, 1:], 0.0, self.max_uncertainty)
        cells = expect(payload, "cells", (height, width), kind="bool")
        feats = expect(payload, "features", (channels, int(cells.sum())))
        if self.max_strength_ratio > 0:
            ego = state.features[int(state.batch.ego_index()[sample])]
            expect_magnitude("features", feats, ego, self.max_strength_ratio)
        feats = self.feature_range.sanitise("features", feats)
        return {"boxes": boxes, "velocity": velocity, "trust_inputs": inputs, "cells": cells,
                "features": feats}

    def gated(self, message: Received, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One message's features on its sender's grid, moved along the box flow over the
        message's age and gated by trust: ((C, H, W) features, (1, H, W) mask)."""
        p = message.payload
        age_s = max(message.delay_us, 0) / 1e6
        trust = self.trust(p["trust_inputs"].to(like.dtype), age_s)
        flat = torch.nonzero(p["cells"].to(like.device).flatten()).squeeze(1)
        canvas, _ = scatter_cells(p["features"], flat, like)
        mask, source = box_flow(p["boxes"].to(like.dtype), p["velocity"].to(like.dtype) * age_s,
                                trust, self.grid, self.roi_margin_m)
        return resample_along(canvas, source, self.grid) * mask, mask

    def fuse(self, state: FusionState, received: list[Received]) -> torch.Tensor:
        """-> (B, C, H, W): every sample through the multi-scale hybrid fusion, the ego alone
        when nothing arrived for it (so its map never skips the fusion layers)."""
        ego = state.features[state.batch.ego_index()]
        groups = group_by_sample(received)
        out = []
        for b in range(len(ego)):
            stack, valid = [ego[b]], [torch.ones_like(ego[b][:1], dtype=torch.bool)]
            msgs = groups.get(b, [])
            if msgs:
                gated = [self.gated(m, ego[b]) for m in msgs]
                poses = torch.stack([m.ego_from_sender.to(ego.dtype) for m in msgs])
                feats = warp_to_ego(torch.stack([f for f, _ in gated]), poses, state.grid)
                masks = warp_to_ego(torch.stack([m for _, m in gated]), poses, state.grid)
                stack += list(feats)
                valid += list(masks > 0)
            out.append(self.fusion(torch.stack(stack), torch.stack(valid)))
        fused = torch.stack(out)
        if torch.is_grad_enabled():
            # every parameter takes part in every step, so DDP needs no unused-parameter
            # search: the trust MLP too when no box arrived (a zero gradient, not none)
            fused = fused + 0.0 * sum(p.sum() for p in self.trust.parameters())
        return fused
