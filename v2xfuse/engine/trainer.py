"""The training loop: seeded, resumable to the same weights, checkpointed atomically.

Reproducibility: the model is initialised under ``torch.manual_seed(seed)``; the sample order of
epoch ``e`` is a permutation drawn from ``(seed, e)``; augmentation draws from ``(seed, e, index)``
(see :class:`~v2xfuse.datasets.CoopSampler`). A checkpoint records the step, the epoch and the
position in it (in optimizer steps), so ``--resume`` replays exactly the batches an uninterrupted
run would see.

One optimizer step takes ``accumulate`` micro-batches of ``batch_size`` samples on each of the
``W`` ranks of a torchrun launch (:mod:`v2xfuse.engine.distributed`): the losses, each a mean
over its micro-batch, are divided by ``accumulate`` and DistributedDataParallel averages the
gradients over the ranks, so a step follows the mean loss of its ``W x accumulate x batch_size``
samples, those one process with that batch would take at that step (the sampler splits each
global batch over the ranks). BatchNorm is the exception: it normalises over each micro-batch of
each rank (over the ranks' micro-batches together with ``sync_bn``, CUDA only). Rank 0 writes
every file; each rank keeps its own RNG state in the checkpoint; a resume must use the world
size the checkpoint was written with.

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
  ``val_frames``, and ``dataset.cache_dir``: :data:`RESUME_ALLOWED_CHANGES`). Any other difference is a
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

import contextlib
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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..builder import build_dataset, build_detector, ensure_synthetic
from ..config import dump_config, section_dataclass
from ..datasets import collate
from ..datasets.base import DatasetError
from ..evaluation import results_to_json
from ..models.encoders.fuser import sensors_of
from .checkpoint import (LAST_NAME, PREVIOUS_NAME, CheckpointError, ResumeError, atomic_write_text,
                         config_changes, format_changes, load_checkpoint,
                         remove_stale_temporaries, save_checkpoint)
from .distributed import (DetectorLoss, EpochSampler, World, all_gather, any_rank, autocast,
                          broadcast, broadcast_buffers, check_setup, describe, in_groups,
                          mean_over_ranks, merge_statistics, one_process_first)
from .evaluate import eval_mode, evaluate_detector, summary_ap_keys

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "Trainer", "EpochSampler", "save_checkpoint", "load_checkpoint",
           "CheckpointError", "ResumeError", "RESUME_CHECKED_SECTIONS", "RESUME_ALLOWED_CHANGES"]

# Sections a checkpoint's weights and optimizer state depend on; --resume may change only
# RESUME_ALLOWED_CHANGES in them: train.steps (extends the run), and the keys that take effect
# on resume without changing what is trained (loader processes, logging, checkpoint and
# validation cadence, DDP's search for unused parameters, where decoded clouds are cached: the
# cache serves the points the source would; the weights do not depend on num_workers, see
# tests/engine/test_train.py).
RESUME_CHECKED_SECTIONS = ("dataset", "pipeline", "model", "train")
RESUME_ALLOWED_CHANGES = ("train.steps", "train.num_workers", "train.log_every",
                          "train.checkpoint_every", "train.val_every", "train.val_frames",
                          "train.find_unused_parameters", "dataset.cache_dir")
_TRAINER_KEYS = ("optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "torch_rng")


@dataclass
class TrainConfig:
    """``train:`` section of an experiment config."""

    seed: int = 0
    steps: int = 1000               # optimizer steps in the whole run
    batch_size: int = 2             # per process (rank); see accumulate
    lr: float = 3e-3
    weight_decay: float = 1e-2
    warmup_frac: float = 0.3        # one-cycle schedule: fraction of steps rising to lr
    grad_clip: float = 10.0
    num_workers: int = 0
    checkpoint_every: int = 100     # steps; the last step is always checkpointed
    val_every: int = 0              # steps; 0: validate only at the end
    val_frames: int = 0             # 0: the whole validation split
    log_every: int = 10
    accumulate: int = 1             # micro-batches per optimizer step (gradients summed)
    amp: str = "off"                # CUDA only: bf16, fp16 (with a gradient scaler) or off
    sync_bn: bool = False           # BatchNorm statistics over all ranks (CUDA only)
    # DDP: whether a rank may leave parameters without a gradient in a step (it then searches
    # the graph every step). None: only for encoders of several sensors, where a batch may lack
    # one sensor (a camera-only roadside unit out of range) and its encoder is skipped; every
    # LiDAR-only model uses all its parameters (tests/engine/test_distributed.py).
    find_unused_parameters: bool | None = None

    def __post_init__(self):
        if self.amp is False:  # YAML reads a bare `amp: off` as false
            self.amp = "off"

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrainConfig":
        return section_dataclass(cls, d, "train")


class Trainer:
    """Trains ``build_detector(cfg)`` on the config's train split.

    Args:
        cfg: the resolved experiment config (``dataset``, ``pipeline``, ``model``, ``train``).
        work_dir: checkpoints (``last.pt``, ``prev.pt``), ``config.yaml``, TensorBoard logs,
            results.
        device: ``"cpu"`` or ``"cuda"``, for one process (``world`` sets it otherwise).
        tensorboard: write TensorBoard scalars under ``work_dir/tb``.
        progress: show a tqdm bar (rank 0).
        world: this process's place in a torchrun launch (:func:`~.distributed.init_world`);
            None: one process on ``device``.
    """

    def __init__(self, cfg: dict, work_dir: str | os.PathLike, device: str = "cpu",
                 tensorboard: bool = True, progress: bool = True, world: World | None = None):
        self.cfg = cfg
        self.tc = TrainConfig.from_dict(cfg.get("train"))
        self.work_dir = Path(work_dir)
        self.world = world or World(device=torch.device(device))
        self.device = self.world.device
        self.main = self.world.is_main
        self.progress = progress and self.main
        self.tensorboard = tensorboard and self.main
        self.global_batch = self.tc.batch_size * self.tc.accumulate * self.world.size
        self.ckpt_path = self.work_dir / LAST_NAME
        self.prev_path = self.work_dir / PREVIOUS_NAME
        self.train_seconds = 0.0  # cumulative over sessions, as of the latest checkpoint
        self.skipped_frames = 0  # bad frames this rank left out of training batches this session

    def _build(self):
        tc, world = self.tc, self.world
        torch.manual_seed(tc.seed)
        model = build_detector(self.cfg)
        if tc.sync_bn and world.distributed:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if world.rank:  # its own random draws (Where2comm's, CodeFilling's training-time
            torch.manual_seed(tc.seed * 1_000_003 + world.rank)  # selections), not rank 0's
        loss = DetectorLoss(self.model)
        self.train_model = loss
        if world.distributed:
            unused = tc.find_unused_parameters
            if unused is None:
                unused = len(sensors_of(self.model.encoder)) > 1
            log.info("DDP find_unused_parameters %s", unused)
            self.train_model = DistributedDataParallel(
                loss, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=unused)
        self.train_set = build_dataset(self.cfg, "train", train=True, seed=tc.seed)
        if len(self.train_set) < self.global_batch:
            raise ValueError(f"train split has {len(self.train_set)} samples, fewer than one "
                             f"step's {self.global_batch} (batch_size {tc.batch_size} x "
                             f"{world.size} rank(s) x accumulate {tc.accumulate})")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr,
                                           weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=tc.lr, total_steps=max(tc.steps, 1),
            pct_start=tc.warmup_frac, anneal_strategy="cos", div_factor=10.0,
            final_div_factor=100.0)
        # fp16 gradients underflow without loss scaling; disabled, it passes everything through
        self.scaler = torch.amp.GradScaler("cuda", enabled=tc.amp == "fp16")

    def _state(self, step: int, epoch: int, batch_in_epoch: int) -> dict:
        """What a checkpoint holds; every rank calls it (each rank's RNG state is gathered)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rank_rng = all_gather(self.world, rng)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "torch_rng": rank_rng[0]["torch"],
                "rank_rng": rank_rng, "world_size": self.world.size,
                "scaler": self.scaler.state_dict(), "train_seconds": self.train_seconds,
                "config": self.cfg}

    def _loader(self, steps_per_epoch: int) -> tuple[DataLoader, EpochSampler]:
        """One loader for the whole run: with ``num_workers`` > 0 its workers persist, so what
        they have decoded (the adapter's point cache) serves every epoch, and the first epoch's
        decoding overlaps training. Each epoch uses ``steps_per_epoch`` whole global batches."""
        sampler = EpochSampler(len(self.train_set), self.tc.seed, rank=self.world.rank,
                               world_size=self.world.size,
                               samples_per_epoch=steps_per_epoch * self.global_batch)
        workers = self.tc.num_workers
        loader = DataLoader(self.train_set, batch_size=self.tc.batch_size, sampler=sampler,
                            collate_fn=collate, num_workers=workers, drop_last=True,
                            persistent_workers=workers > 0)
        return loader, sampler

    def fit(self, resume: bool = False) -> dict:
        """Train for ``train.steps`` steps (continuing ``last.pt`` when ``resume``), validate,
        and return the final validation results (also written to ``results_val.json``); every
        rank returns rank 0's.

        What a resume may change, and what it does with a finished run: see the module docstring.

        Raises:
            ConfigError: ``train.amp`` or ``train.sync_bn`` on the CPU (with several ranks for
                sync_bn), a bad ``train.accumulate``, a bad ``eval`` section.
            CheckpointError: ``last.pt`` cannot be read (the message names ``prev.pt``), or the
                ranks do not see the same one.
            ResumeError: the config differs from the checkpoint's in keys other than
                :data:`RESUME_ALLOWED_CHANGES` (all of them are listed), ``train.steps`` is
                below the checkpoint's step, or the world size differs. Nothing in the work dir
                has changed then.
        """
        tc = self.tc
        check_setup(self.cfg, tc, self.world)
        eval_mode(self.cfg)  # a bad eval section fails now, not after the training
        if self.main:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries([self.ckpt_path, self.prev_path,
                                      self.work_dir / "results_val.json",
                                      self.work_dir / "eval_val.json"])
        state = self._resume_state() if resume else None
        if resume:
            self._agree_on(state)
        # Written only after the check above: config.yaml never claims a config the weights
        # were not trained with.
        if self.main:
            dump_config(self.cfg, self.work_dir / "config.yaml")
        # a synthetic dataset is generated by one process, the others wait for it; a real one
        # is only looked for (its errors come before anything else is logged)
        one_process_first(self.world, lambda: ensure_synthetic(self.cfg["dataset"]))
        for line in describe(self.world, tc.batch_size, tc.accumulate):
            log.info(line)
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
        tc, world = self.tc, self.world
        steps_per_epoch = len(self.train_set) // self.global_batch
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        seconds_before, session_start, val_seconds = self.train_seconds, time.perf_counter(), 0.0
        summary: dict = {}
        self.model.train()
        loader, sampler = self._loader(steps_per_epoch)
        while step < tc.steps:
            sampler.epoch, sampler.start = epoch, batch_in_epoch * self.global_batch
            stepped = False
            for batches in in_groups(loader, tc.accumulate):
                self.skipped_frames += sum(len(b.skipped) for b in batches)
                empty = [b for b in batches if b.batch_size == 0]  # all bad (skip_bad_frames)
                for b in empty:
                    log.warning("a batch of bad frames skipped: %s",
                                "; ".join(s.reason for s in b.skipped))
                # the position in the epoch moves even for a skipped step, for --resume
                batch_in_epoch += 1
                if batch_in_epoch >= steps_per_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                if any_rank(world, bool(empty)):  # the step's gradient would lack a part:
                    continue                      # every rank skips it
                losses = self._step([b.to(self.device) for b in batches])
                merge_statistics(world, self.model)  # each rank saw only its own samples
                stepped = True
                step += 1
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.steps:
                    scalars = mean_over_ranks(world, losses)  # the global batch's loss
                    bar.set_postfix(loss=f"{scalars['loss']:.3f}", ep=epoch)
                    if writer:
                        for k, v in scalars.items():
                            writer.add_scalar(f"train/{k}", v, step)
                        writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], step)
                if step % tc.checkpoint_every == 0 or step == tc.steps:
                    # training time only: validation is not counted, earlier sessions are
                    self.train_seconds = (seconds_before + time.perf_counter() - session_start
                                          - val_seconds)
                    state = self._state(step, epoch, batch_in_epoch)
                    if self.main:
                        save_checkpoint(self.ckpt_path, state, previous=self.prev_path)
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
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world.size:
            raise ResumeError(
                f"--resume: {self.ckpt_path} was written by a run of {saved_world} process(es), "
                f"this one has {self.world.size}: the global batch, the samples of each rank and "
                f"each rank's random state belong to that world size. Resume with "
                f"{saved_world} process(es), or train into another work dir.")
        return state

    def _agree_on(self, state: dict | None) -> None:
        """Every rank resumes from the same step (with several machines the work dir must be
        one folder they share)."""
        seen = all_gather(self.world, None if state is None else int(state["step"]))
        if len(set(seen)) > 1:
            raise CheckpointError(
                f"--resume: the ranks see different checkpoints in {self.work_dir} (step per "
                f"rank, None: no checkpoint: {seen}): every machine of the run must see the same "
                f"work dir (a shared folder)")

    def _restore(self, state: dict) -> tuple[int, int, int]:
        """Load ``state`` into the model, optimizer, schedule, scaler and this rank's RNG;
        (step, epoch, batch)."""
        step = int(state["step"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        saved_steps = TrainConfig.from_dict(state["config"].get("train")).steps
        if saved_steps == self.tc.steps:
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            self._reschedule(step, saved_steps)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # RNG states go back to the CPU: load_checkpoint mapped every tensor to this device
        rng = (state.get("rank_rng") or [{"torch": state["torch_rng"]}])[self.world.rank]
        torch.set_rng_state(rng["torch"].cpu())
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
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
        results = broadcast(self.world, _read_json(path) if self.main else None)
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
        skipped = sum(all_gather(self.world, self.skipped_frames))
        results = broadcast(self.world, {**summary, "train_seconds": round(self.train_seconds, 1),
                                         "steps": step, "train_skipped_frames": skipped})
        if self.main:
            atomic_write_text(self.work_dir / "results_val.json", json.dumps(results, indent=2))
        return results

    def _step(self, batches: list) -> dict[str, torch.Tensor]:
        """One optimizer step on this rank's micro-batches: each loss (a mean over its
        micro-batch) divided by their number, gradients summed here and averaged over the ranks
        by DDP in the last micro-batch's backward. Returns the losses averaged over them."""
        distributed = self.world.distributed
        self.optimizer.zero_grad(set_to_none=True)
        total: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            local = distributed and i < len(batches) - 1  # no all-reduce before the last
            with self.train_model.no_sync() if local else contextlib.nullcontext():
                with autocast(self.tc.amp):
                    losses = self.train_model(batch)
                if not torch.isfinite(losses["loss"]):
                    raise FloatingPointError(f"loss is {float(losses['loss'])} "
                                             f"({ {k: float(v) for k, v in losses.items()} })")
                self.scaler.scale(losses["loss"] / len(batches)).backward()
            for k, v in losses.items():
                total[k] = total.get(k, 0.0) + v.detach().float() / len(batches)
        self.scaler.unscale_(self.optimizer)  # clipping sees true gradients
        if self.tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return total

    def validate(self, step: int, writer=None) -> dict:
        """Evaluate on the val split, sharded over the ranks (see ``evaluate_detector``);
        rank 0 writes ``eval_val.json`` and the scalars. Every rank calls it."""
        broadcast_buffers(self.world, self.model)  # BatchNorm statistics: rank 0's, as saved
        val_set = build_dataset(self.cfg, "val", train=False, seed=self.tc.seed)
        results, summary = evaluate_detector(self.model, val_set, self.cfg, device=self.device,
                                             max_frames=self.tc.val_frames or None,
                                             progress=self.progress, world=self.world)
        self.model.train()
        if not self.main:
            return summary
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
