"""Training beyond one process: the process group torchrun describes, the module DDP wraps, the
sampler that splits every step over the ranks, the few collectives the trainer and the
evaluation need, and the checks of what a device and world can run (``train.amp``,
``train.sync_bn``, ``train.accumulate``).

    torchrun --nproc_per_node 4 tools/train.py --config C --device cuda        # one machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 --rdzv-id RUN tools/train.py --config C --device cuda

torchrun puts ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous in every process's
environment; :func:`init_world` reads them and joins the group: NCCL on CUDA (local rank ``r`` on
``cuda:r``), gloo on CPU. A plain ``python tools/train.py`` is a world of one: no process group,
and every collective here returns its input.

Ranks of one step (see :class:`~v2xfuse.engine.trainer.Trainer`): each runs forward and backward
on its own ``batch_size`` samples (its own ``record_len``: agents per sample may differ between
ranks) and DistributedDataParallel averages the gradients; rank 0 alone writes checkpoints,
TensorBoard, ``config.yaml`` and results, which every rank reads to resume.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Sampler

from ..config import ConfigError

log = logging.getLogger(__name__)

__all__ = ["World", "init_world", "close_world", "check_setup", "autocast", "AMP_DTYPES",
           "DetectorLoss", "EpochSampler", "in_groups", "one_process_first", "gather_to_main",
           "broadcast", "broadcast_buffers", "merge_statistics", "all_gather", "any_rank",
           "barrier", "mean_over_ranks", "describe"]

# A rank waits this long in a collective: rank 0 may validate alone (evaluate.py) while the
# others wait at the next one, longer than NCCL's default 10 minutes on a large split.
TIMEOUT = timedelta(minutes=60)
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class World:
    """Where this process stands in the run.

    Attributes:
        rank: 0..size-1 over all machines; rank 0 writes the files.
        local_rank: the rank on this machine (its GPU index on CUDA).
        size: the number of processes (1: no process group).
        backend: "nccl", "gloo", or None for one process.
        device: this process's device.
    """

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str = "cpu") -> World:
    """The world torchrun's environment describes, its process group joined; a world of one
    (nothing initialised) without torchrun or with ``WORLD_SIZE`` 1.

    Args:
        device: "cpu" (gloo) or "cuda" (NCCL; this process takes ``cuda:LOCAL_RANK``).
    Raises:
        RuntimeError: CUDA asked for and this machine has fewer GPUs than processes.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} needs cuda:{local_rank}, this machine "
                               f"has {torch.cuda.device_count()} GPU(s): start at most that "
                               f"many processes per node (--nproc_per_node)")
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)  # collectives and kernels of this rank on its own GPU
    else:
        where = torch.device(device)
    if size == 1:
        return World(device=where)
    backend = "nccl" if where.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=TIMEOUT,
                                         device_id=where if backend == "nccl" else None)
    return World(rank, local_rank, size, backend, where)


def close_world(world: World) -> None:
    if world.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_setup(cfg: dict, tc, world: World) -> None:
    """Refuse what the device or the world cannot run, before anything is written (``tc``: the
    config's :class:`~v2xfuse.engine.trainer.TrainConfig`).

    Raises:
        ConfigError: ``train.accumulate`` below 1; an unknown ``train.amp``, or one other than
            "off" on the CPU; ``train.sync_bn`` with several CPU ranks, or with an encoder per
            sensor.
    """
    if not isinstance(tc.accumulate, int) or tc.accumulate < 1:
        raise ConfigError(f"train.accumulate must be a whole number >= 1, got {tc.accumulate!r}")
    if tc.amp not in AMP_DTYPES:
        raise ConfigError(f"train.amp must be one of {list(AMP_DTYPES)}, got {tc.amp!r}")
    if tc.amp != "off" and world.device.type != "cuda":
        raise ConfigError(f"train.amp {tc.amp}: mixed precision is CUDA's autocast here; on "
                          f"the CPU training runs in float32: set train.amp: off")
    if not tc.sync_bn:
        return
    if world.size == 1:
        log.info("train.sync_bn: one process, no statistics to share")
        return
    if world.device.type != "cuda":
        raise ConfigError("train.sync_bn: torch's SyncBatchNorm runs on CUDA only; with gloo "
                          "on the CPU each rank normalises over its own batch: set "
                          "train.sync_bn: false, or train on GPUs")
    sensors = [k for k, v in ((cfg.get("model") or {}).get("encoders") or {}).items() if v]
    if len(sensors) > 1:
        raise ConfigError(f"train.sync_bn with an encoder per sensor ({', '.join(sensors)}): a "
                          f"rank whose batch lacks a sensor skips that encoder's BatchNorm "
                          f"layers, and the ranks that run them would wait for it forever: set "
                          f"train.sync_bn: false")


def autocast(amp: str):
    """The context of ``train.amp`` ("off": none; checked by :func:`check_setup`)."""
    dtype = AMP_DTYPES[amp]
    return contextlib.nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


def one_process_first(world: World, make: Callable[[], object]) -> None:
    """``make()`` (e.g. generate a synthetic dataset) on rank 0 while the others wait, then on
    local rank 0 of each other machine (where it finds the result if the machines share the
    folder), then nowhere else."""
    for turn in (world.rank == 0, world.local_rank == 0 and world.rank != 0):
        if turn:
            make()
        barrier(world)


class DetectorLoss(nn.Module):
    """``batch -> {name: loss}``: the detector's forward and its loss as one module, the unit DDP
    wraps, so that everything the loss reaches (the agent loss runs the head again on every
    agent's map) runs inside DDP's forward and each parameter's gradient is reduced once."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, batch) -> dict[str, torch.Tensor]:
        return self.detector.loss(self.detector(batch), batch)


class EpochSampler(Sampler):
    """``(epoch, index)`` keys of this rank: a permutation of ``range(n)`` drawn from
    ``(seed, epoch)``, of which the first ``samples_per_epoch`` positions are used; rank ``r`` of
    ``world_size`` takes positions ``r, r + world_size, ...`` (DistributedSampler's split, without
    its padding: ``samples_per_epoch`` is a whole number of global batches), from global position
    ``start`` (a multiple of ``world_size``). ``epoch`` and ``start`` may change between passes.

    Consecutive batches of B keys of the W ranks together hold positions ``[k W B, (k+1) W B)``,
    the k-th batch of one process with batch ``W B``: the same samples every step.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, start: int = 0, rank: int = 0,
                 world_size: int = 1, samples_per_epoch: int | None = None):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.rank, self.world_size = rank, world_size
        self.samples_per_epoch = n if samples_per_epoch is None else samples_per_epoch
        if self.samples_per_epoch % world_size or not 0 <= self.samples_per_epoch <= n:
            raise ValueError(f"samples_per_epoch {self.samples_per_epoch}: not a multiple of "
                             f"world_size {world_size} within 0..{n}")

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen)[:self.samples_per_epoch]
        mine = order[self.start + self.rank::self.world_size].tolist()
        return iter([(self.epoch, i) for i in mine])

    def __len__(self) -> int:
        return max(self.samples_per_epoch - self.start - self.rank + self.world_size - 1,
                   0) // self.world_size


def in_groups(batches, size: int):
    """Lists of ``size`` consecutive batches (an optimizer step's micro-batches)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def all_gather(world: World, obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    torch.distributed.all_gather_object(out, obj)
    return out


def gather_to_main(world: World, obj) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0; None on the others."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size if world.is_main else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def broadcast(world: World, obj):
    """Rank 0's ``obj`` on every rank (what the others pass is ignored)."""
    if not world.distributed:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(world: World, module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) into ``module`` on every rank. DDP copies them
    at the start of each forward; after the last, each rank's have moved with its own batch."""
    if world.distributed:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, 0)


def merge_statistics(world: World, module: nn.Module) -> None:
    """Merge over the ranks what ``module``'s submodules recorded of their training inputs:
    each submodule with a ``merge_over_ranks()`` method (e.g. the fusion methods'
    :class:`~v2xfuse.fusion.payload_checks.FeatureRange`) is asked to, in module order."""
    if world.distributed:
        for sub in module.modules():
            if hasattr(sub, "merge_over_ranks"):
                sub.merge_over_ranks()


def barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()


def any_rank(world: World, flag: bool) -> bool:
    """Whether ``flag`` holds on at least one rank (every rank gets the same answer)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device=world.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(world: World, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each scalar averaged over the ranks (for the log: the global batch's mean loss)."""
    names = sorted(values)
    t = torch.stack([values[k].detach().float().reshape(()) for k in names]).to(world.device)
    if world.distributed:
        torch.distributed.all_reduce(t)
        t /= world.size
    return dict(zip(names, t.tolist()))


def describe(world: World, batch_size: int, accumulate: int) -> list[str]:
    """The lines that open a training log: world size, backend, each rank's host and device,
    the batch per rank and per optimizer step."""
    where = all_gather(world, f"{socket.gethostname()} {world.device}")
    lines = [f"world size {world.size}, backend {world.backend or 'none (one process)'}"]
    lines += [f"rank {r}: {w}" for r, w in enumerate(where)]
    lines.append(f"batch {batch_size} per rank x {world.size} rank(s) x accumulate {accumulate} "
                 f"= global batch {batch_size * world.size * accumulate} per optimizer step")
    return lines
