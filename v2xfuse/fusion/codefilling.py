"""CodeFilling (Hu et al., CVPR 2024, "Communication-Efficient Collaborative Perception via
Information Filling with Codebook"): collaborators send integer codebook codes instead of
features, for the cells the ego asks them for by information filling.

One frame, per sample, every arrow a real message through the channel when one is attached::

    sender -> ego   "report"   the cells where the sender is confident (confidence above
                               ``conf_threshold``) and those confidences at ``conf_bits`` each
    ego -> sender   "request"  the cells the ego asks that sender for, in the sender's frame
                               (information filling over all reports, see fill_selection)
    sender -> ego   "codes"    the requested cells it is still confident about, and their
                               m x r codebook codes at ceil(log2 k) bits each
    ego                        dequantises, scatters, warps and fuses them with its own map

Bytes on the wire (``len`` of each serialised message, what the ledger records)::

    codes   = header + cells + ceil(K * m * r * ceil(log2 k) / 8) + codes-shape array
    report  = header + cells + ceil(K_report * conf_bits / 8) + levels-shape array
    request = header + cells
    header  = 112 + len(sender id) + len(kind) + per array (3 + 4 * ndim + len(name))
    cells   = [H, W] as 2 uint32 + min(2 * K flat uint16 indices, ceil(H * W / 8) mask bytes)
              (the ``cells`` codec; uint32 indices when H * W > 65536)

The codebook is shared by every agent at setup (model weights, like the encoder's) and is
not counted per frame. The ego's own features are never quantised.
"""
from __future__ import annotations

import torch

from ..comm.checks import Rejected
from ..comm.received import Received
from ..registry import FUSION
from ..structures.bev import warp_to_ego
from .attention import scatter_cells, sparse_cell_attention
from .base import (Arrivals, Contract, FusionMethod, FusionState, fuse_each_sample,
                   group_by_sample)
from .codebook import ResidualCodebook
from .payload_checks import expect

__all__ = ["CodeFilling", "fill_selection"]


def fill_selection(ego_conf: torch.Tensor, collab_conf: torch.Tensor, mode: str = "fill",
                   fill_threshold: float = 1.0, inclusive: bool = False) -> torch.Tensor:
    """Which collaborator the receiver asks for which cell.

    Args:
        ego_conf: (H, W) the receiver's own detection confidence.
        collab_conf: (L, H, W) each collaborator's confidence, in the receiver's frame.
        mode: ``"fill"``: information filling. The receiver's demand at a cell is
            ``fill_threshold - ego_conf`` (1 - its own confidence by default). Collaborators
            are taken in descending confidence while the confidence already supplied by those
            taken before them is below the demand, i.e. while ``ego_conf + sum(earlier) <
            fill_threshold``: the one that fills the demand is taken, the ones after it would
            only overflow it. ``inclusive=True`` takes a collaborator only while the sum
            *including* its own confidence stays below the threshold, the rule of the
            reference code (there a single very confident collaborator can be skipped).
            ``"max"``: only the most confident collaborator, and only where it is more
            confident than the receiver itself (the reference counts the ego as a candidate).
    Returns:
        (L, H, W) bool.
    """
    if mode not in ("fill", "max"):
        raise ValueError(f"mode must be 'fill' or 'max', got {mode!r}")
    if len(collab_conf) == 0:
        return torch.zeros_like(collab_conf, dtype=torch.bool)
    if mode == "max":
        best = collab_conf.argmax(0, keepdim=True)
        top = collab_conf.gather(0, best)
        chosen = torch.zeros_like(collab_conf, dtype=torch.bool)
        return chosen.scatter_(0, best, top > ego_conf[None])
    ordered, order = collab_conf.sort(dim=0, descending=True, stable=True)
    supplied = ordered.cumsum(0)
    earlier = torch.cat([torch.zeros_like(supplied[:1]), supplied[:-1]])
    take = ego_conf[None] + (supplied if inclusive else earlier) < fill_threshold
    return torch.zeros_like(take).scatter_(0, order, take)


def _cells_of(maps: torch.Tensor, limit: int) -> torch.Tensor:
    """(N, C, H, W) -> (P, C) per-cell vectors, at most ``limit`` of them, drawn at random."""
    x = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
    if limit and len(x) > limit:
        x = x[torch.randperm(len(x), device=x.device)[:limit]]
    return x


@FUSION.register("codefilling")
class CodeFilling(FusionMethod):
    """CodeFilling: codebook codes for the cells information filling selects (see the module
    docstring for the message flow and the byte count).

    Selection, at inference, by the ego: it warps every report into its frame, runs
    :func:`fill_selection` against its own confidence, keeps cells the sender reported, and
    warps each sender's share back into that sender's frame (nearest cell). The sender sends
    the requested cells where its own confidence is still above ``conf_threshold``. While
    training, the request is instead a random share of each sender's reported cells, most
    confident first (as this repo's Where2comm), so one model learns to fuse any density;
    the handshake still runs, with tensors passed straight through.

    Representation: :class:`~v2xfuse.fusion.codebook.ResidualCodebook` (m groups, r residual
    stages, k codewords; nearest codeword with the straight-through estimator and VQ-VAE
    codebook + commitment losses, see there for why). Training fuses the dequantised codes, so
    the detector learns on what a receiver gets; the task gradient reaches the senders'
    features straight through. ``aux_loss`` returns ``loss_codebook``; the first training
    step initialises the codebook from the batch's features by k-means.

    Fusion: the decoded cells are scattered into a (C, H, W) map per sender and fused with the
    ego's map by two-scale per-cell attention (as Where2comm).

    Args:
        channels: C of the BEV maps (injected by the builder).
        groups, stages, codewords: m, r, k of the codebook (C divisible by m).
        mode: ``"fill"`` or ``"max"`` (see :func:`fill_selection`).
        fill_threshold: the filling threshold (the ego's demand is this minus its confidence).
        conf_threshold: a sender reports, and sends, only cells above this confidence.
        inclusive_fill: the reference code's filling rule (see :func:`fill_selection`).
        conf_bits: bits per reported confidence (levels 1..2**bits - 1; any reported cell
            gets at least level 1).
        codebook_weight, commitment: weight of ``loss_codebook`` and, inside it, of the
            commitment term.
        init_iters: k-means iterations of the data initialisation.
        loss_cells: cells per step drawn for the codebook loss and its initialisation
            (0: all).
    """

    contract = Contract(fuses_at=("bev",), services={"confidence"}, handshake=True)
    message_kind = "codes"
    codecs = {"conf_cells": "cells", "conf_levels": "codes", "request": "cells",
              "cells": "cells", "codes": "codes"}

    def __init__(self, channels: int, groups: int = 2, stages: int = 3, codewords: int = 64,
                 mode: str = "fill", fill_threshold: float = 1.0, conf_threshold: float = 0.01,
                 inclusive_fill: bool = False, conf_bits: int = 8, codebook_weight: float = 1.0,
                 commitment: float = 0.25, init_iters: int = 5, loss_cells: int = 8192):
        super().__init__()
        if mode not in ("fill", "max"):
            raise ValueError(f"mode must be 'fill' or 'max', got {mode!r}")
        if not 1 <= conf_bits <= 16:
            raise ValueError(f"conf_bits must be in 1..16, got {conf_bits}")
        self.codebook = ResidualCodebook(channels, groups, stages, codewords)
        self.mode, self.fill_threshold = mode, float(fill_threshold)
        self.conf_threshold, self.inclusive_fill = float(conf_threshold), bool(inclusive_fill)
        self.conf_bits, self.conf_levels = int(conf_bits), (1 << int(conf_bits)) - 1
        self.codebook_weight, self.commitment = float(codebook_weight), float(commitment)
        self.init_iters, self.loss_cells = int(init_iters), int(loss_cells)
        self.codec_kwargs = {"codes": {"bits": self.codebook.bits},
                             "conf_levels": {"bits": self.conf_bits}}

    @staticmethod
    def _confidence(state: FusionState) -> torch.Tensor:
        return state.extras["confidence"][:, 0].detach()  # (N, H, W)

    # -- round 1, sender: report -------------------------------------------------------------
    def report(self, state: FusionState, senders: list[int]):
        conf = self._confidence(state)
        out = []
        for i in senders:
            cells = conf[i] > self.conf_threshold
            if not cells.any():
                out.append(None)
                continue
            levels = torch.round(conf[i][cells] * self.conf_levels).clamp(1, self.conf_levels)
            out.append({"conf_cells": cells, "conf_levels": levels.long()})
        return out

    def _reported(self, payload: dict, like: torch.Tensor) -> torch.Tensor:
        """A checked report payload -> (H, W) confidence map (0 where not reported)."""
        cells = payload["conf_cells"].to(like.device)
        levels = payload["conf_levels"].to(like.device)
        out = torch.zeros_like(like)
        out[cells] = levels.to(like.dtype) / self.conf_levels
        return out

    def check_fields(self, kind, payload, state, sample=0):
        """Reports: a (H, W) cell mask of the grid and one level in 1..2**conf_bits - 1 per
        cell; requests: a (H, W) mask; codes: a (H, W) mask and, per cell, stages x groups
        codes below k."""
        grid = tuple(state.features.shape[-2:])
        if kind == "request":
            return {"request": expect(payload, "request", grid, kind="bool")}
        if kind == "report":
            cells = expect(payload, "conf_cells", grid, kind="bool")
            levels = expect(payload, "conf_levels", (int(cells.sum()),), kind="int").long()
            if levels.numel() and (int(levels.min()) < 1 or int(levels.max()) > self.conf_levels):
                raise Rejected("index", f"payload 'conf_levels': outside 1..{self.conf_levels}")
            return {"conf_cells": cells, "conf_levels": levels}
        cb = self.codebook
        cells = expect(payload, "cells", grid, kind="bool")
        codes = expect(payload, "codes", (int(cells.sum()), cb.stages, cb.groups), kind="int")
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= cb.codewords):
            raise Rejected("index", f"payload 'codes': outside [0, {cb.codewords})")
        return {"cells": cells, "codes": codes}

    # -- round 2, ego: request ---------------------------------------------------------------
    @torch.no_grad()
    def request(self, state: FusionState, senders: list[int], reports: list[Received]):
        conf = self._confidence(state)
        ego_index = state.batch.ego_index().tolist()
        asks: dict[int, dict[str, torch.Tensor]] = {}
        for b, msgs in group_by_sample(reports).items():
            maps = torch.stack([self._reported(m.payload, conf[0]) for m in msgs])  # (L, H, W)
            if self.training:
                for m, c in zip(msgs, maps):
                    asks[m.sender] = self._random_request(c)
                continue
            poses = torch.stack([m.ego_from_sender.to(torch.float64) for m in msgs])
            in_ego = warp_to_ego(maps[:, None], poses.to(maps.dtype), state.grid)[:, 0]
            chosen = fill_selection(conf[ego_index[b]], in_ego, self.mode, self.fill_threshold,
                                    self.inclusive_fill) & (in_ego > 0)
            sender_from_ego = torch.linalg.inv(poses).to(maps.dtype)
            back = warp_to_ego(chosen[:, None].to(maps.dtype), sender_from_ego, state.grid,
                               mode="nearest")[:, 0] > 0.5
            for m, ask in zip(msgs, back & (maps > 0)):
                if ask.any():
                    asks[m.sender] = {"request": ask}
        return [asks.get(i) for i in senders]

    @staticmethod
    def _random_request(reported: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Training: the ``n ~ U{0..K}`` most confident of the K reported cells."""
        count = int((reported > 0).sum())
        n = int(torch.randint(0, count + 1, ()).item())
        if n == 0:
            return None
        ask = torch.zeros(reported.numel(), dtype=torch.bool, device=reported.device)
        ask[reported.flatten().topk(n).indices] = True
        return {"request": ask.view_as(reported)}

    # -- round 3, sender: codes --------------------------------------------------------------
    def encode(self, state: FusionState, senders: list[int]):
        conf = self._confidence(state)
        out = []
        for i in senders:
            ask = state.requests.get(i)
            if ask is None:  # nothing asked (or the request was lost): nothing sent
                out.append(None)
                continue
            cells = ask["request"].to(conf.device) & (conf[i] > self.conf_threshold)
            if not cells.any():
                out.append(None)
                continue
            flat = torch.nonzero(cells.flatten()).squeeze(1)
            codes = self.codebook.encode(state.features[i].flatten(1)[:, flat].T)
            out.append({"cells": cells, "codes": codes})
        return out

    def _dequantised(self, payload: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A checked codes payload -> (K,) flat cell indices and (K, C) dequantised features."""
        device = self.codebook.codebooks.device
        flat = torch.nonzero(payload["cells"].to(device).flatten()).squeeze(1)
        return flat, self.codebook.decode(payload["codes"].to(device).long())

    # -- receiver ----------------------------------------------------------------------------
    def fuse(self, state: FusionState, received: list[Received]) -> torch.Tensor:
        features = state.features
        straight_through = torch.is_grad_enabled() and features.requires_grad

        def fuse_one(arrived: Arrivals) -> torch.Tensor:
            dense, sent = [], []
            for m in arrived.messages:
                flat, values = self._dequantised(m.payload)
                if straight_through:  # value: the codes; gradient: to the sender's features
                    x = features[m.sender].flatten(1)[:, flat].T
                    values = x + (values.to(x.dtype) - x).detach()
                canvas, mask = scatter_cells(values.T, flat, arrived.ego)
                dense.append(canvas)
                sent.append(mask)
            return sparse_cell_attention(arrived.ego, torch.stack(dense), torch.stack(sent),
                                         arrived.ego_from_sender, arrived.grid)

        return fuse_each_sample(state, received, fuse_one)

    def aux_loss(self, state: FusionState) -> dict[str, torch.Tensor]:
        """``loss_codebook``: the codebook's VQ-VAE loss on a random draw of the senders'
        cells, times ``codebook_weight``. On the first training step it first initialises the
        codebook by k-means on every agent's cells (every rank does it, rank 0's is kept)."""
        cb = self.codebook
        if self.training and not bool(cb.initialised):
            cb.fit(_cells_of(state.features.detach(), self.loss_cells), self.init_iters)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.broadcast(cb.codebooks.data, 0)
        senders = self.senders(state.batch)
        if not senders:
            return {"loss_codebook": cb.codebooks.sum() * 0.0}
        x = _cells_of(state.features[senders], self.loss_cells)
        return {"loss_codebook": self.codebook_weight * cb.loss(x, self.commitment)}
