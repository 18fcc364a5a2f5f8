#!/usr/bin/env python
"""Generate the embedded synthetic cooperative dataset in OPV2V/V2XSet, DAIR-V2X-C or V2X-Seq SPD format.

    python tools/make_synthetic.py --format opv2v --out data/synthetic/opv2v --scenes 4 --frames 20 --seed 0
    python tools/make_synthetic.py --format dair  --out data/synthetic/dair  --scenes 4 --frames 20 --seed 0
    python tools/make_synthetic.py --format v2xseq --out data/synthetic/v2xseq --scenes 4 --frames 20 --seed 0

Deterministic for a seed. Prints dataset statistics at the end, among them the fraction of
objects near the ego that only a collaborator saw (what cooperation can recover).

--out must be missing or empty, or hold a dataset this tool generated (it carries
v2xfuse_synthetic.json): one generated with the same settings is kept as it is, one with other
settings is replaced. Any other folder is left untouched and the tool stops with an error, so it
can never write into a real OPV2V or DAIR-V2X copy. The data is written into a temporary folder
beside --out and renamed into place when complete: an interrupted run leaves nothing at --out.
Every split with a non-zero fraction gets at least one scene.
"""
from __future__ import annotations

import argparse
import sys

import yaml

from v2xfuse.sim import (FORMATS, ForeignDataError, SimConfig, default_splits, ensure_dataset,
                         split_of_scenes)


def parse_splits(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        name, _, frac = part.partition("=")
        try:
            out[name.strip()] = float(frac)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--splits: expected name=fraction, got {part!r}") from None
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(f"--splits: fractions must sum to 1, got {sum(out.values())}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--out", required=True, help="dataset root to write")
    p.add_argument("--scenes", type=int, default=4)
    p.add_argument("--frames", type=int, default=20, help="10 Hz frames per scene")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", type=parse_splits, default=None,
                   help="scene fractions per split, e.g. train=0.7,validate=0.15,test=0.15")
    p.add_argument("--no-cameras", action="store_true", help="LiDAR only (about 20x faster)")
    p.add_argument("--config", help="YAML file of SimConfig overrides (see v2xfuse/sim/config.py)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None,
                   help="processes writing OPV2V scenes in parallel (default: all CPUs; the output "
                        "does not depend on it)")
    args = p.parse_args(argv)

    overrides = {}
    if args.config:
        with open(args.config) as f:
            overrides = yaml.safe_load(f) or {}
    cfg = SimConfig.from_dict(overrides)
    if args.no_cameras:
        cfg.cameras = False
    splits = args.splits or default_splits(args.format, args.scenes)
    try:
        split_of_scenes(args.scenes, splits)
    except ValueError as e:
        p.error(f"--scenes/--splits: {e}")
    try:
        stats, what = ensure_dataset(args.format, args.out, args.scenes, args.frames, args.seed,
                                     cfg, splits=splits, progress=not args.quiet,
                                     workers=args.workers)
    except ForeignDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if what == "reused":
        print(f"{args.out} already holds this {args.format} dataset (same settings): kept it")
    else:
        print(f"wrote {args.format} dataset to {args.out}"
              + (" (replacing one generated with other settings)" if what == "replaced" else ""))
    print(f"  scenes {stats['scenes']}  frames {stats['frames']}  agents/frame {stats['agents_per_frame']:.1f}"
          f"  agent-frames {stats['agent_frames']}  splits {stats['splits']}")
    print(f"  objects {stats['objects']} (box labels {stats['box_labels']})")
    print(f"  objects within {stats['eval_range_m']} m of the ego seen by some agent: "
          f"{stats['objects_near_ego_seen']}; seen only by a collaborator: "
          f"{100 * stats['collaborator_only_fraction']:.1f}%")
    print(f"  {stats['seconds']:.1f} s, {stats['seconds_per_agent_frame']:.3f} s per agent-frame"
          f" ({stats['workers']} worker{'s' if stats['workers'] > 1 else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
