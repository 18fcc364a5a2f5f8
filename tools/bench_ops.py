#!/usr/bin/env python
"""Speed of the compiled v2xfuse ops against the pure-PyTorch references and shapely.

    python tools/bench_ops.py [--boxes 2000] [--shapely-rows 50] [--nms-boxes 5000] [--repeat 5]
                              [--device cpu|cuda|all] [--threads N] [--clock wall|cpu]
                              [--only all|lss]

Benchmarks, each on CPU and (when available) CUDA:

* pairwise BEV IoU of N x N random rotated boxes (default 2000 x 2000): compiled op, reference,
  and on CPU shapely -- a Python loop of ``Polygon.intersection(...).area`` and shapely 2's
  vectorised ``shapely.intersection`` -- timed on the first ``--shapely-rows`` rows of A against
  all of B and extrapolated linearly to N x N (polygons are built outside the timing);
* pairwise 3D IoU, N x N (op vs reference);
* rotated NMS of ``--nms-boxes`` crowded proposals (op vs reference; the indices are checked equal);
* bev_pool forward + backward on a lift-splat sized input (op vs reference);
* bev_pool forward + backward at the shapes of the ``lss`` camera encoder of ``--lss-config``
  (default configs/camera.yaml): one training batch of ``--lss-samples`` samples of 3 vehicles
  (4 cameras each) and a roadside unit (1), the synthetic world's rigs fitted to the config's
  image size, the frustum points the encoder keeps and their real cells (op vs reference).

Times are medians of ``--repeat`` runs after one untimed warm-up run; on CUDA each run is
bracketed by ``torch.cuda.synchronize()``. The LSS bev_pool op and reference run interleaved
(op, reference, op, ...), and the last line gives their ratio against issue 20's 4x target.
``--clock cpu`` times the process's CPU time instead of wall time, for a machine that other jobs
keep busy. The box/NMS scene is a 100 m x 100 m area of
car-to-truck sized boxes, so most pairs are far apart, as in a real frame.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from v2xfuse import ops
from v2xfuse.ops import reference
from v2xfuse.structures import boxes_bev_corners

DEFAULT_LSS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "camera.yaml"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: --clock: wall time, or the CPU time of the process (all its threads, user + system), which a
#: busy machine's scheduler does not inflate (wall times then mostly measure the waits)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def timeit(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs, after one untimed warm-up run."""
    return timeit_interleaved([fn], device, repeat)[0]


def timeit_interleaved(fns, device: torch.device, repeat: int) -> list[float]:
    """Median seconds of each fn() over `repeat` rounds that run every fn once in turn (so a
    change of machine load hits all of them alike), after one untimed warm-up round."""
    runs = [[] for _ in fns]
    for round_ in range(repeat + 1):
        for fn, fn_runs in zip(fns, runs):
            _sync(device)
            start = CLOCK()
            fn()
            _sync(device)
            if round_:
                fn_runs.append(CLOCK() - start)
    return [statistics.median(r) for r in runs]


def random_boxes(n: int, seed: int, spread: float = 50.0) -> torch.Tensor:
    """(n, 7) float32 boxes, centres uniform in [-spread, spread]^2, sizes 1-12 m x 1-3 m."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([-spread, -spread, -2.0, 1.0, 1.0, 1.0, -math.pi])
    hi = torch.tensor([spread, spread, 0.0, 12.0, 3.0, 4.0, math.pi])
    return lo + (hi - lo) * torch.rand(n, 7, generator=g)


def crowded_proposals(n: int, seed: int, objects: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """n proposals jittered around `objects` objects, with random scores (a detector's output)."""
    g = torch.Generator().manual_seed(seed)
    centres = random_boxes(objects, seed)
    which = torch.randint(0, objects, (n,), generator=g)
    jitter = torch.randn(n, 7, generator=g) * torch.tensor([0.5, 0.5, 0.1, 0.3, 0.1, 0.1, 0.2])
    return centres[which] + jitter, torch.rand(n, generator=g)


def shapely_loop_iou(a: np.ndarray, b: np.ndarray, rows: int) -> tuple[float, np.ndarray]:
    """Seconds for rows x M IoUs by a Python loop over shapely polygons, and the IoUs."""
    from shapely.geometry import Polygon

    pa = [Polygon(c) for c in boxes_bev_corners(a[:rows].astype(np.float64))]
    pb = [Polygon(c) for c in boxes_bev_corners(b.astype(np.float64))]
    area_a = [p.area for p in pa]
    area_b = [p.area for p in pb]
    out = np.zeros((rows, len(pb)))
    start = time.perf_counter()
    for i, p in enumerate(pa):
        for j, q in enumerate(pb):
            inter = p.intersection(q).area
            union = area_a[i] + area_b[j] - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return time.perf_counter() - start, out


def shapely_vectorised_iou(a: np.ndarray, b: np.ndarray, rows: int) -> tuple[float, np.ndarray]:
    """Seconds for rows x M IoUs by shapely 2's vectorised intersection, one call per row."""
    import shapely

    pa = shapely.polygons(boxes_bev_corners(a[:rows].astype(np.float64)))
    pb = shapely.polygons(boxes_bev_corners(b.astype(np.float64)))
    area_b = shapely.area(pb)
    out = np.zeros((rows, len(pb)))
    start = time.perf_counter()
    for i in range(rows):
        inter = shapely.area(shapely.intersection(pa[i], pb))
        union = shapely.area(pa[i]) + area_b - inter
        out[i] = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return time.perf_counter() - start, out


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, float, str]] = []

    def add(self, bench: str, device: str, impl: str, seconds: float, note: str = "") -> None:
        self.rows.append((bench, device, impl, seconds, note))
        print(f"  {bench:<28} {device:<5} {impl:<26} {seconds * 1e3:11.2f} ms {note}", flush=True)

    def print(self) -> None:
        print()
        print(f"{'benchmark':<28} {'dev':<5} {'implementation':<26} {'median ms':>11} "
              f"{'op speed-up':>11}  note")
        print("-" * 100)
        op_time = {(r[0], r[1]): r[3] for r in self.rows if r[2] == "op (v2xfuse._C)"}
        for bench, device, impl, seconds, note in self.rows:
            base = op_time.get((bench, device))
            speedup = "" if base is None or impl.startswith("op") else f"{seconds / base:10.1f}x"
            print(f"{bench:<28} {device:<5} {impl:<26} {seconds * 1e3:11.2f} {speedup:>11}  {note}")


def bench_device(device: torch.device, args, table: Table) -> None:
    dev = device.type
    n = args.boxes
    a = random_boxes(n, 0).to(device)
    b = random_boxes(n, 1).to(device)
    name = f"IoU BEV {n}x{n}"
    t_op = timeit(lambda: ops.boxes_iou_bev(a, b), device, args.repeat)
    table.add(name, dev, "op (v2xfuse._C)", t_op)
    iou_op = ops.boxes_iou_bev(a, b)
    overlap_frac = (iou_op > 0).double().mean().item()
    iou_ref = reference.boxes_iou_bev(a, b)
    err = (iou_op - iou_ref).abs().max().item()
    table.add(name, dev, "reference (PyTorch)", timeit(lambda: reference.boxes_iou_bev(a, b),
                                                        device, args.repeat),
              f"max |op-ref| {err:.1e}; {overlap_frac:.2%} of pairs overlap")

    if dev == "cpu" and args.shapely_rows > 0:
        rows = min(args.shapely_rows, n)
        an, bn = a.double().numpy(), b.double().numpy()
        scale = (n * n) / (rows * n)
        secs, iou_shp = shapely_loop_iou(an, bn, rows)
        err = np.abs(iou_op[:rows].double().numpy() - iou_shp).max()
        table.add(name, dev, "shapely Python loop", secs * scale,
                  f"timed on {rows}x{n}, x{scale:g} extrapolated; max |op-shapely| {err:.1e}")
        secs, iou_vec = shapely_vectorised_iou(an, bn, rows)
        err = np.abs(iou_op[:rows].double().numpy() - iou_vec).max()
        table.add(name, dev, "shapely 2 vectorised", secs * scale,
                  f"timed on {rows}x{n}, x{scale:g} extrapolated; max |op-shapely| {err:.1e}")

    name = f"IoU 3D {n}x{n}"
    table.add(name, dev, "op (v2xfuse._C)",
              timeit(lambda: ops.boxes_iou_3d(a, b), device, args.repeat))
    table.add(name, dev, "reference (PyTorch)",
              timeit(lambda: reference.boxes_iou_3d(a, b), device, args.repeat))

    boxes, scores = crowded_proposals(args.nms_boxes, 2)
    boxes, scores = boxes.to(device), scores.to(device)
    keep_op = ops.nms_rotated(boxes, scores, 0.5)
    keep_ref = reference.nms_rotated(boxes, scores, 0.5)
    same = torch.equal(keep_op.cpu(), keep_ref.cpu())
    name = f"NMS {args.nms_boxes} boxes @0.5"
    table.add(name, dev, "op (v2xfuse._C)",
              timeit(lambda: ops.nms_rotated(boxes, scores, 0.5), device, args.repeat),
              f"keeps {keep_op.numel()}")
    table.add(name, dev, "reference (PyTorch)",
              timeit(lambda: reference.nms_rotated(boxes, scores, 0.5), device, args.repeat),
              "same indices as op" if same else "INDICES DIFFER FROM OP")

    # Lift-splat: B samples x 6 cameras x D depth bins x (fH x fW) feature pixels, C channels,
    # pooled into a 200 x 200 BEV grid (LSS / BEVFusion sizes).
    bsz, cams, depth, fh, fw, ch, ny, nx = 2, 6, 41, 16, 44, 64, 200, 200
    points = bsz * cams * depth * fh * fw
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(points, ch, generator=g).to(device)
    coords = torch.stack([torch.arange(bsz).repeat_interleave(points // bsz),
                          torch.randint(0, ny, (points,), generator=g),
                          torch.randint(0, nx, (points,), generator=g)], dim=1).int().to(device)
    grad = torch.randn(bsz, ch, ny, nx, generator=g).to(device)

    def fwd_bwd(fn):
        f = feats.detach().requires_grad_(True)
        fn(f, coords, bsz, ny, nx).backward(grad)
        return f.grad

    name = f"bev_pool fwd+bwd {points // 1000}k x {ch}"
    table.add(name, dev, "op (v2xfuse._C)", timeit(lambda: fwd_bwd(ops.bev_pool), device,
                                                    args.repeat), f"grid {bsz}x{ny}x{nx}")
    err = (fwd_bwd(ops.bev_pool) - fwd_bwd(reference.bev_pool)).abs().max().item()
    table.add(name, dev, "reference (PyTorch)",
              timeit(lambda: fwd_bwd(reference.bev_pool), device, args.repeat),
              f"max |grad op-ref| {err:.1e}")

    if args.lss_config:
        bench_lss_pool(device, args, table)


def lss_pool_inputs(config: Path, samples: int, device: torch.device):
    """(features (M, C), coords (M, 3), (weights (M,), values (R, C), rows (M,)), agents, ny, nx,
    note): what the lss camera encoder of
    ``config`` pools for one training batch of ``samples`` samples, each of 3 vehicles and a
    roadside unit with the synthetic world's cameras."""
    from v2xfuse.builder import build_encoder
    from v2xfuse.config import load_config
    from v2xfuse.datasets import PipelineConfig
    from v2xfuse.models.encoders.fuser import MultiSensorEncoder
    from v2xfuse.sim.rigs import rig_cameras

    cfg = load_config(config)
    pipeline = PipelineConfig.from_dict(cfg.get("pipeline"))
    if pipeline.cameras is None:
        raise SystemExit(f"{config}: no pipeline.cameras (image_size) to take the shapes from")
    encoder = build_encoder(cfg["model"], pipeline.lidar_range)
    if isinstance(encoder, MultiSensorEncoder):
        encoder = encoder.encoders["camera"]
    if not hasattr(encoder, "frustum_cells"):
        raise SystemExit(f"{config}: the camera encoder is not lss")
    encoder = encoder.to(device)
    cams = rig_cameras(["vehicle", "vehicle", "vehicle", "infrastructure"] * samples,
                       pipeline.cameras.image_size).to(device)
    cells = encoder.frustum_cells(cams.intrinsics, cams.lidar_from_camera, cams.agent,
                                  pipeline.cameras.image_size)
    h, w = (v // encoder.stride for v in pipeline.cameras.image_size)
    total = cams.num_cameras * encoder.bins.count * h * w
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(len(cells.index), encoder.out_channels, generator=g).to(device)
    # the same points as depth x context (bev_pool_weighted): a weight per point, a context row
    # per image pixel, each point's pixel
    lift = (torch.rand(len(cells.index), generator=g).to(device),
            torch.randn(cams.num_cameras * h * w, encoder.out_channels, generator=g).to(device),
            cells.pixels(encoder.bins.count, h, w))
    agents = 4 * samples
    note = (f"{cams.num_cameras} cameras x {encoder.bins.count} bins x {h}x{w}: kept "
            f"{len(cells.index) / 1000:.0f}k of {total / 1000:.0f}k; grid {agents}x{encoder.grid.ny}"
            f"x{encoder.grid.nx}; {config.name}")
    return feats, cells.coords, lift, agents, encoder.grid.ny, encoder.grid.nx, note


def bench_lss_pool(device: torch.device, args, table: Table) -> None:
    feats, coords, lift, agents, ny, nx, note = lss_pool_inputs(Path(args.lss_config),
                                                                args.lss_samples, device)
    grad = torch.randn(agents, feats.shape[1], ny, nx, generator=torch.Generator().manual_seed(5))
    grad = grad.to(device)

    def fwd_bwd(fn):
        f = feats.detach().requires_grad_(True)
        fn(f, coords, agents, ny, nx).backward(grad)
        return f.grad

    name = f"bev_pool fwd+bwd lss {len(feats) // 1000}kx{feats.shape[1]}"
    t_op, t_ref = timeit_interleaved([lambda: fwd_bwd(ops.bev_pool),
                                      lambda: fwd_bwd(reference.bev_pool)], device, args.repeat)
    out_err = (ops.bev_pool(feats, coords, agents, ny, nx)
               - reference.bev_pool(feats, coords, agents, ny, nx)).abs().max().item()
    err = (fwd_bwd(ops.bev_pool) - fwd_bwd(reference.bev_pool)).abs().max().item()
    table.add(name, device.type, "op (v2xfuse._C)", t_op, note)
    table.add(name, device.type, "reference (PyTorch)", t_ref,
              f"interleaved with the op; max |out op-ref| {out_err:.1e}, |grad op-ref| {err:.1e}")

    # lift and splat: the products depth x context formed, then pooled (the reference) against
    # bev_pool_weighted, which never forms them; gradients of both inputs
    weights, values, rows = lift

    def lift_fwd_bwd(fn):
        w, v = weights.detach().requires_grad_(True), values.detach().requires_grad_(True)
        fn(w, v, rows, coords, agents, ny, nx).backward(grad)
        return w.grad, v.grad

    name = f"lift+splat fwd+bwd lss {len(weights) // 1000}k x {values.shape[1]}"
    t_fused, t_lift_ref = timeit_interleaved([lambda: lift_fwd_bwd(ops.bev_pool_weighted),
                                              lambda: lift_fwd_bwd(reference.bev_pool_weighted)],
                                             device, args.repeat)
    (gw, gv), (rw, rv) = (lift_fwd_bwd(ops.bev_pool_weighted),
                          lift_fwd_bwd(reference.bev_pool_weighted))
    table.add(name, device.type, "op (bev_pool_weighted)", t_fused, "depth x context never stored")
    table.add(name, device.type, "reference (PyTorch)", t_lift_ref,
              f"lift then pool; |grad w| {(gw - rw).abs().max():.1e}, |grad v| "
              f"{(gv - rv).abs().max():.1e}")


def _lss_verdict(speedup: float, device: torch.device) -> str:
    """Issue 20's CPU target for the LSS pooling (4x the PyTorch reference); none on CUDA."""
    if device.type != "cpu":
        return ""
    return f" (issue 20 target >= 4x: {'PASS' if speedup >= 4 else 'FAIL'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--boxes", type=int, default=2000, help="N for the N x N IoU benchmarks")
    parser.add_argument("--shapely-rows", type=int, default=50,
                        help="rows of A timed with shapely (0: skip shapely)")
    parser.add_argument("--nms-boxes", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="what a run's time is: wall, or the process's CPU time (steadier on "
                             "a busy machine)")
    parser.add_argument("--only", choices=("all", "lss"), default="all",
                        help="lss: only the bev_pool benchmark at the lss encoder's shapes")
    parser.add_argument("--lss-config", default=str(DEFAULT_LSS_CONFIG),
                        help="config whose lss camera encoder gives the LSS bev_pool shapes "
                             "('' skips that benchmark)")
    parser.add_argument("--lss-samples", type=int, default=2,
                        help="samples per batch for the LSS shapes (the config's batch_size)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    if not ops.extension_available():
        raise SystemExit("v2xfuse._C is not built: python setup.py build_ext --inplace")

    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available() and ops.extension_with_cuda():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            raise SystemExit("no CUDA device, or v2xfuse._C built without CUDA")
        else:
            print("CUDA: skipped (no CUDA device, or v2xfuse._C built without CUDA)")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {args.clock} clock"
          + (f", {torch.cuda.get_device_name()}" if torch.device("cuda") in devices else "")
          + f"; medians of {args.repeat} runs after a warm-up; float32 boxes")
    table = Table()
    for device in devices:
        if args.only == "lss":
            bench_lss_pool(device, args, table)
        else:
            bench_device(device, args, table)
    table.print()
    loop = [r for r in table.rows if r[2] == "shapely Python loop"]
    if loop:
        op = next(r for r in table.rows if r[0] == loop[0][0] and r[1] == "cpu"
                  and r[2].startswith("op"))
        print(f"\nBEV IoU op vs shapely loop on CPU: {loop[0][3] / op[3]:.0f}x "
              f"(acceptance >= 50x: {'PASS' if loop[0][3] / op[3] >= 50 else 'FAIL'})")
    for device in devices:
        fused = [r for r in table.rows if r[0].startswith("lift+splat fwd+bwd lss")
                 and r[1] == device.type]
        if len(fused) == 2:
            op, ref = sorted(fused, key=lambda r: not r[2].startswith("op"))
            speedup = ref[3] / op[3]
            print(f"lift+splat fwd+bwd at the lss shapes on {device.type} (the camera encoder's "
                  f"pooling): bev_pool_weighted {op[3] * 1e3:.2f} ms, reference "
                  f"{ref[3] * 1e3:.2f} ms, {speedup:.1f}x{_lss_verdict(speedup, device)}")
        lss = [r for r in table.rows if r[0].startswith("bev_pool fwd+bwd lss") and r[1] == device.type]
        if len(lss) == 2:
            op, ref = sorted(lss, key=lambda r: not r[2].startswith("op"))
            speedup = ref[3] / op[3]
            print(f"bev_pool fwd+bwd at the lss shapes on {device.type} (the op alone on lifted "
                  f"rows): op {op[3] * 1e3:.2f} ms, reference {ref[3] * 1e3:.2f} ms, "
                  f"{speedup:.1f}x{_lss_verdict(speedup, device)}")


if __name__ == "__main__":
    main()
