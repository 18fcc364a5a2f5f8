"""Attention-based intermediate fusion: AttFuse (OPV2V) and Where2comm.

Both warp what arrived into the ego frame with :func:`~v2xfuse.structures.bev.warp_to_ego` (the
one shared warping routine, through :func:`~v2xfuse.fusion.base.fuse_each_sample`, the one
shared per-sample loop) and fuse per BEV cell across agents.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..comm.received import Received
from ..registry import FUSION
from ..structures.bev import warp_to_ego
from .base import Arrivals, Contract, FusionMethod, FusionState, fuse_each_sample
from .basic import DenseMapFusion
from .payload_checks import FeatureRange, expect, expect_indices, expect_magnitude

__all__ = ["AttFusion", "Where2comm", "cell_attention", "scatter_cells", "sparse_cell_attention"]


def cell_attention(stack: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-cell scaled dot-product self-attention across agents; returns the ego's output.

    Args:
        stack: (L, C, H, W), the ego first, every map in the ego frame.
        valid: (L, 1, H, W) bool, cells an agent actually covers / sent (default: all).
    Returns:
        (C, H, W): ``sum_j softmax_j(x_ego . x_j / sqrt(C)) x_j`` over valid agents j.
    """
    length, channels = stack.shape[:2]
    if length == 1:
        return stack[0]
    scores = (stack[:1] * stack).sum(1, keepdim=True) / math.sqrt(channels)  # (L, 1, H, W)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
        scores[0] = torch.where(valid[0], scores[0], torch.zeros_like(scores[0]))
    weights = torch.softmax(scores, dim=0)
    return (weights * stack).sum(0)


def scatter_cells(values: torch.Tensor, cells: torch.Tensor, like: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse message back on its sender's grid.

    Args:
        values: (C, K) the sent cells' features.
        cells: (K,) long flat indices ``h * W + w``.
        like: (C, H, W) a map of the grid's shape, dtype and device (the ego's).
    Returns:
        ((C, H, W) the values in their cells, zeros elsewhere; (1, H, W) 1 where sent).
    """
    channels, height, width = like.shape
    canvas = like.new_zeros(channels, height * width).index_copy(1, cells, values.to(like.dtype))
    mask = like.new_zeros(1, height * width)
    mask[:, cells] = 1.0
    return canvas.view(channels, height, width), mask.view(1, height, width)


def sparse_cell_attention(ego: torch.Tensor, maps: torch.Tensor, sent: torch.Tensor,
                          ego_from_sender: torch.Tensor, grid) -> torch.Tensor:
    """Fuse sparse collaborator maps with the ego's, Where2comm style, at two scales.

    Args:
        ego: (C, H, W) the ego's map.
        maps: (L, C, H, W) collaborators' maps in their own frames, zero off the cells sent.
        sent: (L, 1, H, W) 1 where a collaborator sent the cell, else 0.
        ego_from_sender: (L, 4, 4).
        grid: the grid of every map.
    Returns:
        (C, H, W): per-cell attention over the ego and the collaborators that sent the cell,
        at full resolution plus the same at 2x average pooling (upsampled, nearest).
    """
    height, width = ego.shape[-2:]
    warped = warp_to_ego(maps, ego_from_sender, grid)
    valid = warp_to_ego(sent, ego_from_sender, grid) > 0.5
    stack = torch.cat([ego[None], warped])
    valid = torch.cat([torch.ones_like(valid[:1]), valid])
    fine = cell_attention(stack, valid)
    pooled = F.avg_pool2d(stack, 2, ceil_mode=True)
    pooled_valid = F.max_pool2d(valid.to(stack.dtype), 2, ceil_mode=True) > 0
    coarse = F.interpolate(cell_attention(pooled, pooled_valid)[None], size=(height, width),
                           mode="nearest")[0]
    return fine + coarse


@FUSION.register("attfuse")
class AttFusion(DenseMapFusion):
    """AttFuse (Xu et al., OPV2V, ICRA 2022): per-cell self-attention over the ego's and the
    warped collaborators' full BEV maps. Payload ``features``: (C, H, W) float32."""

    @staticmethod
    def fuse_one(arrived: Arrivals) -> torch.Tensor:
        feats = arrived.stacked("features")
        covered = arrived.warped(torch.ones_like(feats[:, :1])) > 0.5
        stack = torch.cat([arrived.ego[None], arrived.warped(feats)])
        valid = torch.cat([torch.ones_like(covered[:1]), covered])
        return cell_attention(stack, valid)


@FUSION.register("where2comm")
class Where2comm(FusionMethod):
    """Where2comm (Hu et al., NeurIPS 2022): spatial confidence maps decide which BEV cells a
    collaborator sends; the ego fuses the sparse maps by per-cell attention at two scales.

    Sender: confidence = max over anchors of sigmoid(cls) of the shared detection head on the
    agent's own features. Cells are sent where confidence > ``threshold`` (inference), or the
    ``top_k`` most confident cells when ``top_k`` > 0. While training, a random fraction of the
    most confident cells is kept each step (as the reference does), so one model serves any
    bandwidth. Payload ``features``: (C, K) values and ``cells``: (K,) flat cell indices (sent
    through the sparse codec: bytes grow with K).

    Receiver: each arrival is scattered back to a (C, H, W) map (zeros elsewhere), warped into
    the ego frame, and fused with the ego's map by per-cell attention over the agents that
    sent the cell, at full resolution and 2x pooled; the two results are summed.

    The receiver accepts cells inside its grid and feature values within the range its
    senders produced in training, clamped to it (as :class:`DenseMapFusion`).

    With ``cells_per_packet`` > 0 a message is split into packets of that many cells (the last
    one shorter), each with its own header: a packet the channel drops (``channel.packet_loss``)
    costs the ego those cells only, and the ego fuses the cells of the packets that arrived.

    Args:
        threshold: confidence above which a cell is sent at inference.
        top_k: if > 0, send exactly the ``top_k`` most confident cells instead.
        cells_per_packet: if > 0, split each message into packets of this many cells.
        channels: C (injected by the builder); None: no feature range is kept.
        clamp_features, max_strength_ratio: as :class:`DenseMapFusion` (the cells received
            are compared with as many of the ego's most active cells).
    """

    contract = Contract(fuses_at=("bev",), services={"confidence"})
    message_kind = "sparse_features"
    codecs = {"features": "float32", "cells": "raw"}

    def __init__(self, threshold: float = 0.01, top_k: int = 0, channels: int | None = None,
                 clamp_features: bool = True, max_strength_ratio: float = 10.0,
                 cells_per_packet: int = 0):
        super().__init__()
        self.cells_per_packet = int(cells_per_packet)
        self.max_strength_ratio = float(max_strength_ratio)
        self.threshold = float(threshold)
        self.top_k = int(top_k)
        self.feature_range = FeatureRange(channels, clamp=clamp_features) if channels else None

    def observe(self, senders, payloads):
        if self.feature_range is not None:
            self.feature_range.observe_payloads(payloads)

    def check_fields(self, kind, payload, state, sample=0):
        channels, height, width = state.features.shape[1:]
        cells = expect(payload, "cells", (None,), kind="int")
        cells = expect_indices("cells", cells, height * width)
        feats = expect(payload, "features", (channels, len(cells)))  # finite: check_payload
        if self.max_strength_ratio > 0:
            ego = state.features[int(state.batch.ego_index()[sample])]
            expect_magnitude("features", feats, ego, self.max_strength_ratio)
        if self.feature_range is not None:
            feats = self.feature_range.sanitise("features", feats)
        return {"features": feats, "cells": cells}

    def select(self, confidence: torch.Tensor) -> torch.Tensor:
        """(H, W) confidence -> (K,) flat indices of the cells to send."""
        flat = confidence.reshape(-1)
        if self.training:
            k = int(torch.randint(0, flat.numel() + 1, ()).item())
            return flat.topk(k).indices.sort().values
        if self.top_k > 0:
            return flat.topk(min(self.top_k, flat.numel())).indices.sort().values
        return torch.nonzero(flat > self.threshold).squeeze(1)

    def encode(self, state: FusionState, senders: list[int]):
        conf = state.extras["confidence"]  # (N, 1, H, W)
        maps = state.features.unbind(0)
        out = []
        for i in senders:
            cells = self.select(conf[i, 0].detach())
            payload = {"features": maps[i].flatten(1)[:, cells], "cells": cells.to(torch.int32)}
            out.append(self.packets(payload) if self.cells_per_packet > 0 else payload)
        return out

    def packets(self, payload: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """One message's cells split into packets of ``cells_per_packet`` (at least one)."""
        size = self.cells_per_packet
        count = max(1, -(-len(payload["cells"]) // size))
        return [{"features": payload["features"][:, k * size:(k + 1) * size],
                 "cells": payload["cells"][k * size:(k + 1) * size]} for k in range(count)]

    @staticmethod
    def cells_of(message: Received) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, K) features and (K,) long cells of a message, over the packets that arrived."""
        parts = message.payload if isinstance(message.payload, list) else [message.payload]
        return (torch.cat([q["features"] for q in parts], 1),
                torch.cat([q["cells"].long() for q in parts]))

    def fuse(self, state: FusionState, received: list[Received]) -> torch.Tensor:
        return fuse_each_sample(state, received, self.fuse_one)

    @staticmethod
    def fuse_one(arrived: Arrivals) -> torch.Tensor:
        sparse = [scatter_cells(*Where2comm.cells_of(m), arrived.ego) for m in arrived.messages]
        return sparse_cell_attention(arrived.ego, torch.stack([c for c, _ in sparse]),
                                     torch.stack([m for _, m in sparse]), arrived.ego_from_sender,
                                     arrived.grid)
