"""Run a detector over a split and score it: AP, bytes per frame, latency.

Over the ranks of a torchrun launch (``world``): rank ``r`` of ``W`` predicts frames ``r, r + W,
...`` of the split (no padding), rank 0 gathers them, scores them in the split's order, and every
rank returns its results: exactly one process's, when each frame's outcome depends on that frame
alone (:func:`frames_independent`). A channel that draws losses, delays or pose noise, or an
attack, carries state from frame to frame (its random stream, link histories): rank 0 then
evaluates every frame alone while the others wait.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import torch

from ..config import ConfigError
from ..datasets import collate
from ..datasets import PipelineConfig
from ..evaluation import (DAIR_IOU_THRESHOLDS, DAIR_RANGES, DAIR_VIEWS, DairEvaluator, EvalResult,
                          OpenCOODEvaluator)
from ..evaluation.files import EVAL_MODES
from .distributed import World, broadcast, gather_to_main

__all__ = ["evaluate_detector", "predict_frames", "build_channel", "eval_mode", "dair_summary_key",
           "summary_ap_keys", "frames_independent"]

log = logging.getLogger(__name__)
_OPENCOOD_ONLY = ("order", "iou_type", "range", "range_rule", "range_m")


@torch.no_grad()
def predict_frames(model, dataset, device="cpu", max_frames: int | None = None,
                   channel=None, progress: bool = False):
    """Detections for each frame of ``dataset`` (one frame per forward pass, as deployed).

    Yields:
        (frame_id, det_boxes (K, 7), det_scores (K,), gt_boxes (M, 7), seconds, bytes_sent)
        numpy arrays in the ego frame; ``frame_id`` is "sequence/frame"; ``bytes_sent`` is what
        the channel serialised for the frame (0 without a channel).
    """
    n = len(dataset) if not max_frames else min(max_frames, len(dataset))
    for _, *prediction in _predictions(model, dataset, range(n), device, channel, progress):
        yield tuple(prediction)


def _predictions(model, dataset, frames, device, channel, progress):
    """:func:`predict_frames` of the dataset indices ``frames``, each with its index first."""
    from tqdm import tqdm

    model.eval()
    model.fusion.reset()  # methods with memory across frames start afresh
    sent_before = sum(channel.ledger.bytes_per_frame()) if channel is not None else 0
    for i in tqdm(frames, desc="eval", unit="frame", disable=not progress, leave=False,
                  dynamic_ncols=True):
        batch = collate([dataset[i]]).to(device)
        if batch.batch_size == 0:  # skip_bad_frames left this frame out: nothing to score
            log.warning("frame %d skipped: %s", i, batch.skipped[0].reason)
            continue
        start = time.perf_counter()
        out = model(batch, channel=channel)
        det = model.predict(out)[0]
        if device != "cpu" and torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        sent = 0
        if channel is not None:
            total = sum(channel.ledger.bytes_per_frame())
            sent, sent_before = total - sent_before, total
        record = batch.frames[0]
        yield (i, f"{record.sequence}/{record.frame}", det.boxes.cpu().numpy(),
               det.scores.cpu().numpy(), batch.gt_boxes[0].cpu().numpy(), seconds, sent)


def build_channel(cfg: dict):
    """The simulated channel of the config's ``channel`` section (defaults: ideal link, the
    default receive checks, no attack), as the detector's batch-level adapter. Every evaluated
    message goes through it as bytes. ``channel.checks``: :class:`~v2xfuse.comm.checks.
    ReceiveChecks` fields; ``channel.attack``: :class:`~v2xfuse.comm.attack.AttackConfig`
    fields (``type: nan`` ...)."""
    from ..comm.attack import AttackConfig
    from ..comm.batch_link import BatchChannel
    from ..comm.channel import Channel, LinkConfig
    from ..comm.checks import ReceiveChecks

    section = dict(cfg.get("channel") or {})
    seed = int(section.pop("seed", 0))
    budget = section.pop("budget_bytes_per_frame", None)
    codec_options = section.pop("codec_options", None)
    checks = ReceiveChecks.from_dict(section.pop("checks", None))
    attack = AttackConfig.from_dict(section.pop("attack", None))
    link = LinkConfig(**section)
    return BatchChannel(Channel(np.random.default_rng(seed), link, budget_bytes_per_frame=budget,
                                checks=checks, attack=attack), codec_options)


def evaluate_detector(model, dataset, cfg: dict, device="cpu", max_frames: int | None = None,
                      channel="config", progress: bool = False, split: str = "val",
                      world: World | None = None) -> tuple[list[EvalResult], dict]:
    """AP, bytes per frame and latency, under the protocol of the config's ``eval.mode``.

    The config's ``eval`` section: ``mode`` ("opencood" (default) or "dair", the DAIR-V2X
    official protocol: AP-3D and AP-BEV per distance range, its own matching, ranges and range
    rule); for opencood mode ``order`` ("global" (default, HEAL) or "local" (OpenCOOD)),
    ``iou_type`` ("bev" or "3d"), ``range`` (default: the pipeline's ``lidar_range``; ``null``
    for none), ``range_rule`` (default "all_corners_bev"), ``range_m`` (``[near, far]``: only
    boxes whose BEV centre distance from the ego lies in [near, far), e.g. ``[30, .inf]`` for
    long range; default none). ``channel``: ``"config"`` builds the
    config's simulated channel so that bytes are measured on serialised messages; ``None``
    passes tensors straight through (0 bytes). ``world``: the ranks to share the frames over
    (module docstring; every rank calls this, each with its own channel); None: one process.

    Returns:
        (the :class:`EvalResult` records: one in opencood mode, one per view and range in dair
        mode; a flat summary dict: ``eval_mode``, the AP keys of :func:`summary_ap_keys`
        (opencood: ap_30/ap_50/ap_70; dair: e.g. ap_3d_overall_50, ap_bev_0-30_70), bytes and
        latency statistics, frames, method...).
    """
    if channel == "config":
        channel = build_channel(cfg)
    n = len(dataset) if not max_frames else min(max_frames, len(dataset))
    world = world or World()
    frames = range(world.rank, n, world.size)
    why = frames_independent(model, channel) if world.distributed else None
    if why is not None:
        log.warning("evaluation on rank 0 alone (the other ranks wait): %s", why)
        frames = range(n) if world.is_main else range(0)
    records = list(_predictions(model, dataset, frames, device, channel, progress))
    rejected = Counter(channel.ledger.rejected.counts) if channel is not None else Counter()
    gathered = gather_to_main(world, (records, rejected))
    if gathered is None:  # not rank 0: its frames are scored there
        return broadcast(world, None)
    records = sorted((r for part, _ in gathered for r in part), key=lambda r: r[0])
    rejected = sum((counts for _, counts in gathered), Counter())
    scored = _score(records, rejected, n, cfg, channel is not None, split)
    return broadcast(world, scored)


def _score(records: list, rejected: Counter, n: int, cfg: dict, with_channel: bool,
           split: str) -> tuple[list[EvalResult], dict]:
    """:func:`evaluate_detector`'s results from the frames' predictions, in the split's order
    (``records``: (index, frame_id, boxes, scores, gt, seconds, bytes)); ``n`` frames were
    asked for."""
    eval_cfg = dict(cfg.get("eval") or {})
    mode = eval_mode(cfg)
    if mode == "dair":
        order, eval_range, evaluator = "dair", list(DAIR_RANGES["overall"]), DairEvaluator()
    else:
        order = eval_cfg.get("order", "global")
        lr = cfg.get("pipeline", {}).get("lidar_range", PipelineConfig.lidar_range)
        eval_range = eval_cfg.get("range", list(lr))
        evaluator = OpenCOODEvaluator(
            iou_type=eval_cfg.get("iou_type", "bev"), eval_range=eval_range,
            range_rule=eval_cfg.get("range_rule") or "all_corners_bev",
            range_name="lidar_range" if "range" not in eval_cfg else None,
            range_m=eval_cfg.get("range_m"))
    seconds, sent = [], []
    for _, frame_id, boxes, scores, gt, dt, nbytes in records:
        evaluator.add(frame_id, boxes, scores, gt, payload_bytes=nbytes, latency_ms=dt * 1e3)
        seconds.append(dt)
        sent.append(nbytes)
    method = cfg["model"].get("fusion", {}).get("type", "none")
    if mode == "dair":
        results = evaluator.results(dataset=cfg["dataset"]["type"], split=split, method=method)
        aps = {dair_summary_key(r.iou_type, r.range_name, float(t)): v
               for r in results for t, v in r.ap.items()}
    else:
        results = [evaluator.result(order, dataset=cfg["dataset"]["type"], split=split,
                                    method=method)]
        aps = {f"ap_{round(t * 100)}": results[0].ap_at(t) for t in (0.3, 0.5, 0.7)}
    result = results[0]  # the records of one run share its extras (below)
    summary = {
        "dataset": result.dataset, "split": split, "method": method, "sort_mode": order,
        "range": eval_range, "frames": len(seconds),
        # eval.range_m: only boxes whose BEV centre distance from the ego is in [near, far)
        "range_m": result.extra.get("range_m"),
        "eval_mode": mode, **aps,
        "bytes_per_frame": float(np.mean(sent)) if sent else 0.0,
        "bytes_per_frame_p95": float(np.percentile(sent, 95)) if sent else 0.0,
        "log2_bytes": float(np.log2(np.mean(sent))) if sent and np.mean(sent) > 0 else None,
        "latency_ms_median": float(np.median(seconds) * 1e3) if seconds else None,
        "latency_ms_p95": float(np.percentile(seconds, 95) * 1e3) if seconds else None,
        # messages that arrived and failed the receiver's checks, by reason (v2xfuse.comm.checks)
        "rejected_messages": _by_reason(rejected) if with_channel else {},
        "skipped_frames": n - len(seconds),
        "attack": (cfg.get("channel") or {}).get("attack"),
    }
    result.extra.update({k: summary[k] for k in ("bytes_per_frame_p95", "latency_ms_median",
                                                  "latency_ms_p95", "rejected_messages",
                                                  "attack")})
    for other in results[1:]:
        other.extra.update(result.extra)
    return results, summary


def frames_independent(model, channel) -> str | None:
    """None when evaluating a frame depends on that frame alone, so that frames split over
    ranks and merged in order score exactly as one process scores them; else why not.

    What carries over between frames: a channel's random stream (losses, packet losses,
    delays drawn per message, pose noise), its link histories (delays), an attack's state,
    and a fusion method's stochastic passes (the global torch RNG). An ideal link (the
    default) draws but never uses its randoms."""
    if "passes" in model.fusion.contract.services:
        return "the fusion method's stochastic passes draw from one random stream"
    if channel is None:
        return None
    link_channel = channel.channel
    links = [link_channel.link, *link_channel.per_link.values()]
    stateful = [name for name in ("loss", "packet_loss", "xy_std_m", "yaw_std_deg")
                if any(getattr(link, name) for link in links)]
    if any(link.delay_range() != (0, 0) for link in links):
        stateful.append("delay")
    if link_channel.attacker is not None:
        stateful.append("attack")
    if stateful:
        return (f"the channel's {', '.join(stateful)} follow(s) one random stream and link "
                f"history over the frames in order")
    return None


def _by_reason(counts: Counter) -> dict[str, int]:
    """Rejection counts in :data:`~v2xfuse.comm.checks.REASONS` order, as the ledger gives."""
    from ..comm.checks import RejectionLog

    rejections = RejectionLog()
    rejections.counts.update(counts)
    return rejections.as_dict()


def eval_mode(cfg: dict) -> str:
    """The config's ``eval.mode`` ("opencood" when absent), checked; in dair mode, a warning
    for opencood-only keys (``order``, ``iou_type``, ``range``, ``range_rule``), which the DAIR
    protocol fixes itself (they may come from a base config)."""
    eval_cfg = dict(cfg.get("eval") or {})
    mode = eval_cfg.get("mode") or "opencood"
    if mode not in EVAL_MODES:
        raise ConfigError(f"eval.mode must be one of {EVAL_MODES}, got {mode!r}")
    ignored = [k for k in _OPENCOOD_ONLY if eval_cfg.get(k) is not None]
    if mode == "dair" and ignored:
        log.warning("eval.mode dair fixes its own ordering, IoU views and ranges: eval.%s "
                    "(opencood mode only) ignored", ", eval.".join(ignored))
    return mode


def dair_summary_key(view: str, range_name: str, threshold: float) -> str:
    """Summary key of one DAIR AP: ("3d", "0-30", 0.5) -> "ap_3d_0-30_50"."""
    return f"ap_{view}_{range_name}_{round(threshold * 100)}"


def summary_ap_keys(mode: str) -> list[str]:
    """The AP keys :func:`evaluate_detector` puts in the summary of ``mode``."""
    if mode == "dair":
        return [dair_summary_key(v, r, t) for v in DAIR_VIEWS for r in DAIR_RANGES
                for t in DAIR_IOU_THRESHOLDS]
    return ["ap_30", "ap_50", "ap_70"]
