#!/usr/bin/env python
"""Frames per second of the data path: a 5-agent OPV2V frame and a DAIR-V2X-C pair.

    python tools/bench_loading.py [--frames 4] [--iters 40] [--workers 2] [--keep DIR] [--reps 5]
                                  [--cache-only]

Generates the data with the synthetic generator (default sensor settings, no cameras; OPV2V
scenes with 4 connected vehicles + 1 roadside unit), then times, per dataset:

* ``adapter.load``   - file reading and parsing only (1 process);
* ``sampler+collate``- adapter + :class:`CoopSampler` (crop) + :func:`collate`, 1 process;
* ``DataLoader xN``  - the same through ``torch.utils.data.DataLoader(num_workers=N)``.

Point clouds are decoded every time (no point cache); the OS file cache is warm after the
first pass, as in a training epoch over a dataset that fits in RAM.

Then, per dataset, the decoded-cloud disk cache (``dataset.cache_dir``,
:mod:`v2xfuse.datasets.point_cache`) against decoding, per frame (all its agents' clouds),
measured as process CPU time (``time.process_time``, one torch thread) with the two sides
interleaved frame by frame over ``--reps`` passes, medians reported (so that other processes
on a shared machine distort neither side more than the other):

* ``clouds: decode``    - parsing the frame's PCDs as the adapter does (y flip / intensity scale);
* ``clouds: cache hit`` - the same clouds mapped from a warm cache (header, size, CRC-32 checks);
* ``load: no cache`` / ``load: cache hit`` - the whole ``adapter.load`` (yaml/json too), without
  and with ``cache_dir`` (warm); no in-memory LRU on either side.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from v2xfuse.datasets import CoopSampler, DairV2XCAdapter, Opv2vAdapter, PipelineConfig, collate
from v2xfuse.sim import SimConfig, generate_dataset


def make_data(root: Path, n_frames: int) -> dict:
    cfg = SimConfig.from_dict({"scene": {"n_cavs": 4, "n_rsus": 1}})
    cfg.cameras = False
    out = {}
    for fmt in ("opv2v", "dair"):
        if not (root / fmt / "v2xfuse_synthetic.json").is_file():
            generate_dataset(fmt, root / fmt, n_scenes=1, n_frames=n_frames, seed=0, cfg=cfg,
                             splits={"train": 1.0}, progress=False)
        out[fmt] = root / fmt
    return out


def rate(fn, iters: int) -> float:
    fn(0)  # warm-up: imports, page cache
    t = time.perf_counter()
    for i in range(iters):
        fn(i)
    return iters / (time.perf_counter() - t)


def loader_rate(sampler, iters: int, workers: int) -> float:
    n = len(sampler)
    indices = [i % n for i in range(iters + 2 * max(workers, 1))]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(sampler, indices), batch_size=1,
                                         num_workers=workers, collate_fn=collate,
                                         persistent_workers=False)
    it = iter(loader)
    for _ in range(2 * max(workers, 1)):  # worker start-up and the prefetch are not timed
        next(it)
    t = time.perf_counter()
    count = 0
    for _ in it:
        count += 1
    return count / (time.perf_counter() - t)


def cpu_ms(fn) -> float:
    t = time.process_time()
    fn()
    return (time.process_time() - t) * 1e3


def frame_clouds(adapter, idx: int) -> list[tuple[str, object]]:
    """(path, decode) of every cloud ``adapter.load(idx)`` reads, as the adapter asks its cache."""
    seen = []
    get = adapter.points.get
    adapter.points.get = lambda key, load: (seen.append((key, load)), get(key, load))[1]
    try:
        adapter.load(idx)
    finally:
        del adapter.points.get
    return seen


def cache_rows(name: str, make, cache_dir: Path, reps: int) -> list[tuple]:
    """Median per-frame CPU ms of decoding vs a cache hit (clouds alone and whole loads)."""
    plain, cached = make(), make(cache_dir=cache_dir)
    disk = cached.points.disk
    frames = [frame_clouds(plain, i) for i in range(len(plain))]
    for i in range(len(cached)):  # fills the cache
        cached.load(i)
    times = {k: [] for k in ("clouds: decode", "clouds: cache hit", "load: no cache", "load: cache hit")}
    for _ in range(reps):
        for i, clouds in enumerate(frames):
            times["clouds: decode"].append(cpu_ms(lambda: [load() for _, load in clouds]))
            times["clouds: cache hit"].append(cpu_ms(lambda: [disk.get(k, load) for k, load in clouds]))
            times["load: no cache"].append(cpu_ms(lambda: plain.load(i)))
            times["load: cache hit"].append(cpu_ms(lambda: cached.load(i)))
    if disk.stats["misses"] != len({k for clouds in frames for k, _ in clouds}) or disk.stats["corrupt"]:
        raise RuntimeError(f"{name}: the timed cache did not only hit: {dict(disk.stats)}")
    points = statistics.median(sum(len(load()) for _, load in clouds) for clouds in frames)
    med = {k: statistics.median(v) for k, v in times.items()}
    return [(name, int(points), k, v, med[k.split(":")[0] + (": decode" if k.startswith("clouds")
                                                            else ": no cache")] / v)
            for k, v in med.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=4, help="frames to generate per dataset")
    p.add_argument("--iters", type=int, default=40, help="frames timed per measurement")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--keep", type=Path, help="generate into (and reuse) this folder")
    p.add_argument("--reps", type=int, default=5, help="passes over the frames for the cache timing")
    p.add_argument("--cache-only", action="store_true", help="only the disk cache timing")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    root = args.keep or Path(tmp.name)
    data = make_data(root, args.frames)
    makers = {
        "OPV2V (5 agents)": lambda **kw: Opv2vAdapter(data["opv2v"], "train", max_agents=5,
                                                      comm_range=1e3, **kw),
        "DAIR-V2X-C (2 agents)": lambda **kw: DairV2XCAdapter(data["dair"], "train", **kw),
    }
    adapters = {name: make() for name, make in makers.items()}
    rows = []
    for name, adapter in ({} if args.cache_only else adapters).items():
        frame = adapter.load(0)
        points = sum(len(a.points) for a in frame.agents)
        sampler = CoopSampler(adapter, PipelineConfig(), train=False)
        n = len(adapter)
        rows.append((name, len(frame.agents), points, "adapter.load", rate(lambda i: adapter.load(i % n), args.iters)))
        rows.append((name, len(frame.agents), points, "sampler+collate",
                     rate(lambda i: collate([sampler[i % n]]), args.iters)))
        rows.append((name, len(frame.agents), points, "DataLoader x0", loader_rate(sampler, args.iters, 0)))
        rows.append((name, len(frame.agents), points, f"DataLoader x{args.workers}",
                     loader_rate(sampler, args.iters, args.workers)))
    if rows:
        print(f"{'dataset':<24}{'agents':>7}{'points':>9}  {'path':<18}{'frames/s':>9}")
    for name, agents, points, path, fps in rows:
        print(f"{name:<24}{agents:>7}{points:>9}  {path:<18}{fps:>9.1f}")
    print(f"\ndecoded-cloud disk cache: per frame, process CPU ms, medians of {args.reps} "
          f"interleaved passes over {args.frames} frames (one torch thread)")
    print(f"{'dataset':<24}{'points':>9}  {'path':<20}{'ms/frame':>9}{'speed-up':>9}")
    with tempfile.TemporaryDirectory() as cache_root:
        for i, (name, make) in enumerate(makers.items()):
            for row in cache_rows(name, make, Path(cache_root) / str(i), args.reps):
                print(f"{row[0]:<24}{row[1]:>9}  {row[2]:<20}{row[3]:>9.2f}{row[4]:>8.1f}x")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
