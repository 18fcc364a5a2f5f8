"""Evaluation under a hostile collaborator completes, and the results count what was refused."""
import json

import pytest
import torch

from v2xfuse.builder import build_dataset, build_detector
from v2xfuse.engine.evaluate import evaluate_detector
from v2xfuse.sim import SimConfig, generate_dataset


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    sim = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 360, "beams": 16},
                               "rsu_lidar": {"azimuth_steps": 360, "beams": 16}})
    sim.cameras = False
    generate_dataset("opv2v", root, n_scenes=2, n_frames=3, seed=11, cfg=sim,
                     splits={"train": 0.5, "validate": 0.5}, progress=False)
    return {
        "dataset": {"type": "opv2v", "root": str(root), "max_agents": 3, "comm_range": 200.0,
                    "splits": {"train": "train", "val": "validate"}},
        "pipeline": {"lidar_range": [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0]},
        "model": {"encoder": {"type": "pointpillars", "voxel_size": [1.6, 1.6],
                              "out_channels": 8, "max_points_per_pillar": 8},
                  "backbone": {"layer_strides": [1], "layer_channels": [8], "layer_nums": [1],
                               "upsample_channels": [8], "out_stride": 1},
                  "fusion": {"type": "max"}, "post": {"score_threshold": 0.05}},
    }


@pytest.mark.parametrize("attack, reason", [("nan", "nonfinite"), ("truncate", "malformed"),
                                            ("spoof_ego", "sender"), ("far_pose", "far")])
def test_evaluation_under_attack_completes_and_records_rejections(tiny_cfg, attack, reason):
    torch.manual_seed(0)
    model = build_detector(tiny_cfg).eval()
    data = build_dataset(tiny_cfg, "val", train=False)
    clean, clean_summary = evaluate_detector(model, data, tiny_cfg)
    assert clean_summary["rejected_messages"] == {}
    cfg = {**tiny_cfg, "channel": {"attack": {"type": attack, "fraction": 1.0, "seed": 1}}}
    (result,), summary = evaluate_detector(model, data, cfg)
    assert summary["frames"] == clean_summary["frames"] == len(data)
    refused = summary["rejected_messages"]
    assert set(refused) == {reason} and refused[reason] >= len(data)
    assert json.loads(result.to_json())["extra"]["rejected_messages"] == refused
    assert summary["attack"]["type"] == attack


def test_evaluation_leaves_out_a_bad_frame_once_and_counts_it(tiny_cfg, tmp_path):
    import shutil
    from pathlib import Path

    root = tmp_path / "copy"
    shutil.copytree(tiny_cfg["dataset"]["root"], root)
    cfg = {**tiny_cfg, "dataset": {**tiny_cfg["dataset"], "root": str(root),
                                   "skip_bad_frames": True}}
    data = build_dataset(cfg, "val", train=False)
    pcd = sorted(Path(root, "validate").rglob("*.pcd"))[0]
    pcd.write_bytes(pcd.read_bytes()[:300])  # truncated mid-header or mid-data
    torch.manual_seed(0)
    model = build_detector(cfg).eval()
    results, summary = evaluate_detector(model, data, cfg)
    assert summary["skipped_frames"] == 1 and summary["frames"] == len(data) - 1
