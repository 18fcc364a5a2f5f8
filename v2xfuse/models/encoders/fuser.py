"""One BEV map per agent from the maps of its sensors (BEVFusion's ConvFuser idea).

    lidar encoder  -> (N, C_l, ny, nx) -+
                                        +- concatenate -> 3x3 conv + BN + ReLU -> (N, C, ny, nx)
    camera encoder -> (N, C_c, ny, nx) -+

Every agent gets a map from every encoder: one without the sensor (a camera-only roadside
unit, a LiDAR-only car) gets that encoder's zero map, and :func:`modality_mask` says which
agents had which sensor. A detector with one sensor has no fuser at all: its encoder's map
goes straight to the backbone, as before sensors had encoders of their own, so LiDAR-only
checkpoints keep their parameter names and numbers.
"""
from __future__ import annotations

import torch
from torch import nn

from ...registry import SENSOR_FUSERS
from ...structures.bev import BevGrid
from ..inputs import AgentInputs

__all__ = ["ConvFuser", "MultiSensorEncoder", "modality_mask", "sensors_of"]


@SENSOR_FUSERS.register("conv")
class ConvFuser(nn.Module):
    """``forward(maps)``: S maps (N, C_s, ny, nx) -> (N, out_channels, ny, nx).

    Args:
        in_channels: C_s of each sensor's map, in the order the maps are given.
        out_channels: default: the widest input.
    """

    def __init__(self, in_channels: list[int], out_channels: int | None = None):
        super().__init__()
        self.in_channels = [int(c) for c in in_channels]
        self.out_channels = int(out_channels or max(self.in_channels))
        self.conv = nn.Sequential(
            nn.Conv2d(sum(self.in_channels), self.out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(self.out_channels, eps=1e-3, momentum=0.1), nn.ReLU(inplace=True))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.conv(torch.cat(maps, dim=1))


class MultiSensorEncoder(nn.Module):
    """Per-sensor encoders on one :class:`BevGrid` and the fuser of their maps.

    Args:
        encoders: sensor name (``SENSORS``) -> encoder; each maps :class:`AgentInputs` to
            (N, C_s, ny, nx) on the same grid.
        fuser: S maps -> (N, out_channels, ny, nx), with an ``out_channels`` attribute.
    """

    def __init__(self, encoders: dict[str, nn.Module], fuser: nn.Module):
        super().__init__()
        grids = {name: enc.grid for name, enc in encoders.items()}
        if len(set(grids.values())) != 1:
            raise ValueError(f"sensor encoders must share one BEV grid, got {grids}")
        self.encoders = nn.ModuleDict(encoders)
        self.fuser = fuser
        self.sensors = tuple(encoders)
        self.grid: BevGrid = next(iter(grids.values()))
        self.out_channels = int(fuser.out_channels)

    def forward(self, inputs: AgentInputs) -> torch.Tensor:
        """-> (N, out_channels, ny, nx), one map per agent whatever sensors it has."""
        return self.fuser([enc(inputs) for enc in self.encoders.values()])


def sensors_of(encoder: nn.Module) -> tuple[str, ...]:
    """The sensors ``encoder`` reads: a :class:`MultiSensorEncoder`'s ``sensors``, or a
    single-sensor encoder's ``sensor``."""
    if isinstance(encoder, MultiSensorEncoder):
        return encoder.sensors
    return (encoder.sensor,)


def modality_mask(encoder: nn.Module, inputs: AgentInputs) -> torch.Tensor:
    """(N, S) bool: which of the S sensors of :func:`sensors_of` each of the N agents of
    ``inputs`` has data for (an agent without one still gets a map: that encoder's zeros)."""
    return torch.stack([inputs.present(s) for s in sensors_of(encoder)], dim=1)
