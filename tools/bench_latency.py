#!/usr/bin/env python
"""Per-frame latency of a cooperative detector, split by stage, for 1..N agents.

    python tools/bench_latency.py --config configs/quickstart.yaml --checkpoint last.pt \\
        --agents 1,2,3,4 --frames 20 --device cpu
    python tools/bench_latency.py --config configs/quickstart.yaml \\
        --set model.fusion.type=where2comm --frames 50 --device cuda --out work_dirs/latency

Stages (see ``CoopDetector.forward``/``predict`` and ``BatchChannel``; each excludes the stages
nested in it, so they add up to the frame):

* ``encode``: encoder and backbone of every agent, and what senders compute for their messages
  (confidence maps, late fusion's own detections, the method's selection);
* ``serialise``: payload codecs and message encoding to / decoding from bytes;
* ``channel``: the rest of the simulated link (byte accounting, loss, delay, pose noise);
* ``fuse``: the receiver's fusion; ``head``: detection head and box decoding; ``nms``: rotated NMS;
* ``other``: the remainder of the frame (freeing the frame's tensors, bookkeeping);
  ``total``: the frame.

For ``k`` agents each validation frame keeps its ego and its ``k - 1`` first collaborators
(nearest first); a count no frame reaches is skipped. With fewer frames in the split than
``--warmup + --frames`` the frames are used again in order. The first ``--warmup`` frames of
each count are run and not measured. Medians and 95th percentiles in milliseconds are printed as a table and
written to OUT/latency.csv and OUT/latency.json. On CUDA every stage boundary synchronises the
device. Without ``--checkpoint`` the weights are random (a warning says so): selection-based
methods then send an untypical amount, so use a trained model for numbers worth quoting.

``--camera-encoder`` times the model's camera encoder alone (``model.encoders.camera``, e.g.
lss), in evaluation mode, on k = each ``--agents`` count of vehicles carrying the synthetic
world's four cameras at ``pipeline.cameras.image_size`` (random pixels: the encoder's cost does
not depend on them, and no dataset is read). It prints the median and 95th percentile per call
and the median per agent, on the CPU and on CUDA when a device is available (or on ``--device``
alone), and writes OUT/camera_encoder.json:

    python tools/bench_latency.py --config configs/camera.yaml --camera-encoder --agents 1,2,4
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_latency")

__all__ = ["STAGES", "select_agents", "measure", "measure_camera_encoder", "main"]

STAGES = ["encode", "serialise", "channel", "fuse", "head", "nms"]


def select_agents(sample, count: int):
    """The sample with its ego and its first ``count - 1`` collaborators only."""
    def cut(x):
        return x if x is None else x[:count]

    return dataclasses.replace(
        sample, points=sample.points[:count], ego_from_agent=cut(sample.ego_from_agent),
        agent_ids=list(sample.agent_ids[:count]), agent_kinds=list(sample.agent_kinds[:count]),
        delay_us=cut(sample.delay_us), cameras=sample.cameras[:count],
        true_ego_from_agent=cut(sample.true_ego_from_agent), history=cut(sample.history))


def measure(model, samples: list, cfg: dict, count: int, frames: int, warmup: int,
            device) -> dict:
    """Time ``warmup + frames`` frames with ``count`` agents; per-frame seconds per stage.

    Returns:
        {"agents": count, "agents_actual": mean agents per frame, "bytes_per_frame": mean,
         "seconds": {stage: (frames,) array}} with stages :data:`STAGES`, "other", "total".
    """
    import torch

    from v2xfuse.datasets import collate
    from v2xfuse.engine.evaluate import build_channel
    from v2xfuse.utils.timing import StageTimer

    timer = StageTimer(device)
    channel = build_channel(cfg)
    channel.timer = timer
    cuda = torch.device(device).type == "cuda"
    seconds: dict[str, list[float]] = {s: [] for s in [*STAGES, "other", "total"]}
    agents, sent = [], []
    model.eval()
    with torch.no_grad():
        for i in range(warmup + frames):
            if i and i % len(samples) == 0:  # the same frames again: a link sends once a frame
                channel.channel.reset()
            sample = select_agents(samples[i % len(samples)], count)
            batch = collate([sample]).to(device)
            bytes_before = sum(channel.ledger.bytes_per_frame())
            if cuda:
                torch.cuda.synchronize(device)
            timer.pop()
            start = time.perf_counter()
            model.predict(model(batch, channel=channel, timer=timer), timer=timer)
            if cuda:
                torch.cuda.synchronize(device)
            total = time.perf_counter() - start
            stages = timer.pop()
            if i < warmup:
                continue
            unknown = set(stages) - set(STAGES)
            if unknown:
                raise RuntimeError(f"stages {sorted(unknown)} are not in STAGES")
            for s in STAGES:
                seconds[s].append(stages.get(s, 0.0))
            seconds["other"].append(max(total - sum(stages.values()), 0.0))
            seconds["total"].append(total)
            agents.append(len(sample.points))
            sent.append(sum(channel.ledger.bytes_per_frame()) - bytes_before)
    return {"agents": count, "agents_actual": float(np.mean(agents)),
            "bytes_per_frame": float(np.mean(sent)),
            "seconds": {s: np.asarray(v) for s, v in seconds.items()}}


def camera_encoder_of(model):
    """The model's camera encoder (alone or inside a MultiSensorEncoder), or None."""
    from v2xfuse.models.encoders.fuser import MultiSensorEncoder

    encoder = model.encoder
    if isinstance(encoder, MultiSensorEncoder):
        return encoder.encoders["camera"] if "camera" in encoder.encoders else None
    return encoder if getattr(encoder, "sensor", None) == "camera" else None


def measure_camera_encoder(encoder, image_size, counts: list[int], frames: int, warmup: int,
                           device) -> list[dict]:
    """Milliseconds per call of ``encoder`` on k vehicles with the synthetic world's 4 cameras
    each, for each k in ``counts``: [{"agents", "cameras", "median_ms", "p95_ms",
    "per_agent_ms"}]."""
    import torch

    from v2xfuse.models.inputs import AgentInputs
    from v2xfuse.sim.rigs import rig_cameras

    cuda = torch.device(device).type == "cuda"
    encoder = encoder.to(device).eval()
    out = []
    for count in counts:
        inputs = AgentInputs(count, cameras=rig_cameras(["vehicle"] * count, image_size).to(device))
        seconds = []
        with torch.no_grad():
            for i in range(warmup + frames):
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                encoder(inputs)
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    seconds.append(time.perf_counter() - start)
        median = float(np.median(seconds) * 1e3)
        out.append({"agents": count, "cameras": inputs.cameras.num_cameras, "median_ms": median,
                    "p95_ms": float(np.percentile(seconds, 95) * 1e3),
                    "per_agent_ms": median / count})
    return out


def camera_main(args) -> int:
    """``--camera-encoder``: the camera encoder's latency per agent count, per device."""
    import torch

    from v2xfuse.datasets import PipelineConfig

    devices = [args.device] if args.device else \
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    args.device = "cpu"
    cfg, model, _ = load_model(args)
    encoder = camera_encoder_of(model)
    if encoder is None:
        raise SystemExit("--camera-encoder: the model has no camera encoder (model.encoders.camera)")
    cameras = PipelineConfig.from_dict(cfg.get("pipeline")).cameras
    if cameras is None:
        raise SystemExit("--camera-encoder: the config has no pipeline.cameras.image_size")
    counts = [int(a) for a in args.agents.split(",")]
    report = {"encoder": type(encoder).__name__, "image_size": list(cameras.image_size),
              "torch_threads": torch.get_num_threads(), "frames": args.frames,
              "warmup": args.warmup, "results": {}}
    print(f"camera encoder {report['encoder']}, images {cameras.image_size[0]}x"
          f"{cameras.image_size[1]}, 4 cameras per vehicle, {args.frames} calls after "
          f"{args.warmup} warm-up calls, {torch.get_num_threads()} CPU threads")
    print(f"{'device':<8}{'agents':>7}{'cameras':>9}{'median ms':>11}{'p95 ms':>9}{'ms/agent':>10}")
    for device in devices:
        rows = measure_camera_encoder(encoder, cameras.image_size, counts, args.frames,
                                      args.warmup, device)
        name = device if device == "cpu" else f"{device} ({torch.cuda.get_device_name()})"
        report["results"][name] = rows
        for r in rows:
            print(f"{device:<8}{r['agents']:>7}{r['cameras']:>9}{r['median_ms']:>11.2f}"
                  f"{r['p95_ms']:>9.2f}{r['per_agent_ms']:>10.2f}")
    if "cuda" not in devices:
        print("CUDA: no device available, not measured")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "camera_encoder.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'camera_encoder.json'}")
    return 0


def summarise(measured: dict) -> dict:
    """Milliseconds: median, p95 and mean per stage."""
    return {s: {"median_ms": float(np.median(v) * 1e3), "p95_ms": float(np.percentile(v, 95) * 1e3),
                "mean_ms": float(np.mean(v) * 1e3)} for s, v in measured["seconds"].items()}


def print_table(results: list[dict]) -> None:
    names = [*STAGES, "other", "total"]
    head = f"{'stage':<10}" + "".join(f"{str(r['agents']) + ' agents (med/p95 ms)':>26}"
                                      for r in results)
    print(head)
    print("-" * len(head))
    for s in names:
        print(f"{s:<10}" + "".join(
            f"{r['stages'][s]['median_ms']:>16.2f} / {r['stages'][s]['p95_ms']:>7.2f}"
            for r in results))
    print(f"{'KB/frame':<10}" + "".join(f"{r['bytes_per_frame'] / 1000:>26.1f}" for r in results))


def load_model(args):
    """(config, model on ``args.device``, checkpoint step or None)."""
    import torch

    from v2xfuse.builder import build_detector
    from v2xfuse.config import apply_overrides, load_config
    from v2xfuse.engine.checkpoint import load_detector

    if not args.checkpoint and not args.config:
        raise SystemExit("give --config, --checkpoint or both")
    config = load_config(args.config) if args.config else None
    if args.checkpoint:
        cfg, model, state = load_detector(args.checkpoint, config, args.overrides, args.device)
        return cfg, model, int(state.get("step", -1))
    cfg = apply_overrides(config, args.overrides)
    torch.manual_seed(0)
    log.warning("no --checkpoint: timing randomly initialised weights")
    return cfg, build_detector(cfg).to(args.device), None


def write_outputs(out_dir: Path, meta: dict, results: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latency.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    with open(out_dir / "latency.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "device", "agents", "agents_actual", "stage", "median_ms",
                         "p95_ms", "mean_ms", "frames", "bytes_per_frame"])
        for r in results:
            for s, v in r["stages"].items():
                writer.writerow([meta["method"], meta["device"], r["agents"],
                                 f"{r['agents_actual']:.2f}", s, f"{v['median_ms']:.3f}",
                                 f"{v['p95_ms']:.3f}", f"{v['mean_ms']:.3f}", meta["frames"],
                                 f"{r['bytes_per_frame']:.1f}"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML for data and channel (default: the "
                                    "checkpoint's config); the model section is the checkpoint's")
    p.add_argument("--checkpoint", help="a last.pt written by tools/train.py")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--agents", default="1,2,3,4,5", help="comma-separated agent counts")
    p.add_argument("--frames", type=int, default=20, help="measured frames per agent count")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured frames first")
    p.add_argument("--split", default="val")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cpu (--camera-encoder: cpu, and cuda when available)")
    p.add_argument("--camera-encoder", action="store_true",
                   help="time the model's camera encoder alone, per agent count (see above)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    p.add_argument("--out", default="work_dirs/latency", help="folder for latency.csv/json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_latency: --device cuda but no CUDA device is available; skipped")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.camera_encoder:
        return camera_main(args)
    args.device = args.device or "cpu"
    from v2xfuse.builder import build_dataset

    cfg, model, step = load_model(args)
    dataset = build_dataset(cfg, args.split, train=False)
    if len(dataset) == 0:
        raise SystemExit(f"split {args.split!r} is empty")
    samples = [dataset[i] for i in range(min(len(dataset), args.warmup + args.frames))]
    most = max(len(s.points) for s in samples)
    results = []
    for count in (int(a) for a in args.agents.split(",")):
        if count > most:
            print(f"{count} agents: skipped, no frame has more than {most} (dataset.max_agents "
                  f"{cfg['dataset'].get('max_agents')})")
            continue
        measured = measure(model, samples, cfg, count, args.frames, args.warmup, args.device)
        results.append({"agents": count, "agents_actual": measured["agents_actual"],
                        "bytes_per_frame": measured["bytes_per_frame"],
                        "stages": summarise(measured)})
    meta = {"method": cfg["model"].get("fusion", {}).get("type", "none"),
            "device": str(args.device) + ("" if args.device == "cpu"
                                          else f" ({torch.cuda.get_device_name()})"),
            "torch_threads": torch.get_num_threads(), "checkpoint": args.checkpoint,
            "step": step, "split": args.split, "frames": args.frames, "warmup": args.warmup,
            "stages": [*STAGES, "other", "total"]}
    print(f"method {meta['method']} on {meta['device']}, {args.frames} frames after "
          f"{args.warmup} warm-up frames")
    if results:
        print_table(results)
    write_outputs(Path(args.out), meta, results)
    print(f"wrote {Path(args.out) / 'latency.csv'} and {Path(args.out) / 'latency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
