"""The configs of configs/experimental/ train a step and evaluate through the real builder,
trainer and evaluation, on tiny synthetic data their own ``dataset.synthetic`` section makes."""
import json
from pathlib import Path

import torch

from v2xfuse.engine.trainer import Trainer, load_checkpoint


def _fit(cfg: dict, work: Path) -> dict:
    Trainer(cfg, work, tensorboard=False, progress=False).fit()
    return json.loads((work / "results_val.json").read_text())


def test_lidar_camera_trains_a_step_on_images_and_evaluates(tiny_experiment, tmp_path):
    cfg = tiny_experiment("experimental/lidar_camera", tmp_path, cameras=True)
    cfg["pipeline"]["cameras"]["image_size"] = [32, 64]  # multiples of the lss stride (8)
    assert cfg["model"]["encoders"]["camera"]["type"] == "lss"
    results = _fit(cfg, tmp_path / "work")
    assert results["frames"] == 2 and "ap_50" in results and results["bytes_per_frame"] > 0
    state = load_checkpoint(tmp_path / "work" / "last.pt")["model"]
    # the image network ran on training images (its batch norm counted the step) and its
    # weights moved (AdamW leaves a parameter without a gradient alone)
    assert int(state["encoder.encoders.camera.image_net.layers.1.num_batches_tracked"]) == 1
    torch.manual_seed(cfg["train"]["seed"])
    from v2xfuse.builder import build_detector

    fresh = build_detector(cfg).state_dict()
    for name in ("image_net.layers.0.weight", "depth_net.1.weight"):
        assert not torch.equal(state[f"encoder.encoders.camera.{name}"],
                               fresh[f"encoder.encoders.camera.{name}"]), name
    assert "encoder.fuser.conv.0.weight" in state


def test_history_trains_a_step_and_evaluates_with_histories_in_every_batch(tiny_experiment, tmp_path, monkeypatch):
    from v2xfuse.models.detector import CoopDetector

    seen = []
    forward = CoopDetector.forward

    def recording(self, batch, *args, **kwargs):
        seen.append((self.training, batch.history.length.tolist(), batch.ego_index().tolist(),
                     batch.history.num_observations))
        return forward(self, batch, *args, **kwargs)

    monkeypatch.setattr(CoopDetector, "forward", recording)
    cfg = tiny_experiment("experimental/history", tmp_path, cameras=False)
    cfg["train"]["val_frames"] = 3  # the whole validation scenario: frames 0, 1, 2
    assert cfg["dataset"]["history_frames"] == 2 and cfg["pipeline"]["delay_frames"] == 1
    results = _fit(cfg, tmp_path / "work")
    assert results["frames"] == 3 and "ap_50" in results
    assert [t for t, *_ in seen] == [True, False, False, False]  # one step, 3 validation frames
    lengths = [n for _, length, _, _ in seen for n in length]
    assert max(lengths) == 2 and min(lengths) == 0  # frame 0 of a scenario: none yet
    for _, length, egos, count in seen:
        assert count == sum(length)
        # a collaborator one frame late has at most one older frame before frame 2
        assert all(n <= (2 if i in egos else 1) for i, n in enumerate(length))


def test_hetero_trains_a_step_with_lidar_cars_and_a_camera_only_roadside_unit(tiny_experiment, tmp_path,
                                                                              monkeypatch):
    from v2xfuse.models.detector import CoopDetector

    seen = []
    forward = CoopDetector.forward

    def recording(self, batch, *args, **kwargs):
        roadside = batch.agent_kind == 1
        lidar_agents = set(batch.points[:, 0].long().tolist())
        seen.append((self.training, roadside.any().item(),
                     not any(roadside[i] for i in lidar_agents),
                     set(batch.cameras.agent.tolist()) <= set(roadside.nonzero()[:, 0].tolist()),
                     self.modality_mask(batch)[:, 1].tolist() == roadside.tolist()))
        return forward(self, batch, *args, **kwargs)

    monkeypatch.setattr(CoopDetector, "forward", recording)
    cfg = tiny_experiment("experimental/hetero", tmp_path, cameras=True)
    cfg["pipeline"]["cameras"]["image_size"] = [32, 56]
    assert cfg["dataset"]["sensors"] == {"ego": ["lidar"], "vehicle": ["lidar"],
                                         "infrastructure": ["camera"]}
    results = _fit(cfg, tmp_path / "work")
    assert results["frames"] == 2 and "ap_50" in results and results["bytes_per_frame"] > 0
    assert [s[0] for s in seen] == [True, False, False]
    # every batch had a roadside unit, without points, and it alone had cameras
    assert all(all(s[1:]) for s in seen), seen
    state = load_checkpoint(tmp_path / "work" / "last.pt")["model"]
    assert int(state["encoder.encoders.camera.image_net.layers.1.num_batches_tracked"]) == 1


def test_query_and_quest_train_a_step_and_evaluate_through_the_channel(tiny_experiment, tmp_path):
    results = {}
    for name in ("query", "quest"):
        # one dataset for both
        cfg = tiny_experiment(f"experimental/{name}", tmp_path, cameras=False)
        if name == "quest":  # untrained, its queries score about 0.01: send some all the same
            cfg["model"]["fusion"].update(score_threshold=0.0, top_k=4)
        results[name] = _fit(cfg, tmp_path / f"work_{name}")
    assert results["query"]["frames"] == results["quest"]["frames"] == 2
    assert "ap_50" in results["query"] and results["query"]["bytes_per_frame"] == 0
    assert results["quest"]["bytes_per_frame"] > 4 * 480  # 4 queries of about 480 bytes each
    state = load_checkpoint(tmp_path / "work_quest" / "last.pt")["model"]
    assert "fusion.align.feature.weight" in state and "head.layers.2.cls.2.bias" in state


def test_acco_trains_a_step_and_evaluates_through_the_channel_beyond_a_distance(tiny_experiment, tmp_path):
    cfg = tiny_experiment("experimental/acco", tmp_path, cameras=False)
    # untrained, its anchors score about 0.01: send some all the same
    cfg["model"]["fusion"].update(score_threshold=0.0, top_k=4)
    cfg.setdefault("eval", {})["range_m"] = [5.0, float("inf")]
    results = _fit(cfg, tmp_path / "work")
    assert results["frames"] == 2 and "ap_50" in results and results["range_m"] == [5.0, None]
    # two rounds (decoder:1 and decoder:2), each at least one collaborator's 4 anchors
    assert results["bytes_per_frame"] >= 2 * (188 + 164 * 4)
    state = load_checkpoint(tmp_path / "work" / "last.pt")["model"]
    assert "fusion.attn_out.weight" in state and "fusion.range.lo" in state


def test_codyntrust_trains_a_step_and_evaluates_through_the_channel(tiny_experiment, tmp_path):
    cfg = tiny_experiment("experimental/codyntrust", tmp_path, cameras=False)
    assert cfg["model"]["fusion"]["type"] == "codyntrust" and cfg["dataset"]["history_frames"] == 1
    cfg["model"]["fusion"]["passes"] = 2
    cfg["train"]["val_frames"] = 3
    results = _fit(cfg, tmp_path / "work")
    assert results["frames"] == 3 and "ap_50" in results
    assert results["bytes_per_frame"] > 0 and not results.get("rejected_messages")
    state = load_checkpoint(tmp_path / "work" / "last.pt")["model"]
    assert "head.log_var.weight" in state and "fusion.trust.mlp.0.weight" in state
