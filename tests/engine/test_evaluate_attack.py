"""Evaluation under a hostile collaborator completes, and the results count what was refused
(``tiny_cfg``: tests/engine/conftest.py)."""
import json

import pytest
import torch

from v2xfuse.builder import build_dataset, build_detector
from v2xfuse.engine.evaluate import evaluate_detector


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


def test_training_leaves_out_bad_frames_and_stops_when_none_is_left(tiny_cfg, tmp_path):
    import shutil
    from pathlib import Path

    from v2xfuse.datasets.base import DatasetError
    from v2xfuse.engine.trainer import Trainer

    root = tmp_path / "copy"
    shutil.copytree(tiny_cfg["dataset"]["root"], root)
    cfg = {**tiny_cfg, "dataset": {**tiny_cfg["dataset"], "root": str(root),
                                   "skip_bad_frames": True},
           "train": {**tiny_cfg["train"], "steps": 2, "batch_size": 1}}
    clouds = sorted(Path(root, "train").rglob("*.pcd"))
    clouds[0].write_bytes(b"")  # one bad frame: left out, counted, training goes on
    results = Trainer(cfg, tmp_path / "one", tensorboard=False, progress=False).fit()
    assert results["steps"] == 2 and results["train_skipped_frames"] >= 1
    for pcd in clouds:  # every frame bad: a clear error, not an endless loop
        pcd.write_bytes(b"")
    with pytest.raises(DatasetError, match="nothing to train on"):
        Trainer(cfg, tmp_path / "all", tensorboard=False, progress=False).fit()
