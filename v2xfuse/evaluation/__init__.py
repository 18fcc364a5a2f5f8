"""Detection evaluation: OpenCOOD/HEAL-style AP, DAIR-V2X official AP, results records, files.

* :class:`OpenCOODEvaluator`: BEV (or 3D) rotated IoU, greedy score-ordered matching, VOC
  all-point AP, "local" (OpenCOOD default) or "global" (HEAL) detection ordering.
* :class:`DairEvaluator`: DAIR-V2X official AP-3D and AP-BEV per distance range.
* :class:`EvalResult`: what every results file records (dataset, split, method, range, sort mode,
  AP@0.3/0.5/0.7, bytes per frame, latency, frames).
* :mod:`v2xfuse.evaluation.files`: prediction and ground-truth JSON files.
"""
from .common import IOU_TYPES, RANGE_RULES, boxes_in_range, pairwise_iou
from .dair import (DAIR_CAR_TYPES, DAIR_IOU_THRESHOLDS, DAIR_RANGES, DAIR_VIEWS, DairEvaluator,
                   dair_ap, dair_match_frame)
from .opencood import (DEFAULT_IOU_THRESHOLDS, SORT_MODES, FrameMatch, OpenCOODEvaluator,
                       average_precision, match_frame, voc_ap)
from .result import EvalResult, results_from_json, results_to_json

__all__ = [
    "IOU_TYPES", "RANGE_RULES", "boxes_in_range", "pairwise_iou",
    "DAIR_CAR_TYPES", "DAIR_IOU_THRESHOLDS", "DAIR_RANGES", "DAIR_VIEWS", "DairEvaluator",
    "dair_ap", "dair_match_frame",
    "DEFAULT_IOU_THRESHOLDS", "SORT_MODES", "FrameMatch", "OpenCOODEvaluator",
    "average_precision", "match_frame", "voc_ap",
    "EvalResult", "results_from_json", "results_to_json",
]
