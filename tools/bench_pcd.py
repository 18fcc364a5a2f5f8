#!/usr/bin/env python
"""PCD read speed: v2xfuse's reader against Open3D's on the same files.

    python tools/bench_pcd.py [--points 100000] [--repeat 20]

Writes a binary, an ascii (OPV2V-style packed rgb) and a binary_compressed file of N points to
a temporary folder, then prints the median and best read time of each reader. Open3D is
optional (``pip install open3d``); without it only our numbers are printed.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from v2xfuse.io.pcd import read_points, write_pcd, write_points_opv2v


def _time(fn, repeat: int) -> tuple[float, float]:
    fn()  # warm the page cache and any lazy imports
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    try:
        import open3d as o3d
    except ImportError:
        o3d = None
        print("open3d is not installed: timing v2xfuse only (pip install open3d to compare)")

    rng = np.random.default_rng(0)
    xyz = rng.normal(0, 40, (args.points, 3)).astype(np.float32)
    intensity = rng.uniform(0, 1, args.points).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"binary": Path(tmp) / "binary.pcd", "ascii": Path(tmp) / "ascii.pcd",
                 "binary_compressed": Path(tmp) / "compressed.pcd"}
        fields = {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2], "intensity": intensity * 255}
        write_pcd(files["binary"], fields, data="binary")
        write_points_opv2v(files["ascii"], xyz, intensity)
        write_pcd(files["binary_compressed"], fields, data="binary_compressed")
        print(f"{args.points} points, {args.repeat} reads each; times in ms (median / best)")
        print(f"{'file':<18} {'MB':>6} {'v2xfuse':>16} {'open3d':>16} {'speed-up':>9}")
        for kind, path in files.items():
            ours = _time(lambda: read_points(path), args.repeat)
            size = path.stat().st_size / 1e6
            line = f"{kind:<18} {size:6.2f} {ours[0] * 1e3:7.2f} / {ours[1] * 1e3:6.2f}"
            if o3d is not None:
                theirs = _time(lambda: (np.asarray(o3d.io.read_point_cloud(str(path)).points)),
                               args.repeat)
                line += f" {theirs[0] * 1e3:7.2f} / {theirs[1] * 1e3:6.2f} " \
                        f"{theirs[0] / ours[0]:8.1f}x"
            print(line)


if __name__ == "__main__":
    main()
