"""QUEST (Fan et al., "Query Stream for Practical Cooperative Perception", ICRA 2024): agents
exchange object queries, one packet per query; the ego fuses the ones it shares with a
collaborator and appends the ones it lacks. The query-cooperation steps follow UniV2X's
``AgentQueryFusion`` (reference/fusion-methods.md, section 5).

Runs inside a query head (``model.head.type: query``) at fusion point ``decoder:<layer>``: after
that decoder layer, every collaborator's own queries (the detector's ``queries`` service: the
same head on its own map, in its own frame) are selected and sent; the ego's head runs its
remaining layers on the union. The collaborators' queries are those of their layer ``layer``
too, or with ``send_layer`` those of another layer: ``-1``, their last, is what a deployed
collaborator has (UniV2X fuses the other agent's output track instances): final boxes and
calibrated scores, where those of an inner layer are rough (at the quickstart budget, 48 % of
layer 1's queries scoring >= 0.5 lay within 1 m of a true box). Measured at that budget, neither
made the received queries help: README "Object queries".

Sender: the queries with score >= ``score_threshold``, best first, at most ``top_k`` (0: no
cap); the stream's length is the bandwidth knob. Each query is one packet (a message split
into packets, so the channel's ``packet_loss`` drops queries independently)::

    box       (7,)  its box in the sender's frame; the centre is the query's reference point
    score     (1,)  its object probability
    feature   (D,)  the query's instance feature (the "feature half")      } ``halves``:
    position  (D,)  its anchor embedding (the "positional half")           } either or both

Receiver, per sample, message after message:

1. the boxes go into the ego frame (``ego_from_sender``); queries centred off the ego's grid
   are left out (nothing there is evaluated or supervised);
2. dual-space alignment: each half sent, with the 9 values of the sender-to-ego rotation
   appended, goes through its own ``Linear(D + 9 -> D)``; the aligned query is their sum;
3. matching to the ego's queries scoring >= ``match_score``: Hungarian on the BEV distance of
   the centres, a pair farther apart than ``gate_scale`` times half the ego box's BEV diagonal
   forbidden (UniV2X gates by the box's dimensions too);
4. fusion (co-aware instances): a matched ego query's feature += ``Linear(D -> D)`` of the
   aligned query; its anchor and score stay the ego's;
5. complementation (unaware instances): an unmatched query joins the ego's set: the aligned
   feature, the anchor of its box (ego frame), the logit of its score and the front logit of
   its heading. A later message of the same sample matches against the set so grown.

Received packets are untrusted: the channel refuses NaN, inf and values beyond its bound, then
:meth:`Quest.check_fields` holds each packet to its arrays' shapes, a box of finite size
within range, a score in [0, 1] and halves within ``FeatureRange.reject_factor`` spans of the
range its senders produced in training (clamped to that range). A packet that fails is dropped
and counted by reason (``ledger.rejected``); the ego fuses the packets that passed.

Bytes: every packet carries the whole message header plus its place in the message, so one
query costs (see :meth:`Quest.packet_bytes`, tested against the serialised length)::

    112 + 4 + len(sender) + len("queries") + sum over the packet's arrays of
        (3 + 4 * ndim + len(key) + data bytes)

with keys and data per codec: float32 ``<name>.f32`` 4 bytes a value, float16 ``<name>.f16``
2 bytes, int8 ``<name>.q`` 1 byte plus ``<name>.scale`` (a float32 scalar: 3 + 13 + 4 more
for a feature half). With D = 64, box and score float32, both halves float16: 478 + len(sender)
bytes per query.
"""
from __future__ import annotations

import torch
from torch import nn

from ..comm.message import HEADER_BYTES, PACKET_HEADER_BYTES
from ..comm.received import Received
from ..models.heads.matching import FORBIDDEN, hungarian
from ..models.heads.query_decoder import (Queries, anchors_from_boxes, boxes_from_anchors,
                                          front_logit)
from ..registry import FUSION
from ..structures.bev import BevGrid
from ..structures.boxes import transform_boxes
from .base import Contract, FusionMethod, FusionState, group_by_sample
from .basic import check_boxes
from .payload_checks import FeatureRange, expect, expect_within

__all__ = ["Quest", "HALVES", "select_confident"]

HALVES = ("feature", "position")
#: codec -> (payload entries (key suffix, bytes per value) of one array)
_CODEC_ENTRIES = {"float32": (("f32", 4),), "float16": (("f16", 2),),
                  "int8": (("q", 1), ("scale", None))}


def select_confident(queries: Queries, score_threshold: float, top_k: int) -> torch.Tensor:
    """One map's queries (1, Q, ...) -> indices of its valid queries scoring at least
    ``score_threshold``, best first (ties in query order), at most ``top_k`` (0: no cap)."""
    scores = queries.scores()[0].detach()
    index = torch.nonzero(queries.valid[0] & (scores >= score_threshold)).squeeze(1)
    index = index[torch.sort(scores[index], descending=True, stable=True).indices]
    return index[:top_k] if top_k > 0 else index


@FUSION.register("quest")
class Quest(FusionMethod):
    """Query streams between agents (module docstring).

    Args:
        query_dims: D of the head's queries (injected by the builder).
        grid: the ego's BEV grid (injected by the builder).
        layer: the decoder layer after which the ego fuses (``decoder:<layer>``).
        send_layer: the decoder layer whose queries the collaborators send (-1: their last,
            each collaborator running its whole decoder as a deployed detector does, so
            boxes and scores are final); None: ``layer``, as the ego's at the fusion point.
        score_threshold, top_k: the sender's selection (module docstring).
        halves: which halves of a query are sent: ``["feature"]``, ``["position"]`` or both.
        feature_codec: ``float32``, ``float16`` or ``int8`` (one scale per half) for the halves;
            box_codec: ``float32`` or ``float16`` for the box.
        match_score: the ego's queries that may be matched score at least this.
        gate_scale: matching gate, in halves of the ego box's BEV diagonal.
        max_queries: packets fused per message at most (the first ones; a sender cannot make
            the ego's decoder pay for whatever it chose to send).
        max_box_size_m, max_point_range_m: a received box's largest size and farthest centre
            from its sender.
        clamp_features: clamp received halves to the trained range (False: refuse only values
            far beyond it).
    """

    #: at ``layer`` 1 (the default); an instance's own says where it fuses
    contract = Contract(fuses_at=("decoder:1",), services={"queries"})
    message_kind = "queries"

    def __init__(self, query_dims: int, grid: BevGrid, layer: int = 1,
                 send_layer: int | None = None, score_threshold: float = 0.2, top_k: int = 0, halves=HALVES,
                 feature_codec: str = "float16", box_codec: str = "float32",
                 match_score: float = 0.05, gate_scale: float = 1.0, max_queries: int = 256,
                 max_box_size_m: float = 30.0, max_point_range_m: float = 300.0,
                 clamp_features: bool = True):
        super().__init__()
        self.halves = tuple(halves)
        if not self.halves or set(self.halves) - set(HALVES) or \
                len(set(self.halves)) != len(self.halves):
            raise ValueError(f"halves {list(halves)}: one or both of {list(HALVES)}")
        if feature_codec not in _CODEC_ENTRIES or box_codec not in ("float32", "float16"):
            raise ValueError(f"feature_codec {feature_codec!r} (float32, float16, int8), "
                             f"box_codec {box_codec!r} (float32, float16)")
        if not 0.0 <= score_threshold <= 1.0 or top_k < 0:
            raise ValueError("score_threshold in [0, 1] and top_k >= 0")
        self.contract = Contract(fuses_at=(f"decoder:{int(layer)}",), services={"queries"},
                                 sender_query_layer=None if send_layer is None
                                 else int(send_layer))
        self.codecs = {"box": box_codec, "score": "float32",
                       **{h: feature_codec for h in self.halves}}
        # int8 scales per half (a vector), not per value
        self.codec_kwargs = {h: {"axis": None} for h in self.halves} \
            if feature_codec == "int8" else {}
        self.query_dims, self.grid = int(query_dims), grid
        self.score_threshold, self.top_k = float(score_threshold), int(top_k)
        self.match_score, self.gate_scale = float(match_score), float(gate_scale)
        self.max_queries = int(max_queries)
        self.max_box_size_m = float(max_box_size_m)
        self.max_point_range_m = float(max_point_range_m)
        self.align = nn.ModuleDict({h: nn.Linear(query_dims + 9, query_dims)
                                    for h in self.halves})
        self.fuse_proj = nn.Linear(query_dims, query_dims)
        self.ranges = nn.ModuleDict({h: FeatureRange(query_dims, clamp=clamp_features)
                                     for h in self.halves})

    # --- sender --------------------------------------------------------------------------
    def select(self, queries: Queries) -> torch.Tensor:
        """One map's queries (1, Q, ...) -> (K,) indices of those sent, best first."""
        return select_confident(queries, self.score_threshold, self.top_k)

    def encode(self, state: FusionState, senders: list[int]):
        """Per sender, one packet per selected query (None: nothing selected, nothing sent)."""
        layer = int(state.point.split(":")[1])
        own = state.extras["sender_queries"][layer]
        out = []
        for i in senders:
            q = own[i]
            index = self.select(q)
            if not len(index):
                out.append(None)
                continue
            arrays = {"box": q.boxes()[0, index], "score": q.scores()[0, index, None],
                      "feature": q.features[0, index], "position": q.positions[0, index]}
            out.append([{name: arrays[name][k] for name in ("box", "score", *self.halves)}
                        for k in range(len(index))])
        return out

    def packet_bytes(self, sender: str) -> int:
        """Bytes of one query's packet from ``sender`` (module docstring's formula)."""
        arrays = {"box": (1, 7), "score": (1, 1), **{h: (1, self.query_dims)
                                                     for h in self.halves}}
        n = HEADER_BYTES + PACKET_HEADER_BYTES + len(sender.encode()) + len(self.message_kind)
        for name, (ndim, values) in arrays.items():
            for suffix, size in _CODEC_ENTRIES[self.codecs[name]]:
                if size is None:  # int8's scale: one float32 scalar
                    n += 3 + len(f"{name}.{suffix}") + 4
                else:
                    n += 3 + 4 * ndim + len(f"{name}.{suffix}") + size * values
        return n

    # --- receiver ------------------------------------------------------------------------
    def observe(self, senders, payloads):
        for h in self.halves:
            self.ranges[h].observe_payloads(payloads, name=h)

    def check_fields(self, kind, payload, state, sample=0):
        box = expect(payload, "box", (7,))  # finite: check_payload saw to it
        check_boxes({"box": box[None]}, "box", 1, self.max_box_size_m, self.max_point_range_m)
        score = expect(payload, "score", (1,))
        expect_within("score", score, 0.0, 1.0)
        out = {"box": box, "score": score}
        for h in self.halves:
            out[h] = self.ranges[h].sanitise(h, expect(payload, h, (self.query_dims,)))
        return out

    def fuse(self, state: FusionState, received: list[Received]) -> Queries:
        """The ego's queries (``state.extras["queries"]``) with what arrived fused into them
        and appended to them (module docstring), padded per sample."""
        ego: Queries = state.extras["queries"]
        if not received:
            return ego
        groups = group_by_sample(received)
        parts = []
        for b in range(ego.batch_size):
            valid = ego.valid[b]
            part = {"features": ego.features[b][valid], "anchors": ego.anchors[b][valid],
                    "logits": ego.logits[b][valid], "front": ego.front[b][valid]}
            for message in groups.get(b, []):
                part = self.fuse_message(part, message)
            parts.append(part)
        return Queries.pad(parts)

    def fuse_message(self, part: dict[str, torch.Tensor],
                     message: Received) -> dict[str, torch.Tensor]:
        """One sample's queries (``Queries.pad``'s dict of one map) with one message fused in."""
        packets = message.payload if isinstance(message.payload, list) else [message.payload]
        packets = packets[:self.max_queries]
        if not packets:
            return part
        dtype = part["features"].dtype
        ego_from_sender = message.ego_from_sender.to(dtype)
        boxes = transform_boxes(ego_from_sender,
                                torch.stack([p["box"] for p in packets]).to(dtype))
        g = self.grid
        on = (boxes[:, 0] >= g.x_min) & (boxes[:, 0] < g.x_max) & \
            (boxes[:, 1] >= g.y_min) & (boxes[:, 1] < g.y_max)
        keep = torch.nonzero(on).squeeze(1).tolist()
        if not keep:
            return part
        boxes = boxes[keep]
        scores = torch.stack([packets[k]["score"] for k in keep]).to(dtype).reshape(-1)
        rotation = ego_from_sender[:3, :3].reshape(1, 9).expand(len(keep), 9)
        aligned = sum(self.align[h](torch.cat([torch.stack([packets[k][h] for k in keep])
                                               .to(dtype), rotation], dim=1))
                      for h in self.halves)
        rows, cols = self.match(boxes, part)
        features = part["features"].index_add(0, cols, self.fuse_proj(aligned[rows]))
        fresh = torch.ones(len(keep), dtype=torch.bool, device=boxes.device)
        fresh[rows] = False
        return {"features": torch.cat([features, aligned[fresh]]),
                "anchors": torch.cat([part["anchors"], anchors_from_boxes(boxes[fresh])]),
                "logits": torch.cat([part["logits"],
                                     torch.logit(scores[fresh].clamp(1e-4, 1 - 1e-4))]),
                "front": torch.cat([part["front"], front_logit(boxes[fresh, 6])])}

    def match(self, boxes: torch.Tensor,
              part: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, 7) received boxes (ego frame) against one sample's queries -> (received, ego)
        index pairs within the gate (module docstring, step 3)."""
        candidates = torch.nonzero(torch.sigmoid(part["logits"].detach())
                                   >= self.match_score).squeeze(1)
        own = boxes_from_anchors(part["anchors"][candidates].detach(),
                                 part["front"][candidates].detach())
        distance = torch.cdist(boxes[:, :2].detach(), own[:, :2])
        gate = self.gate_scale * 0.5 * torch.hypot(own[:, 3], own[:, 4])
        rows, cols = hungarian(torch.where(distance <= gate[None], distance,
                                           torch.full_like(distance, FORBIDDEN)))
        ok = distance[rows, cols] <= gate[cols]
        return rows[ok], candidates[cols[ok]]
