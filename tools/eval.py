#!/usr/bin/env python
"""Score detections: AP@0.3/0.5/0.7 plus bytes per frame and latency, written to a results file.

File mode (predictions and ground truth as JSON, see v2xfuse/evaluation/files.py)::

    python tools/eval.py --pred preds.json --gt gt.json                   # OpenCOOD, global sort
    python tools/eval.py --pred preds.json --gt gt.json --order local      # OpenCOOD default
    python tools/eval.py --pred preds.json --gt gt.json --range -140 -40 -3 140 40 1
    python tools/eval.py --pred preds.json --gt gt.json --mode dair --out results.json

``--mode dair`` is the DAIR-V2X official protocol (AP-3D and AP-BEV, ranges overall/0-30/30-50/
50-100 m); its AP is not comparable with OpenCOOD-style AP.
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
    proto = p.add_argument_group("protocol")
    proto.add_argument("--mode", choices=EVAL_MODES, default="opencood")
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
    labels.add_argument("--split", default="")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.pred and args.gt):
        parser.error("give --pred FILE and --gt FILE")
    if args.mode == "dair":
        given = [flag for flag, v in (("--order", args.order), ("--iou", args.iou_type),
                                      ("--range", args.eval_range),
                                      ("--range-rule", args.range_rule)) if v is not None]
        if given:
            parser.error(f"{', '.join(given)}: not used by --mode dair (it fixes its own)")
    try:
        results = score_files(args.pred, args.gt, mode=args.mode, order=args.order,
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
