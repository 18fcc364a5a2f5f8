"""The training loop: seeded, resumable to the same weights, checkpointed atomically.

Reproducibility: the model is initialised under ``torch.manual_seed(seed)``; the sample order of
epoch ``e`` is a permutation drawn from ``(seed, e)``; augmentation draws from ``(seed, e, index)``
(see :class:`~v2xfuse.datasets.CoopSampler`). A checkpoint records the step, the epoch and the
position in it, so ``--resume`` replays exactly the batches an uninterrupted run would see.

Files in the work dir: ``last.pt`` and ``prev.pt`` (the checkpoint before it, kept in case
``last.pt`` is damaged; see :mod:`v2xfuse.engine.checkpoint`), ``config.yaml``,
``results_val.json`` (the final validation summary with ``eval_mode``, cumulative
``train_seconds`` and ``steps``), ``eval_val.json`` (the results records of the latest
validation), ``tb/``.

What ``--resume`` does:

* The checkpoint fixes the config it was trained with: every value under ``dataset``,
  ``pipeline``, ``model`` and ``train`` must be the same (``train`` compared with its defaults
  filled in), except ``train.steps`` and the ``train`` keys that take effect on resume without
  changing what is trained (``num_workers``, ``log_every``, ``checkpoint_every``, ``val_every``,
  ``val_frames``: :data:`RESUME_ALLOWED_CHANGES`). Any other difference is a
  :class:`ResumeError` listing each key with both values, raised before anything in the work
  dir is written. ``eval`` and ``channel`` may change: they only affect validation.
* A larger (or smaller, but not below the checkpoint's step) ``train.steps`` extends the run.
  The one-cycle LR schedule is rebuilt for the new total and continues at the current step: from
  there on the LR is what a run started with the new ``train.steps`` has at that step. For a run
  that had finished, whose LR had decayed to ``lr / 1000``, the LR rises again to the new
  schedule's value (a warm restart). The log says so with both LRs. The weights differ from those
  of a run trained with the larger ``train.steps`` from the start.
* A finished run (checkpoint step = ``train.steps``) returns its ``results_val.json`` unchanged;
  if that file is missing or incomplete (a kill during the final validation, another
  ``eval.mode``), the final checkpoint is validated and the file written.
* ``train_seconds`` is training time summed over sessions (validation excluded), carried in the
  checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from ..builder import build_dataset, build_detector
from ..config import dump_config, section_dataclass
from ..datasets import collate
from ..datasets.base import DatasetError
from ..evaluation import results_to_json
from .checkpoint import (LAST_NAME, PREVIOUS_NAME, CheckpointError, ResumeError, atomic_write_text,
                         config_changes, format_changes, load_checkpoint,
                         remove_stale_temporaries, save_checkpoint)
from .evaluate import eval_mode, evaluate_detector, summary_ap_keys

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "Trainer", "EpochSampler", "save_checkpoint", "load_checkpoint",
           "CheckpointError", "ResumeError", "RESUME_CHECKED_SECTIONS", "RESUME_ALLOWED_CHANGES"]

# Sections a checkpoint's weights and optimizer state depend on; --resume may change only
# RESUME_ALLOWED_CHANGES in them: train.steps (extends the run), and the keys that take effect
# on resume without changing what is trained (loader processes, logging, checkpoint and
# validation cadence; the weights do not depend on num_workers, see tests/engine/test_train.py).
RESUME_CHECKED_SECTIONS = ("dataset", "pipeline", "model", "train")
RESUME_ALLOWED_CHANGES = ("train.steps", "train.num_workers", "train.log_every",
                          "train.checkpoint_every", "train.val_every", "train.val_frames")
_TRAINER_KEYS = ("optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "torch_rng")


@dataclass
class TrainConfig:
    """``train:`` section of an experiment config."""

    seed: int = 0
    steps: int = 1000               # optimizer steps in the whole run
    batch_size: int = 2
    lr: float = 3e-3
    weight_decay: float = 1e-2
    warmup_frac: float = 0.3        # one-cycle schedule: fraction of steps rising to lr
    grad_clip: float = 10.0
    num_workers: int = 0
    checkpoint_every: int = 100     # steps; the last step is always checkpointed
    val_every: int = 0              # steps; 0: validate only at the end
    val_frames: int = 0             # 0: the whole validation split
    log_every: int = 10

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrainConfig":
        return section_dataclass(cls, d, "train")


class EpochSampler(Sampler):
    """``(epoch, index)`` keys: a permutation of ``range(n)`` drawn from ``(seed, epoch)``,
    starting at position ``start``. ``epoch`` and ``start`` may be changed between passes."""

    def __init__(self, n: int, seed: int, epoch: int = 0, start: int = 0):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen)[self.start:].tolist()
        return iter([(self.epoch, i) for i in order])

    def __len__(self) -> int:
        return self.n - self.start


class Trainer:
    """Trains ``build_detector(cfg)`` on the config's train split.

    Args:
        cfg: the resolved experiment config (``dataset``, ``pipeline``, ``model``, ``train``).
        work_dir: checkpoints (``last.pt``, ``prev.pt``), ``config.yaml``, TensorBoard logs,
            results.
        device: ``"cpu"`` or ``"cuda"``.
        tensorboard: write TensorBoard scalars under ``work_dir/tb``.
        progress: show a tqdm bar.
    """

    def __init__(self, cfg: dict, work_dir: str | os.PathLike, device: str = "cpu",
                 tensorboard: bool = True, progress: bool = True):
        self.cfg = cfg
        self.tc = TrainConfig.from_dict(cfg.get("train"))
        self.work_dir = Path(work_dir)
        self.device = torch.device(device)
        self.progress = progress
        self.tensorboard = tensorboard
        self.ckpt_path = self.work_dir / LAST_NAME
        self.prev_path = self.work_dir / PREVIOUS_NAME
        self.train_seconds = 0.0  # cumulative over sessions, as of the latest checkpoint
        self.skipped_frames = 0  # bad frames left out of training batches in this session

    def _build(self):
        tc = self.tc
        torch.manual_seed(tc.seed)
        self.model = build_detector(self.cfg).to(self.device)
        self.train_set = build_dataset(self.cfg, "train", train=True, seed=tc.seed)
        if len(self.train_set) < tc.batch_size:
            raise ValueError(f"train split has {len(self.train_set)} samples, fewer than "
                             f"batch_size {tc.batch_size}")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr,
                                           weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=tc.lr, total_steps=max(tc.steps, 1),
            pct_start=tc.warmup_frac, anneal_strategy="cos", div_factor=10.0,
            final_div_factor=100.0)

    def _state(self, step: int, epoch: int, batch_in_epoch: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "torch_rng": torch.get_rng_state(),
                "train_seconds": self.train_seconds, "config": self.cfg}

    def _loader(self) -> tuple[DataLoader, EpochSampler]:
        """One loader for the whole run: with ``num_workers`` > 0 its workers persist, so what
        they have decoded (the adapter's point cache) serves every epoch, and the first epoch's
        decoding overlaps training."""
        sampler = EpochSampler(len(self.train_set), self.tc.seed)
        workers = self.tc.num_workers
        loader = DataLoader(self.train_set, batch_size=self.tc.batch_size, sampler=sampler,
                            collate_fn=collate, num_workers=workers, drop_last=True,
                            persistent_workers=workers > 0)
        return loader, sampler

    def fit(self, resume: bool = False) -> dict:
        """Train for ``train.steps`` steps (continuing ``last.pt`` when ``resume``), validate,
        and return the final validation results (also written to ``results_val.json``).

        What a resume may change, and what it does with a finished run: see the module docstring.

        Raises:
            CheckpointError: ``last.pt`` cannot be read (the message names ``prev.pt``).
            ResumeError: the config differs from the checkpoint's in keys other than
                :data:`RESUME_ALLOWED_CHANGES` (all of them are listed), or ``train.steps`` is
                below the checkpoint's step. Nothing in the work dir has changed then.
        """
        tc = self.tc
        eval_mode(self.cfg)  # a bad eval section fails now, not after the training
        self.work_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries([self.ckpt_path, self.prev_path,
                                  self.work_dir / "results_val.json",
                                  self.work_dir / "eval_val.json"])
        state = self._resume_state() if resume else None
        # Written only after the check above: config.yaml never claims a config the weights
        # were not trained with.
        dump_config(self.cfg, self.work_dir / "config.yaml")
        self._build()
        step = epoch = batch_in_epoch = 0
        self.train_seconds = 0.0
        if state is not None:
            step, epoch, batch_in_epoch = self._restore(state)
        writer = self._writer()
        try:
            if step >= tc.steps:
                return self._finished(step, writer)
            return self._train(step, epoch, batch_in_epoch, writer)
        finally:
            if writer:
                writer.close()

    def _train(self, step: int, epoch: int, batch_in_epoch: int, writer) -> dict:
        tc = self.tc
        batches_per_epoch = len(self.train_set) // tc.batch_size
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        seconds_before, session_start, val_seconds = self.train_seconds, time.perf_counter(), 0.0
        summary: dict = {}
        self.model.train()
        loader, sampler = self._loader()
        while step < tc.steps:
            sampler.epoch, sampler.start = epoch, batch_in_epoch * tc.batch_size
            stepped = False
            for batch in loader:
                if batch.skipped:
                    self.skipped_frames += len(batch.skipped)
                if batch.batch_size == 0:  # every sample of it skipped (skip_bad_frames)
                    log.warning("a batch of bad frames skipped: %s",
                                "; ".join(s.reason for s in batch.skipped))
                    batch_in_epoch += 1  # the position in the epoch still moves, for --resume
                    if batch_in_epoch >= batches_per_epoch:
                        epoch, batch_in_epoch = epoch + 1, 0
                    continue
                losses = self._step(batch.to(self.device))
                stepped = True
                step += 1
                batch_in_epoch += 1
                if batch_in_epoch >= batches_per_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.steps:
                    scalars = {k: float(v) for k, v in losses.items()}
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}", ep=epoch)
                    if writer:
                        for k, v in scalars.items():
                            writer.add_scalar(f"train/{k}", v, step)
                        writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], step)
                if step % tc.checkpoint_every == 0 or step == tc.steps:
                    # training time only: validation is not counted, earlier sessions are
                    self.train_seconds = (seconds_before + time.perf_counter() - session_start
                                          - val_seconds)
                    save_checkpoint(self.ckpt_path, self._state(step, epoch, batch_in_epoch),
                                    previous=self.prev_path)
                if (tc.val_every and step % tc.val_every == 0) or step == tc.steps:
                    started = time.perf_counter()
                    summary = self.validate(step, writer)
                    val_seconds += time.perf_counter() - started
                if step >= tc.steps:
                    break
            if not stepped:  # a whole pass of bad frames: another pass would loop forever
                raise DatasetError(f"every training batch of a pass over the train split was "
                                   f"skipped as bad ({self.skipped_frames} frames; the warnings "
                                   f"above name their files): nothing to train on")
        bar.close()
        return self._write_results(summary, step)

    def _resume_state(self) -> dict | None:
        """The checkpoint to continue, checked against the config; None when there is none."""
        if not self.ckpt_path.is_file():
            if self.prev_path.is_file():
                raise CheckpointError(
                    f"--resume: {self.ckpt_path} is missing but {self.prev_path} (the checkpoint "
                    f"before it) is there: copy it to {self.ckpt_path} to resume from it, or "
                    f"delete it to start afresh")
            log.warning("--resume: no checkpoint at %s, starting from scratch", self.ckpt_path)
            return None
        state = load_checkpoint(self.ckpt_path, self.device)
        missing = [k for k in _TRAINER_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"{self.ckpt_path}: no {', '.join(missing)}: not a checkpoint "
                                  f"that training can continue")
        changes = config_changes(_comparable(state["config"]), _comparable(self.cfg),
                                 RESUME_CHECKED_SECTIONS, allowed=RESUME_ALLOWED_CHANGES)
        if changes:
            raise ResumeError(
                f"--resume: the config differs from the one {self.ckpt_path} (step "
                f"{state['step']}) was trained with, in {len(changes)} value(s) the checkpoint "
                f"fixes:\n{format_changes(changes)}\nOf dataset, pipeline, model and train, a "
                f"resume may change only {', '.join(RESUME_ALLOWED_CHANGES)}. Resume with the "
                f"checkpoint's values, or train into another work dir.")
        if self.tc.steps < state["step"]:
            raise ResumeError(f"--resume: train.steps {self.tc.steps} is below step "
                              f"{state['step']} of {self.ckpt_path}: a run cannot be cut back")
        return state

    def _restore(self, state: dict) -> tuple[int, int, int]:
        """Load ``state`` into the model, optimizer, schedule and RNG; (step, epoch, batch)."""
        step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        saved_steps = TrainConfig.from_dict(state["config"].get("train")).steps
        if saved_steps == self.tc.steps:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            self._reschedule(step, saved_steps)
        torch.set_rng_state(state["torch_rng"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        log.info("resumed %s at step %d (epoch %d, batch %d)", self.ckpt_path, step,
                 state["epoch"], state["batch_in_epoch"])
        return step, int(state["epoch"]), int(state["batch_in_epoch"])

    def _reschedule(self, step: int, saved_steps: int) -> None:
        """Continue at ``step`` of a one-cycle schedule rebuilt for the new ``train.steps``."""
        before = self.optimizer.param_groups[0]["lr"]
        self.scheduler.last_epoch = step - 1
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": it only
            warnings.simplefilter("ignore", UserWarning)  # positions the schedule here
            self.scheduler.step()
        after = self.optimizer.param_groups[0]["lr"]
        log.warning(
            "train.steps %d -> %d: the one-cycle LR schedule is rebuilt for %d steps and "
            "continues at step %d with the LR a %d-step run has there (%.3g -> %.3g)%s",
            saved_steps, self.tc.steps, self.tc.steps, step, self.tc.steps, before, after,
            "; the old schedule had finished its decay, so the LR rises again (a warm restart)"
            if step >= saved_steps else "")

    def _finished(self, step: int, writer) -> dict:
        """Resume of a run at its last step: its results, validating only if they are missing."""
        path = self.work_dir / "results_val.json"
        results = _read_json(path)
        mode = eval_mode(self.cfg)
        if _complete(results, step, mode):
            log.info("the run finished at step %d: its results (%s) are kept as they are",
                     step, path)
            return results
        log.warning("the run finished at step %d but %s is %s: validating the final checkpoint",
                    step, path, "missing" if results is None else
                    f"incomplete (for step {step}, eval.mode {mode})")
        return self._write_results(self.validate(step, writer), step)

    def _write_results(self, summary: dict, step: int) -> dict:
        results = {**summary, "train_seconds": round(self.train_seconds, 1), "steps": step,
                   "train_skipped_frames": self.skipped_frames}
        atomic_write_text(self.work_dir / "results_val.json", json.dumps(results, indent=2))
        return results

    def _step(self, batch) -> dict[str, torch.Tensor]:
        out = self.model(batch)
        losses = self.model.loss(out, batch)
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"loss is {float(losses['loss'])} "
                                     f"({ {k: float(v) for k, v in losses.items()} })")
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return {k: v.detach() for k, v in losses.items()}

    def validate(self, step: int, writer=None) -> dict:
        val_set = build_dataset(self.cfg, "val", train=False, seed=self.tc.seed)
        results, summary = evaluate_detector(self.model, val_set, self.cfg, device=self.device,
                                             max_frames=self.tc.val_frames or None,
                                             progress=self.progress)
        self.model.train()
        for result in results:
            result.extra["step"] = step
        atomic_write_text(self.work_dir / "eval_val.json", results_to_json(results) + "\n")
        headline = [k for k in summary_ap_keys(summary["eval_mode"]) if k.endswith("_50")]
        log.info("step %d validation (%s): %s", step, summary["eval_mode"],
                 {k: summary[k] for k in headline})
        if writer:
            for k, v in summary.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
                    writer.add_scalar(f"val/{k}", v, step)
        return summary

    def _writer(self):
        if not self.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but a stripped env should still train
            log.warning("tensorboard is not installed: no TensorBoard scalars")
            return None
        return SummaryWriter(str(self.work_dir / "tb"))


def _comparable(cfg: dict) -> dict:
    """``cfg`` with its ``train`` section's defaults filled in (an absent key and its default
    value are the same training) and without the options of heads it does not use
    (``model.head.<name>`` for a name other than ``model.head.type``: options a config carries
    so that ``--set model.head.type=...`` can switch heads, which the weights do not depend on)."""
    head = (cfg.get("model") or {}).get("head")
    if isinstance(head, dict) and "type" in head:
        unused = {k for k, v in head.items() if isinstance(v, dict) and k != head["type"]}
        cfg = {**cfg, "model": {**cfg["model"],
                                "head": {k: v for k, v in head.items() if k not in unused}}}
    try:
        train = dataclasses.asdict(TrainConfig.from_dict(cfg.get("train")))
    except (KeyError, TypeError):  # a key this version does not know: compare as written
        return cfg
    return {**cfg, "train": train}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _complete(results, step: int, mode: str) -> bool:
    """Whether ``results`` (a read results_val.json) is the final validation of this run."""
    return (isinstance(results, dict) and results.get("steps") == step
            and results.get("eval_mode", "opencood") == mode and "train_seconds" in results
            and all(k in results for k in summary_ap_keys(mode)))
