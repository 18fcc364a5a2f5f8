"""The embedded synthetic cooperative world and its dataset writers.

``generate_dataset`` lays out scenes, runs every agent's LiDAR and cameras, and writes the
result in the exact OPV2V/V2XSet, DAIR-V2X-C or V2X-Seq SPD format, so the real-data loaders,
training and evaluation all run without downloading anything. ``ensure_dataset`` reuses a
dataset generated earlier for the same request.

Both write only into a missing or empty folder or one of our own (see :mod:`.target`), through
a temporary sibling renamed into place when complete.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import SimConfig
from .sensors import CAMERA_RENDERER
from .generate import simulate_scene, visibility_stats
from .target import (MANIFEST_NAME, ForeignDataError, check_target, inventory, publish,
                     staging)
from .world import build_scene

__all__ = ["SimConfig", "generate_dataset", "ensure_dataset", "scene_seeds", "split_of_scenes",
           "default_splits", "FORMATS", "MANIFEST_NAME", "ForeignDataError", "build_scene",
           "simulate_scene"]

log = logging.getLogger(__name__)

FORMATS = ("opv2v", "dair", "v2xseq")
PAIR_FORMATS = ("dair", "v2xseq")  # one vehicle + one roadside unit per scene
EPOCH_US = 1626155123000000  # July 2021, like DAIR-V2X's timestamps


def scene_seeds(seed: int, n_scenes: int) -> list[np.random.Generator]:
    """One independent generator per scene; scene i is the same whatever ``n_scenes`` is."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n_scenes)]


def default_splits(fmt: str, n_scenes: int | None = None) -> dict[str, float]:
    """Each format's own split names (OPV2V folders, DAIR split-file keys), 70/15/15. With
    fewer than 3 scenes, only the first ``n_scenes`` of train, val, test (a scene each)."""
    val = "val" if fmt in PAIR_FORMATS else "validate"
    splits = {"train": 0.7, val: 0.15, "test": 0.15}
    if n_scenes is not None and 0 < n_scenes < len(splits):
        names = list(splits)[:n_scenes]
        splits = {n: 1.0 / n_scenes for n in names}
    return splits


def split_of_scenes(n_scenes: int, fractions: dict[str, float]) -> list[str]:
    """Assign scenes to splits in order: ``floor(fraction x n_scenes)`` each, at least one for
    every split with a non-zero fraction (taken from the largest), the rounding remainder to
    the first split with a non-zero fraction.

    Raises ValueError when there are fewer scenes than splits with a non-zero fraction: a split
    left empty only shows up later, when training validates on it.
    """
    names = list(fractions)
    wanted = [n for n in names if fractions[n] > 0]
    if not wanted:
        raise ValueError(f"splits: no split has a positive fraction: {fractions}")
    if n_scenes < len(wanted):
        raise ValueError(f"{n_scenes} scene(s) cannot give each of the splits {wanted} a scene: "
                         f"generate at least {len(wanted)} scenes or name fewer splits")
    # The epsilon keeps 0.15 x 20 (2.9999999999999996 in floats) at 3.
    counts = {n: int(np.floor(fractions[n] * n_scenes + 1e-9)) for n in names}
    for n in wanted:
        counts[n] = max(counts[n], 1)
    while sum(counts.values()) > n_scenes:
        largest = max(wanted, key=lambda n: counts[n])
        counts[largest] -= 1
    counts[wanted[0]] += n_scenes - sum(counts.values())
    out = []
    for n in names:
        out += [n] * counts[n]
    return out


def generate_dataset(fmt: str, out: str | Path, n_scenes: int, n_frames: int, seed: int,
                     cfg: SimConfig | None = None, splits: dict[str, float] | None = None,
                     progress: bool = True, keep_frames: bool = False, eval_range: float = 51.2,
                     workers: int | None = None):
    """Generate and write a synthetic dataset.

    Args:
        fmt: ``"opv2v"`` (OPV2V/V2XSet layout, roadside units as negative ids), ``"dair"``
            (DAIR-V2X-C: the ego vehicle and one roadside unit per scene) or ``"v2xseq"``
            (V2X-Seq SPD: the same pair, one sequence per scene, track ids).
        out: dataset root to write.
        n_scenes, n_frames: scenes and 10 Hz frames per scene.
        seed: everything is a deterministic function of the seed and the arguments (not of
            ``workers``: every scene has its own generator and its own folder).
        cfg: world and sensor settings.
        splits: fraction of scenes per split, in order (default: :func:`default_splits`);
            every split with a non-zero fraction gets a scene.
        keep_frames: also return the :class:`SimFrame` truth records (tests only: they are big).
        workers: processes that simulate and write OPV2V scenes in parallel (default: the CPUs
            this process may use). The pair formats write one shared index, so they run in
            this process; so does ``keep_frames``. The processes are spawned, so a script that
            calls this with more than one worker needs the ``if __name__ == "__main__":`` guard
            (or ``workers=1``).
    Returns:
        (stats dict, list of (scene, frames, write info) if ``keep_frames`` else None).
    Raises:
        ForeignDataError: ``out`` is neither missing, empty nor a dataset of ours (then nothing
            is written). A dataset of ours at ``out`` is replaced once the new one is complete.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    cfg = cfg or SimConfig()
    out = Path(out).resolve()
    splits = dict(splits) if splits is not None else default_splits(fmt, n_scenes)
    scene_split = split_of_scenes(n_scenes, splits)
    check_target(out, fmt)
    with staging(out) as tmp:
        stats, kept = _generate_into(tmp, fmt, n_scenes, n_frames, seed, cfg, splits, scene_split,
                                     progress, keep_frames, eval_range, workers)
        now = check_target(out, fmt)
        if now.kind == "ours" and not _mismatch(now.manifest, _request(
                fmt, n_scenes, n_frames, seed, cfg, splits)):
            # The same dataset, e.g. published meanwhile by another process (a second run,
            # another rank): keep it, as it may be being read; ours goes with the staging.
            log.info("%s already holds this dataset (same request): keeping it", out)
        else:
            publish(tmp, out, fmt)
    if kept is not None:  # the scene folders were written under tmp
        kept = [(scene, frames, None if d is None else out / Path(d).relative_to(tmp))
                for scene, frames, d in kept]
    return stats, kept


def _generate_into(out: Path, fmt: str, n_scenes: int, n_frames: int, seed: int, cfg: SimConfig,
                   splits: dict[str, float], scene_split: list[str], progress: bool,
                   keep_frames: bool, eval_range: float, workers: int | None):
    """Simulate and write every scene into ``out`` (the staging folder), manifest last."""
    from tqdm import tqdm

    rngs = scene_seeds(seed, n_scenes)
    agents_per_scene = 2 if fmt in PAIR_FORMATS else cfg.scene.n_cavs + cfg.scene.n_rsus
    bar = tqdm(total=n_scenes * n_frames * agents_per_scene, desc=f"synthetic {fmt}", unit="agent-frame",
               disable=not progress)
    if fmt in PAIR_FORMATS or keep_frames:
        workers = 1
    elif workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = max(1, min(int(workers or 1), n_scenes))
    jobs = [(fmt, out, i, rng, split, n_frames, seed, cfg, eval_range)
            for i, (rng, split) in enumerate(zip(rngs, scene_split))]
    tally = _Tally()
    kept = [] if keep_frames else None
    started = time.perf_counter()
    if workers == 1:
        shared = None
        if fmt in PAIR_FORMATS:
            from .write_dair import DairWriter
            from .write_v2xseq import V2XSeqWriter
            shared = {"dair": DairWriter, "v2xseq": V2XSeqWriter}[fmt](out, np.random.default_rng([seed, 1]))
        for job in jobs:
            tally.add(_generate_scene(*job, shared_writer=shared, progress=bar, kept=kept))
        if shared is not None:
            shared.close()
    else:
        # Spawned, not forked: the caller may hold torch's thread pools, which do not survive fork.
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for scene_tally in pool.imap(_generate_scene_job, jobs):
                tally.add(scene_tally)
                bar.update(n_frames * agents_per_scene)
    bar.close()
    elapsed = time.perf_counter() - started
    stats = {
        "format": fmt, "scenes": n_scenes, "frames": tally.frames, "agent_frames": tally.agents,
        "agents_per_frame": tally.agents / max(tally.frames, 1),
        "objects": len(tally.object_ids), "box_labels": tally.labels,
        "objects_near_ego_seen": tally.seen,
        "collaborator_only_fraction": 1.0 - tally.seen_ego / tally.seen if tally.seen else 0.0,
        "eval_range_m": eval_range,
        "seconds": elapsed, "seconds_per_agent_frame": elapsed / max(tally.agents, 1),
        "workers": workers,
        "splits": {s: scene_split.count(s) for s in splits},
    }
    manifest = {**_request(fmt, n_scenes, n_frames, seed, cfg, splits), "stats": stats,
                "inventory": inventory(out)}
    with open(out / MANIFEST_NAME, "w") as f:
        json.dump(manifest, f, indent=1)
    return stats, kept


def _request(fmt: str, n_scenes: int, n_frames: int, seed: int, cfg: SimConfig,
             splits: dict[str, float]) -> dict:
    """What a manifest records of the request, as JSON would read it back (with the camera
    renderer's version when images are rendered)."""
    request = {"format": fmt, "scenes": n_scenes, "frames": n_frames, "seed": seed,
               "config": cfg.to_dict(), "splits": splits}
    if cfg.cameras:
        request["camera_renderer"] = CAMERA_RENDERER
    return json.loads(json.dumps(request))


def _mismatch(manifest: dict, request: dict) -> list[str]:
    """The keys in which a manifest differs from a request (also the split sizes it got)."""
    keys = [k for k in request if manifest.get(k) != request[k]]
    if not keys:
        scene_split = split_of_scenes(request["scenes"], request["splits"])
        counts = {s: scene_split.count(s) for s in request["splits"]}
        if (manifest.get("stats") or {}).get("splits") != counts:
            keys.append("split sizes")
    return keys


def ensure_dataset(fmt: str, out: str | Path, n_scenes: int, n_frames: int, seed: int,
                   cfg: SimConfig | None = None, splits: dict[str, float] | None = None,
                   progress: bool = True, workers: int | None = None) -> tuple[dict, str]:
    """The dataset :func:`generate_dataset` would write at ``out``, generated only if needed.

    Returns (stats, what happened: "reused" | "generated" | "replaced"). A dataset of ours
    generated for the same request is reused; one generated for another request is replaced.
    Raises :class:`ForeignDataError` for any other non-empty folder.
    """
    cfg = cfg or SimConfig()
    out = Path(out).resolve()
    splits = dict(splits) if splits is not None else default_splits(fmt, n_scenes)
    state = check_target(out, fmt)
    if state.kind == "ours":
        differs = _mismatch(state.manifest, _request(fmt, n_scenes, n_frames, seed, cfg, splits))
        if not differs:
            return state.manifest.get("stats", {}), "reused"
        log.warning("replacing the synthetic %s dataset at %s: it was generated for a different "
                    "request (%s differ)", fmt, out, ", ".join(differs))
    else:
        log.info("generating the synthetic %s dataset in %s", fmt, out)
    stats, _ = generate_dataset(fmt, out, n_scenes, n_frames, seed, cfg, splits=splits,
                                progress=progress, workers=workers)
    return stats, "replaced" if state.kind == "ours" else "generated"


@dataclass
class _Tally:
    """What the statistics need of the scenes written so far."""

    seen: int = 0
    seen_ego: int = 0
    labels: int = 0
    agents: int = 0
    frames: int = 0
    object_ids: set = field(default_factory=set)

    def add(self, other: "_Tally") -> None:
        self.seen += other.seen
        self.seen_ego += other.seen_ego
        self.labels += other.labels
        self.agents += other.agents
        self.frames += other.frames
        self.object_ids |= other.object_ids


def _generate_scene_job(job: tuple) -> _Tally:
    return _generate_scene(*job)


def _generate_scene(fmt: str, out: Path, i: int, rng: np.random.Generator, split: str, n_frames: int,
                    seed: int, cfg: SimConfig, eval_range: float, shared_writer=None, progress=None,
                    kept: list | None = None) -> _Tally:
    """Simulate scene ``i`` and write it: into its own OPV2V scenario folder, or through the
    pair formats' ``shared_writer``."""
    from .write_opv2v import Opv2vWriter, opv2v_scenario_name

    scene = build_scene(rng, cfg, f"scene_{i:03d}", n_frames / cfg.frame_rate_hz)
    start_us = EPOCH_US + i * 600_000_000
    agent_offsets, camera_offsets = {}, {}
    if fmt in PAIR_FORMATS:
        rsu = next(a for a in scene.agents if a.kind == "infrastructure")
        scene.agents = [scene.agents[0], rsu]
        agent_offsets[rsu.agent_id] = int(rng.integers(-45_000, 45_000))
        camera_offsets = {scene.agents[0].agent_id: int(rng.integers(20_000, 60_000)),
                          rsu.agent_id: int(rng.integers(20_000, 110_000))}
        shared_writer.begin_batch(scene, start_us, n_frames, "val" if split == "validate" else split)
        writer = shared_writer
    else:
        writer = Opv2vWriter(out, split, opv2v_scenario_name(rng), scene, start_us,
                             first_key=2 * int(rng.integers(30, 200)), rng=rng,
                             protocol={"world": {"generator": "v2xfuse.sim", "seed": seed,
                                                 "scene": i, "road_yaw": scene.meta["road_yaw"]},
                                       "sensors": cfg.to_dict()})
    tally = _Tally()
    scene_frames = []
    for frame in simulate_scene(scene, cfg, n_frames, rng, start_us, agent_offsets, camera_offsets,
                                progress=progress):
        info = writer.write_frame(frame)
        st = visibility_stats([frame], eval_range)
        tally.seen += st["objects_seen"]
        tally.seen_ego += st["objects_seen_by_ego"]
        for a in frame.agents:
            tally.labels += len(a.seen_ids())
            tally.object_ids.update((i, oid) for oid in a.seen_ids())
        tally.agents += len(frame.agents)
        tally.frames += 1
        if kept is not None:
            scene_frames.append((frame, info))
    if kept is not None:
        kept.append((scene, scene_frames, getattr(writer, "dir", None)))
    return tally
