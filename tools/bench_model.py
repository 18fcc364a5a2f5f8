#!/usr/bin/env python
"""CPU time of the PointPillars + max-fusion detector, stage by stage, at inference and per
training step, optionally against another checkout of v2xfuse on identical inputs.

    python tools/bench_model.py                        # this checkout
    git worktree add /tmp/v2xfuse-base main            # the code to compare against
    python tools/bench_model.py --compare /tmp/v2xfuse-base --reps 7
    git clone https://github.com/DerrickXuNu/OpenCOOD /tmp/OpenCOOD  # the peer, side by side
    python tools/bench_model.py --opencood /tmp/OpenCOOD --reps 5

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

With ``--opencood PATH`` the other side is OpenCOOD (a checkout of DerrickXuNu/OpenCOOD; it
needs spconv 2 and cumm, which OpenCOOD's voxeliser uses): the same work built from its own
classes, run by its own code -- each agent's cloud projected into the ego's frame and cropped
(``box_utils.project_points_by_matrix_torch``, ``pcd_utils.mask_points_by_range``: OpenCOOD's
``proj_first``), voxelised and collated by ``SpVoxelPreprocessor``, then ``PillarVFE``,
``PointPillarScatter``, ``BaseBEVBackbone`` and F-Cooper's ``SpatialFusion`` with the scenario's
widths, and 1x1 class and box convolutions (two anchors); a training step adds
``PointPillarLoss`` on fixed targets and the backward pass. OpenCOOD runs with glibc's
allocator as it ships; ``--opencood-malloc`` gives it the allocator settings that importing
``v2xfuse.models`` makes (v2xfuse.utils.malloc: a 1 GB mmap threshold, no trimming), to compare
the code alone. OpenCOOD does not
decode boxes on the CPU (its NMS is a CUDA extension), so the ratio compares the model without
``decode``, and the v2xfuse side alone carries its direction head and its target assignment (in
its step, where OpenCOOD assigns in its data loader). Weights differ (the two parameterise the layers
differently), so outputs are compared by shape only. open3d, which OpenCOOD imports for file I/O
only, is replaced by an empty module in that worker when it is not installed.

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


class OpenCOODWorker:
    """The other side with ``--opencood``: the scenario's work on OpenCOOD's own classes."""

    def __init__(self, workdir: Path, opencood: Path, tune_malloc: bool = False):
        import types

        import torch

        torch.set_num_threads(1)
        if tune_malloc:  # the allocator settings importing v2xfuse.models makes (README)
            from v2xfuse.utils.malloc import tune_malloc as tune

            print(f"OpenCOOD worker: {tune()}", file=sys.stderr)
        sys.path.insert(0, str(opencood))
        try:
            import open3d  # noqa: F401  (OpenCOOD's pcd_utils reads files with it)
        except ImportError:
            sys.modules["open3d"] = types.ModuleType("open3d")
        self.torch = torch
        self.workdir = workdir
        self.models: dict[tuple[str, str], tuple] = {}
        self.targets: dict[str, dict] = {}

    def model(self, grid: str, mode: str):
        """(modules, initial weights, preprocessor, scenario sizes) of ``grid``; the voxeliser's
        cap is v2xfuse's max_pillars in both modes, so both sides keep the same pillars."""
        torch = self.torch
        if (grid, mode) in self.models:
            return self.models[(grid, mode)]
        from opencood.data_utils.pre_processor.sp_voxel_preprocessor import SpVoxelPreprocessor
        from opencood.models.fuse_modules.f_cooper_fuse import SpatialFusion
        from opencood.models.sub_modules.base_bev_backbone import BaseBEVBackbone
        from opencood.models.sub_modules.pillar_vfe import PillarVFE
        from opencood.models.sub_modules.point_pillar_scatter import PointPillarScatter

        cfg = scenario_config(grid)
        enc, bb = cfg["model"]["encoder"], cfg["model"]["backbone"]
        lidar_range = [float(v) for v in cfg["pipeline"]["lidar_range"]]
        voxel = [float(enc["voxel_size"][0]), float(enc["voxel_size"][1]),
                 lidar_range[5] - lidar_range[2]]
        max_pillars = int(enc.get("max_pillars", 32000))
        pre = SpVoxelPreprocessor({"cav_lidar_range": lidar_range, "args": {
            "voxel_size": voxel, "max_points_per_voxel": int(enc["max_points_per_pillar"]),
            "max_voxel_train": max_pillars, "max_voxel_test": max_pillars}}, mode == "train")
        grid_size = np.round((np.array(lidar_range[3:]) - np.array(lidar_range[:3]))
                             / np.array(voxel)).astype(np.int64)
        strides = np.cumprod(bb["layer_strides"])
        torch.manual_seed(0)
        channels = int(enc["out_channels"])
        modules = torch.nn.ModuleDict({
            "pillar_vfe": PillarVFE({"use_norm": True, "with_distance": False,
                                     "use_absolute_xyz": True, "num_filters": [channels]},
                                    num_point_features=4, voxel_size=voxel,
                                    point_cloud_range=lidar_range),
            "scatter": PointPillarScatter({"num_features": channels, "grid_size": grid_size}),
            "backbone": BaseBEVBackbone({
                "layer_nums": list(bb["layer_nums"]), "layer_strides": list(bb["layer_strides"]),
                "num_filters": list(bb["layer_channels"]),
                "upsample_strides": [int(s // bb["out_stride"]) for s in strides],
                "num_upsample_filter": list(bb["upsample_channels"])}, channels),
            "fusion": SpatialFusion(),
        })
        width = sum(bb["upsample_channels"])
        modules["cls_head"] = torch.nn.Conv2d(width, 2, kernel_size=1)
        modules["reg_head"] = torch.nn.Conv2d(width, 14, kernel_size=1)
        sizes = {"range": lidar_range, "ny": int(grid_size[1] // bb["out_stride"]),
                 "nx": int(grid_size[0] // bb["out_stride"])}
        self.models[(grid, mode)] = (modules, {k: v.clone() for k, v in
                                               modules.state_dict().items()}, pre, sizes)
        return self.models[(grid, mode)]

    def fixed_targets(self, name: str, frames: int, sizes: dict) -> dict:
        """PointPillarLoss's targets: a few positive anchors per frame, random box residuals."""
        torch = self.torch
        if name not in self.targets:
            g = torch.Generator().manual_seed(1)
            pos = (torch.rand(frames, sizes["ny"], sizes["nx"], 2, generator=g) < 2e-3).float()
            reg = torch.randn(frames, sizes["ny"], sizes["nx"], 14, generator=g)
            self.targets[name] = {"pos_equal_one": pos, "targets": reg}
        return self.targets[name]

    def run(self, grid: str, name: str, mode: str, save: bool) -> dict:
        from opencood.loss.point_pillar_loss import PointPillarLoss
        from opencood.utils import box_utils, pcd_utils

        torch = self.torch
        modules, weights, pre, sizes = self.model(grid, mode)
        modules.load_state_dict(weights)
        data = np.load(self.workdir / f"{name}.npz")
        points, poses = data["points"], data["poses"].astype(np.float64)
        clouds = [points[points[:, 0] == i, 1:].copy() for i in range(len(poses))]
        record_len = torch.from_numpy(data["record_len"])
        times: dict[str, float] = {}

        def timed(stage, fn, *args):
            start = time.process_time()
            out = fn(*args)
            times[stage] = times.get(stage, 0.0) + time.process_time() - start
            return out

        def project(clouds):
            out = []
            for cloud, pose in zip(clouds, poses):
                cloud[:, :3] = box_utils.project_points_by_matrix_torch(cloud[:, :3], pose)
                out.append(pcd_utils.mask_points_by_range(cloud, sizes["range"]))
            return out

        def voxelise(clouds):
            merged = {"voxel_features": [], "voxel_coords": [], "voxel_num_points": []}
            for cloud in clouds:
                for key, value in pre.preprocess(cloud).items():
                    merged[key].append(value)
            return pre.collate_batch(merged)

        training = mode == "train"
        modules.train(training)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.process_time()
        with torch.set_grad_enabled(training):
            batch = timed("voxelise", voxelise, timed("transform", project, clouds))
            batch["record_len"] = record_len
            batch = timed("pillar_net", modules["pillar_vfe"], batch)
            batch = timed("scatter", modules["scatter"], batch)
            batch = timed("backbone", modules["backbone"], batch)
            fused = timed("fusion", modules["fusion"], batch["spatial_features_2d"], record_len)
            out = timed("head", lambda x: {"psm": modules["cls_head"](x),
                                           "rm": modules["reg_head"](x)}, fused)
            if training:
                loss = PointPillarLoss({"cls_weight": 1.0, "reg": 2.0})(
                    out, self.fixed_targets(name, len(record_len), sizes))
                loss.backward()
        total = time.process_time() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        result = dict(times, total=total)
        if training:
            result["backward"] = total - sum(times.values())
        if save:
            np.savez(self.workdir / f"out_{os.getpid()}_{name}_{mode}.npz",
                     cls=out["psm"].detach().numpy(), reg=out["rm"].detach().numpy())
        modules.zero_grad(set_to_none=True)
        return {"seconds": result, "page_faults": faults}


def worker_main(workdir: Path, write_weights: bool, opencood: Path | None = None,
                tune_malloc: bool = False) -> int:
    worker = (OpenCOODWorker(workdir, opencood, tune_malloc) if opencood
              else Worker(workdir, write_weights))
    for line in sys.stdin:
        cmd = json.loads(line)
        result = worker.run(cmd["grid"], cmd["name"], cmd["mode"], cmd.get("save", False))
        print(json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------- parent


class Side:
    def __init__(self, label: str, checkout: Path, workdir: Path, write_weights: bool,
                 opencood: bool = False, tune_malloc: bool = False):
        env = dict(os.environ, PYTHONPATH=str(ROOT if opencood else checkout),
                   OMP_NUM_THREADS="1")
        args = [sys.executable, str(Path(__file__).resolve()), "--worker", str(workdir)]
        if write_weights:
            args.append("--write-weights")
        if opencood:
            args += ["--opencood", str(checkout)] + (["--opencood-malloc"] if tune_malloc else [])
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
    parser.add_argument("--opencood", type=Path,
                        help="an OpenCOOD checkout: the other side is OpenCOOD's classes")
    parser.add_argument("--opencood-malloc", action="store_true",
                        help="give the OpenCOOD side v2xfuse's glibc allocator settings too "
                             "(v2xfuse.utils.malloc); by default it runs as it ships")
    parser.add_argument("--reps", type=int, default=5, help="measured reps per side and scenario")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write-weights", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.write_weights, args.opencood, args.opencood_malloc)
    if args.compare and args.opencood:
        raise SystemExit("--compare and --opencood: one other side at a time")
    if args.compare and not (args.compare / "v2xfuse" / "__init__.py").exists():
        raise SystemExit(f"--compare {args.compare}: no v2xfuse package there")
    if args.opencood and not (args.opencood / "opencood" / "models").is_dir():
        raise SystemExit(f"--opencood {args.opencood}: no opencood/models there (a clone of "
                         f"https://github.com/DerrickXuNu/OpenCOOD)")
    other = args.compare or args.opencood
    other_label = "OpenCOOD" if args.opencood else "old"
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
        if other:
            sides.append(Side("old", other.resolve(), workdir, False, bool(args.opencood),
                              args.opencood_malloc))
        print(f"process CPU time per call, 1 torch thread per side, medians of {args.reps} reps "
              f"after {args.warmup} warm-up" + (", sides interleaved" if other else ""))
        print(f"new: {ROOT}" + (f"\n{other_label.lower()}: {other.resolve()}" if other else ""))
        if args.opencood:
            print("OpenCOOD's allocator: " + ("v2xfuse's glibc settings (--opencood-malloc)"
                                              if args.opencood_malloc else "as it ships"))
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
                    report(name, mode, agents, frames, runs, other_label)
                    print("  minor page faults per call (median): " + ", ".join(
                        f"{k} {int(np.median(v))}" for k, v in faults.items()))
                    if args.compare:
                        print(f"  largest |new - old|: {largest_difference(workdir, sides, name, mode)}")
                    if args.opencood:
                        print(f"  head outputs: {output_shapes(workdir, sides, name, mode)}")
        finally:
            for s in sides:
                s.close()
    return 0


def output_shapes(workdir: Path, sides: list[Side], name: str, mode: str) -> str:
    """The two sides' class and box output shapes (OpenCOOD's weights are its own)."""
    a, b = (np.load(workdir / f"out_{s.proc.pid}_{name}_{mode}.npz") for s in sides)
    return ", ".join(f"{key} {tuple(a[key].shape)} vs {tuple(b[key].shape)}"
                     for key in ("cls", "reg"))


def report(name: str, mode: str, agents: int, frames: int, runs: dict,
           other: str = "old") -> None:
    keys = list(runs["new"][0]) + [k for k in runs.get("old", [{}])[0] if k not in runs["new"][0]]
    stages = [s for s in STAGES if s in keys] + [s for s in keys if s not in STAGES]
    stages.remove("total")
    stages.append("total")

    def median(side: str, stage: str) -> float:
        return 1e3 * float(np.median([r.get(stage, 0.0) for r in runs[side]]))

    print(f"\n{name} ({mode}, {agents} agents x {frames} frame{'s' if frames > 1 else ''})")
    header = f"  {'stage':<12}{'new ms':>10}"
    if "old" in runs:
        header += f"{other + ' ms':>14}{'new/' + other:>14}"
    print(header)
    for stage in stages:
        new = median("new", stage)
        line = f"  {stage:<12}{new:>10.1f}"
        if "old" in runs:
            old = median("old", stage)
            line += f"{old:>14.1f}{(new / old if old > 0 else float('nan')):>14.2f}"
        print(line)
    if other == "OpenCOOD":
        # the same work: OpenCOOD's side has no decode, so neither does the ratio
        new = float(np.median([r["total"] - r.get("decode", 0.0) for r in runs["new"]]))
        old = float(np.median([r["total"] for r in runs["old"]]))
        target = 0.8 if mode == "train" else 0.6
        print(f"  same work (total without decode): v2xfuse {1e3 * new:.1f} ms, OpenCOOD "
              f"{1e3 * old:.1f} ms, ratio {new / old:.2f} (issue 20 target <= {target}: "
              f"{'PASS' if new / old <= target else 'FAIL'})")


if __name__ == "__main__":
    sys.exit(main())
