#!/usr/bin/env python
"""Train a cooperative detector.

    python tools/train.py --config configs/quickstart.yaml
    python tools/train.py --config configs/quickstart.yaml --set model.fusion.type=none \
        --work-dir work_dirs/ego_only
    python tools/train.py --config configs/quickstart.yaml --resume     # continue last.pt

The synthetic dataset a config names is generated on first use. The resolved config is saved
as WORK_DIR/config.yaml, checkpoints as WORK_DIR/last.pt (written atomically every
train.checkpoint_every steps), validation results as WORK_DIR/results_val.json, TensorBoard
scalars under WORK_DIR/tb.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from v2xfuse.config import load_config
from v2xfuse.engine.trainer import Trainer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=200 (repeatable)")
    p.add_argument("--work-dir", help="output folder (default: work_dirs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/last.pt")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: this torch has no usable CUDA device", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    work_dir = Path(args.work_dir or Path("work_dirs") / Path(args.config).stem)
    trainer = Trainer(cfg, work_dir, device=args.device, tensorboard=not args.no_tensorboard,
                      progress=not args.quiet)
    results = trainer.fit(resume=args.resume)
    print(json.dumps(results, indent=2))
    print(f"method {results.get('method')}: AP@0.3 {results.get('ap_30', float('nan')):.4f}  "
          f"AP@0.5 {results.get('ap_50', float('nan')):.4f}  "
          f"AP@0.7 {results.get('ap_70', float('nan')):.4f}  "
          f"bytes/frame {results.get('bytes_per_frame', 0):.0f}  "
          f"({results['steps']} steps, {results['train_seconds']:.0f} s; {work_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
