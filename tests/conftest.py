"""Fixtures shared across test folders: a tiny detector config and a one-frame batch of random
points, for tests that run whole models on CPU in well under a second; a tiny synthetic OPV2V
dataset with camera images; the tools/ scripts as modules; a dataset's train split and the
frame behind a sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from v2xfuse.datasets import collate
from v2xfuse.datasets.pipeline import Sample


def small_sim_config(cameras: bool, shrink: int = 4, beams: int = 16, azimuth_steps: int = 360,
                     **scene):
    """Generator settings for test data: 16-beam LiDARs, cameras at a quarter of their size
    (100 x 75 on vehicles, 120 x 67 on the roadside unit); ``shrink``, ``beams``,
    ``azimuth_steps`` and ``scene`` keys (e.g. ``n_cavs``) make it smaller still."""
    from v2xfuse.sim import SimConfig

    lidar = {"azimuth_steps": azimuth_steps, "beams": beams}
    sim = SimConfig.from_dict({"vehicle_lidar": lidar, "rsu_lidar": lidar, "scene": scene})
    sim.cameras = cameras
    for cam in sim.vehicle_cameras + sim.rsu_cameras:
        cam.width, cam.height = cam.width // shrink, cam.height // shrink
    return sim


@pytest.fixture(scope="session")
def camera_opv2v_root(tmp_path_factory):
    """A synthetic OPV2V dataset with camera images: 2 scenes of 3 frames (scene 0 "train",
    scene 1 "validate"), 3 CAVs and a roadside unit each (about 6 s to generate)."""
    from v2xfuse.sim import generate_dataset

    root = tmp_path_factory.mktemp("opv2v_cameras")
    generate_dataset("opv2v", root, n_scenes=2, n_frames=3, seed=11, cfg=small_sim_config(True),
                     splits={"train": 0.5, "validate": 0.5}, progress=False, workers=1)
    return root


@pytest.fixture(scope="session")
def tiny_camera_data(tmp_path_factory):
    """``root(fmt)`` -> the root of a tiny dataset with camera images ("opv2v" or "dair"), made
    on first use: 1 scene ("train") of 3 frames, 2 vehicles (the ego and a CAV) and a roadside
    unit, 4-beam LiDARs, cameras at an eighth of their size (50 x 37 on vehicles, 60 x 33 on
    the roadside unit). The DAIR root holds ``cooperative-vehicle-infrastructure`` and the
    split file (the adapter and tools/check_dataset.py take either). Read only: copy it to
    change files."""
    from v2xfuse.sim import generate_dataset

    made = {}

    def root(fmt: str):
        if fmt not in made:
            out = tmp_path_factory.mktemp(f"{fmt}_cameras")
            generate_dataset(fmt, out, n_scenes=1, n_frames=3, seed=5,
                             cfg=small_sim_config(True, 8, 4, 64, n_cavs=2),
                             splits={"train": 1.0}, progress=False, workers=1)
            made[fmt] = out
        return made[fmt]
    return root


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


TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="session")
def load_tool():
    """``load_tool(name)`` -> tools/<name>.py freshly executed as a module (the tools are
    scripts, not a package); registered in ``sys.modules``, where dataclasses look it up."""
    from v2xfuse.utils.scripts import load_script

    def load(name: str):
        return load_script(TOOLS / f"{name}.py", fresh=True)
    return load


@pytest.fixture(scope="session")
def train_adapter():
    """``train_adapter(fmt, root, **kw)`` -> the "train" split's adapter of a generated dataset
    ("opv2v", "dair" or "v2xseq"); OPV2V keeps every agent within 1 km."""
    from v2xfuse.datasets import DairV2XCAdapter, Opv2vAdapter, V2XSeqAdapter

    adapters = {"dair": DairV2XCAdapter, "v2xseq": V2XSeqAdapter, "opv2v": Opv2vAdapter}

    def make(fmt: str, root, **kw):
        if fmt == "opv2v":
            kw = {"max_agents": 8, "comm_range": 1e3, **kw}
        return adapters[fmt](root, "train", **kw)
    return make


@pytest.fixture(scope="session")
def frame_of():
    """``frame_of(adapter, i)`` -> the frame id (OPV2V) or vehicle frame id (DAIR, V2X-Seq) of
    sample i: what a file name of that frame contains."""
    from v2xfuse.datasets import Opv2vAdapter

    def name(adapter, i: int):
        if isinstance(adapter, Opv2vAdapter):
            scenario, ego, k = adapter.samples[i]
            return adapter.scenarios[scenario][ego][k]
        return adapter.samples[i]["_vehicle_id"]
    return name
