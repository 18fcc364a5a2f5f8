"""ACCO (Yang et al., "Is Discretization Fusion All You Need for Collaborative Perception?",
ICRA 2025, arXiv 2503.13946; reference/fusion-methods.md section 4): anchor-centric
cooperation inside a query head (``model.head.type: query``).

At each fusion layer L of ``layers`` (fusion point ``decoder:<L>``, one channel round each)
the round runs inside layer L, after its attention and before its refinement
(``Contract.fuse_before_refine``): the refinement sees the fused features, and the next fusion
layer sees the anchors so refined, on both sides.

Sender: each collaborator's own queries at the same place (the detector's ``queries``
service: the same head on its own map, its frame); the anchors whose object score is at least
``score_threshold``, best first, at most ``top_k`` (0: no cap) make one message::

    anchor   (n, 8)  [x, y, z, log dx, log dy, log dz, sin yaw, cos yaw], sender's frame
    feature  (n, D)  the instance feature
    score    (n,)    the object probability (the confidence that gates local fusion)

Nothing passes: nothing is sent. The reference code attends to all of a neighbour's anchors
while sending only K; here the ego attends to exactly what arrived.

Receiver, per sample (the ego's queries ``Q``, the ``R`` anchors that arrived from all its
collaborators):

1. each anchor goes into the ego's frame: centre by ``ego_from_sender``, heading by the
   relative yaw (``sin, cos`` rotated, so the heading is exact), sizes unchanged;
2. local fusion (anchor alignment): each ego query adds ``Linear(D -> D)`` of the
   score-weighted sum of the features of the received anchors whose centres lie inside its
   (rotated, BEV) box;
3. global fusion (spatial-aware cross-attention): ``heads``-head attention from the ego's
   instance features (plus their anchor embedding) to the received anchors only; keys and
   values carry the anchor's embedding (ego frame) and a learned encoding of its sender's
   relative transform ``[dx, dy, dz, sin dyaw, cos dyaw]``; each head's logits get a learned
   distance bias ``-softplus(w_h) * d / distance_scale_m`` (``d`` the BEV distance between the
   two centres);
4. the ego's features plus both (their output projections start at zero, so an untrained
   ACCO starts as the ego alone); then the layer's refinement.

Received messages are untrusted: the channel refuses NaN, inf and values beyond its bound;
:meth:`Acco.check_fields` then holds a message to its arrays' shapes and to at most ``top_k``
anchors (``max_anchors`` without a cap), anchors with finite sizes in (``min_box_size_m``,
``max_box_size_m``], centres within ``max_point_range_m`` of their sender, a heading code of
norm in [0.5, 2], scores in [0, 1] and features within ``FeatureRange.reject_factor`` spans of
what its senders produced in training (clamped to it). A message that fails is dropped and
counted by reason (``ledger.rejected``); the ego fuses those that passed.

Bytes, one message per collaborator per fusion layer that sends (see :meth:`Acco.message_bytes`,
tested against the serialised length)::

    112 + len(sender) + len(kind) + (3 + 8 + len("anchor.f32")) + (3 + 8 + len("feature.<c>"))
        + (3 + 4 + len("score.f32")) + n * (4 * 8 + v * D + 4)

with ``kind`` ``"anchors@decoder:<L>"`` when fusing at several layers (``"anchors"`` at one),
``v`` the feature codec's bytes per value (float16: 2, float32: 4; int8: 1 plus one float32
scale, ``+ 3 + 0 + len("feature.scale") + 4``). At D = 64, float16, 2 fusion layers below 10:
``188 + len(sender) + 164 n``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..comm.checks import Rejected
from ..comm.message import HEADER_BYTES
from ..comm.received import Received
from ..models.heads.query_decoder import ANCHOR_DIM, AnchorEncoder, Queries
from ..registry import FUSION
from ..structures.bev import BevGrid
from ..utils.precision import full_precision
from .base import Contract, FusionMethod, FusionState, group_by_sample
from .payload_checks import FeatureRange, expect, expect_within
from .quest import select_confident

__all__ = ["Acco", "anchors_to_frame", "inside_boxes", "pose_code"]

#: feature codec -> (key suffix, bytes per value; None: int8's float32 scale entry)
_FEATURE_ENTRIES = {"float32": (("f32", 4),), "float16": (("f16", 2),),
                    "int8": (("q", 1), ("scale", None))}


def relative_yaw(a_from_b: torch.Tensor) -> torch.Tensor:
    """(4, 4) transform -> () its rotation's yaw (about z)."""
    return torch.atan2(a_from_b[1, 0], a_from_b[0, 0])


@full_precision
def anchors_to_frame(a_from_b: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(n, 8) anchors in frame b -> the same in frame a: the centre by the whole transform, the
    heading code ``[sin yaw, cos yaw]`` rotated by its yaw (its norm kept), sizes unchanged."""
    a_from_b = a_from_b.to(anchors.dtype)
    centre = anchors[:, :3] @ a_from_b[:3, :3].T + a_from_b[:3, 3]
    yaw = relative_yaw(a_from_b)
    c, s = torch.cos(yaw), torch.sin(yaw)
    sin, cos = anchors[:, 6], anchors[:, 7]
    heading = torch.stack([sin * c + cos * s, cos * c - sin * s], dim=1)
    return torch.cat([centre, anchors[:, 3:6], heading], dim=1)


def inside_boxes(points: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(R, 2) BEV points, (Q, 8) anchors -> (Q, R) bool: point r inside anchor q's rotated BEV
    box (borders included)."""
    norm = torch.sqrt(anchors[:, 6] ** 2 + anchors[:, 7] ** 2).clamp(min=1e-6)
    s, c = (anchors[:, 6] / norm)[:, None], (anchors[:, 7] / norm)[:, None]
    d = points[None, :, :] - anchors[:, None, :2]  # (Q, R, 2)
    along = d[..., 0] * c + d[..., 1] * s
    across = -d[..., 0] * s + d[..., 1] * c
    half = torch.exp(anchors[:, 3:5].clamp(min=-4.0, max=4.0)) / 2
    return (along.abs() <= half[:, 0:1]) & (across.abs() <= half[:, 1:2])


def pose_code(ego_from_sender: torch.Tensor, scale_m: float) -> torch.Tensor:
    """(4, 4) -> (5,) ``[dx, dy, dz, sin dyaw, cos dyaw]``, translations over ``scale_m``."""
    yaw = relative_yaw(ego_from_sender)
    return torch.cat([ego_from_sender[:3, 3] / scale_m, torch.sin(yaw)[None],
                      torch.cos(yaw)[None]])


@FUSION.register("acco")
class Acco(FusionMethod):
    """Anchor-centric cooperation (module docstring).

    Args:
        query_dims: D of the head's queries (injected by the builder).
        grid: the ego's BEV grid (injected by the builder).
        layers: the decoder layers that fuse, each its own channel round (below the head's
            ``decoder_layers``).
        top_k: anchors sent per collaborator and layer at most (0: every one that passes).
        score_threshold: an anchor is sent when its object score is at least this.
        feature_codec: ``float32``, ``float16`` or ``int8`` for the instance features.
        heads: heads of the global cross-attention (a divisor of D).
        distance_scale_m: the distance bias's unit; also the pose code's translation unit.
        max_anchors: without ``top_k``, anchors accepted per message at most.
        min_box_size_m, max_box_size_m, max_point_range_m: a received anchor's sizes and centre
            distance from its sender.
        clamp_features: clamp received features to the trained range (False: only refuse
            values far beyond it).
    """

    contract = Contract(fuses_at=("decoder:1", "decoder:2"), services={"queries"},
                        fuse_before_refine=True)
    message_kind = "anchors"

    def __init__(self, query_dims: int, grid: BevGrid, layers=(1, 2), top_k: int = 32,
                 score_threshold: float = 0.2, feature_codec: str = "float16", heads: int = 4,
                 distance_scale_m: float = 10.0, max_anchors: int = 512,
                 min_box_size_m: float = 0.05, max_box_size_m: float = 30.0,
                 max_point_range_m: float = 300.0, clamp_features: bool = True):
        super().__init__()
        layers = sorted(int(v) for v in layers)
        if not layers or layers[0] < 0 or len(set(layers)) != len(layers):
            raise ValueError(f"model.fusion.layers {layers}: distinct decoder layers >= 0")
        if feature_codec not in _FEATURE_ENTRIES:
            raise ValueError(f"model.fusion.feature_codec {feature_codec!r}: one of "
                             f"{sorted(_FEATURE_ENTRIES)}")
        if not 0.0 <= score_threshold <= 1.0 or top_k < 0:
            raise ValueError("model.fusion: score_threshold in [0, 1] and top_k >= 0")
        if query_dims % heads:
            raise ValueError(f"model.fusion.heads {heads} does not divide the queries' "
                             f"{query_dims} dims")
        self.layers = layers
        self.contract = Contract(fuses_at=tuple(f"decoder:{v}" for v in layers),
                                 services={"queries"}, fuse_before_refine=True)
        self.codecs = {"anchor": "float32", "feature": feature_codec, "score": "float32"}
        self.codec_kwargs = {"feature": {"axis": None}} if feature_codec == "int8" else {}
        self.query_dims, self.grid, self.heads = int(query_dims), grid, int(heads)
        self.top_k, self.score_threshold = int(top_k), float(score_threshold)
        self.distance_scale_m = float(distance_scale_m)
        self.max_anchors = int(max_anchors)
        self.min_box_size_m, self.max_box_size_m = float(min_box_size_m), float(max_box_size_m)
        self.max_point_range_m = float(max_point_range_m)
        d = self.query_dims
        self.local_proj = nn.Linear(d, d)
        self.local_out = nn.Linear(d, d)
        self.anchor_embed = AnchorEncoder(grid, d)
        self.pose_embed = nn.Sequential(nn.Linear(5, d), nn.ReLU(inplace=True), nn.Linear(d, d))
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d) for _ in range(3))
        self.attn_out = nn.Linear(d, d)
        self.distance_weight = nn.Parameter(torch.zeros(self.heads))
        for last in (self.local_out, self.attn_out):  # start as the ego alone
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.range = FeatureRange(d, clamp=clamp_features)

    # --- sender --------------------------------------------------------------------------
    def select(self, queries: Queries) -> torch.Tensor:
        """One map's queries (1, Q, ...) -> (n,) indices of the anchors sent, best first."""
        return select_confident(queries, self.score_threshold, self.top_k)

    def encode(self, state: FusionState, senders: list[int]):
        """Per sender, its selected anchors as one payload (None: none passed)."""
        own = state.extras["sender_queries"][int(state.point.split(":")[1])]
        out = []
        for i in senders:
            q = own[i]
            index = self.select(q)
            out.append({"anchor": q.anchors[0, index], "feature": q.features[0, index],
                        "score": q.scores()[0, index]} if len(index) else None)
        return out

    def message_bytes(self, sender: str, n: int, layer: int | None = None) -> int:
        """Bytes of one message of ``n`` anchors from ``sender`` at ``layer`` (default the
        first fusion layer): the module docstring's formula."""
        kind = self.kind_at(f"decoder:{self.layers[0] if layer is None else layer}")
        total = HEADER_BYTES + len(sender.encode()) + len(kind.encode())
        total += 3 + 4 * 2 + len("anchor.f32") + 4 * ANCHOR_DIM * n
        total += 3 + 4 * 1 + len("score.f32") + 4 * n
        for suffix, size in _FEATURE_ENTRIES[self.codecs["feature"]]:
            if size is None:
                total += 3 + len(f"feature.{suffix}") + 4
            else:
                total += 3 + 4 * 2 + len(f"feature.{suffix}") + size * self.query_dims * n
        return total

    # --- receiver ------------------------------------------------------------------------
    def observe(self, senders, payloads):
        for p in payloads:
            if p is not None:
                self.range.observe(p["feature"].T)

    def check_fields(self, kind, payload, state, sample=0):
        anchor = expect(payload, "anchor", (None, ANCHOR_DIM))
        n = len(anchor)
        cap = self.top_k if self.top_k > 0 else self.max_anchors
        if n > cap:
            raise Rejected("bounds", f"payload 'anchor': {n} anchors, at most {cap}")
        feature = expect(payload, "feature", (n, self.query_dims))
        score = expect(payload, "score", (n,))
        expect_within("score", score, 0.0, 1.0)
        expect_within("anchor", anchor[:, :3], -self.max_point_range_m, self.max_point_range_m)
        expect_within("anchor", anchor[:, 3:6], math.log(self.min_box_size_m),
                      math.log(self.max_box_size_m))
        norm = torch.sqrt(anchor[:, 6] ** 2 + anchor[:, 7] ** 2)
        expect_within("anchor", norm, 0.5, 2.0)
        feature = self.range.sanitise("feature", feature.T).T
        return {"anchor": anchor, "feature": feature, "score": score}

    def fuse(self, state: FusionState, received: list[Received]) -> Queries:
        """The ego's queries (``state.extras["queries"]``, inside the fusion layer) with the
        features of what arrived fused into them (module docstring); anchors and logits are the
        ego's, for the layer's refinement."""
        ego: Queries = state.extras["queries"]
        groups = group_by_sample(received)
        if not any(groups.values()):
            return ego
        features = []
        for b in range(ego.batch_size):
            messages = groups.get(b, [])
            x = ego.features[b]
            if messages:
                x = x + self.fuse_sample(x, ego.positions[b], ego.anchors[b], messages)[0]
            features.append(x)
        return Queries(torch.stack(features), ego.anchors, ego.logits, ego.front, ego.valid,
                       ego.positions)

    def arrived(self, messages: list[Received], dtype: torch.dtype):
        """One sample's messages -> (R, 8) anchors in the ego's frame, (R, D) features, (R,)
        scores, (R, D) their senders' pose embedding."""
        anchors, features, scores, poses = [], [], [], []
        for m in messages:
            p = m.payload
            pose = m.ego_from_sender.to(dtype)
            anchors.append(anchors_to_frame(pose, p["anchor"].to(dtype)))
            features.append(p["feature"].to(dtype))
            scores.append(p["score"].to(dtype))
            code = pose_code(pose, self.distance_scale_m)
            poses.append(self.pose_embed(code)[None].expand(len(p["anchor"]), -1))
        return torch.cat(anchors), torch.cat(features), torch.cat(scores), torch.cat(poses)

    def fuse_sample(self, x: torch.Tensor, positions: torch.Tensor, anchors: torch.Tensor,
                    messages: list[Received]) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample: (Q, D) ego features, (Q, D) their anchor embedding, (Q, 8) anchors and
        its messages -> ((Q, D) what fusion adds, (heads, Q, R) the attention weights over the
        R received anchors)."""
        recv_anchors, recv_features, scores, pose = self.arrived(messages, x.dtype)
        ego_anchors = anchors.detach()
        # local: score-gated sum of the received features whose centres lie in each ego box
        inside = inside_boxes(recv_anchors[:, :2].detach(), ego_anchors).to(x.dtype)
        local = (inside * scores[None]) @ self.local_proj(recv_features)
        # global: cross-attention to the received anchors, with a distance bias per head
        q, r, h = x.shape[0], recv_anchors.shape[0], self.heads
        d = self.query_dims // h
        keys_in = recv_features + self.anchor_embed(recv_anchors.detach()) + pose
        query = self.q_proj(x + positions).view(q, h, d).transpose(0, 1)  # (h, Q, d)
        key = self.k_proj(keys_in).view(r, h, d).transpose(0, 1)          # (h, R, d)
        value = self.v_proj(recv_features + pose).view(r, h, d).transpose(0, 1)
        distance = torch.cdist(ego_anchors[:, :2], recv_anchors[:, :2].detach())  # (Q, R)
        bias = -F.softplus(self.distance_weight)[:, None, None] * \
            (distance / self.distance_scale_m)[None]
        logits = query @ key.transpose(1, 2) / math.sqrt(d) + bias
        weights = torch.softmax(logits, dim=-1)
        attended = (weights @ value).transpose(0, 1).reshape(q, self.query_dims)
        return self.local_out(local) + self.attn_out(attended), weights
