#!/usr/bin/env python
"""Train a cooperative detector.

    python tools/train.py --config configs/quickstart.yaml
    python tools/train.py --config configs/quickstart.yaml --set model.fusion.type=none \
        --work-dir work_dirs/ego_only
    python tools/train.py --config configs/quickstart.yaml --resume     # continue last.pt
    python tools/train.py --config configs/quickstart.yaml --resume --set train.steps=2400
    torchrun --nproc_per_node 4 tools/train.py --config configs/quickstart.yaml --device cuda

The synthetic dataset a config names is generated on first use. The resolved config is saved
as WORK_DIR/config.yaml, checkpoints as WORK_DIR/last.pt (written atomically every
train.checkpoint_every steps; the one before it is kept as WORK_DIR/prev.pt, to fall back on
should last.pt be damaged), validation results as WORK_DIR/results_val.json (the summary) and
WORK_DIR/eval_val.json (the results records), TensorBoard scalars under WORK_DIR/tb.
The config's eval.mode picks the protocol of the validation: opencood (default; AP@0.3/0.5/0.7)
or dair (DAIR-V2X official: AP-3D and AP-BEV over 0-100, 0-30, 30-50 and 50-100 m).

--resume continues WORK_DIR/last.pt with the config it was trained with: any change under
dataset, pipeline, model or train is refused with the list of changed keys, except train.steps,
which extends the run (the one-cycle LR schedule is rebuilt for the new total and continues at
the current step), and train.num_workers/log_every/checkpoint_every/val_every/val_frames, which
do not change what is trained. Resuming a finished run prints its results without changing them, or
validates its final checkpoint if results_val.json is missing or incomplete.

Under torchrun every process trains with DistributedDataParallel (NCCL with --device cuda, one GPU
per process; gloo on the CPU): train.batch_size is per process, rank 0 writes the files and
prints the results, a resume needs the same number of processes. See README "Training on several
processes".
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from v2xfuse.config import ConfigError, load_config
from v2xfuse.engine.evaluate import dair_summary_key
from v2xfuse.datasets.base import DatasetError
from v2xfuse.engine.distributed import barrier, close_world, init_world
from v2xfuse.engine.trainer import CheckpointError, ResumeError, Trainer
from v2xfuse.sim.target import ForeignDataError
from v2xfuse.evaluation import DAIR_RANGES


def summary_line(results: dict, work_dir) -> str:
    """One line for the end of training, for either eval mode's summary keys."""
    def ap(key):
        v = results.get(key)
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    mode = results.get("eval_mode", "opencood")
    if mode == "dair":
        aps = "  ".join(f"{name} {ap(dair_summary_key('3d', name, 0.5))}/"
                        f"{ap(dair_summary_key('bev', name, 0.5))}" for name in DAIR_RANGES)
        aps = f"AP-3D/AP-BEV@0.5 {aps}"
    else:
        aps = f"AP@0.3 {ap('ap_30')}  AP@0.5 {ap('ap_50')}  AP@0.7 {ap('ap_70')}"
    return (f"method {results.get('method')} [{mode}]: {aps}  "
            f"bytes/frame {results.get('bytes_per_frame') or 0:.0f}  "
            f"({results.get('steps')} steps, {results.get('train_seconds') or 0:.0f} s training; "
            f"{work_dir})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/last.pt")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="under torchrun, cuda means cuda:LOCAL_RANK for each process")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    # torchrun's environment; a plain run is rank 0 of 1. Other ranks log warnings only.
    rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    who = f"rank {rank} " if size > 1 else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {who}%(levelname)s %(message)s")

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: this torch has no usable CUDA device", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    world = init_world(args.device)
    try:
        trainer = Trainer(cfg, work_dir, tensorboard=not args.no_tensorboard,
                          progress=not args.quiet, world=world)
        results = trainer.fit(resume=args.resume)
        # every rank done before any tears the process group down: a rank that left while
        # another still wrote its results was once aborted in teardown (std::terminate, CI)
        barrier(world)
    except (ConfigError, CheckpointError, ResumeError, DatasetError, ForeignDataError) as exc:
        print(f"{who}error: {exc}", file=sys.stderr)
        return 2
    finally:
        close_world(world)
    if world.is_main:
        print(json.dumps(results, indent=2))
        print(summary_line(results, work_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
