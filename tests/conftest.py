"""Fixtures shared across test folders: a tiny detector config and a one-frame batch of random
points, for tests that run whole models on CPU in well under a second."""
from __future__ import annotations

import numpy as np
import pytest

from v2xfuse.datasets import collate
from v2xfuse.datasets.pipeline import Sample


@pytest.fixture
def tiny_detector_cfg():
    """``make(fusion="max", **model)``: PointPillars with 0.8 m cells on +-12.8 m, one 8-channel
    backbone stage, every score kept; ``model`` keys (e.g. ``sender_frame``) are added."""
    def make(fusion: str = "max", **model) -> dict:
        return {"dataset": {"type": "opv2v"},
                "pipeline": {"lidar_range": [-12.8, -12.8, -4.0, 12.8, 12.8, 2.0]},
                "model": {"encoder": {"type": "pointpillars", "voxel_size": [0.8, 0.8],
                                      "out_channels": 8},
                          "backbone": {"layer_strides": [1], "layer_channels": [8],
                                       "layer_nums": [1], "upsample_channels": [8],
                                       "out_stride": 1},
                          "fusion": {"type": fusion}, "post": {"score_threshold": 0.0}, **model}}
    return make


@pytest.fixture
def random_points_batch():
    """``make(poses, points=None, seed=0, true_poses=None)``: a collated one-frame batch of
    agents at ``poses`` (ego_from_agent), each with 800 random points within +-12 m unless
    ``points`` are given, and no ground truth."""
    def make(poses, points=None, seed: int = 0, true_poses=None):
        rng = np.random.default_rng(seed)
        n = len(poses)
        if points is None:
            points = [np.c_[rng.uniform(-12, 12, (800, 2)), rng.uniform(-3, 1, (800, 1)),
                            rng.uniform(0, 1, (800, 1))].astype(np.float32) for _ in range(n)]
        sample = Sample(points, np.stack(poses), np.zeros((0, 7)), np.zeros(0, np.int64),
                        [str(i) for i in range(n)], ["vehicle"] * n, np.zeros(n),
                        ("synthetic", "s0", "000000"), true_ego_from_agent=true_poses)
        return collate([sample])
    return make
