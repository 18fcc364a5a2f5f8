"""Sparse object-query detection head (DETR family: Sparse4D's anchors and key-point sampling,
TransFusion's / CenterFormer's heatmap query selection), on any agent's BEV map.

    features (B, C, H, W) -> dense heatmap (a center head) -> Q queries -> L decoder layers
                                                              (anchors refined at each)
    -> Detections(boxes, scores, extras{"query": (K, D), "reference_point": (K, 3)})

Queries start either from the dense heatmap (``query_init: heatmap``): the Q highest local
maxima of a CenterPoint heatmap trained beside the decoder, each query's anchor the box the
center head regresses at that cell and its feature the map's there; anchors are then per-frame.
Or from a learned bank (``query_init: learned``): Q anchors spread uniformly over the grid
with learned features, the same every frame. The heatmap is trained in both (a dense,
one-to-many objective for the shared BEV features; in ``learned`` only that).

Every layer refines the anchor, the object logit and the front logit it is given by residuals
that start at zero, so the decoder starts from the heatmap's own boxes and scores and learns
corrections. Scores learned from scratch lag: after 100 quickstart steps the decoder's own
scores ranked its boxes at AP@0.5 0.30, the heatmap's scores ranked the same boxes at 0.38.

Training matches each layer's queries one-to-one to the ground truth (Hungarian,
:mod:`.matching`: focal classification cost plus L1 box cost) and sums, over every layer, a
focal classification loss on all queries, an L1 loss on the matched boxes' code
``[x, y, z, log dx, log dy, log dz, sin 2yaw, cos 2yaw]`` and a binary cross-entropy on their
front logits (see :mod:`.query_decoder` for the axis code).

Where the key points read (``sample_from``): ``bev``, the map the head is given (the default);
``camera``, the image features of the cameras of that map's agent (the camera encoder's image
backbone output, before lift-splat: ACCO's and Sparse4D's sampling), each BEV key point lifted
to 3D at the box's height levels ``camera_heights`` and projected into every camera with the
calibration the batch has (:mod:`.camera_sampling`). The heatmap and the initial queries still
come from the BEV map in both.

A fusion method may act on the queries between layers (fusion point ``decoder:<L>``): the
detector passes ``hooks`` ``{L: fn(queries) -> queries}`` and the later layers run on what the
method returned (QUEST appends the queries collaborators sent); :meth:`QueryHead.queries_after`
gives the collaborators' own queries at the same layers (the ``queries`` service).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import HEADS
from ...structures.bev import BevGrid
from ...structures.detections import Detections
from ..inputs import CameraFeatures
from .anchor_head import sigmoid_focal_loss
from .base import Head, OutsideGrid
from .center_head import CenterHead, CenterOutput
from .matching import hungarian, match_cost
from .query_decoder import (ANCHOR_DIM, AnchorEncoder, DecoderLayer, Queries, anchors_from_boxes,
                            axis_code, boxes_from_anchors, front_target)

__all__ = ["QueryHead", "QueryOutput", "box_code"]

QUERY_INITS = ("heatmap", "learned")
SAMPLE_FROM = ("bev", "camera")
#: the object logit learned queries start from (probability 0.01, as RetinaNet's prior)
PRIOR_LOGIT = -math.log((1 - 0.01) / 0.01)


def box_code(anchors: torch.Tensor) -> torch.Tensor:
    """(..., 8) anchors -> (..., 8) the code the box loss and the matching compare:
    ``[x, y, z, log dx, log dy, log dz, sin 2yaw, cos 2yaw]``."""
    return torch.cat([anchors[..., :6], axis_code(anchors)], dim=-1)


@dataclass
class QueryOutput:
    """What the query head made of B maps.

    Attributes:
        dense: the heatmap head's maps (:class:`~.center_head.CenterOutput`).
        layers: each decoder layer's queries as that layer left them (before any fusion after
            it; with a fusion before its refinement, the fused ones: see :meth:`forward`).
        final: the queries decoded: the last layer's, or what a method fusing after the last
            layer returned.
    """

    dense: CenterOutput
    layers: list[Queries]
    final: Queries

    @property
    def batch_size(self) -> int:
        return self.final.batch_size


@HEADS.register("query")
class QueryHead(Head):
    """Object queries refined by ``decoder_layers`` decoder layers (module docstring).

    Args:
        in_channels: C of the map; grid: its grid.
        num_queries: Q per map.
        embed_dims: D of a query; heads: attention heads; ffn_dims: feed-forward width;
            learned_points: key points per query besides the 5 fixed ones.
        decoder_layers: L.
        query_init: ``"heatmap"`` or ``"learned"`` (module docstring).
        heatmap_channels: width of the dense heatmap head's convolutions.
        dense_weight: weight of the heatmap head's loss.
        cls_weight, reg_weight, direction_weight: weights of the focal, L1 and front losses of
            each layer.
        match_cls_weight, match_reg_weight: weights of the two matching costs.
        anchor_size, anchor_z: ``learned`` only: the size (l, w, h) and centre height the bank's
            anchors start with (the anchor head's options of the same name and meaning).
        sample_from: ``"bev"`` or ``"camera"``: what the key points read (module docstring).
        camera_heights: camera mode: the height levels of the key points, in box heights from
            the box's centre (-0.5 its bottom, 0.5 its top).
        image_channels: camera mode: c of the camera encoder's image features (injected by the
            builder from the encoder, never set in a config).
    """

    def __init__(self, in_channels: int, grid: BevGrid, num_queries: int = 128,
                 embed_dims: int = 64, heads: int = 4, ffn_dims: int = 128,
                 learned_points: int = 6, decoder_layers: int = 3, query_init: str = "heatmap",
                 heatmap_channels: int = 32, dense_weight: float = 1.0, cls_weight: float = 1.0,
                 reg_weight: float = 0.25, direction_weight: float = 0.2,
                 match_cls_weight: float = 2.0, match_reg_weight: float = 0.25,
                 anchor_size=(4.5, 1.9, 1.6), anchor_z: float = -1.1, sample_from: str = "bev",
                 camera_heights=(-0.5, 0.0, 0.5), image_channels: int | None = None):
        super().__init__()
        if query_init not in QUERY_INITS:
            raise ValueError(f"query_init {query_init!r} is not one of {QUERY_INITS}")
        if sample_from not in SAMPLE_FROM:
            raise ValueError(f"model.head.query.sample_from: {sample_from!r} is not one of "
                             f"{SAMPLE_FROM}")
        heights = None
        if sample_from == "camera":
            if image_channels is None:
                raise ValueError("model.head.query.sample_from: camera samples the camera "
                                 "encoder's image features, and the model has no camera encoder "
                                 "that gives them (model.encoders.camera.type: lss)")
            heights = tuple(float(v) for v in camera_heights)
            if not heights or any(not -1.0 <= v <= 1.0 for v in heights):
                raise ValueError(f"model.head.query.camera_heights: one or more levels in "
                                 f"[-1, 1] box heights, got {list(camera_heights)}")
        self.sample_from = sample_from
        if decoder_layers < 1:
            raise ValueError("the query head needs at least one decoder layer")
        self.grid, self.query_init = grid, query_init
        self.num_queries, self.embed_dims = int(num_queries), int(embed_dims)
        self.decoder_layers = int(decoder_layers)
        self.dense_weight, self.cls_weight = float(dense_weight), float(cls_weight)
        self.reg_weight, self.direction_weight = float(reg_weight), float(direction_weight)
        self.match_cls_weight = float(match_cls_weight)
        self.match_reg_weight = float(match_reg_weight)
        self.heatmap = CenterHead(in_channels, grid, head_channels=heatmap_channels,
                                  yaw_code="axis_direction")
        self.anchor_encoder = AnchorEncoder(grid, embed_dims)
        sampled = in_channels if heights is None else int(image_channels)
        self.layers = nn.ModuleList(
            DecoderLayer(sampled, embed_dims, heads, ffn_dims, learned_points, grid, heights)
            for _ in range(self.decoder_layers))
        if query_init == "heatmap":
            self.input_proj = nn.Linear(in_channels, embed_dims)
            self.score_embed = nn.Linear(1, embed_dims)
        else:
            self.bank_anchors = nn.Parameter(lattice_anchors(grid, self.num_queries, anchor_size,
                                                             anchor_z))
            self.bank_features = nn.Parameter(torch.randn(self.num_queries, embed_dims) * 0.02)

    @property
    def reads_images(self) -> bool:
        """Whether the head samples image features (camera mode): the detector then passes
        each call the cameras of the maps' agents (``cameras``)."""
        return self.sample_from == "camera"

    # --- queries -------------------------------------------------------------------------
    def initial(self, features: torch.Tensor, dense: CenterOutput) -> Queries:
        """The B maps' queries before the first layer (module docstring)."""
        b = features.shape[0]
        if self.query_init == "learned":
            q = self.num_queries
            return Queries(self.bank_features.expand(b, -1, -1),
                           self.bank_anchors.expand(b, -1, -1),
                           features.new_full((b, q), PRIOR_LOGIT), features.new_zeros(b, q),
                           torch.ones(b, q, dtype=torch.bool, device=features.device))
        heat = dense.heatmap.detach().flatten(1)  # (B, H*W) logits
        peak = heat == F.max_pool2d(dense.heatmap.detach(), 3, 1, 1).flatten(1)
        # local maxima first; other cells only if a map has fewer than Q maxima
        k = min(self.num_queries, heat.shape[1])
        index = (heat - 1e4 * (~peak).to(heat.dtype)).topk(k, dim=1).indices  # (B, Q)
        logits = heat.gather(1, index)
        reg = dense.reg.detach().flatten(2)
        reg = reg.gather(2, index[:, None].expand(-1, reg.shape[1], -1)).transpose(1, 2)
        boxes = self.heatmap.decode_boxes(reg.reshape(-1, reg.shape[-1]), index.reshape(-1))
        cells = features.flatten(2)
        cells = cells.gather(2, index[:, None].expand(-1, cells.shape[1], -1)).transpose(1, 2)
        return Queries(self.input_proj(cells) + self.score_embed(logits[..., None]),
                       anchors_from_boxes(boxes).view(b, k, ANCHOR_DIM), logits,
                       reg[..., 8], torch.ones_like(logits, dtype=torch.bool))

    def with_positions(self, queries: Queries) -> Queries:
        """``queries`` with their anchor embedding (the positional half) filled in."""
        return replace(queries, positions=self.anchor_encoder(queries.anchors.detach()))

    def forward(self, features: torch.Tensor,
                hooks: dict[int, Callable[[Queries], Queries]] | None = None,
                before_refine: bool = False,
                cameras: CameraFeatures | None = None) -> QueryOutput:
        """(B, C, H, W) maps -> :class:`QueryOutput`. ``hooks``: layer -> a function the
        queries leaving that layer go through (with their positions) before the next layer;
        ``before_refine``: the hooks act inside their layer, between its attention and its
        refinement (:meth:`DecoderLayer.attend`), and the refinement sees what they returned. ``layers`` holds each layer's queries as it left
        them: before any fusion after the layer, fused where the fusion is the layer's own
        (``before_refine``: its refinement belongs to it, and is trained on the fused set).
        ``cameras``: camera mode: the cameras of the B maps' agents (``agent`` in 0..B-1), or
        None (no camera: the key points read zeros); ignored in BEV mode."""
        dense = self.heatmap(features)
        queries = self.initial(features, dense)
        layers = []
        for i, layer in enumerate(self.layers):
            if before_refine and hooks and i in hooks:
                attended = layer.attend(queries, features, self.anchor_encoder, cameras)
                fused = hooks[i](self.with_positions(attended))
                queries = layer.refine_queries(replace(fused, positions=None),
                                               self.anchor_encoder)
                layers.append(queries)
                continue
            queries = layer(queries, features, self.anchor_encoder, cameras)
            layers.append(queries)
            if hooks and i in hooks:
                queries = hooks[i](self.with_positions(queries))
        return QueryOutput(dense, layers, queries)

    def queries_after(self, features: torch.Tensor, layers: Iterable[int],
                      before_refine: bool = False,
                      cameras: CameraFeatures | None = None) -> dict[int, Queries]:
        """(N, C, H, W) maps -> layer -> the N maps' queries leaving that layer, with their
        positions (the decoder runs as far as the last layer asked for); ``before_refine``:
        as that layer holds them before its refinement; ``cameras``: as in :meth:`forward`."""
        wanted = sorted(set(layers))
        if not wanted or wanted[0] < 0 or wanted[-1] >= self.decoder_layers:
            raise ValueError(f"layers {wanted}: the head has {self.decoder_layers}")
        queries = self.initial(features, self.heatmap(features))
        out = {}
        for i, layer in enumerate(self.layers[:wanted[-1] + 1]):
            if before_refine and i in wanted:
                attended = layer.attend(queries, features, self.anchor_encoder, cameras)
                out[i] = self.with_positions(attended)
                queries = layer.refine_queries(attended, self.anchor_encoder)
                continue
            queries = layer(queries, features, self.anchor_encoder, cameras)
            if i in wanted:
                out[i] = self.with_positions(queries)
        return out

    def confidence(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, 1, H, W) the dense heatmap's object probability."""
        return self.heatmap.confidence(features)

    # --- training ------------------------------------------------------------------------
    def loss(self, out: QueryOutput, gt_boxes: list[torch.Tensor],
             ignore: list[OutsideGrid] | None = None) -> dict[str, torch.Tensor]:
        """The heatmap head's loss plus, for every layer's queries (and the fused final set when
        a method fused after the last layer), the matched focal, L1 and front losses, each
        divided by the map's number of boxes and averaged over the B maps.

        ``ignore``: optional B region rules (see :meth:`Head.loss`) applied to the queries'
        centres: an unmatched query there is not taught as background."""
        dtype = out.final.features.dtype
        gts = [self._on_grid(gt.to(dtype)) for gt in gt_boxes]
        dense = self.heatmap.loss(out.dense, gts, ignore)
        sets = out.layers + ([out.final] if out.final is not out.layers[-1] else [])
        total = self.dense_weight * dense["loss"]
        for queries in sets:
            cls, reg, front = self._set_loss(queries, gts, ignore)
            total = total + self.cls_weight * cls + self.reg_weight * reg + \
                self.direction_weight * front
        return {"loss": total, "loss_dense": dense["loss"].detach(), "loss_cls": cls.detach(),
                "loss_reg": reg.detach(), "loss_dir": front.detach()}

    def _on_grid(self, gt: torch.Tensor) -> torch.Tensor:
        g = self.grid
        on = (gt[:, 0] >= g.x_min) & (gt[:, 0] < g.x_max) & (gt[:, 1] >= g.y_min) & \
            (gt[:, 1] < g.y_max)
        return gt[on]

    def match(self, logits: torch.Tensor, anchors: torch.Tensor,
              gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One map's matching: (Q,) logits, (Q, 8) anchors, (M, 7) boxes -> (query, box) index
        pairs, min(Q, M) of them."""
        cost = match_cost(logits.detach(), box_code(anchors.detach()),
                          box_code(anchors_from_boxes(gt)), self.match_cls_weight,
                          self.match_reg_weight)
        return hungarian(cost)

    def _set_loss(self, queries: Queries, gts: list[torch.Tensor],
                  ignore: list[OutsideGrid] | None):
        cls_l, reg_l, dir_l = [], [], []
        for b, gt in enumerate(gts):
            valid = queries.valid[b]
            logits, anchors = queries.logits[b][valid], queries.anchors[b][valid]
            front = queries.front[b][valid]
            rows, cols = self.match(logits, anchors, gt)
            target = torch.zeros_like(logits)
            target[rows] = 1.0
            care = torch.ones_like(logits, dtype=torch.bool)
            if ignore is not None:
                care = ~ignore[b](anchors[:, :2].detach())
                care[rows] = True
            n = max(len(gt), 1)
            cls_l.append(sigmoid_focal_loss(logits[care], target[care]).sum() / n)
            if len(rows):
                reg_l.append(F.l1_loss(box_code(anchors[rows]), box_code(anchors_from_boxes(
                    gt[cols])), reduction="sum") / n)
                dir_l.append(F.binary_cross_entropy_with_logits(
                    front[rows], front_target(gt[cols, 6]), reduction="sum") / n)
            else:  # nothing to match: zero losses that still reach every parameter
                reg_l.append(anchors.sum() * 0.0)
                dir_l.append(front.sum() * 0.0)
        return torch.stack(cls_l).mean(), torch.stack(reg_l).mean(), torch.stack(dir_l).mean()

    # --- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, out: QueryOutput, b: int, score_threshold: float = 0.1) -> Detections:
        """Map ``b``'s queries with a score >= threshold as boxes (K, 7) in the map's frame,
        best first; ``extras``: ``"query"`` (K, D) each box's query feature and
        ``"reference_point"`` (K, 3) its anchor's centre."""
        q = out.final
        valid = q.valid[b]
        scores = torch.sigmoid(q.logits[b][valid])
        keep = torch.nonzero(scores >= score_threshold).squeeze(1)
        keep = keep[scores[keep].argsort(descending=True)]
        anchors = q.anchors[b][valid][keep]
        return Detections(boxes_from_anchors(anchors, q.front[b][valid][keep]), scores[keep],
                          extras={"query": q.features[b][valid][keep],
                                  "reference_point": anchors[:, :3]})


def lattice_anchors(grid: BevGrid, count: int, size, z: float) -> torch.Tensor:
    """(count, 8) anchors spread uniformly over ``grid``: the centres of a near-square lattice
    of at least ``count`` cells, the first ``count`` in a stride that covers the whole grid,
    alternating 0 and 90 degree headings."""
    side = math.ceil(math.sqrt(count))
    xs = grid.x_min + (torch.arange(side) + 0.5) * (grid.x_max - grid.x_min) / side
    ys = grid.y_min + (torch.arange(side) + 0.5) * (grid.y_max - grid.y_min) / side
    xy = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    xy = xy[torch.linspace(0, len(xy) - 1, count).round().long()]
    yaw = (torch.arange(count) % 2) * (math.pi / 2)
    boxes = torch.cat([xy, torch.full((count, 1), float(z)),
                       torch.tensor(size, dtype=torch.float32).expand(count, 3), yaw[:, None]], 1)
    return anchors_from_boxes(boxes)
