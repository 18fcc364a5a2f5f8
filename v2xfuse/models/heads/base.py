"""What the detector asks of a detection head; anchor, center (and query) heads are peers.

    features (B, C, H, W) --forward--> output --decode(output, b)--> Detections (map's frame)
                                           \\--loss(output, gt_boxes, ignore)--> {"loss": ...}
    features (N, C, H, W) --confidence--> (N, 1, H, W)     (Where2comm, CodeFilling)

Every head is built as ``cls(in_channels, grid, **options)``: the channels and the BEV grid of
the maps it reads come from the stages before it, its own options from ``model.head``
(see :func:`v2xfuse.builder.build_head`). Registered in :data:`v2xfuse.registry.HEADS`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...structures.detections import Detections
from ...structures.bev import BevGrid
from ...utils.precision import full_precision

__all__ = ["Head", "OutsideGrid"]


class Head(nn.Module):
    """Base of the detection heads. Subclasses set ``self.grid`` and implement the four methods.

    ``output`` is the head's own dataclass of raw maps; the detector only reads its
    ``batch_size`` and hands it back to :meth:`loss` and :meth:`decode`.
    """

    grid: BevGrid

    def forward(self, features: torch.Tensor):
        """(B, C, H, W) maps on ``self.grid`` -> the head's output for B maps."""
        raise NotImplementedError

    def loss(self, output, gt_boxes: list[torch.Tensor],
             ignore: list["OutsideGrid"] | None = None) -> dict[str, torch.Tensor]:
        """Training loss of B maps.

        Args:
            gt_boxes: B tensors (M_b, 7), the ground truth in each map's frame.
            ignore: optional B region rules (``xy (K, 2) -> (K,) bool``, True = ignore), one per
                map: where the ground truth is incomplete, so background there is not taught as
                background. Each head applies it to its own locations (anchor centres, cells,
                reference points) in the map's frame.
        Returns:
            ``"loss"``: the scalar to minimise; other keys: detached parts for logging.
        """
        raise NotImplementedError

    def decode(self, output, b: int, score_threshold: float = 0.1) -> Detections:
        """Map ``b``'s detections in that map's frame, best first, before NMS."""
        raise NotImplementedError

    def confidence(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) per-agent maps -> (N, 1, H, W) object probability per cell in [0, 1]
        (Where2comm's spatial confidence)."""
        raise NotImplementedError


@dataclass(frozen=True)
class OutsideGrid:
    """The ignore rule of a map whose supervision is only complete on another frame's grid.

    Args:
        outer_from_map: (4, 4) transform from the map's frame to the frame of ``grid`` (for an
            agent's own map: ``ego_from_agent``; the ego's labels cover the ego's range only).
        grid: the region, in the outer frame, where the ground truth is complete.
    """

    outer_from_map: torch.Tensor
    grid: BevGrid

    @full_precision
    def __call__(self, xy: torch.Tensor) -> torch.Tensor:
        """(K, 2) positions in the map's frame -> (K,) True where they fall outside ``grid``."""
        t = self.outer_from_map.to(device=xy.device, dtype=xy.dtype)
        p = xy @ t[:2, :2].T + t[:2, 3]
        g = self.grid
        return ~((p[:, 0] >= g.x_min) & (p[:, 0] < g.x_max) &
                 (p[:, 1] >= g.y_min) & (p[:, 1] < g.y_max))
