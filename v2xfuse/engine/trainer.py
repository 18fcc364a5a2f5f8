"""The training loop: seeded, resumable to the same weights, checkpointed atomically.

Reproducibility: the model is initialised under ``torch.manual_seed(seed)``; the sample order of
epoch ``e`` is a permutation drawn from ``(seed, e)``; augmentation draws from ``(seed, e, index)``
(see :class:`~v2xfuse.datasets.CoopSampler`). A checkpoint records the step, the epoch and the
position in it, so ``--resume`` replays exactly the batches an uninterrupted run would see.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from ..builder import build_dataset, build_detector
from ..config import dump_config
from ..datasets import collate
from .evaluate import evaluate_detector

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "Trainer", "EpochSampler", "save_checkpoint", "load_checkpoint"]


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
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise KeyError(f"train: unknown keys {sorted(unknown)} "
                           f"(known: {sorted(cls.__dataclass_fields__)})")
        return cls(**d)


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


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` with ``torch.save`` to a temporary file, then rename: a kill mid-write
    leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Checkpoints hold tensors, numbers, strings, lists and dicts only: ``weights_only=True``."""
    return torch.load(path, map_location=map_location, weights_only=True)


class Trainer:
    """Trains ``build_detector(cfg)`` on the config's train split.

    Args:
        cfg: the resolved experiment config (``dataset``, ``pipeline``, ``model``, ``train``).
        work_dir: checkpoints (``last.pt``), ``config.yaml``, TensorBoard logs, results.
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
        self.ckpt_path = self.work_dir / "last.pt"

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
                "config": self.cfg}

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
        and return the final validation results (also written to ``results_val.json``)."""
        tc = self.tc
        self.work_dir.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.work_dir / "config.yaml")
        self._build()
        step = epoch = batch_in_epoch = 0
        if resume and self.ckpt_path.is_file():
            state = load_checkpoint(self.ckpt_path, self.device)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
            log.info("resumed %s at step %d (epoch %d, batch %d)", self.ckpt_path, step, epoch,
                     batch_in_epoch)
        elif resume:
            log.warning("--resume: no checkpoint at %s, starting from scratch", self.ckpt_path)
        writer = self._writer()
        batches_per_epoch = len(self.train_set) // tc.batch_size
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, desc="train", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        started = time.perf_counter()
        results: dict = {}
        self.model.train()
        loader, sampler = self._loader()
        while step < tc.steps:
            sampler.epoch, sampler.start = epoch, batch_in_epoch * tc.batch_size
            for batch in loader:
                losses = self._step(batch.to(self.device))
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
                    save_checkpoint(self.ckpt_path, self._state(step, epoch, batch_in_epoch))
                if (tc.val_every and step % tc.val_every == 0) or step == tc.steps:
                    results = self.validate(step, writer)
                if step >= tc.steps:
                    break
        bar.close()
        if writer:
            writer.close()
        results["train_seconds"] = round(time.perf_counter() - started, 1)
        results["steps"] = step
        (self.work_dir / "results_val.json").write_text(json.dumps(results, indent=2))
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
        result, summary = evaluate_detector(self.model, val_set, self.cfg, device=self.device,
                                            max_frames=self.tc.val_frames or None,
                                            progress=self.progress)
        self.model.train()
        (self.work_dir / "eval_val.json").write_text(result.to_json())
        log.info("step %d validation: %s", step, {k: summary[k] for k in summary if "ap" in k})
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
