"""Tiny synthetic datasets and training configs shared by the engine tests (made once per session:
generating them takes a few seconds)."""
import copy
import dataclasses
from pathlib import Path

import pytest

from v2xfuse.config import load_config
from v2xfuse.sim import SimConfig, generate_dataset
from v2xfuse.sim.config import default_rsu_cameras, default_vehicle_cameras

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _small_sim() -> SimConfig:
    sim = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 360, "beams": 16},
                               "rsu_lidar": {"azimuth_steps": 360, "beams": 16}})
    sim.cameras = False
    return sim


def _quarter(cameras) -> list[dict]:
    return [dict(dataclasses.asdict(c), width=c.width // 4, height=c.height // 4) for c in cameras]


@pytest.fixture(scope="session")
def tiny_experiment():
    """``tiny_experiment(name, tmp_path, cameras, **dataset)`` -> configs/<name>.yaml (e.g.
    "experimental/acco", "quickstart") on 2 scenes of 3 frames its own ``dataset.synthetic``
    section generates into ``tmp_path / "data"``, +-12.8 m, one step."""
    def make(name: str, tmp_path: Path, cameras: bool, **dataset) -> dict:
        cfg = load_config(CONFIGS / f"{name}.yaml")
        sim = {"vehicle_lidar": {"azimuth_steps": 360, "beams": 16},
               "rsu_lidar": {"azimuth_steps": 360, "beams": 16}}
        if cameras:
            sim.update(vehicle_cameras=_quarter(default_vehicle_cameras()),
                       rsu_cameras=_quarter(default_rsu_cameras()))
        cfg["dataset"].update(root=str(tmp_path / "data"), comm_range=200.0, cache_points_mb=0,
                              cache_dir=str(tmp_path / "point_cache"),  # not the repo's work_dirs
                              synthetic={"scenes": 2, "frames": 3, "seed": 11, "cameras": cameras,
                                         "splits": {"train": 0.5, "validate": 0.5}, "sim": sim},
                              **dataset)
        cfg["pipeline"]["lidar_range"] = [-12.8, -12.8, -5.0, 12.8, 12.8, 3.0]
        cfg["train"].update(steps=1, batch_size=2, num_workers=0, checkpoint_every=1,
                            val_frames=2, log_every=1)
        return cfg
    return make


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory):
    """A 6-step run of a small PointPillars on 2 synthetic OPV2V scenes of 3 frames."""
    root = tmp_path_factory.mktemp("syn")
    generate_dataset("opv2v", root, n_scenes=2, n_frames=3, seed=11, cfg=_small_sim(),
                     splits={"train": 0.5, "validate": 0.5}, progress=False, workers=1)
    return {
        "dataset": {"type": "opv2v", "root": str(root), "max_agents": 3, "comm_range": 200.0,
                    "splits": {"train": "train", "val": "validate"}},
        "pipeline": {"lidar_range": [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0], "flip_prob": 0.5,
                     "rotate_deg": 10.0},
        "model": {"encoder": {"type": "pointpillars", "voxel_size": [1.6, 1.6],
                              "out_channels": 8, "max_points_per_pillar": 8},
                  "backbone": {"layer_strides": [1], "layer_channels": [16], "layer_nums": [1],
                               "upsample_channels": [16], "out_stride": 1},
                  "fusion": {"type": "max"}},
        "train": {"seed": 3, "steps": 6, "batch_size": 2, "lr": 3e-3, "checkpoint_every": 2,
                  "val_frames": 1, "log_every": 1},
    }


@pytest.fixture(scope="session")
def short_cfg(tiny_cfg):
    """``tiny_cfg`` cut to 3 steps on a 16 x 16 grid, a checkpoint every step: for the tests of
    what happens around a run (resume, checkpoints, results), not of what it learns."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg["pipeline"]["lidar_range"] = [-12.8, -12.8, -5.0, 12.8, 12.8, 3.0]
    cfg["train"].update(steps=3, checkpoint_every=1)
    return cfg


@pytest.fixture(scope="session")
def tiny_dair_cfg(tmp_path_factory):
    """A 2-step run on 2 synthetic DAIR-V2X-C scenes of 2 frames, scored the DAIR way."""
    out = tmp_path_factory.mktemp("dair")
    generate_dataset("dair", out, n_scenes=2, n_frames=2, seed=5, cfg=_small_sim(),
                     splits={"train": 0.5, "val": 0.5}, progress=False, workers=1)
    return {
        "dataset": {"type": "dair_v2x_c", "root": str(out / "cooperative-vehicle-infrastructure"),
                    "split_file": str(out / "cooperative-split-data.json"),
                    "splits": {"train": "train", "val": "val"}},
        "pipeline": {"lidar_range": [0.0, -25.6, -3.0, 51.2, 25.6, 1.0], "flip_prob": 0.0,
                     "rotate_deg": 0.0},
        "model": {"encoder": {"type": "pointpillars", "voxel_size": [3.2, 3.2],
                              "out_channels": 8, "max_points_per_pillar": 8},
                  "backbone": {"layer_strides": [1], "layer_channels": [8], "layer_nums": [1],
                               "upsample_channels": [8], "out_stride": 1},
                  "fusion": {"type": "max"}, "post": {"score_threshold": 0.0}},
        "train": {"seed": 1, "steps": 2, "batch_size": 1, "lr": 3e-3, "checkpoint_every": 1,
                  "log_every": 1},
        "eval": {"mode": "dair"},
    }
