"""The query decoder: anchors, the queries they travel with, and one decoder layer.

An anchor is a box in the map's frame, coded as ``ANCHOR_DIM`` = 8 numbers::

    [x, y, z, log dx, log dy, log dz, sin yaw, cos yaw]

Each query carries one anchor and a feature vector. A decoder layer (Sparse4D's order) runs

    self-attention among the queries (anchor embedding added to query and key)
 -> key-point attention: the BEV map sampled (``grid_sample``) at points around each anchor,
    5 fixed ones (centre, the 4 BEV corners) and ``learned_points`` offsets predicted from the
    query, weighted per head by a softmax over the points (deformable attention on one level);
    in camera mode (``camera_heights`` given) each of those points at each height level
    ``z + level * dz`` of the box is a 3D point, read from the image features of the cameras
    of the map's agent that see it (:mod:`.camera_sampling`)
 -> feed-forward
 -> refinement: the anchor, the object logit and the front logit each plus a predicted
    residual (zero at initialisation, so a layer starts from what it was given: the heatmap's
    peak scores and boxes, or what a collaborator sent).

Where a car's front and back look alike, a heading regressed through ``sin yaw, cos yaw``
averages the two and lands anywhere in between (the center head measured it: 14% of its boxes
off by 15-165 degrees on the quickstart). So the loss compares only the anchor's axis,
``[sin 2yaw, cos 2yaw]`` computed from its ``sin yaw, cos yaw`` (the same for either heading),
and a separate front logit says which end is the front, as the center head's
``axis_direction`` code does: :func:`boxes_from_anchors` turns the axis round where the logit
is negative.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ...structures.bev import BevGrid
from ...structures.boxes import wrap_angle
from ..inputs import CameraFeatures
from .camera_sampling import sample_cameras

__all__ = ["ANCHOR_DIM", "Queries", "anchors_from_boxes", "boxes_from_anchors", "axis_code",
           "front_target", "front_logit", "AnchorEncoder", "KeyPointAttention", "DecoderLayer"]

ANCHOR_DIM = 8
#: logit magnitude standing for "certain" (a box whose heading is known, a received score of 1)
CERTAIN_LOGIT = 8.0
#: the fixed key points in box units (x along the length, y along the width): centre, corners
FIXED_POINTS = ((0.0, 0.0), (0.5, 0.5), (0.5, -0.5), (-0.5, 0.5), (-0.5, -0.5))


def anchors_from_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 7) boxes -> (..., 8) anchors (module docstring)."""
    return torch.cat([boxes[..., :3], torch.log(boxes[..., 3:6]),
                      torch.sin(boxes[..., 6:7]), torch.cos(boxes[..., 6:7])], dim=-1)


def axis_code(anchors: torch.Tensor) -> torch.Tensor:
    """(..., 8) anchors -> (..., 2) ``[sin 2yaw, cos 2yaw]`` of their axis, from ``s, c`` as
    ``[2 s c, c^2 - s^2]`` (left unnormalised: the L1 loss towards unit targets keeps
    ``s^2 + c^2`` near 1, and a normalisation would blow up the gradient near 0)."""
    s, c = anchors[..., 6], anchors[..., 7]
    return torch.stack([2 * s * c, c * c - s * s], dim=-1)


def front_target(yaw: torch.Tensor) -> torch.Tensor:
    """(...,) headings -> (...,) 1.0 where the heading is its axis angle (in (-90, 90]
    degrees), 0.0 where it is that plus 180 degrees (the center head's rule)."""
    axis = torch.atan2(torch.sin(2 * yaw), torch.cos(2 * yaw)) / 2
    return (wrap_angle(yaw - axis).abs() < math.pi / 2).to(yaw.dtype)


def front_logit(yaw: torch.Tensor) -> torch.Tensor:
    """(...,) known headings -> (...,) the certain front logit that decodes back to them."""
    return (2 * front_target(yaw) - 1) * CERTAIN_LOGIT


def boxes_from_anchors(anchors: torch.Tensor, front: torch.Tensor) -> torch.Tensor:
    """(..., 8) anchors and (...,) front logits -> (..., 7) boxes: the axis angle of the anchor,
    turned round where the front logit is <= 0 (module docstring)."""
    code = axis_code(anchors)
    axis = torch.atan2(code[..., 0], code[..., 1]) / 2
    yaw = wrap_angle(axis + math.pi * (front <= 0).to(anchors.dtype))
    dims = torch.exp(anchors[..., 3:6].clamp(min=-4.0, max=4.0))
    return torch.cat([anchors[..., :3], dims, yaw[..., None]], dim=-1)


@dataclass
class Queries:
    """B maps' object queries, padded to Q per map.

    Attributes:
        features: (B, Q, D) instance features.
        anchors: (B, Q, 8) anchors in the map's frame (module docstring).
        logits: (B, Q) object logits.
        front: (B, Q) front/back logits (> 0: the heading is the anchor's axis angle).
        valid: (B, Q) bool, False for padding (maps holding fewer queries than Q).
        positions: (B, Q, D) the anchors' embedding (the positional half of a query), when a
            caller outside the head needs it (QUEST sends it); None inside the decoder, which
            embeds the anchors itself.
    """

    features: torch.Tensor
    anchors: torch.Tensor
    logits: torch.Tensor
    front: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    def boxes(self) -> torch.Tensor:
        """(B, Q, 7) the boxes the queries stand for, in the map's frame."""
        return boxes_from_anchors(self.anchors, self.front)

    def scores(self) -> torch.Tensor:
        """(B, Q) object probabilities."""
        return torch.sigmoid(self.logits)

    def rows(self, index) -> "Queries":
        """The maps at ``index`` (along B), every field taken alike."""
        return Queries(self.features[index], self.anchors[index], self.logits[index],
                       self.front[index], self.valid[index],
                       None if self.positions is None else self.positions[index])

    @staticmethod
    def pad(parts: list[dict[str, torch.Tensor]]) -> "Queries":
        """B maps' queries from per-map dicts of ``features`` (Q_b, D), ``anchors`` (Q_b, 8),
        ``logits`` and ``front`` (Q_b,), padded with zeros to the largest Q_b (``valid``
        False there). Built by concatenation, so gradients reach every part."""
        q = max(len(p["logits"]) for p in parts)

        def padded(name: str) -> torch.Tensor:
            return torch.stack([torch.cat([p[name], p[name].new_zeros(q - len(p[name]),
                                                                        *p[name].shape[1:])])
                                for p in parts])

        counts = torch.tensor([len(p["logits"]) for p in parts], device=parts[0]["logits"].device)
        valid = torch.arange(q, device=counts.device)[None] < counts[:, None]
        return Queries(padded("features"), padded("anchors"), padded("logits"), padded("front"),
                       valid)


class AnchorEncoder(nn.Module):
    """(..., 8) anchors -> (..., D) their embedding; x and y scaled to [-1, 1] over the grid."""

    def __init__(self, grid: BevGrid, embed_dims: int):
        super().__init__()
        centre = [(grid.x_max + grid.x_min) / 2, (grid.y_max + grid.y_min) / 2]
        half = [(grid.x_max - grid.x_min) / 2, (grid.y_max - grid.y_min) / 2]
        self.register_buffer("centre", torch.tensor(centre), persistent=False)
        self.register_buffer("extent", torch.tensor(half), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(ANCHOR_DIM, embed_dims), nn.ReLU(inplace=True),
                                 nn.Linear(embed_dims, embed_dims), nn.ReLU(inplace=True),
                                 nn.LayerNorm(embed_dims))

    def forward(self, anchors: torch.Tensor) -> torch.Tensor:
        xy = (anchors[..., :2] - self.centre) / self.extent
        return self.mlp(torch.cat([xy, anchors[..., 2:]], dim=-1))


class KeyPointAttention(nn.Module):
    """Each query reads the BEV map, or its agent's camera images, at key points around its
    anchor (module docstring).

    Args:
        in_channels: C of what is sampled: the BEV map, or the image features in camera mode;
        embed_dims: D of the queries; heads: attention heads (each weighs the points on its
        own); learned_points: offsets predicted per query, within one box length and width of
        the centre; grid: the map's grid.
        camera_heights: None: BEV mode. Else camera mode: the height levels, in box heights
            from the centre (-0.5 the bottom, 0.5 the top), at which every BEV key point
            becomes a 3D point; ``(5 + learned_points) * len(camera_heights)`` points a query.
    """

    def __init__(self, in_channels: int, embed_dims: int, heads: int, learned_points: int,
                 grid: BevGrid, camera_heights=None):
        super().__init__()
        if embed_dims % heads:
            raise ValueError(f"embed_dims {embed_dims} is not a multiple of heads {heads}")
        self.grid, self.heads, self.learned = grid, heads, learned_points
        self.register_buffer("fixed", torch.tensor(FIXED_POINTS), persistent=False)
        self.levels = None if camera_heights is None else len(camera_heights)
        if camera_heights is not None:
            self.register_buffer("heights", torch.tensor([float(v) for v in camera_heights]),
                                 persistent=False)
        points = (len(FIXED_POINTS) + learned_points) * (self.levels or 1)
        self.offsets = nn.Linear(embed_dims, 2 * learned_points)
        self.weights = nn.Linear(embed_dims, heads * points)
        self.value = nn.Linear(in_channels, embed_dims)
        self.out = nn.Linear(embed_dims, embed_dims)
        # learned points start on a ring at 3/4 of the box's half-size, spread in angle
        nn.init.zeros_(self.offsets.weight)
        angle = torch.arange(learned_points) * (2 * math.pi / max(learned_points, 1))
        ring = torch.stack([torch.cos(angle), torch.sin(angle)], -1) * 0.375
        self.offsets.bias.data.copy_(torch.atanh(ring * 2).reshape(-1))
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)

    def key_points(self, query: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) queries, (B, Q, 8) anchors -> (B, Q, P, 2) key points, x and y in the map's
        frame."""
        b, q = anchors.shape[:2]
        learned = torch.tanh(self.offsets(query)).view(b, q, self.learned, 2) * 0.5
        unit = torch.cat([self.fixed.to(query.dtype).expand(b, q, -1, -1), learned], dim=2)
        size = torch.exp(anchors[..., 3:5].clamp(min=-4.0, max=4.0))[:, :, None]
        local = unit * size
        norm = torch.sqrt(anchors[..., 6] ** 2 + anchors[..., 7] ** 2).clamp(min=1e-6)
        s, c = (anchors[..., 6] / norm)[..., None], (anchors[..., 7] / norm)[..., None]
        x = local[..., 0] * c - local[..., 1] * s
        y = local[..., 0] * s + local[..., 1] * c
        return torch.stack([x, y], dim=-1) + anchors[:, :, None, :2]

    def key_points_3d(self, query: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Camera mode: (B, Q, D) queries, (B, Q, 8) anchors -> (B, Q, P * L, 3) every BEV key
        point (:meth:`key_points`) at each of the L height levels ``z + level * dz``, points
        outer, levels inner; x, y, z in the map's frame."""
        xy = self.key_points(query, anchors)                              # (B, Q, P, 2)
        b, q, p = xy.shape[:3]
        height = torch.exp(anchors[..., 5].clamp(min=-4.0, max=4.0))        # (B, Q)
        z = anchors[..., 2, None] + height[..., None] * self.heights.to(anchors.dtype)
        xyz = torch.cat([xy[:, :, :, None].expand(-1, -1, -1, self.levels, -1),
                         z[:, :, None, :, None].expand(-1, -1, p, -1, -1)], dim=-1)
        return xyz.reshape(b, q, p * self.levels, 3)

    def forward(self, query: torch.Tensor, anchors: torch.Tensor, bev: torch.Tensor,
                cameras: CameraFeatures | None = None) -> torch.Tensor:
        """(B, Q, D) queries (anchor embedding added), (B, Q, 8) anchors, (B, C, H, W) map ->
        (B, Q, D). Camera mode: the image features of ``cameras`` (``agent`` indexing the B
        maps; None: no camera, every point reads zero) are sampled instead of the map."""
        if self.levels is not None:
            return self._from_cameras(query, anchors, cameras)
        b, q, d = query.shape
        g = self.grid
        points = self.key_points(query, anchors)  # (B, Q, P, 2)
        p = points.shape[2]
        # align_corners=False: -1 and 1 are the grid's outer edges, as the cells' extent
        uv = torch.stack([(points[..., 0] - g.x_min) / (g.x_max - g.x_min),
                          (points[..., 1] - g.y_min) / (g.y_max - g.y_min)], dim=-1) * 2 - 1
        sampled = F.grid_sample(bev, uv.view(b, q * p, 1, 2).to(bev.dtype), mode="bilinear",
                                padding_mode="zeros", align_corners=False)  # (B, C, Q*P, 1)
        values = self.value(sampled[..., 0].transpose(1, 2)).view(b, q, p, self.heads, -1)
        weights = torch.softmax(self.weights(query).view(b, q, self.heads, p), dim=-1)
        out = torch.einsum("bqhp,bqphd->bqhd", weights, values).reshape(b, q, d)
        return self.out(out)

    def _from_cameras(self, query: torch.Tensor, anchors: torch.Tensor,
                      cameras: CameraFeatures | None) -> torch.Tensor:
        """Camera mode of :meth:`forward`: each 3D key point's image feature, averaged over the
        cameras that see it, projected to D; a point no camera sees adds nothing (its value is
        zero, its weight is not handed to the others)."""
        b, q, d = query.shape
        points = self.key_points_3d(query, anchors)                         # (B, Q, P, 3)
        p = points.shape[2]
        sampled, seen = sample_cameras(points.reshape(b, q * p, 3), cameras,
                                       self.value.in_features)              # (B, Q*P, C)
        values = self.value(sampled) * seen[..., None].to(sampled.dtype)
        values = values.view(b, q, p, self.heads, -1)
        weights = torch.softmax(self.weights(query).view(b, q, self.heads, p), dim=-1)
        out = torch.einsum("bqhp,bqphd->bqhd", weights, values.to(weights.dtype)).reshape(b, q, d)
        return self.out(out)


class DecoderLayer(nn.Module):
    """One decoder layer (module docstring): ``(queries, map) -> queries`` with refined anchors
    and fresh object and front logits.

    Args:
        in_channels: C of what the key points sample (the BEV map, or the image features in
        camera mode); embed_dims: D; heads: attention heads; ffn_dims: width of the
        feed-forward layer; learned_points, camera_heights: see :class:`KeyPointAttention`;
        grid: the map's grid.
    """

    def __init__(self, in_channels: int, embed_dims: int, heads: int, ffn_dims: int,
                 learned_points: int, grid: BevGrid, camera_heights=None):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dims, heads, batch_first=True)
        self.sample = KeyPointAttention(in_channels, embed_dims, heads, learned_points, grid,
                                        camera_heights)
        self.ffn = nn.Sequential(nn.Linear(embed_dims, ffn_dims), nn.ReLU(inplace=True),
                                 nn.Linear(ffn_dims, embed_dims))
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(3))
        self.refine = nn.Sequential(nn.Linear(embed_dims, embed_dims), nn.ReLU(inplace=True),
                                    nn.Linear(embed_dims, ANCHOR_DIM))
        self.cls = nn.Sequential(nn.Linear(embed_dims, embed_dims), nn.ReLU(inplace=True),
                                 nn.Linear(embed_dims, 1))
        self.front = nn.Linear(embed_dims, 1)
        # residuals start at zero: a fresh layer predicts what it was given
        for last in (self.refine[-1], self.cls[-1], self.front):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, queries: Queries, bev: torch.Tensor, encoder: AnchorEncoder,
                cameras: CameraFeatures | None = None) -> Queries:
        return self.refine_queries(self.attend(queries, bev, encoder, cameras), encoder)

    def attend(self, queries: Queries, bev: torch.Tensor, encoder: AnchorEncoder,
               cameras: CameraFeatures | None = None) -> Queries:
        """The layer up to its refinement: the queries with new features and the anchors and
        logits they came with (detached). A method fusing before the refinement (a contract's
        ``fuse_before_refine``) acts here, so that the refinement sees fused features.
        ``cameras``: what camera mode samples (:meth:`KeyPointAttention.forward`)."""
        # Each layer refines the anchor and logits it is given without a gradient through them
        # (iterative box refinement as in Deformable DETR): every layer's loss is its own.
        anchors = queries.anchors.detach()
        pos = encoder(anchors)
        x = queries.features
        q = x + pos
        attended = self.self_attn(q, q, x, key_padding_mask=~queries.valid,
                                  need_weights=False)[0]
        x = self.norms[0](x + attended)
        x = self.norms[1](x + self.sample(x + pos, anchors, bev, cameras))
        x = self.norms[2](x + self.ffn(x))
        return replace(queries, features=x, anchors=anchors, logits=queries.logits.detach(),
                       front=queries.front.detach(), positions=pos)

    def refine_queries(self, queries: Queries, encoder: AnchorEncoder) -> Queries:
        """The refinement: anchor, object logit and front logit each plus a residual predicted
        from the features and the anchor's embedding (``queries.positions`` when set)."""
        pos = queries.positions if queries.positions is not None else encoder(queries.anchors)
        h = queries.features + pos
        return replace(queries, anchors=queries.anchors + self.refine(h),
                       logits=queries.logits + self.cls(h)[..., 0],
                       front=queries.front + self.front(h)[..., 0], positions=None)
