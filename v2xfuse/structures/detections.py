"""Detections: what a head decodes and what NMS, late fusion and evaluation pass along.

Every field is per box and stays aligned with ``boxes`` through :meth:`Detections.select`
(indexing, NMS, top-K, score thresholds), :meth:`Detections.cat` and :meth:`Detections.to`::

    dets = head.decode(output, b, score_threshold)      # boxes (K, 7), scores (K,), ...
    dets = dets.select(nms_rotated(dets.boxes, dets.scores, 0.15))
    dets.extras["uncertainty"]                           # (K', ...) still row for row
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .boxes import BOX_DIM

__all__ = ["Detections"]


@dataclass
class Detections:
    """K boxes in one frame (named by the variable that holds them), usually best first.

    Args:
        boxes: (K, 7) [x, y, z, dx, dy, dz, yaw] (see :mod:`v2xfuse.structures.boxes`).
        scores: (K,) confidence in [0, 1].
        labels: (K,) int64 class index; zeros (one class) when not given.
        extras: named per-box tensors, each (K, ...): an uncertainty, a query embedding, a
            reference point, a track id... Whatever selects boxes selects their rows.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        k = self.boxes.shape[0]
        if self.boxes.dim() != 2 or self.boxes.shape[1] != BOX_DIM:
            raise ValueError(f"boxes must be (K, {BOX_DIM}), got {tuple(self.boxes.shape)}")
        if self.labels is None:
            self.labels = torch.zeros(k, dtype=torch.int64, device=self.boxes.device)
        for name, t in (("scores", self.scores), ("labels", self.labels), *self.extras.items()):
            if t.dim() == 0 or t.shape[0] != k:
                raise ValueError(f"Detections.{name} must have {k} rows (one per box), "
                                 f"got shape {tuple(t.shape)}")

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def select(self, index) -> "Detections":
        """The boxes at ``index`` (a (K,) bool mask, int64 indices or a slice), every field
        taken row for row."""
        return Detections(self.boxes[index], self.scores[index], self.labels[index],
                          {k: v[index] for k, v in self.extras.items()})

    __getitem__ = select

    def to(self, device) -> "Detections":
        """Every field on ``device``."""
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device),
                          {k: v.to(device) for k, v in self.extras.items()})

    @staticmethod
    def cat(parts: list["Detections"]) -> "Detections":
        """The boxes of ``parts`` one after the other (no re-sorting). Only the extras every
        part carries are kept: a received box has no embedding of the ego's head."""
        if not parts:
            raise ValueError("Detections.cat needs at least one part")
        common = set(parts[0].extras).intersection(*(p.extras for p in parts[1:]))
        return Detections(torch.cat([p.boxes for p in parts]), torch.cat([p.scores for p in parts]),
                          torch.cat([p.labels for p in parts]),
                          {k: torch.cat([p.extras[k] for p in parts])
                           for k in parts[0].extras if k in common})

