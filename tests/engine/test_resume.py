"""--resume around a run's edges: a finished run, a kill during the final validation, a longer
train.steps, a changed config, a damaged last.pt; and eval.mode dair at the end of training."""
import copy
import json
import logging
import shutil

import pytest
import torch
import yaml

from v2xfuse.engine.checkpoint import CheckpointError, ResumeError
from v2xfuse.engine.evaluate import summary_ap_keys
from v2xfuse.engine.trainer import Trainer, load_checkpoint
from v2xfuse.evaluation import results_from_json



def _trainer(cfg, work_dir) -> Trainer:
    return Trainer(cfg, work_dir, tensorboard=False, progress=False)


def _with(cfg: dict, **sections) -> dict:
    """A copy of ``cfg`` with ``section={key: value}`` merged in."""
    out = copy.deepcopy(cfg)
    for section, values in sections.items():
        out.setdefault(section, {}).update(values)
    return out


@pytest.fixture(scope="module")
def finished_run(short_cfg, tmp_path_factory):
    """The work dir of a finished 3-step run (copy it before changing it)."""
    work = tmp_path_factory.mktemp("finished") / "run"
    _trainer(short_cfg, work).fit()
    return work


@pytest.fixture
def run_copy(finished_run, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(finished_run, work)
    return work


def _forbid_training(monkeypatch):
    def no_step(self, batch):
        raise AssertionError("a finished run must not train")
    monkeypatch.setattr(Trainer, "_step", no_step)


def test_resuming_a_finished_run_keeps_its_results(load_tool, short_cfg, run_copy, monkeypatch):
    results_path = run_copy / "results_val.json"
    before = results_path.read_bytes()
    results = json.loads(before)
    state = load_checkpoint(run_copy / "last.pt")
    assert results["steps"] == 3 and results["eval_mode"] == "opencood"
    assert results["train_seconds"] == round(state["train_seconds"], 1) > 0
    (run_copy / "last.pt.tmp").write_bytes(b"left by a kill")

    _forbid_training(monkeypatch)
    monkeypatch.setattr(Trainer, "validate", lambda *a, **k: pytest.fail("validated again"))
    # keys that do not change what is trained may differ
    again = _trainer(_with(short_cfg, train={"num_workers": 1, "log_every": 5}),
                     run_copy).fit(resume=True)
    assert again == results and results_path.read_bytes() == before
    assert not (run_copy / "last.pt.tmp").exists()
    line = load_tool("train").summary_line(again, run_copy)
    assert f"[opencood]: AP@0.3 {results['ap_30']:.4f}  AP@0.5 {results['ap_50']:.4f}" in line
    assert f"(3 steps, {results['train_seconds']:.0f} s training;" in line


def test_a_kill_in_the_final_validation_is_validated_on_resume(short_cfg, tmp_path, monkeypatch):
    work = tmp_path / "run"
    real_validate = Trainer.validate

    def killed(self, step, writer=None):
        raise KeyboardInterrupt("killed during validation")

    monkeypatch.setattr(Trainer, "validate", killed)
    with pytest.raises(KeyboardInterrupt):
        _trainer(short_cfg, work).fit()
    state = load_checkpoint(work / "last.pt")
    assert state["step"] == 3 and not (work / "results_val.json").exists()

    calls = []
    monkeypatch.setattr(Trainer, "validate",
                        lambda self, step, writer=None: calls.append(step)
                        or real_validate(self, step, writer))
    _forbid_training(monkeypatch)
    results = _trainer(short_cfg, work).fit(resume=True)
    assert calls == [3]
    assert results["steps"] == 3 and all(k in results for k in summary_ap_keys("opencood"))
    assert results["train_seconds"] == round(state["train_seconds"], 1) > 0
    assert json.loads((work / "results_val.json").read_text()) == results

    # the file an earlier version wrote on such a resume: validated again, time restored
    (work / "results_val.json").write_text(json.dumps({"train_seconds": 0, "steps": 3}))
    results = _trainer(short_cfg, work).fit(resume=True)
    assert calls == [3, 3] and results["train_seconds"] > 0 and "ap_50" in results


def _one_cycle_lr(cfg: dict, total: int, step: int) -> float:
    tc = cfg["train"]
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=tc["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tc["lr"], total_steps=total,
                                                pct_start=0.3, anneal_strategy="cos",
                                                div_factor=10.0, final_div_factor=100.0)
    for _ in range(step):
        opt.step()
        sched.step()
    return opt.param_groups[0]["lr"]


def test_a_larger_train_steps_extends_the_run(short_cfg, run_copy, caplog):
    before = load_checkpoint(run_copy / "last.pt")
    longer = _with(short_cfg, train={"steps": 5})
    with caplog.at_level(logging.WARNING, logger="v2xfuse.engine.trainer"):
        results = _trainer(longer, run_copy).fit(resume=True)
    state = load_checkpoint(run_copy / "last.pt")
    assert state["step"] == 5 and results["steps"] == 5
    assert state["scheduler"]["total_steps"] == 5
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        _one_cycle_lr(short_cfg, 5, 5), rel=1e-9)
    text = caplog.text
    assert "train.steps 3 -> 5" in text and "rebuilt for 5 steps" in text
    assert "warm restart" in text
    # the clock continues from the checkpoint's: compared unrounded (two tiny steps can take
    # under 0.05 s, so the results' one-decimal figure may not move), and reported rounded
    assert state["train_seconds"] > before["train_seconds"]
    assert results["train_seconds"] == round(state["train_seconds"], 1)
    assert yaml.safe_load((run_copy / "config.yaml").read_text())["train"]["steps"] == 5
    assert load_checkpoint(run_copy / "prev.pt")["step"] == 4

    with pytest.raises(ResumeError, match="train.steps 2 is below step 5"):
        _trainer(_with(short_cfg, train={"steps": 2}), run_copy).fit(resume=True)


def test_config_changes_on_resume_are_refused_and_listed(load_tool, short_cfg, run_copy, monkeypatch):
    config_before = (run_copy / "config.yaml").read_bytes()
    ckpt_before = (run_copy / "last.pt").read_bytes()
    changed = _with(short_cfg, train={"lr": 1e-3, "steps": 9, "weight_decay": 0.0},
                    pipeline={"flip_prob": 0.0}, eval={"order": "local"})
    changed["model"]["fusion"] = {"type": "none"}
    _forbid_training(monkeypatch)
    with pytest.raises(ResumeError) as info:
        _trainer(changed, run_copy).fit(resume=True)
    message = str(info.value)
    for line in ("train.lr: 0.003 (checkpoint) -> 0.001 (now)",
                 "train.weight_decay: 0.01 (checkpoint) -> 0.0 (now)",
                 "pipeline.flip_prob: 0.5 (checkpoint) -> 0.0 (now)",
                 "model.fusion.type: 'max' (checkpoint) -> 'none' (now)"):
        assert line in message
    assert "4 value(s)" in message and "train.steps:" not in message and "eval.order" not in message
    assert (run_copy / "config.yaml").read_bytes() == config_before
    assert (run_copy / "last.pt").read_bytes() == ckpt_before

    # through the tool: exit status 2 and the list on stderr, nothing trained
    cfg_file = run_copy.parent / "changed.yaml"
    cfg_file.write_text(yaml.safe_dump(changed))
    rc = load_tool("train").main(["--config", str(cfg_file), "--work-dir", str(run_copy),
                              "--resume", "--quiet", "--no-tensorboard"])
    assert rc == 2
    assert (run_copy / "config.yaml").read_bytes() == config_before


def test_a_damaged_last_checkpoint_points_at_the_previous_one(load_tool, short_cfg, run_copy, capsys):
    last, prev = run_copy / "last.pt", run_copy / "prev.pt"
    assert load_checkpoint(prev)["step"] == 2
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as info:
        _trainer(short_cfg, run_copy).fit(resume=True)
    assert str(last) in str(info.value) and f"cp {prev} {last}" in str(info.value)
    rc = load_tool("eval").main(["--checkpoint", str(last)])
    assert rc == 2 and str(last) in capsys.readouterr().err
    last.unlink()
    with pytest.raises(CheckpointError, match="prev.pt .* is there"):
        _trainer(short_cfg, run_copy).fit(resume=True)


def test_eval_mode_dair_scores_training_and_checkpoints_the_dair_way(load_tool, tiny_dair_cfg, tmp_path,
                                                                     capsys):
    work = tmp_path / "dair"
    cfg_file = tmp_path / "dair.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_dair_cfg))
    rc = load_tool("train").main(["--config", str(cfg_file), "--work-dir", str(work), "--quiet",
                              "--no-tensorboard"])
    assert rc == 0
    out = capsys.readouterr().out
    results = json.loads((work / "results_val.json").read_text())
    assert results["eval_mode"] == "dair" and results["sort_mode"] == "dair"
    assert all(k in results for k in summary_ap_keys("dair"))
    assert "ap_50" not in results
    assert results["bytes_per_frame"] > 0 and results["latency_ms_median"] > 0
    line = out.strip().splitlines()[-1]
    assert "[dair]: AP-3D/AP-BEV@0.5 overall" in line and "0-30" in line and "50-100" in line
    assert f"overall {results['ap_3d_overall_50']:.4f}/{results['ap_bev_overall_50']:.4f}" in line
    records = results_from_json((work / "eval_val.json").read_text())
    assert {(r.protocol, r.iou_type) for r in records} == {("dair", "3d"), ("dair", "bev")}
    assert len(records) == 8 and all(r.bytes_per_frame > 0 and r.latency_ms > 0 for r in records)
    assert records[0].num_det > 0 and records[0].num_gt > 0

    out_file, pred_file = tmp_path / "scored.json", tmp_path / "pred.json"
    assert load_tool("eval").main(["--checkpoint", str(work / "last.pt"), "--out", str(out_file),
                               "--save-pred", str(pred_file)]) == 0  # the config's eval.mode
    scored = results_from_json(out_file.read_text())
    from_files = load_tool("eval").score_files(pred_file, tmp_path / "pred.gt.json", mode="dair")
    for got, want in zip(from_files, scored, strict=True):  # what --save-pred wrote is what
        assert got.ap == pytest.approx(want.ap, nan_ok=True)  # was scored, bytes included
        assert (got.num_det, got.bytes_per_frame) == (want.num_det, want.bytes_per_frame)
    assert [r.protocol for r in scored] == ["dair"] * 8
    assert all(r.extra["checkpoint"] == str(work / "last.pt") and r.bytes_per_frame > 0
               for r in scored)
    for r in scored:  # the same model, frames and protocol as the validation at the end
        same = next(x for x in records if (x.iou_type, x.range_name) == (r.iou_type, r.range_name))
        assert r.ap == pytest.approx(same.ap, nan_ok=True) and r.num_gt == same.num_gt
    assert load_tool("eval").main(["--checkpoint", str(work / "last.pt"), "--mode", "opencood",
                               "--out", str(out_file)]) == 0
    assert [r.protocol for r in results_from_json(out_file.read_text())] == ["opencood"]
    assert load_tool("eval").main(["--checkpoint", str(work / "last.pt"), "--order", "local"]) == 2
    with pytest.raises(SystemExit):
        load_tool("eval").main(["--checkpoint", str(work / "last.pt"), "--mode", "dair",
                            "--iou", "3d"])


def test_resume_ignores_the_options_of_heads_the_run_does_not_use():
    """A run saved before a config gained ``model.head.center`` options still resumes, while a
    change to the head it trains is refused."""
    from v2xfuse.engine.checkpoint import config_changes
    from v2xfuse.engine.trainer import RESUME_CHECKED_SECTIONS, _comparable

    saved = {"model": {"head": {"type": "anchor", "anchor": {"num_dirs": 2}}}}
    now = {"model": {"head": {"type": "anchor", "anchor": {"num_dirs": 2},
                              "center": {"head_channels": 32}}}}
    assert config_changes(_comparable(saved), _comparable(now), RESUME_CHECKED_SECTIONS) == []
    now["model"]["head"]["anchor"]["num_dirs"] = 1
    changes = config_changes(_comparable(saved), _comparable(now), RESUME_CHECKED_SECTIONS)
    assert [c[0] for c in changes] == ["model.head.anchor.num_dirs"]
    now["model"]["head"]["type"] = "center"
    changes = config_changes(_comparable(saved), _comparable(now), RESUME_CHECKED_SECTIONS)
    assert "model.head.type" in [c[0] for c in changes]


def test_resume_accepts_a_new_or_moved_point_cache():
    """``dataset.cache_dir`` serves the points the source would: a run saved before the config
    had one (or with another folder) resumes; the dataset itself still may not change."""
    from v2xfuse.engine.checkpoint import config_changes
    from v2xfuse.engine.trainer import RESUME_ALLOWED_CHANGES, RESUME_CHECKED_SECTIONS, _comparable

    saved = {"dataset": {"type": "opv2v", "root": "/data/a"}}
    now = {"dataset": {"type": "opv2v", "root": "/data/a", "cache_dir": "/work/cache"}}
    check = lambda: [c[0] for c in config_changes(_comparable(saved), _comparable(now),  # noqa: E731
                                                  RESUME_CHECKED_SECTIONS, RESUME_ALLOWED_CHANGES)]
    assert check() == []
    saved["dataset"]["cache_dir"] = "/elsewhere"
    assert check() == []
    now["dataset"]["root"] = "/data/b"
    assert check() == ["dataset.root"]
