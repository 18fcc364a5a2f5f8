#!/usr/bin/env python
"""Score detections: AP@0.3/0.5/0.7 plus bytes per frame and latency, written to a results file.

File mode (predictions and ground truth as JSON, see v2xfuse/evaluation/files.py)::

    python tools/eval.py --pred preds.json --gt gt.json                   # OpenCOOD, global sort
    python tools/eval.py --pred preds.json --gt gt.json --order local      # OpenCOOD default
    python tools/eval.py --pred preds.json --gt gt.json --range -140 -40 -3 140 40 1
    python tools/eval.py --pred preds.json --gt gt.json --mode dair --out results.json

Checkpoint mode (run a trained model over a split, through the config's simulated channel)::

    python tools/eval.py --checkpoint work_dirs/quickstart/last.pt --split val
    python tools/eval.py --checkpoint last.pt --set channel.loss=0.3 --save-pred preds.json
    python tools/eval.py --checkpoint work_dirs/dair/last.pt --mode dair --out results.json

``--mode dair`` is the DAIR-V2X official protocol (AP-3D and AP-BEV, ranges overall/0-30/30-50/
50-100 m); its AP is not comparable with OpenCOOD-style AP. In checkpoint mode the default is the
config's ``eval.mode`` (opencood when it has none); in file mode, opencood. Every result records
its protocol, bytes per frame and latency.
"""
from __future__ import annotations

import argparse
import sys

from v2xfuse.evaluation import RANGE_RULES, SORT_MODES, EvalResult, results_to_json
from v2xfuse.evaluation.files import EVAL_MODES, EvalFileError, score_files

__all__ = ["build_parser", "main", "score_files", "report"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to score (file mode)")
    src.add_argument("--pred", help="predictions JSON, one entry per frame")
    src.add_argument("--gt", help="ground-truth JSON, one entry per frame")
    ck = p.add_argument_group("what to score (checkpoint mode)")
    ck.add_argument("--checkpoint", help="a last.pt written by tools/train.py")
    ck.add_argument("--config", help="experiment YAML (default: the config saved in the "
                                     "checkpoint; the model section always comes from the "
                                     "checkpoint, change it with --set)")
    ck.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (e.g. channel.loss=0.5, model.fusion.top_k=200)")
    ck.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ck.add_argument("--max-frames", type=int, default=0)
    ck.add_argument("--save-pred", help="also write the predictions and ground truth as JSON "
                                        "(PRED and PRED with .gt.json) for file mode")
    proto = p.add_argument_group("protocol")
    proto.add_argument("--mode", choices=EVAL_MODES, default=None,
                       help="protocol (default: opencood; checkpoint mode: the config's "
                            "eval.mode)")
    proto.add_argument("--order", choices=SORT_MODES, default=None,
                       help="detection ordering for OpenCOOD AP (default: global)")
    proto.add_argument("--iou", dest="iou_type", choices=("bev", "3d"), default=None,
                       help="IoU for OpenCOOD AP (default: bev)")
    proto.add_argument("--range", dest="eval_range", type=float, nargs=6, default=None,
                       metavar=("XMIN", "YMIN", "ZMIN", "XMAX", "YMAX", "ZMAX"),
                       help="evaluate only boxes in this ego-frame region (OpenCOOD mode)")
    proto.add_argument("--range-rule", choices=RANGE_RULES, default=None,
                       help="how a box counts as inside --range (default: all_corners_bev)")
    labels = p.add_argument_group("labels written into the results")
    labels.add_argument("--dataset", default="")
    labels.add_argument("--split", default="", help="(checkpoint mode: the split to run, "
                                                     "default val)")
    labels.add_argument("--method", default="")
    p.add_argument("--out", help="write the results JSON here")
    return p


def report(results: list[EvalResult], out: str | None) -> None:
    """Print one line per result and write the results file if asked."""
    for r in results:
        print(r.summary())
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(results_to_json(results) + "\n")
        print(f"wrote {out}")


def evaluate_checkpoint(args) -> list[EvalResult]:
    """Run the checkpoint's detector over ``args.split`` and score it under ``args.mode`` (the
    config's ``eval.mode`` when None)."""
    import torch

    from v2xfuse.builder import build_dataset
    from v2xfuse.config import ConfigError, load_config
    from v2xfuse.engine.checkpoint import checkpoint_config, detector_from_state, load_checkpoint
    from v2xfuse.engine.evaluate import (build_channel, dair_summary_key, evaluate_detector,
                                         predict_frames)

    state = load_checkpoint(args.checkpoint, args.device)
    cfg = checkpoint_config(state, load_config(args.config) if args.config else None,
                            args.overrides)
    eval_cfg = cfg.setdefault("eval", {})
    if args.mode:
        eval_cfg["mode"] = args.mode
        if args.mode == "dair":  # the config's opencood settings do not apply to this run
            for key in ("order", "iou_type", "range", "range_rule"):
                eval_cfg.pop(key, None)
    elif eval_cfg.get("mode") == "dair":
        given = [flag for flag, v in (("--order", args.order), ("--iou", args.iou_type),
                                      ("--range", args.eval_range),
                                      ("--range-rule", args.range_rule)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: not used by eval.mode dair, the mode of the "
                              f"config (give --mode opencood to score with them)")
    for key, value in (("range_rule", args.range_rule), ("order", args.order),
                       ("iou_type", args.iou_type), ("range", args.eval_range)):
        if value is not None:
            eval_cfg[key] = list(value) if key == "range" else value
    model = detector_from_state(state, cfg, args.device, args.checkpoint)
    split = args.split or "val"
    dataset = build_dataset(cfg, split, train=False)
    results, summary = evaluate_detector(model, dataset, cfg, device=args.device,
                                         max_frames=args.max_frames or None, progress=True,
                                         split=split)
    for result in results:
        result.extra["checkpoint"] = str(args.checkpoint)
        result.extra["step"] = int(state.get("step", -1))
    if args.save_pred:
        from v2xfuse.evaluation.files import FrameBoxes, write_ground_truth, write_predictions

        # a fresh channel of the same seed: the frames, losses and bytes of the pass scored above
        with torch.no_grad():
            frames = list(predict_frames(model, dataset, args.device, args.max_frames or None,
                                         channel=build_channel(cfg)))
        write_predictions(args.save_pred, [FrameBoxes(f, b, s, nbytes, dt * 1e3)
                                           for f, b, s, _, dt, nbytes in frames])
        gt_path = str(args.save_pred).removesuffix(".json") + ".gt.json"
        write_ground_truth(gt_path, [FrameBoxes(f, g) for f, _, _, g, _, _ in frames])
        print(f"wrote {args.save_pred} and {gt_path}")
    if summary["eval_mode"] == "dair":
        aps = (f"AP-3D@0.5 overall {summary[dair_summary_key('3d', 'overall', 0.5)]:.4f}  "
               f"AP-BEV@0.5 overall {summary[dair_summary_key('bev', 'overall', 0.5)]:.4f}")
    else:
        aps = (f"AP@0.3 {summary['ap_30']:.4f}  AP@0.5 {summary['ap_50']:.4f}  "
               f"AP@0.7 {summary['ap_70']:.4f}")
    latency = summary["latency_ms_median"]
    print(f"{summary['method']} [{summary['eval_mode']}]: {aps}  bytes/frame "
          f"{summary['bytes_per_frame']:.0f} (p95 {summary['bytes_per_frame_p95']:.0f})  "
          f"latency {latency if latency is not None else float('nan'):.0f} ms  "
          f"[{summary['sort_mode']} sort, {summary['frames']} frames]")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode == "dair":
        given = [flag for flag, v in (("--order", args.order), ("--iou", args.iou_type),
                                      ("--range", args.eval_range),
                                      ("--range-rule", args.range_rule)) if v is not None]
        if given:
            parser.error(f"{', '.join(given)}: not used by --mode dair (it fixes its own)")
    if args.checkpoint:
        from v2xfuse.config import ConfigError
        from v2xfuse.datasets.base import DatasetError
        from v2xfuse.engine.checkpoint import CheckpointError
        from v2xfuse.sim.target import ForeignDataError

        if args.pred or args.gt:
            parser.error("give either --checkpoint or --pred/--gt, not both")
        try:
            results = evaluate_checkpoint(args)
        except (CheckpointError, ConfigError, DatasetError, ForeignDataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        report(results, args.out)
        return 0
    if not (args.pred and args.gt):
        parser.error("give --pred FILE and --gt FILE, or --checkpoint FILE")
    try:
        results = score_files(args.pred, args.gt, mode=args.mode or "opencood", order=args.order,
                              iou_type=args.iou_type, eval_range=args.eval_range,
                              range_rule=args.range_rule, dataset=args.dataset,
                              split=args.split, method=args.method)
    except EvalFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
