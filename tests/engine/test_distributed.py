"""Training beyond one process. Two CPU processes launched by torchrun (gloo) against one process
with the same global batch: the samples each rank trains on, the weights, a resume after a kill,
the sharded validation. Without a second process: the sampler's split, gradient accumulation,
what the CPU refuses, and that every parameter gets a gradient (so DDP need not search for unused
ones).

Why the weights can be compared: the detector's loss is a mean over the samples of a batch (each
head's loss is averaged over the B maps), so the mean of two ranks' losses over B samples each is
the loss of one batch of the 2B samples, and DDP's gradient average is that loss's gradient. The
exception is BatchNorm, which normalises over each rank's own batch (sync_bn, which would share
the statistics, runs on CUDA only): the comparison runs BN-free (torchrun_worker.py replaces each
BatchNorm by an identity, in both runs).
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from v2xfuse.builder import build_dataset, build_detector
from v2xfuse.config import ConfigError, load_config
from v2xfuse.datasets import collate
from v2xfuse.engine import trainer as trainer_module
from v2xfuse.engine.distributed import EpochSampler, World
from v2xfuse.engine.evaluate import evaluate_detector
from v2xfuse.engine.trainer import Trainer, TrainConfig, load_checkpoint
from v2xfuse.sim import SimConfig, generate_dataset

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("torchrun_worker.py")
# Two ranks average their gradients in another order than one process sums them over its batch
# (float32 sums of the same terms, regrouped: relative differences ~1e-7), and AdamW divides by
# the gradients' running RMS, so these carry into the weights at about the LR times that. After
# 4 steps at lr 3e-3 the largest difference measured was 3e-8 (weights of size ~0.1-1); the
# tolerance leaves room for other CPUs' summation orders, far below the 3e-4 an update moves a
# weight at this LR.
WEIGHT_ATOL, WEIGHT_RTOL = 2e-6, 1e-5


def _worker():
    spec = importlib.util.spec_from_file_location("v2xfuse_torchrun_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ddp_cfg(tmp_path_factory) -> dict:
    """One scene of 4 frames to train on, one of 4 to validate; a 16 x 16 grid; batch 1 per
    rank, so 2 steps per epoch on 2 ranks and 4 steps are 2 epochs; detections kept down to
    score 0, so that the validation's AP is not 0 (and would change with a frame missing or
    counted twice)."""
    root = tmp_path_factory.mktemp("syn4")
    sim = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 360, "beams": 16},
                               "rsu_lidar": {"azimuth_steps": 360, "beams": 16}})
    sim.cameras = False
    generate_dataset("opv2v", root, n_scenes=2, n_frames=4, seed=11, cfg=sim,
                     splits={"train": 0.5, "validate": 0.5}, progress=False, workers=1)
    return {
        "dataset": {"type": "opv2v", "root": str(root), "max_agents": 3, "comm_range": 200.0,
                    "splits": {"train": "train", "val": "validate"}},
        "pipeline": {"lidar_range": [-12.8, -12.8, -5.0, 12.8, 12.8, 3.0], "flip_prob": 0.5,
                     "rotate_deg": 10.0},
        "model": {"encoder": {"type": "pointpillars", "voxel_size": [1.6, 1.6],
                              "out_channels": 8, "max_points_per_pillar": 8},
                  "backbone": {"layer_strides": [1], "layer_channels": [16], "layer_nums": [1],
                               "upsample_channels": [16], "out_stride": 1},
                  "fusion": {"type": "max"}, "post": {"score_threshold": 0.0}},
        # val_frames 3: the ranks get 2 and 1 frames, nothing to pad
        "train": {"seed": 3, "steps": 4, "batch_size": 1, "lr": 3e-3, "checkpoint_every": 2,
                  "val_frames": 3, "log_every": 1},
    }


def _torchrun(cfg: dict, work: Path, *args: str, **hooks: str) -> subprocess.CompletedProcess:
    """tools/train.py on 2 CPU processes (torchrun_worker.py's ``hooks``: NO_BN, RECORD,
    DIE_AT)."""
    work.mkdir(parents=True, exist_ok=True)
    config = work.parent / f"{work.name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1",  # 2 ranks, 2 cores
           **{f"V2XFUSE_TEST_{k}": v for k, v in hooks.items()}}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), "--config", str(config), "--work-dir", str(work), "--quiet", *args],
        env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ddp_run(ddp_cfg, tmp_path_factory) -> Path:
    """The work dir of a finished BN-free 4-step run on 2 ranks, each rank's steps recorded in
    ``frames/rank<r>.jsonl``."""
    work = tmp_path_factory.mktemp("ddp") / "run"
    (work.parent / "frames").mkdir()
    done = _torchrun(ddp_cfg, work, NO_BN="1", RECORD=str(work.parent / "frames"))
    assert done.returncode == 0, done.stderr[-3000:]
    (work.parent / "stderr.txt").write_text(done.stderr)
    return work


def _one_process(cfg: dict, work: Path, monkeypatch, record: list | None = None) -> dict:
    """A BN-free run of ``cfg`` in this process; ``record`` gets each step's frames."""
    worker = _worker()
    build, step = trainer_module.build_detector, Trainer._step
    monkeypatch.setattr(trainer_module, "build_detector",
                        lambda c: worker.without_batch_norm(build(c)))
    if record is not None:
        monkeypatch.setattr(Trainer, "_step", lambda self, batches: (
            record.append(worker.frames_of(batches)), step(self, batches))[1])
    Trainer(cfg, work, tensorboard=False, progress=False).fit()
    return load_checkpoint(work / "last.pt")["model"]


@pytest.mark.slow
def test_two_ranks_train_the_weights_of_one_process_with_their_global_batch(
        ddp_cfg, ddp_run, tmp_path, monkeypatch):
    log = (ddp_run.parent / "stderr.txt").read_text()
    for line in ("world size 2, backend gloo", "rank 0: ", " cpu", "rank 1: ",
                 "batch 1 per rank x 2 rank(s) x accumulate 1 = global batch 2"):
        assert line in log, line
    ranks = [[json.loads(line) for line in (ddp_run.parent / "frames" / f"rank{r}.jsonl")
              .read_text().splitlines()] for r in range(2)]
    assert [len(steps) for steps in ranks] == [4, 4]
    # each step: one micro-batch of one frame per rank, never the same frame on both
    per_step = [[frame for rank in ranks for frame in rank[k][0]] for k in range(4)]
    assert all(len(set(frames)) == 2 for frames in per_step), per_step
    assert len(build_dataset(ddp_cfg, "train", train=False)) == 4
    for epoch in range(2):  # 2 steps of 2 frames: the 4 frames of the split, each once
        seen = per_step[2 * epoch] + per_step[2 * epoch + 1]
        assert len(set(seen)) == 4, seen

    single_cfg = copy.deepcopy(ddp_cfg)
    single_cfg["train"]["batch_size"] = 2
    single_steps: list = []
    expected = _one_process(single_cfg, tmp_path / "single", monkeypatch, single_steps)
    # the same samples at every step: one batch of 2 here, the ranks' batches of 1 there
    assert [sorted(s[0]) for s in single_steps] == [sorted(f) for f in per_step]
    got = load_checkpoint(ddp_run / "last.pt")
    assert got["step"] == 4 and got["world_size"] == 2 and len(got["rank_rng"]) == 2
    worst = max(float((got["model"][k] - v).abs().max()) for k, v in expected.items()
                if v.is_floating_point())
    for name, value in expected.items():
        torch.testing.assert_close(got["model"][name], value, atol=WEIGHT_ATOL,
                                   rtol=WEIGHT_RTOL, msg=lambda m: f"{name}: {m}")
    print(f"largest weight difference, 2 ranks against 1 process: {worst:.2e}")


def _bn_free_detector(cfg: dict, state: dict):
    torch.manual_seed(0)
    model = _worker().without_batch_norm(build_detector(cfg))
    model.load_state_dict(state)
    return model


@pytest.mark.slow
def test_the_sharded_validation_scores_exactly_what_one_process_scores(ddp_cfg, ddp_run):
    # 3 frames over 2 ranks (2 + 1): rank 0 gathers them, nothing padded or counted twice
    results = json.loads((ddp_run / "results_val.json").read_text())
    records = json.loads((ddp_run / "eval_val.json").read_text())["results"]
    model = _bn_free_detector(ddp_cfg, load_checkpoint(ddp_run / "last.pt")["model"])
    (one,), summary = evaluate_detector(model, build_dataset(ddp_cfg, "val", train=False),
                                        ddp_cfg, max_frames=3)
    assert summary["frames"] == results["frames"] == 3 and summary["ap_30"] > 0
    for key in ("ap_30", "ap_50", "ap_70", "bytes_per_frame", "bytes_per_frame_p95",
                "rejected_messages", "skipped_frames"):
        assert results[key] == summary[key], key
    (record,) = records
    assert record["ap"] == one.ap
    assert (record["num_frames"], record["num_gt"], record["num_det"]) == \
        (one.num_frames, one.num_gt, one.num_det)
    # rank 0 alone wrote the files: one TensorBoard event file, one config
    assert len(list((ddp_run / "tb").iterdir())) == 1
    assert sorted(p.name for p in ddp_run.iterdir()) == [
        "config.yaml", "eval_val.json", "last.pt", "prev.pt", "results_val.json", "tb"]


@pytest.mark.slow
def test_two_ranks_killed_after_a_checkpoint_resume_to_the_same_weights(ddp_cfg, ddp_run,
                                                                         tmp_path):
    work = tmp_path / "killed"
    killed = _torchrun(ddp_cfg, work, NO_BN="1", DIE_AT="3")  # after step 2's checkpoint
    assert killed.returncode != 0 and load_checkpoint(work / "last.pt")["step"] == 2
    resumed = _torchrun(ddp_cfg, work, "--resume", NO_BN="1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr and "at step 2" in resumed.stderr
    expected, got = load_checkpoint(ddp_run / "last.pt"), load_checkpoint(work / "last.pt")
    assert got["step"] == 4
    for name, value in expected["model"].items():
        assert torch.equal(got["model"][name], value), name
    for r in range(2):
        assert torch.equal(got["rank_rng"][r]["torch"], expected["rank_rng"][r]["torch"])
    straight = json.loads((ddp_run / "results_val.json").read_text())
    again = json.loads((work / "results_val.json").read_text())
    assert {k: again[k] for k in ("ap_30", "ap_50", "ap_70", "frames")} == \
        {k: straight[k] for k in ("ap_30", "ap_50", "ap_70", "frames")}


def test_a_resume_with_another_number_of_processes_is_refused(ddp_cfg, ddp_run, tmp_path):
    import shutil

    from v2xfuse.engine.checkpoint import ResumeError

    shutil.copytree(ddp_run, tmp_path / "run")
    with pytest.raises(ResumeError, match="run of 2 process"):
        Trainer(ddp_cfg, tmp_path / "run", tensorboard=False, progress=False).fit(resume=True)


def test_the_sampler_splits_each_global_batch_over_the_ranks():
    n, batch, ranks = 11, 2, 3  # 11 samples, global batch 6: one step per epoch, 5 left out
    one = list(EpochSampler(n, seed=7, epoch=4, samples_per_epoch=6))
    split = [list(EpochSampler(n, seed=7, epoch=4, rank=r, world_size=ranks, samples_per_epoch=6))
             for r in range(ranks)]
    assert [len(s) for s in split] == [batch] * ranks
    assert sorted(k for s in split for k in s) == sorted(one)  # disjoint, covering the step
    assert list(EpochSampler(n, seed=7)) == list(EpochSampler(n, seed=7, world_size=1))
    # resuming mid-epoch: from global position 6 on, each rank continues its own share
    whole = [list(EpochSampler(12, 1, rank=r, world_size=2)) for r in range(2)]
    later = [list(EpochSampler(12, 1, start=6, rank=r, world_size=2)) for r in range(2)]
    assert [w[3:] for w in whole] == later and [len(s) for s in later] == [3, 3]


def test_accumulated_micro_batches_train_the_weights_of_their_whole_batch(ddp_cfg, tmp_path,
                                                                          monkeypatch):
    cfg = copy.deepcopy(ddp_cfg)
    cfg["train"].update(steps=2, batch_size=2, val_frames=1)
    whole = _one_process(cfg, tmp_path / "whole", monkeypatch)
    cfg["train"].update(batch_size=1, accumulate=2)
    steps: list = []
    micro = _one_process(cfg, tmp_path / "micro", monkeypatch, steps)
    assert [len(s) for s in steps] == [2, 2]  # two micro-batches of one frame per step
    for name, value in whole.items():  # the same sums, regrouped: see WEIGHT_ATOL
        torch.testing.assert_close(micro[name], value, atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("train, message", [
    ({"amp": "bf16"}, "train.amp bf16: mixed precision is CUDA's autocast"),
    ({"amp": "fp8"}, "train.amp must be one of"),
    ({"accumulate": 0}, "train.accumulate must be a whole number"),
    ({"sync_bn": True}, "SyncBatchNorm runs on CUDA only"),
])
def test_the_cpu_refuses_what_it_cannot_do_before_writing_anything(ddp_cfg, tmp_path, train,
                                                                   message):
    cfg = copy.deepcopy(ddp_cfg)
    cfg["train"].update(train)
    # a world of 2 CPU ranks, refused before its first collective (none is initialised here)
    world = World(rank=0, size=2, backend="gloo")
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, tmp_path / "run", world=world).fit()
    assert not (tmp_path / "run").exists()


def test_amp_off_in_yaml_is_off(tmp_path):
    (tmp_path / "c.yaml").write_text("train: {amp: off}\n")  # YAML 1.1 reads `off` as false
    assert TrainConfig.from_dict(load_config(tmp_path / "c.yaml")["train"]).amp == "off"


FUSIONS = ("none", "early", "late", "max", "attfuse", "where2comm", "codefilling")


@pytest.mark.parametrize("model", [
    *({"fusion": {"type": t}} for t in FUSIONS),
    {"fusion": {"type": "max"}, "head": {"type": "center"}, "agent_loss_weight": 1.0},
    {"fusion": {"type": "codefilling"}, "max_agents": 1},  # no sender in the batch
    {"fusion": {"type": "max"}, "encoder": {"type": "second", "voxel_size": [1.6, 1.6, 1.0],
                                            "channels": [4, 8]}},
], ids=[*FUSIONS, "center-agent_loss", "codefilling-ego_only", "second"])
def test_every_parameter_gets_a_gradient_so_ddp_need_not_search_for_unused_ones(ddp_cfg,
                                                                                 model):
    """LiDAR-only models (find_unused_parameters off by default); an encoder per sensor may be
    skipped by a batch without that sensor, and switches the search on (TrainConfig)."""
    cfg = copy.deepcopy(ddp_cfg)
    if "max_agents" in model:
        cfg["dataset"]["max_agents"] = model.pop("max_agents")
    cfg["model"].update(model)
    torch.manual_seed(0)
    detector = build_detector(cfg).train()
    data = build_dataset(cfg, "train", train=True, seed=0)
    batch = collate([data[0], data[1]])
    detector.loss(detector(batch), batch)["loss"].backward()
    assert [n for n, p in detector.named_parameters() if p.grad is None] == []
