#!/usr/bin/env python
"""PCD and OPV2V yaml read speed: v2xfuse against Open3D 0.20 on the same files.

    python tools/bench_pcd.py [--agents 5] [--points 33400] [--repeat 15] [--vehicles 40]

Writes one cooperative frame (``--agents`` clouds of ``--points`` LiDAR-like points each:
the default is the 5-agent, ~167k-point frame of issue 20) as binary, ascii (OPV2V-style
packed rgb) and binary_compressed files, and reads the whole frame with each reader:
v2xfuse with its compiled decoders (``v2xfuse._C``), v2xfuse with its pure-Python decoders
(what ``V2XFUSE_NO_EXT=1`` runs), and Open3D (``o3d.io.read_point_cloud`` and its points as
numpy). Then times OPV2V box extraction from one yaml of ``--vehicles`` vehicles: the batched
``vehicle_boxes`` against the old per-vehicle loop, with the yaml parse for scale.

Measurement: one thread (torch.set_num_threads(1)), process CPU time per call
(time.process_time, so other processes on a shared machine do not count), the sides
interleaved call by call, medians over ``--repeat`` calls after a warm-up. Ratios are
v2xfuse / other: below 1 means v2xfuse is faster. Open3D is optional: without it (e.g. not
on PYTHONPATH) its columns are skipped.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from v2xfuse.formats import opv2v as opv2v_format
from v2xfuse.io import _ext
from v2xfuse.io.pcd import read_points, write_pcd, write_points_opv2v


def _lidar_like(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3) float32 points on 64 rings around a sensor, and intensities in [0, 1]."""
    ring = rng.integers(0, 64, n)
    azimuth = rng.uniform(-np.pi, np.pi, n)
    elevation = np.radians(-25 + ring * (40 / 63))
    distance = rng.uniform(2, 80, n) * (1 + 0.02 * rng.normal(size=n))
    xyz = np.stack([distance * np.cos(elevation) * np.cos(azimuth),
                    distance * np.cos(elevation) * np.sin(azimuth),
                    1.8 + distance * np.sin(elevation)], axis=1).astype(np.float32)
    return xyz, rng.uniform(0, 1, n).astype(np.float32)


def _median_cpu_ms(sides: dict, repeat: int) -> dict:
    """{name: median process CPU ms} of each callable, interleaved call by call."""
    for fn in sides.values():
        fn()  # warm the page cache and lazy imports
    runs = {name: [] for name in sides}
    for _ in range(repeat):
        for name, fn in sides.items():
            start = time.process_time()
            fn()
            runs[name].append(time.process_time() - start)
    return {name: statistics.median(r) * 1e3 for name, r in runs.items()}


def _read_all(paths, python: bool):
    def run():
        saved = _ext._module
        if python:
            _ext._module = None  # what V2XFUSE_NO_EXT=1 selects
        try:
            for path in paths:
                read_points(path)
        finally:
            _ext._module = saved
    return run


def _yaml_text(rng: np.random.Generator, n: int) -> str:
    vehicles = {}
    for vid in rng.choice(10**5, n, replace=False):
        vehicles[int(vid)] = {
            "angle": [float(rng.normal(0, 0.5)), float(rng.uniform(-180, 180)),
                      float(rng.normal(0, 0.5))],
            "center": [0.0, 0.0, float(rng.uniform(0.6, 1.0))],
            "extent": [float(rng.uniform(1.8, 2.6)), float(rng.uniform(0.8, 1.1)),
                       float(rng.uniform(0.6, 1.0))],
            "location": rng.uniform(-150, 150, 3).tolist(),
            "speed": float(rng.uniform(0, 60)),
        }
    return yaml.safe_dump({"lidar_pose": rng.uniform(-100, 100, 6).tolist(), "ego_speed": 30.0,
                           "vehicles": vehicles})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--points", type=int, default=33_400, help="points per agent")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--vehicles", type=int, default=40, help="vehicles in the yaml")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import open3d as o3d
    except ImportError:
        o3d = None
        print("open3d is not importable: timing v2xfuse only (README, Benchmarks: "
              "`pip install --target DIR open3d` and PYTHONPATH=DIR to compare)")
    compiled = _ext.extension() is not None
    if not compiled:
        print("v2xfuse._C is not built or V2XFUSE_NO_EXT=1: the compiled column is the Python one")

    rng = np.random.default_rng(0)
    print(f"PCD: one frame of {args.agents} agents x {args.points} points "
          f"({args.agents * args.points} points); process CPU ms per frame, median of "
          f"{args.repeat} interleaved reads, 1 thread. Ratio = v2xfuse / Open3D (< 1: faster)")
    print(f"{'DATA':<18} {'MB':>6} {'v2xfuse':>9} {'py only':>9} {'open3d':>9} "
          f"{'v2x/o3d':>8} {'py/o3d':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        files = {kind: [] for kind in ("binary", "ascii", "binary_compressed")}
        for agent in range(args.agents):
            xyz, intensity = _lidar_like(rng, args.points)
            fields = {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
                      "intensity": np.round(intensity * 255).astype(np.float32)}
            for kind in ("binary", "binary_compressed"):
                path = Path(tmp) / f"{agent}_{kind}.pcd"
                write_pcd(path, fields, data=kind)
                files[kind].append(path)
            path = Path(tmp) / f"{agent}_ascii.pcd"
            write_points_opv2v(path, xyz, intensity)
            files["ascii"].append(path)
        for kind, paths in files.items():
            sides = {"ours": _read_all(paths, python=False),
                     "python": _read_all(paths, python=True)}
            if o3d is not None:
                sides["open3d"] = lambda paths=paths: [
                    np.asarray(o3d.io.read_point_cloud(str(p)).points) for p in paths]
            ms = _median_cpu_ms(sides, args.repeat)
            size = sum(p.stat().st_size for p in paths) / 1e6
            line = f"{kind:<18} {size:6.2f} {ms['ours']:9.2f} {ms['python']:9.2f}"
            if o3d is not None:
                line += (f" {ms['open3d']:9.2f} {ms['ours'] / ms['open3d']:7.3f}x "
                         f"{ms['python'] / ms['open3d']:6.2f}x")
            print(line)

    text = _yaml_text(rng, args.vehicles)
    meta = yaml.load(text, Loader=opv2v_format.YamlLoader)
    world_from_lidar = opv2v_format.world_from_lidar_rh(meta, "bench.yaml")
    batched = opv2v_format.vehicle_boxes(meta, world_from_lidar, "bench.yaml")
    looped = opv2v_format._vehicle_boxes_per_entry(meta, world_from_lidar, "bench.yaml")
    identical = np.array_equal(batched[0], looped[0]) and \
        batched[1].tobytes() == looped[1].tobytes()
    ms = _median_cpu_ms({
        "parse": lambda: yaml.load(text, Loader=opv2v_format.YamlLoader),
        "loop": lambda: opv2v_format._vehicle_boxes_per_entry(meta, world_from_lidar, "b.yaml"),
        "batched": lambda: opv2v_format.vehicle_boxes(meta, world_from_lidar, "b.yaml"),
    }, args.repeat * 4)
    print(f"\nOPV2V boxes: one yaml of {args.vehicles} vehicles; process CPU ms, median of "
          f"{args.repeat * 4} interleaved calls, 1 thread")
    print(f"yaml parse {ms['parse']:.3f}   per-vehicle loop {ms['loop']:.3f}   batched "
          f"{ms['batched']:.3f}   batched / loop {ms['batched'] / ms['loop']:.3f}x   "
          f"bit-identical: {identical}")


if __name__ == "__main__":
    main()
