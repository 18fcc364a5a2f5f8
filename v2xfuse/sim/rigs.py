"""The synthetic world's camera rigs as a batch carries them, without rendering anything: for
timing camera encoders (tools/bench_latency.py, tools/bench_ops.py) on the shapes and
calibrations of real training batches."""
from __future__ import annotations

import numpy as np
import torch

from .config import SimConfig
from .sensors import camera_intrinsic, lidar_from_camera

__all__ = ["rig_cameras", "AGENT_KINDS"]

AGENT_KINDS = ("vehicle", "infrastructure")


def rig_cameras(kinds: list[str], image_size, cfg: SimConfig | None = None, seed: int = 0):
    """The cameras of agents ``0..len(kinds)-1`` of the given kinds.

    Args:
        kinds: per agent, ``"vehicle"`` (OPV2V's four cameras) or ``"infrastructure"`` (one).
        image_size: (H, W) the pipeline fits every image to (``pipeline.cameras.image_size``).
        cfg: the rigs (default: the generator's).
    Returns:
        :class:`~v2xfuse.datasets.batch.CameraBatch` with random pixels and the intrinsics that
        :func:`~v2xfuse.datasets.images.fit_image` gives the resized, cropped images.
    """
    from ..datasets.batch import CameraBatch
    from ..datasets.images import CameraConfig, fit_image
    from ..structures.coop import CameraObs

    cfg = cfg or SimConfig()
    fit = CameraConfig(tuple(image_size))
    owners, cams = [], []
    for agent, kind in enumerate(kinds):
        if kind not in AGENT_KINDS:
            raise ValueError(f"agent kind must be one of {AGENT_KINDS}, got {kind!r}")
        for spec in cfg.vehicle_cameras if kind == "vehicle" else cfg.rsu_cameras:
            raw = CameraObs(spec.name, camera_intrinsic(spec), lidar_from_camera(spec),
                            (spec.height, spec.width), np.zeros((spec.height, spec.width, 3), np.uint8))
            cams.append(fit_image(raw, fit))
            owners.append(agent)
    batch = CameraBatch.stack(owners, cams, fit.image_size)
    g = torch.Generator().manual_seed(seed)
    batch.images = torch.randint(0, 256, batch.images.shape, dtype=torch.uint8, generator=g)
    return batch
