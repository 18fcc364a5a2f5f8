#!/usr/bin/env python
"""Frames per second of the data path: a 5-agent OPV2V frame and a DAIR-V2X-C pair.

    python tools/bench_loading.py [--frames 4] [--iters 40] [--workers 2] [--keep DIR]

Generates the data with the synthetic generator (default sensor settings, no cameras; OPV2V
scenes with 4 connected vehicles + 1 roadside unit), then times, per dataset:

* ``adapter.load``   - file reading and parsing only (1 process);
* ``sampler+collate``- adapter + :class:`CoopSampler` (crop) + :func:`collate`, 1 process;
* ``DataLoader xN``  - the same through ``torch.utils.data.DataLoader(num_workers=N)``.

Point clouds are decoded every time (no point cache); the OS file cache is warm after the
first pass, as in a training epoch over a dataset that fits in RAM.
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=4, help="frames to generate per dataset")
    p.add_argument("--iters", type=int, default=40, help="frames timed per measurement")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--keep", type=Path, help="generate into (and reuse) this folder")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    root = args.keep or Path(tmp.name)
    data = make_data(root, args.frames)
    adapters = {
        "OPV2V (5 agents)": Opv2vAdapter(data["opv2v"], "train", max_agents=5, comm_range=1e3),
        "DAIR-V2X-C (2 agents)": DairV2XCAdapter(data["dair"], "train"),
    }
    rows = []
    for name, adapter in adapters.items():
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
    print(f"{'dataset':<24}{'agents':>7}{'points':>9}  {'path':<18}{'frames/s':>9}")
    for name, agents, points, path, fps in rows:
        print(f"{name:<24}{agents:>7}{points:>9}  {path:<18}{fps:>9.1f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
