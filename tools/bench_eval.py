#!/usr/bin/env python
"""Speed of OpenCOOD-style evaluation against OpenCOOD's own loop, on a generated 2000-frame set.

    python tools/bench_eval.py [--frames 2000] [--repeat 5] [--reference-repeat N] [--seed 0]
                                [--keep DIR]

Generates street frames (cars in lanes and parked rows over +-100 m x +-16 m, 0 to 40 per frame;
detections are jittered copies of 90 % of them, some turned by pi, some duplicated, plus strays;
frames without ground truth and frames without detections), writes them as the prediction and
ground-truth JSON files tools/eval.py reads, then times, interleaved, ``--repeat`` rounds of:

1. ``OpenCOODEvaluator``: add every frame, AP in local and in global order (in process, arrays
   in memory);
2. the reference: OpenCOOD's evaluation loop (``opencood/utils/eval_utils.py``, rewritten here
   from reference/opencood-opv2v.md section 4): per frame and per IoU threshold, shapely polygons
   of the boxes' bottom faces, each detection in score order against every unmatched ground-truth
   polygon, greedy TP/FP, then VOC all-point AP in both orders. It is given the corners
   (its input), so converting boxes is not charged to it;
3. ``score_files`` on the two files (reading, validating, evaluating; one sort order);
4. ``python tools/eval.py --pred --gt`` as a subprocess;
5. the floor under (4): ``python -c pass`` and ``python -c "import numpy"``.

Each round runs them in a rotated order; the table shows medians of wall-clock and of CPU
time (user + system: of this process, or of the child for (4) and (5)), and the reference's
median over each. On a shared machine the wall clock measures the load as much as the code; CPU
time moves less. The last line sets (4) against issue 20's target of 0.5 s. Before timing, it
asserts that (1) and the reference give the same AP, to 1e-12, in both orders and at the three
thresholds, and that (3) and (4) agree with (1).
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.3, 0.5, 0.7)
PROCESS_TARGET_S = 0.5  # issue 20: tools/eval.py --pred --gt on these files, as a process


# --- the data ------------------------------------------------------------------------------------

def _street_gt(rng) -> np.ndarray:
    """(M, 7) cars of one frame, about 20 on average: moving in 2 lanes each way and parked
    along both kerbs, bumper to bumper in places."""
    cars = []
    traffic = rng.uniform(0.4, 1.6)  # denser or lighter traffic from frame to frame
    for lane_y, heading in [(y, 0.0) for y in (1.75, 5.25)] + [(y, math.pi) for y in
                                                                 (-1.75, -5.25)]:
        x = -100.0 + rng.exponential(50.0 / traffic)
        while x < 100.0:
            length = rng.uniform(3.8, 5.2)
            cars.append([x, lane_y + rng.normal(0, 0.3), rng.uniform(-1.6, -1.2), length,
                         rng.uniform(1.7, 2.1), rng.uniform(1.4, 1.9),
                         heading + rng.normal(0, 0.04)])
            x += length + 2.0 + rng.exponential(50.0 / traffic)
    for kerb_y in (-13.0, 13.0):
        x = -100.0 + rng.exponential(60.0 / traffic)
        while x < 100.0:
            length = rng.uniform(3.8, 5.0)
            cars.append([x, kerb_y + rng.normal(0, 0.2), -1.4, length, rng.uniform(1.7, 2.0),
                         rng.uniform(1.4, 1.7), rng.choice([0.0, math.pi]) + rng.normal(0, 0.05)])
            x += length + 0.8 + rng.exponential(60.0 / traffic)
    gt = np.array(cars, dtype=np.float64).reshape(-1, 7)
    return gt[rng.permutation(len(gt))[:40]]


def make_frames(n_frames: int, seed: int) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """[(frame_id, det_boxes (N, 7), det_scores (N,), gt_boxes (M, 7))], scores all distinct."""
    rng = np.random.default_rng(seed)
    frames = []
    for f in range(n_frames):
        gt = _street_gt(rng) if rng.random() > 0.04 else np.zeros((0, 7))
        seen = gt[rng.random(len(gt)) < 0.9]
        det = seen.copy()
        det[:, 0:2] += rng.normal(0, 0.25, (len(det), 2))
        det[:, 2] += rng.normal(0, 0.1, len(det))
        det[:, 3:6] *= rng.normal(1.0, 0.05, (len(det), 3))
        det[:, 6] += rng.normal(0, 0.03, len(det)) + math.pi * (rng.random(len(det)) < 0.1)
        dup = det[rng.random(len(det)) < 0.05] + np.r_[rng.normal(0, 0.5, 2), np.zeros(5)]
        stray = np.c_[rng.uniform(-100, 100, (k := rng.poisson(4), 1)),
                      rng.uniform(-16, 16, (k, 1)), np.full((k, 1), -1.4),
                      rng.uniform(3.8, 5.0, (k, 1)), rng.uniform(1.7, 2.0, (k, 1)),
                      np.full((k, 1), 1.5), rng.uniform(-math.pi, math.pi, (k, 1))]
        # continuous scores: OpenCOOD's sort is not stable, so ties would order differently
        scores = 1.0 / (1.0 + np.exp(-np.r_[rng.normal(1.2, 0.8, len(det)),
                                            rng.normal(-1.0, 0.8, len(dup) + len(stray))]))
        det = np.concatenate([det, dup, stray])
        if rng.random() < 0.03:
            det, scores = np.zeros((0, 7)), np.zeros(0)
        frames.append((f"{f:06d}", det, scores, gt))
    every_score = np.concatenate([s for _, _, s, _ in frames])
    assert len(np.unique(every_score)) == len(every_score), "tied scores: draw another seed"
    return frames


def write_files(frames, root: Path, seed: int) -> tuple[Path, Path]:
    from v2xfuse.evaluation.files import FrameBoxes, write_ground_truth, write_predictions

    rng = np.random.default_rng(seed + 1)
    pred, gt = root / "pred.json", root / "gt.json"
    write_predictions(pred, [FrameBoxes(f, d, s, payload_bytes=float(rng.integers(2000, 60000)),
                                        latency_ms=float(rng.uniform(20, 60)))
                             for f, d, s, _ in frames])
    write_ground_truth(gt, [FrameBoxes(f, g) for f, _, _, g in frames])
    return pred, gt


# --- the reference: OpenCOOD's loop --------------------------------------------------------------

def bev_corners(boxes: np.ndarray) -> np.ndarray:
    """(N, 8, 3) corners, first four the bottom face counter-clockwise (OpenCOOD's input)."""
    from v2xfuse.evaluation.geometry import box_corners

    return box_corners(boxes)


def _polygons(corners: np.ndarray) -> list:
    from shapely.geometry import Polygon

    return [Polygon([(c[i, 0], c[i, 1]) for i in range(4)]) for c in corners]


def _reference_tp_fp(det_corners, det_scores, gt_corners, stat: dict, thr: float) -> None:
    """One frame at one threshold, as ``caluclate_tp_fp``."""
    tp, fp = [], []
    if det_corners is not None:
        order = np.argsort(-det_scores)  # OpenCOOD's unstable sort; the scores here are distinct
        det_polygons = _polygons(det_corners)
        gt_polygons = _polygons(gt_corners)
        for i in range(order.shape[0]):
            det = det_polygons[order[i]]
            # IoU as OpenCOOD's compute_iou: shapely areas, stored as float32
            ious = np.array([det.intersection(g).area / det.union(g).area for g in gt_polygons],
                            dtype=np.float32)
            if len(gt_polygons) == 0 or np.max(ious) < thr:
                tp.append(0)
                fp.append(1)
                continue
            tp.append(1)
            fp.append(0)
            gt_polygons.pop(int(np.argmax(ious)))
        stat["score"] += det_scores[order].tolist()
    stat["tp"] += tp
    stat["fp"] += fp
    stat["gt"] += len(gt_corners)


def _reference_ap(stat: dict, global_sort: bool) -> float:
    """``calculate_ap`` + ``voc_ap``, on copies (OpenCOOD's local mode rewrote its lists)."""
    tp, fp = list(stat["tp"]), list(stat["fp"])
    if global_sort:
        order = np.argsort(-np.array(stat["score"]))
        tp, fp = np.array(tp)[order].tolist(), np.array(fp)[order].tolist()
    for flags in (tp, fp):
        running = 0
        for i, v in enumerate(flags):
            running += v
            flags[i] = running
    rec = [float(t) / stat["gt"] for t in tp]
    prec = [float(t) / (f + t) for t, f in zip(tp, fp)]
    mrec, mpre = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def reference_eval(corner_frames) -> dict[str, dict[float, float]]:
    """OpenCOOD's evaluation of [(det_corners or None, det_scores, gt_corners)]."""
    stats = {t: {"tp": [], "fp": [], "score": [], "gt": 0} for t in THRESHOLDS}
    for det, scores, gt in corner_frames:
        for thr in THRESHOLDS:
            _reference_tp_fp(det, scores, gt, stats[thr], thr)
    return {order: {t: _reference_ap(stats[t], order == "global") for t in THRESHOLDS}
            for order in ("local", "global")}


# --- ours ----------------------------------------------------------------------------------------

def ours_eval(frames) -> dict[str, dict[float, float]]:
    from v2xfuse.evaluation import OpenCOODEvaluator

    ev = OpenCOODEvaluator(iou_thresholds=THRESHOLDS)
    for fid, det, scores, gt in frames:
        ev.add(fid, det, scores, gt)
    return {order: ev.compute(order) for order in ("local", "global")}


def score_files_eval(pred: Path, gt: Path) -> dict[str, float]:
    from v2xfuse.evaluation.files import score_files

    (result,) = score_files(pred, gt)
    return result.ap


def _python(*args: str) -> str:
    """stdout of a Python process with this checkout first on its path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          check=True)
    return done.stdout


def tool_eval(pred: Path, gt: Path) -> str:
    return _python(str(ROOT / "tools" / "eval.py"), "--pred", str(pred), "--gt", str(gt))


# --- the run -------------------------------------------------------------------------------------

def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def check_same_ap(ours: dict, ref: dict, scored: dict, tool_out: str) -> None:
    for order in ("local", "global"):
        for t in THRESHOLDS:
            a, b = ours[order][t], ref[order][t]
            assert abs(a - b) <= 1e-12, f"{order} AP@{t}: ours {a!r}, OpenCOOD loop {b!r}"
    for t in THRESHOLDS:
        assert abs(scored[f"{t:g}"] - ours["global"][t]) <= 1e-12, (scored, ours["global"])
        assert f"AP@{t:g} {ours['global'][t]:.4f}" in tool_out, tool_out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=5, help="timed rounds (medians are reported)")
    p.add_argument("--reference-repeat", type=int, default=None,
                   help="rounds that also time OpenCOOD's loop (default: all; it costs about 25 s "
                        "of CPU a round, most of the run on a loaded machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, help="write the JSON files here instead of a temp dir")
    args = p.parse_args(argv)
    ref_rounds = args.repeat if args.reference_repeat is None else args.reference_repeat
    if not 1 <= ref_rounds <= args.repeat:
        p.error(f"--reference-repeat must lie in 1..--repeat ({args.repeat}), got {ref_rounds}")

    frames = make_frames(args.frames, args.seed)
    corner_frames = [(bev_corners(d) if len(d) else None, s, bev_corners(g))
                     for _, d, s, g in frames]
    tmp = None if args.keep else tempfile.TemporaryDirectory()
    root = args.keep or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    pred, gt = write_files(frames, root, args.seed)
    n_det = sum(len(f[1]) for f in frames)
    n_gt = sum(len(f[3]) for f in frames)
    print(f"{args.frames} frames, {n_gt} ground-truth boxes, {n_det} detections; files "
          f"{pred.stat().st_size / 1e6:.1f} + {gt.stat().st_size / 1e6:.1f} MB in {root}")

    ours, ref = ours_eval(frames), reference_eval(corner_frames)
    check_same_ap(ours, ref, score_files_eval(pred, gt), tool_eval(pred, gt))
    print("AP (ours = OpenCOOD loop, to 1e-12): " + "  ".join(
        f"{o} " + "/".join(f"{ours[o][t]:.4f}" for t in THRESHOLDS) for o in ("local", "global")),
          flush=True)

    runs = {
        "OpenCOODEvaluator, in process": lambda: ours_eval(frames),
        "OpenCOOD loop (reference)": lambda: reference_eval(corner_frames),
        "score_files (read + evaluate)": lambda: score_files_eval(pred, gt),
        "tools/eval.py --pred --gt (process)": lambda: tool_eval(pred, gt),
    }
    # what any process pays before reading a file: the interpreter, and numpy on top of it
    floors = {
        "python -c pass": lambda: _python("-c", "pass"),
        "python -c 'import numpy'": lambda: _python("-c", "import numpy"),
    }
    names = list(runs) + list(floors)
    runs.update(floors)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name == "OpenCOOD loop (reference)" and r >= ref_rounds:
                continue
            start, start_cpu = time.perf_counter(), _cpu_seconds()
            runs[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(_cpu_seconds() - start_cpu)
    med_wall = {name: statistics.median(t) for name, t in wall.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    ref = "OpenCOOD loop (reference)"
    print(f"\n{'':<38} {'wall s':>8} {'(min':>7} {'max)':>7} {'ref/this':>9}   "
          f"{'CPU s':>7} {'ref/this':>9}")
    for name in names[:-len(floors)]:
        print(f"{name:<38} {med_wall[name]:>8.3f} {min(wall[name]):>7.3f} {max(wall[name]):>7.3f} "
              f"{med_wall[ref] / med_wall[name]:>8.1f}x   {med_cpu[name]:>7.3f} "
              f"{med_cpu[ref] / med_cpu[name]:>8.1f}x")
    for name in floors:
        print(f"{name:<38} {med_wall[name]:>8.3f} {min(wall[name]):>7.3f} {max(wall[name]):>7.3f} "
              f"{'':>9}   {med_cpu[name]:>7.3f}")
    print(f"medians of {args.repeat} interleaved rounds ({ref_rounds} for the reference); "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    tool, floor = "tools/eval.py --pred --gt (process)", list(floors)[-1]
    print(f"issue 20 target: {tool} under {PROCESS_TARGET_S} s: wall {med_wall[tool]:.3f} s "
          f"({med_wall[tool] / PROCESS_TARGET_S:.2f} of it), CPU {med_cpu[tool]:.3f} s "
          f"({med_cpu[tool] / PROCESS_TARGET_S:.2f} of it); the interpreter and numpy alone "
          f"take {med_cpu[floor]:.3f} s of CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
