#!/usr/bin/env python
"""CPU time of the PointPillars + max-fusion detector, stage by stage, at inference and per
training step, optionally against another checkout of v2xfuse on identical inputs.

    python tools/bench_model.py                        # this checkout
    git worktree add /tmp/v2xfuse-base main            # the code to compare against
    python tools/bench_model.py --compare /tmp/v2xfuse-base --reps 7

Scenarios: the quickstart grid (configs/quickstart.yaml: 0.8 m cells, 96 x 96, 32 channels) and
the OPV2V-standard grid (OpenCOOD's PointPillars: 0.4 m cells, 704 x 200, 64 channels, backbone
64/128/256 at strides 2/2/2, 3 x 128 upsampled), 3 and 5 agents, senders in the ego's axes
(``model.sender_frame: ego_aligned``, the quickstart's), no channel (messages pass straight
through). Inputs are synthetic: per agent a LiDAR-like cloud (density falling with range,
ground and objects between -2 and 1 m) at a random pose within 30 m of the ego; a training
step is forward + loss + backward on a batch of 2 such frames with 20 random boxes each.

How it is measured: every side runs in its own worker process with one torch thread
(``torch.set_num_threads(1)``) and times with ``time.process_time`` (CPU time of the process,
so other load on the machine does not inflate it); with ``--compare`` the two workers take
turns rep by rep (the first of each pair alternates), and the table gives medians and the
ratio new / old. Both sides load the same inputs and the same weights (written by this
checkout's worker), and the script prints the largest difference between their head outputs.

Stages (inference): ``transform`` (senders' points into the ego's axes), ``voxelise``,
``pillar_net``, ``scatter`` (the rest of the encoder), ``backbone``, ``fusion``, ``head``
(the head's convs), ``decode`` (the rest: decoding and NMS), ``total``; a training step has ``backward`` (the rest: loss
and backward) instead of ``decode``. The minor page faults per call are printed too (see
v2xfuse.utils.malloc).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["transform", "voxelise", "pillar_net", "scatter", "backbone", "fusion", "head",
          "decode", "total"]

OPV2V_MODEL = {
    "encoder": {"type": "pointpillars", "voxel_size": [0.4, 0.4], "out_channels": 64,
                "max_points_per_pillar": 32},
    "backbone": {"layer_strides": [2, 2, 2], "layer_channels": [64, 128, 256],
                 "layer_nums": [3, 5, 8], "upsample_channels": [128, 128, 128], "out_stride": 2},
}
OPV2V_RANGE = [-140.8, -40.0, -3.0, 140.8, 40.0, 1.0]


def scenario_config(grid: str) -> dict:
    """The model config of ``grid`` ("quickstart" or "opv2v") with max fusion."""
    from v2xfuse.config import load_config, merge

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    cfg["model"]["fusion"] = {"type": "max"}
    # the anchor head with its defaults, as the quickstart's, spelled so that older checkouts
    # (--compare) read it too: they know no per-head sections
    cfg["model"]["head"] = {"type": "anchor"}
    if grid == "opv2v":
        cfg["model"] = merge(cfg["model"], OPV2V_MODEL)
        cfg["pipeline"]["lidar_range"] = list(OPV2V_RANGE)
    return cfg


def make_inputs(rng: np.random.Generator, agents: int, points_per_agent: int, frames: int,
                lidar_range) -> dict:
    """``frames`` frames of ``agents`` agents: points (P, 5), poses (N, 4, 4), boxes."""
    x0, y0, _, x1, y1, _ = lidar_range
    reach = max(abs(x0), abs(x1), abs(y0), abs(y1))
    out = {"record_len": np.full(frames, agents, dtype=np.int64)}
    points, poses, boxes = [], [], []
    for f in range(frames):
        for a in range(agents):
            r = reach * rng.random(points_per_agent) ** 2 + 2.0
            phi = rng.uniform(-np.pi, np.pi, points_per_agent)
            z = np.where(rng.random(points_per_agent) < 0.6, -1.9, rng.uniform(-1.9, 1.0, points_per_agent))
            pts = np.stack([np.full(points_per_agent, f * agents + a, dtype=np.float64),
                            r * np.cos(phi), r * np.sin(phi), z, rng.random(points_per_agent)], 1)
            inside = ((pts[:, 1] >= x0) & (pts[:, 1] < x1) & (pts[:, 2] >= y0) & (pts[:, 2] < y1))
            points.append(pts[inside])
            pose = np.eye(4)
            if a:
                yaw = rng.uniform(-np.pi, np.pi)
                pose[:2, :2] = [[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]]
                pose[:2, 3] = rng.uniform(-30, 30, 2)
            poses.append(pose)
        b = np.zeros((20, 7))
        b[:, 0] = rng.uniform(x0 * 0.8, x1 * 0.8, 20)
        b[:, 1] = rng.uniform(y0 * 0.8, y1 * 0.8, 20)
        b[:, 2] = -1.0
        b[:, 3:6] = [4.5, 1.9, 1.6]
        b[:, 6] = rng.uniform(-np.pi, np.pi, 20)
        boxes.append(b)
    out["points"] = np.concatenate(points).astype(np.float32)
    out["poses"] = np.stack(poses).astype(np.float32)
    out["boxes"] = np.stack(boxes).astype(np.float32)
    return out


# ----------------------------------------------------------------------------------- worker


class Worker:
    """One side: builds the scenarios' models on the v2xfuse it imports and times them."""

    def __init__(self, workdir: Path, write_weights: bool):
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        self.workdir, self.write_weights = workdir, write_weights
        self.models: dict[str, object] = {}

    def model(self, grid: str):
        torch = self.torch
        if grid not in self.models:
            from v2xfuse.builder import build_detector

            torch.manual_seed(0)
            model = build_detector(scenario_config(grid))
            weights = self.workdir / f"weights_{grid}.pt"
            if self.write_weights:
                torch.save(model.state_dict(), weights)
            else:
                for _ in range(600):  # the other worker writes them first
                    if weights.exists():
                        break
                    time.sleep(0.1)
                model.load_state_dict(torch.load(weights, weights_only=True))
            self.models[grid] = (model, {k: v.clone() for k, v in model.state_dict().items()})
        return self.models[grid]

    def batch(self, name: str):
        from v2xfuse.datasets.batch import CoopBatch

        torch = self.torch
        data = np.load(self.workdir / f"{name}.npz")
        poses = torch.from_numpy(data["poses"])
        n = len(poses)
        return CoopBatch(
            points=torch.from_numpy(data["points"]), record_len=torch.from_numpy(data["record_len"]),
            ego_from_agent=poses, agent_kind=torch.zeros(n, dtype=torch.int64),
            delay_us=torch.zeros(n, dtype=torch.int64),
            gt_boxes=[torch.from_numpy(b) for b in data["boxes"]],
            gt_ids=[torch.arange(len(b)) for b in data["boxes"]], frames=[],
            true_ego_from_agent=poses.clone())

    def run(self, grid: str, name: str, mode: str, save: bool) -> dict:
        torch = self.torch
        model, weights = self.model(grid)
        model.load_state_dict(weights)  # a training step moves the BN statistics
        batch = self.batch(name)
        times: dict[str, float] = {}
        restore = self._instrument(model, times)
        try:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.process_time()
            if mode == "infer":
                model.eval()
                with torch.no_grad():
                    out = model(batch)
                    dets = model.predict(out)
            else:
                model.train()
                out = model(batch)
                loss = model.loss(out, batch)["loss"]
                loss.backward()
            total = time.process_time() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        finally:
            restore()
        result = {"total": total}
        result.update(times)
        if "encoder" in times:
            result["scatter"] = times.pop("encoder") - times.get("voxelise", 0) - times.get("pillar_net", 0)
            result.pop("encoder")
        if mode == "infer":
            result["decode"] = total - sum(v for k, v in result.items() if k != "total")
        else:
            result["backward"] = total - sum(v for k, v in result.items() if k != "total")
        result = {"seconds": result, "page_faults": faults}
        if save:
            arrays = {f: getattr(out.head, f).detach().numpy() for f in ("cls", "reg", "dir")}
            if mode == "infer":
                arrays["boxes"] = np.concatenate([d.boxes.numpy() for d in dets])
                arrays["scores"] = np.concatenate([d.scores.numpy() for d in dets])
            else:
                arrays["loss"] = np.asarray(loss.item())
                arrays["grad"] = np.concatenate([p.grad.numpy().ravel() for p in model.parameters()
                                                 if p.grad is not None])
            np.savez(self.workdir / f"out_{os.getpid()}_{name}_{mode}.npz", **arrays)
        model.zero_grad(set_to_none=True)
        return result

    def _instrument(self, model, times: dict):
        """Time the stages through hooks and wrappers; returns a function that removes them."""
        import v2xfuse.models.detector as detector

        handles = []

        def timed_module(module, stage):
            def pre(*_):
                times.setdefault("_start_" + stage, time.process_time())

            def post(*_):
                times[stage] = times.get(stage, 0.0) + time.process_time() - times.pop("_start_" + stage)
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))

        timed_module(model.encoder, "encoder")
        timed_module(model.encoder.voxelizer, "voxelise")
        timed_module(model.encoder.pfn, "pillar_net")
        timed_module(model.backbone, "backbone")
        timed_module(model.head, "head")

        def timed_call(fn, stage):
            def wrapper(*args, **kwargs):
                start = time.process_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    times[stage] = times.get(stage, 0.0) + time.process_time() - start
            return wrapper

        fuse, align = model.fusion.fuse, detector.ego_aligned_frames
        model.fusion.fuse = timed_call(fuse, "fusion")
        detector.ego_aligned_frames = timed_call(align, "transform")

        def restore():
            for h in handles:
                h.remove()
            del model.fusion.fuse
            detector.ego_aligned_frames = align
        return restore


def worker_main(workdir: Path, write_weights: bool) -> int:
    worker = Worker(workdir, write_weights)
    for line in sys.stdin:
        cmd = json.loads(line)
        result = worker.run(cmd["grid"], cmd["name"], cmd["mode"], cmd.get("save", False))
        print(json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------- parent


class Side:
    def __init__(self, label: str, checkout: Path, workdir: Path, write_weights: bool):
        env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS="1")
        args = [sys.executable, str(Path(__file__).resolve()), "--worker", str(workdir)]
        if write_weights:
            args.append("--write-weights")
        self.label, self.checkout = label, checkout
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def run(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} worker ({self.checkout}) stopped")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


SCENARIOS = [  # (name, grid, agents, points per agent, frames per batch, modes)
    ("quickstart_3", "quickstart", 3, 20000, 1, ("infer",)),
    ("quickstart_5", "quickstart", 5, 20000, 1, ("infer",)),
    ("quickstart_train", "quickstart", 4, 20000, 2, ("train",)),
    ("opv2v_3", "opv2v", 3, 40000, 1, ("infer",)),
    ("opv2v_5", "opv2v", 5, 40000, 1, ("infer",)),
    ("opv2v_train", "opv2v", 3, 40000, 2, ("train",)),
]


def largest_difference(workdir: Path, sides: list[Side], name: str, mode: str) -> str:
    a, b = (np.load(workdir / f"out_{s.proc.pid}_{name}_{mode}.npz") for s in sides)
    parts = []
    for key in a.files:
        if a[key].shape != b[key].shape:
            parts.append(f"{key}: shapes {a[key].shape} vs {b[key].shape}")
            continue
        diff = float(np.abs(a[key] - b[key]).max()) if a[key].size else 0.0
        parts.append(f"{key} {diff:.1e}")
    return ", ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", type=Path, help="another v2xfuse checkout (the old side)")
    parser.add_argument("--reps", type=int, default=5, help="measured reps per side and scenario")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write-weights", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.write_weights)
    if args.compare and not (args.compare / "v2xfuse" / "__init__.py").exists():
        raise SystemExit(f"--compare {args.compare}: no v2xfuse package there")
    chosen = [s for s in SCENARIOS if not args.only or s[0] in args.only.split(",")]
    if not chosen:
        raise SystemExit(f"--only {args.only!r}: none of {[s[0] for s in SCENARIOS]}")
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        workdir = Path(tmp)
        sys.path.insert(0, str(ROOT))
        rng = np.random.default_rng(0)
        for name, grid, agents, per_agent, frames, _ in chosen:
            lidar_range = OPV2V_RANGE if grid == "opv2v" else [-38.4, -38.4, -5.0, 38.4, 38.4, 3.0]
            np.savez(workdir / f"{name}.npz", **make_inputs(rng, agents, per_agent, frames, lidar_range))
        sides = [Side("new", ROOT, workdir, True)]
        if args.compare:
            sides.append(Side("old", args.compare.resolve(), workdir, False))
        print(f"process CPU time per call, 1 torch thread per side, medians of {args.reps} reps "
              f"after {args.warmup} warm-up" + (", sides interleaved" if args.compare else ""))
        print(f"new: {ROOT}" + (f"\nold: {args.compare.resolve()}" if args.compare else ""))
        try:
            for name, grid, agents, per_agent, frames, modes in chosen:
                for mode in modes:
                    runs = {s.label: [] for s in sides}
                    faults = {s.label: [] for s in sides}
                    for rep in range(args.warmup + args.reps):
                        order = sides if rep % 2 == 0 else sides[::-1]
                        for side in order:
                            r = side.run(grid=grid, name=name, mode=mode, save=rep == 0)
                            if rep >= args.warmup:
                                runs[side.label].append(r["seconds"])
                                faults[side.label].append(r["page_faults"])
                    report(name, mode, agents, frames, runs)
                    print("  minor page faults per call (median): " + ", ".join(
                        f"{k} {int(np.median(v))}" for k, v in faults.items()))
                    if args.compare:
                        print(f"  largest |new - old|: {largest_difference(workdir, sides, name, mode)}")
        finally:
            for s in sides:
                s.close()
    return 0


def report(name: str, mode: str, agents: int, frames: int, runs: dict) -> None:
    stages = [s for s in STAGES if s in runs["new"][0]] + \
        [s for s in runs["new"][0] if s not in STAGES]
    stages.remove("total")
    stages.append("total")
    print(f"\n{name} ({mode}, {agents} agents x {frames} frame{'s' if frames > 1 else ''})")
    header = f"  {'stage':<12}{'new ms':>10}"
    if "old" in runs:
        header += f"{'old ms':>10}{'new/old':>9}"
    print(header)
    for stage in stages:
        new = 1e3 * float(np.median([r.get(stage, 0.0) for r in runs["new"]]))
        line = f"  {stage:<12}{new:>10.1f}"
        if "old" in runs:
            old = 1e3 * float(np.median([r.get(stage, 0.0) for r in runs["old"]]))
            line += f"{old:>10.1f}{(new / old if old > 0 else float('nan')):>9.2f}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
