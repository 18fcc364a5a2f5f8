"""The BEV grid and warping feature maps between agents' frames.

A BEV map is ``(C, ny, nx)``: column ``i`` covers x in ``[x_min + i*cell, x_min + (i+1)*cell)``
and row ``j`` covers y likewise, so row index grows with y (to the left). Every agent has the
same grid in its own LiDAR frame; fusion warps collaborators' maps into the ego's grid with
the pairwise transforms, once, in :func:`warp_to_ego`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..utils.precision import full_precision

__all__ = ["BevGrid", "warp_to_ego", "ego_to_agent_theta", "whole_cell_shifts"]


@dataclass(frozen=True)
class BevGrid:
    """An axis-aligned grid over ``[x_min, x_max) x [y_min, y_max)`` with square cells."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    cell: float

    @property
    def nx(self) -> int:
        return int(round((self.x_max - self.x_min) / self.cell))

    @property
    def ny(self) -> int:
        return int(round((self.y_max - self.y_min) / self.cell))

    def scaled(self, stride: int) -> "BevGrid":
        """The same extent at ``stride`` times coarser cells."""
        return BevGrid(self.x_min, self.y_min, self.x_max, self.y_max, self.cell * stride)

    def centres(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(ny, nx) x and y of the cell centres."""
        xs = self.x_min + (torch.arange(self.nx, device=device, dtype=dtype) + 0.5) * self.cell
        ys = self.y_min + (torch.arange(self.ny, device=device, dtype=dtype) + 0.5) * self.cell
        return torch.meshgrid(xs, ys, indexing="xy")


@full_precision
def ego_to_agent_theta(ego_from_agent: torch.Tensor, grid: BevGrid) -> torch.Tensor:
    """(N, 2, 3) ``affine_grid`` matrices mapping the ego grid's normalised coordinates to each
    agent grid's normalised coordinates (align_corners=False, so -1 and 1 are grid edges)."""
    agent_from_ego = torch.linalg.inv(ego_from_agent.to(torch.float64))
    rot = agent_from_ego[:, :2, :2]
    trans = agent_from_ego[:, :2, 3]
    half = torch.tensor([(grid.x_max - grid.x_min) / 2, (grid.y_max - grid.y_min) / 2],
                        dtype=torch.float64, device=ego_from_agent.device)
    centre = torch.tensor([(grid.x_max + grid.x_min) / 2, (grid.y_max + grid.y_min) / 2],
                          dtype=torch.float64, device=ego_from_agent.device)
    lin = rot * half[None, None, :] / half[None, :, None]
    off = (torch.einsum("nij,j->ni", rot, centre) + trans - centre) / half
    return torch.cat([lin, off[:, :, None]], dim=2).to(ego_from_agent.dtype)


def warp_to_ego(features: torch.Tensor, ego_from_agent: torch.Tensor, grid: BevGrid,
                mode: str = "bilinear") -> torch.Tensor:
    """Resample each agent's BEV map onto its ego's grid.

    Args:
        features: (N, C, ny, nx) maps, each in its agent's own frame.
        ego_from_agent: (N, 4, 4) transform of each agent into its sample's ego frame.
        grid: the grid of ``features`` (shared by all agents).
    Returns:
        (N, C, ny, nx) in the ego frame; cells the agent does not cover are zero.
    """
    shifts, is_shift = whole_cell_shifts(ego_from_agent, grid)
    if not bool(is_shift.any()):
        return _resample(features, ego_from_agent, grid, mode)
    # Senders in the ego's axes (model.sender_frame: ego_aligned) arrive shifted by whole
    # cells: move them by slicing, exact and without building a sampling grid.
    resampled = iter(_resample(features[~is_shift], ego_from_agent[~is_shift], grid, mode)
                     if not bool(is_shift.all()) else ())
    return torch.stack([_shift(f, *shift.tolist()) if ok else next(resampled)
                        for f, shift, ok in zip(features, shifts, is_shift.tolist())])


def whole_cell_shifts(ego_from_agent: torch.Tensor, grid: BevGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Which transforms only move a map by whole cells: (N, 2) the columns and rows each map
    moves by, and (N,) whether its transform is such a shift (no rotation in x-y, a translation
    within 1e-4 cells of whole cells)."""
    t = ego_from_agent.detach().to(torch.float64)
    cells = t[:, :2, 3] / grid.cell
    rounded = cells.round()
    eye = torch.eye(2, dtype=t.dtype, device=t.device)
    is_shift = (((t[:, :2, :2] - eye).abs().amax(dim=(1, 2)) < 1e-6)
                & ((cells - rounded).abs().amax(dim=1) < 1e-4))
    return rounded.long(), is_shift


def shift_map(feature: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """(..., ny, nx) map moved by ``dx`` columns and ``dy`` rows, zeros where nothing moved in.
    One padded copy (negative padding crops) rather than a zero map and a sliced copy."""
    ny, nx = feature.shape[-2:]
    if abs(dx) >= nx or abs(dy) >= ny:
        return torch.zeros_like(feature)
    return F.pad(feature, (dx, -dx, dy, -dy))


_shift = shift_map


def _resample(features: torch.Tensor, ego_from_agent: torch.Tensor, grid: BevGrid,
              mode: str) -> torch.Tensor:
    theta = ego_to_agent_theta(ego_from_agent, grid).to(features.dtype)
    sampling = F.affine_grid(theta, list(features.shape), align_corners=False)
    return F.grid_sample(features, sampling, mode=mode, padding_mode="zeros", align_corners=False)
