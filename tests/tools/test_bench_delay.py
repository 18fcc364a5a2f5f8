"""tools/bench_delay.py on a tiny generated dataset with untrained models: every (method, delay)
point scored once, resumable, the binomial protocol's delays realised, plot and table written."""
import csv
from pathlib import Path

import pytest
import torch

from v2xfuse.builder import build_detector
from v2xfuse.config import dump_config
from v2xfuse.engine.checkpoint import save_checkpoint
from v2xfuse.sim import SimConfig, generate_dataset
from v2xfuse.utils.scripts import load_script

TOOLS = Path(__file__).resolve().parents[2] / "tools"
METHODS = ["none", "max", "codyntrust"]


def _tool(name: str):
    return load_script(TOOLS / f"{name}.py", fresh=True)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """A config on 2 scenes of 3 frames (one for validation) and untrained checkpoints of
    METHODS (CoDynTrust with 2 dropout passes)."""
    root = tmp_path_factory.mktemp("syn")
    lidar = {"azimuth_steps": 180, "beams": 8}
    sim = SimConfig.from_dict({"vehicle_lidar": lidar, "rsu_lidar": lidar})
    sim.cameras = False
    generate_dataset("opv2v", root, n_scenes=2, n_frames=3, seed=3, cfg=sim,
                     splits={"train": 0.5, "validate": 0.5}, progress=False, workers=1)
    cfg = {
        "dataset": {"type": "opv2v", "root": str(root), "max_agents": 3, "comm_range": 200.0,
                    "splits": {"train": "train", "val": "validate"}},
        "pipeline": {"lidar_range": [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0]},
        "model": {"encoder": {"type": "pointpillars", "voxel_size": [1.6, 1.6],
                              "out_channels": 8, "max_points_per_pillar": 8},
                  "backbone": {"layer_strides": [1], "layer_channels": [8], "layer_nums": [1],
                               "upsample_channels": [8], "out_stride": 1},
                  "fusion": {"type": "max"}, "post": {"score_threshold": 0.05}},
        "train": {"seed": 0, "steps": 1, "batch_size": 1},
        "channel": {"seed": 0},
    }
    work = tmp_path_factory.mktemp("bench")
    dump_config(cfg, work / "tiny.yaml")
    for method in METHODS:
        method_cfg = {**cfg, "model": {**cfg["model"], "fusion": {"type": method}}}
        if method == "codyntrust":  # untrained: every anchor's score is about 0.01
            method_cfg["model"]["fusion"]["passes"] = 2
            method_cfg["model"]["post"] = {"score_threshold": 0.0, "max_detections": 20}
        torch.manual_seed(0)
        (work / "ckpt" / method).mkdir(parents=True)
        save_checkpoint(work / "ckpt" / method / "last.pt",
                        {"model": build_detector(method_cfg).state_dict(), "config": method_cfg,
                         "step": 0})
    return work


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _argv(work: Path, out: Path, *extra) -> list[str]:
    return ["--config", str(work / "tiny.yaml"), "--methods", ",".join(METHODS),
            "--checkpoints", str(work / "ckpt"), "--out", str(out), "--frames", "3",
            "--delays", "0,200", "--binomial-n", "2", "--quiet", *extra]


def test_bench_delay_scores_each_method_at_each_delay_and_resumes(tiny_bench, tmp_path,
                                                                  monkeypatch):
    bench = _tool("bench_delay")
    out = tmp_path / "delay"
    assert bench.main(_argv(tiny_bench, out)) == 0
    rows = _rows(out / "delay.csv")
    assert [(r["method"], r["delay_ms"]) for r in rows] == \
        [(m, d) for d in ("0", "200") for m in METHODS]
    realised = {r["delay_ms"]: float(r["realised_delay_ms"]) for r in rows}
    # Binomial(2, 1): 2 frames of 100 ms, cut short at the sequence start (frames 0, 1, 2)
    assert realised["0"] == 0.0 and realised["200"] == pytest.approx(100.0)
    ego_only = {r["ap_50"] for r in rows if r["method"] == "none"}
    assert len(ego_only) == 1  # the ego's own observation is never late
    assert all(float(r["bytes_per_frame"]) > 0 for r in rows if r["method"] != "none")
    assert all(r["frames"] == "3" and r["protocol"] == "binomial" for r in rows)
    # an observation served again in the next frame is not refused as a replay
    assert not any(r["rejected_messages"] for r in rows)
    png = (out / "ap_vs_delay.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    table = (out / "delay.md").read_text()
    assert "| 0 ms | 200 ms |" in table
    assert all(f"\n| {m} |" in table for m in METHODS)

    # a rerun scores nothing; a lost row is scored again, alone
    bandwidth = load_script(TOOLS / "bench_bandwidth.py")  # the module the bench uses
    calls = []
    original = bandwidth.evaluate_detector

    def counting(model, dataset, cfg, **kwargs):
        calls.append((cfg["model"]["fusion"]["type"], cfg["pipeline"]["delay_p"]))
        return original(model, dataset, cfg, **kwargs)

    monkeypatch.setattr(bandwidth, "evaluate_detector", counting)
    assert bench.main(_argv(tiny_bench, out)) == 0 and calls == []
    lines = (out / "delay.csv").read_text().splitlines(keepends=True)
    (out / "delay.csv").write_text("".join(lines[:-1]))
    assert bench.main(_argv(tiny_bench, out)) == 0
    assert calls == [("codyntrust", 1.0)]  # 200 ms with n = 2 frames of 100 ms: p = 1
    assert _rows(out / "delay.csv")[:-1] == rows[:-1]


def test_delay_overrides_follow_each_protocol():
    bench = _tool("bench_delay")
    assert bench.delay_overrides("binomial", 300, 100.0, 10) == [
        "pipeline.delay_frames=10", "pipeline.delay_mode=binomial", "pipeline.delay_p=0.3"]
    assert bench.delay_overrides("fixed", 200, 100.0)[:2] == [
        "pipeline.delay_frames=2", "pipeline.delay_mode=fixed"]
    assert bench.delay_overrides("uniform", 150, 100.0)[0] == "pipeline.delay_frames=3"
    assert bench.delay_overrides("binomial", 0, 100.0)[0] == "pipeline.delay_frames=0"
    with pytest.raises(SystemExit, match="p = 1.2"):
        bench.delay_overrides("binomial", 1200, 100.0, 10)
    with pytest.raises(SystemExit, match="whole frames"):
        bench.delay_overrides("fixed", 150, 100.0)
