"""Checkpoint files: durable rotation, errors that name the file, the --resume config diff."""
import os

import pytest
import torch

from v2xfuse.engine import checkpoint as ckpt
from v2xfuse.engine.checkpoint import (CheckpointError, config_changes, format_changes,
                                       load_checkpoint, remove_stale_temporaries, save_checkpoint)


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "config": {"train": {}}, "step": step}


def test_save_fsyncs_then_rotates_the_previous_checkpoint(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    save_checkpoint(last, _state(1), previous=prev)
    assert load_checkpoint(last)["step"] == 1 and not prev.exists()
    assert len(synced) >= 2  # the temporary file, then the folder after the rename
    save_checkpoint(last, _state(2), previous=prev)
    assert load_checkpoint(last)["step"] == 2 and load_checkpoint(prev)["step"] == 1
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links here")))
    save_checkpoint(last, _state(3), previous=prev)  # falls back to a copy
    assert load_checkpoint(last)["step"] == 3 and load_checkpoint(prev)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "prev.pt"]


def test_a_kill_while_writing_leaves_the_checkpoint_whole(tmp_path, monkeypatch):
    last = tmp_path / "last.pt"
    save_checkpoint(last, _state(1), previous=tmp_path / "prev.pt")

    def killed(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(last, _state(2), previous=tmp_path / "prev.pt")
    monkeypatch.undo()
    assert load_checkpoint(last)["step"] == 1
    assert remove_stale_temporaries([last, tmp_path / "prev.pt"]) == [tmp_path / "last.pt.tmp"]
    assert not (tmp_path / "last.pt.tmp").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "a list"])
def test_unreadable_checkpoints_name_the_file_and_the_previous_one(tmp_path, damage):
    last, prev = tmp_path / "last.pt", tmp_path / "prev.pt"
    save_checkpoint(last, _state(1), previous=prev)
    save_checkpoint(last, _state(2), previous=prev)
    data = last.read_bytes()
    if damage == "truncated":
        last.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        last.write_bytes(b"")
    elif damage == "garbage":
        last.write_bytes(os.urandom(1000))
    else:
        torch.save([1, 2, 3], last)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(last)
    message = str(info.value)
    assert str(last) in message and f"cp {prev} {last}" in message
    prev.unlink()
    with pytest.raises(CheckpointError, match="no previous checkpoint"):
        load_checkpoint(last)


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")


def test_config_changes_list_every_difference_but_the_allowed():
    saved = {"model": {"fusion": {"type": "max"}, "encoder": {"voxel_size": [0.8, 0.8]}},
             "train": {"lr": 3e-3, "steps": 10}, "channel": {"loss": 0.0}}
    now = {"model": {"fusion": {"type": "attfuse", "heads": 2},
                     "encoder": {"voxel_size": (0.8, 0.8)}},
           "train": {"lr": 1e-3, "steps": 20}, "channel": {"loss": 0.5}, "pipeline": {"a": 1}}
    changes = config_changes(saved, now, ("dataset", "pipeline", "model", "train"),
                             allowed=("train.steps",))
    assert [c[0] for c in changes] == ["pipeline", "model.fusion.type", "model.fusion.heads",
                                       "train.lr"]
    text = format_changes(changes)
    assert "train.lr: 0.003 (checkpoint) -> 0.001 (now)" in text
    assert "model.fusion.heads: (absent) (checkpoint) -> 2 (now)" in text
    assert "pipeline: (absent) (checkpoint) -> {'a': 1} (now)" in text
    assert ckpt.config_changes(saved, saved, ("model", "train")) == []


def test_load_detector_builds_the_checkpoints_model_with_its_weights(tmp_path, tiny_detector_cfg):
    from v2xfuse.builder import build_detector
    from v2xfuse.engine.checkpoint import load_detector

    torch.manual_seed(3)
    cfg = tiny_detector_cfg("where2comm")
    trained = build_detector(cfg)
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": trained.state_dict(), "config": cfg, "step": 7})
    # another experiment config: its model section is replaced by the checkpoint's, then --set
    other = tiny_detector_cfg("max")
    other["eval"] = {"order": "local"}
    got_cfg, model, state = load_detector(path, other, ["model.fusion.threshold=0.3"])
    assert state["step"] == 7 and got_cfg["eval"] == {"order": "local"}
    assert got_cfg["model"]["fusion"] == {"type": "where2comm", "threshold": 0.3}
    assert type(model.fusion).__name__ == "Where2comm" and model.fusion.threshold == 0.3
    for name, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    # weights that do not fit the model the config builds: an error naming the file
    with pytest.raises(CheckpointError, match="last.pt: the weights do not fit"):
        load_detector(path, None, ["model.backbone.layer_channels=[16]",
                                   "model.backbone.upsample_channels=[16]"])
