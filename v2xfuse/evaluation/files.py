"""Prediction and ground-truth JSON files, and scoring one against the other.

Both files hold a JSON list with one entry per frame, boxes in the ego (vehicle LiDAR) frame::

    predictions:  [{"frame_id": "000068", "boxes": [[x, y, z, dx, dy, dz, yaw], ...],
                    "scores": [s, ...],
                    "payload_bytes": 1234, "latency_ms": 41.5}, ...]   # last two optional
    ground truth: [{"frame_id": "000068", "boxes": [[x, y, z, dx, dy, dz, yaw], ...]}, ...]

A frame without boxes has ``"boxes": []`` (and ``"scores": []``). ``frame_id`` is a string or an
integer (compared as its decimal string, so 68 and "68" match but "000068" does not). Frames are
evaluated in ground-truth file order, which is the frame order of the "local" AP sort. Other keys
in an entry are ignored. Every malformed entry raises :class:`EvalFileError` naming the file, the
frame and the field. A file nested deeper than :data:`MAX_JSON_DEPTH` is refused before it is
parsed (the format needs 4 levels; a deep nest would otherwise exhaust the parser's stack).

Reading checks each frame's fields in Python but never each number: all boxes of a file become
one numpy array whose dtype, shape, finiteness and sizes are checked at once. Only when that
check fails (or the file holds ``true``/``false``, which numpy would read as 1 and 0) are the
entries walked value by value, which finds the first bad value and names it.
"""
from __future__ import annotations

import gc
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .common import RANGE_RULES
from .geometry import BOX_DIM
from .dair import DairEvaluator
from .opencood import DEFAULT_IOU_THRESHOLDS, SORT_MODES, OpenCOODEvaluator
from .result import EvalResult

__all__ = [
    "EvalFileError",
    "FrameBoxes",
    "load_predictions",
    "load_ground_truth",
    "write_predictions",
    "write_ground_truth",
    "pair_frames",
    "score_files",
    "EVAL_MODES",
    "MAX_JSON_DEPTH",
]

EVAL_MODES = ("opencood", "dair")
# Arrays and objects inside one another: the format needs 4 ([{"boxes": [[...]]}]); other keys
# of an entry may hold a little more. json's parser recurses per level.
MAX_JSON_DEPTH = 32


class EvalFileError(ValueError):
    """A predictions or ground-truth file that cannot be evaluated."""


@dataclass
class FrameBoxes:
    """One frame of a predictions or ground-truth file.

    Attributes:
        frame_id: the id as a string.
        boxes: (N, 7) float64 [x, y, z, dx, dy, dz, yaw].
        scores: (N,) float64 for predictions, None for ground truth.
        payload_bytes: bytes sent for this frame, if the file says.
        latency_ms: latency of this frame, if the file says.
    """

    frame_id: str
    boxes: np.ndarray
    scores: np.ndarray | None = None
    payload_bytes: float | None = None
    latency_ms: float | None = None


def load_predictions(path: str | os.PathLike) -> dict[str, FrameBoxes]:
    """Read a predictions file: ``{frame_id: FrameBoxes}`` in file order."""
    return _load(path, with_scores=True)


def load_ground_truth(path: str | os.PathLike) -> dict[str, FrameBoxes]:
    """Read a ground-truth file: ``{frame_id: FrameBoxes}`` in file order."""
    return _load(path, with_scores=False)


def write_predictions(path: str | os.PathLike, frames: Iterable[FrameBoxes]) -> None:
    _write(path, frames, with_scores=True)


def write_ground_truth(path: str | os.PathLike, frames: Iterable[FrameBoxes]) -> None:
    _write(path, frames, with_scores=False)


def pair_frames(predictions: dict[str, FrameBoxes], ground_truth: dict[str, FrameBoxes],
                pred_path: str = "predictions", gt_path: str = "ground truth"
                ) -> list[tuple[FrameBoxes, FrameBoxes]]:
    """(prediction, ground truth) per frame, in ground-truth order.

    Raises:
        EvalFileError: a ground-truth frame has no prediction entry, or the other way round.
    """
    _check_same_frames(list(predictions), list(ground_truth), pred_path, gt_path)
    return [(predictions[f], ground_truth[f]) for f in ground_truth]


def _check_same_frames(pred_ids: list[str], gt_ids: list[str], pred_path: str,
                       gt_path: str) -> None:
    in_pred, in_gt = set(pred_ids), set(gt_ids)
    missing = [f for f in gt_ids if f not in in_pred]
    extra = [f for f in pred_ids if f not in in_gt]
    if missing:
        raise EvalFileError(
            f"{pred_path}: missing frame {missing[0]!r} present in {gt_path} ({len(missing)} "
            f"frame(s) missing; give frames without detections as \"boxes\": [], \"scores\": [])")
    if extra:
        raise EvalFileError(f"{pred_path}: frame {extra[0]!r} is not in {gt_path} "
                            f"({len(extra)} such frame(s))")


def score_files(pred_path: str | os.PathLike, gt_path: str | os.PathLike, mode: str = "opencood",
                order: str | None = None, iou_type: str | None = None,
                eval_range: Sequence[float] | None = None, range_rule: str | None = None,
                iou_thresholds: Sequence[float] = DEFAULT_IOU_THRESHOLDS, dataset: str = "",
                split: str = "", method: str = "") -> list[EvalResult]:
    """Evaluate a predictions file against a ground-truth file.

    Args:
        mode: "opencood" (one result) or "dair" (official protocol: one result per view and
            distance range; it fixes its own ordering, views and ranges, so ``order``,
            ``iou_type``, ``eval_range`` and ``range_rule`` must be left None).
        order: "local" or "global" (default) detection ordering; opencood mode.
        iou_type: "bev" (default) or "3d"; opencood mode.
        eval_range: [xmin, ymin, zmin, xmax, ymax, zmax], default None (no filter); opencood mode.
        range_rule: one of :data:`v2xfuse.evaluation.common.RANGE_RULES`, default
            "all_corners_bev" (OpenCOOD's); opencood mode.
        dataset, split, method: labels written into the results.
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r}")
    opencood_options = {"order": order, "iou_type": iou_type, "eval_range": eval_range,
                        "range_rule": range_rule}
    if mode == "dair":
        given = [k for k, v in opencood_options.items() if v is not None]
        if given:
            raise ValueError(f"dair mode fixes its own ordering, IoU views and ranges; "
                             f"{', '.join(given)} apply to opencood mode only")
    order = order or "global"
    if order not in SORT_MODES:
        raise ValueError(f"order must be one of {SORT_MODES}, got {order!r}")
    range_rule = range_rule or "all_corners_bev"
    if range_rule not in RANGE_RULES:
        raise ValueError(f"range_rule must be one of {RANGE_RULES}, got {range_rule!r}")
    pred, gt = _load_table(pred_path, with_scores=True), _load_table(gt_path, with_scores=False)
    _check_same_frames(pred.ids, gt.ids, os.fspath(pred_path), os.fspath(gt_path))
    if pred.ids != gt.ids:
        position = {f: k for k, f in enumerate(pred.ids)}
        pred = pred.take(np.array([position[f] for f in gt.ids], dtype=np.int64))
    if mode == "dair":
        evaluator = DairEvaluator(iou_thresholds=iou_thresholds)
    else:
        evaluator = OpenCOODEvaluator(iou_thresholds=iou_thresholds, iou_type=iou_type or "bev",
                                      eval_range=eval_range, range_rule=range_rule)
    evaluator.add_frames(gt.ids, pred.boxes, pred.scores, pred.counts, gt.boxes, gt.counts,
                         payload_bytes=pred.payload_bytes, latency_ms=pred.latency_ms)
    if mode == "dair":
        return evaluator.results(dataset=dataset, split=split, method=method)
    return [evaluator.result(order, dataset=dataset, split=split, method=method)]


# --- reading and writing -------------------------------------------------------------------------

@dataclass
class _FrameTable:
    """A file's frames as arrays, frames one after another in file order.

    Attributes:
        ids: (F,) frame ids.
        boxes: (N, 7) float64; counts: (F,) boxes per frame.
        scores: (N,) float64, None for ground truth.
        payload_bytes, latency_ms: (F,) each a float or None.
    """

    ids: list[str]
    boxes: np.ndarray
    counts: np.ndarray
    scores: np.ndarray | None
    payload_bytes: list[float | None]
    latency_ms: list[float | None]

    @classmethod
    def from_frames(cls, frames: Iterable[FrameBoxes], with_scores: bool) -> "_FrameTable":
        frames = list(frames)
        return cls(ids=[f.frame_id for f in frames],
                   boxes=np.concatenate([f.boxes for f in frames] + [np.zeros((0, BOX_DIM))]),
                   counts=np.array([len(f.boxes) for f in frames], dtype=np.int64),
                   scores=(np.concatenate([f.scores for f in frames] + [np.zeros(0)])
                           if with_scores else None),
                   payload_bytes=[f.payload_bytes for f in frames],
                   latency_ms=[f.latency_ms for f in frames])

    def frames(self) -> dict[str, FrameBoxes]:
        ends = np.cumsum(self.counts)
        return {fid: FrameBoxes(fid, self.boxes[end - n:end],
                                None if self.scores is None else self.scores[end - n:end],
                                nbytes, ms)
                for fid, n, end, nbytes, ms in zip(self.ids, self.counts, ends,
                                                    self.payload_bytes, self.latency_ms)}

    def take(self, order: np.ndarray) -> "_FrameTable":
        """The frames at ``order`` (F',) in that order."""
        counts = self.counts[order]
        starts = (np.cumsum(self.counts) - self.counts)[order]
        rows = np.arange(int(counts.sum())) + np.repeat(starts - (np.cumsum(counts) - counts),
                                                        counts)
        return _FrameTable(ids=[self.ids[k] for k in order], boxes=self.boxes[rows],
                           counts=counts,
                           scores=None if self.scores is None else self.scores[rows],
                           payload_bytes=[self.payload_bytes[k] for k in order],
                           latency_ms=[self.latency_ms[k] for k in order])


def _load(path: str | os.PathLike, with_scores: bool) -> dict[str, FrameBoxes]:
    return _load_table(path, with_scores).frames()


def _load_table(path: str | os.PathLike, with_scores: bool) -> _FrameTable:
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise EvalFileError(f"{name}: cannot read: {exc.strerror or exc}") from exc
    if json_depth(raw, stop_above=MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise EvalFileError(f"{name}: JSON nested deeper than {MAX_JSON_DEPTH} levels (arrays and "
                            f"objects inside one another); the format needs 4")
    # json builds a list per box and a float per number, none of them in a cycle; with the
    # collector running, its passes over those growing generations cost a quarter of the parse
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _parse_table(raw, name, with_scores)
    finally:
        if collecting:
            gc.enable()


def _parse_table(raw: bytes, name: str, with_scores: bool) -> _FrameTable:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvalFileError(f"{name}: not valid JSON: {exc}") from exc
    except RecursionError as exc:  # a nest within MAX_JSON_DEPTH but past the recursion limit
        raise EvalFileError(f"{name}: JSON nested too deeply to parse") from exc
    if not isinstance(data, list):
        raise EvalFileError(f"{name}: expected a JSON list with one entry per frame, "
                            f"got {type(data).__name__}")
    # numpy reads true and false as 1 and 0: such files are walked value by value (also when
    # the word is only inside a string, which costs time, not correctness)
    if b"true" not in raw and b"false" not in raw:
        table = _parse_arrays(data, with_scores)
        if table is not None:
            return table
    frames: dict[str, FrameBoxes] = {}
    for index, entry in enumerate(data):
        frame = _parse_entry(entry, index, name, with_scores)
        if frame.frame_id in frames:
            raise EvalFileError(f"{name}: frame {frame.frame_id!r} (entry {index}) appears twice")
        frames[frame.frame_id] = frame
    return _FrameTable.from_frames(frames.values(), with_scores)


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def json_depth(raw: bytes, stop_above: int | None = None) -> int:
    """How deep arrays and objects nest in a JSON text, found without parsing it (brackets inside
    strings do not count). Linear time, no recursion, memory bounded per 4 MiB chunk.

    Args:
        stop_above: return as soon as the depth exceeds this (the value returned is then only
            known to be larger).
    """
    if b"\\" in raw:  # an escaped quote does not end its string: let the regex find the strings
        return _depth(_JSON_STRING.sub(b'""', raw), stop_above, strings_end=-1)
    # without escapes a string runs from a quote to the next: a bracket after an odd number of
    # quotes is inside one, unless it follows the last quote (an odd last quote opens no string:
    # the regex leaves it as text)
    return _depth(raw, stop_above, strings_end=raw.rfind(b'"'))


def _depth(text: bytes, stop_above: int | None, strings_end: int) -> int:
    """:func:`json_depth` of a text whose quotes up to ``strings_end`` pair up into strings
    without escapes (-1: no bracket is inside a string, as in a text whose strings are emptied)."""
    depth = deepest = quotes_before = 0
    chunk = 1 << 22
    for start in range(0, len(text), chunk):
        chars = np.frombuffer(text, dtype=np.uint8, count=min(chunk, len(text) - start),
                              offset=start)
        opens = (chars == ord("[")) | (chars == ord("{"))
        where = np.flatnonzero(opens | (chars == ord("]")) | (chars == ord("}")))
        quotes = np.flatnonzero(chars == ord('"'))
        if len(quotes):
            in_string = (np.searchsorted(quotes, where) + quotes_before) % 2 == 1
            where = where[~in_string | (where + start > strings_end)]
            quotes_before += len(quotes)
        if len(where) == 0:
            continue
        running = depth + np.cumsum(np.where(opens[where], 1, -1))
        deepest, depth = max(deepest, int(running.max())), int(running[-1])
        if stop_above is not None and deepest > stop_above:
            break
    return deepest


def _parse_arrays(data: list, with_scores: bool) -> _FrameTable | None:
    """The frames of a parsed file, numbers checked array-wise; None if anything is off (then
    :func:`_parse_entry` walks the entries and names the first bad value).

    Must accept exactly what :func:`_parse_entry` accepts and give the same arrays; the caller
    has made sure the file holds no ``true`` or ``false``.
    """
    ids: list[str] = []
    seen: set[str] = set()
    box_lists, score_lists, extras = [], [], {"payload_bytes": [], "latency_ms": []}
    for entry in data:
        if type(entry) is not dict:
            return None
        fid = entry.get("frame_id", _MISSING)
        boxes = entry.get("boxes", _MISSING)
        if not ((type(fid) is str and fid) or type(fid) is int) or type(boxes) is not list:
            return None
        if with_scores:
            scores = entry.get("scores", _MISSING)
            if type(scores) is not list or len(scores) != len(boxes):
                return None
            score_lists.append(scores)
        for key, values in extras.items():
            value = entry.get(key)
            if value is not None:
                if not _is_number(value) or value < 0:
                    return None
                value = float(value)
            values.append(value)
        fid = str(fid)
        if fid in seen:
            return None
        seen.add(fid)
        ids.append(fid)
        box_lists.append(boxes)
    boxes = _number_array(list(itertools.chain.from_iterable(box_lists)), (BOX_DIM,))
    if boxes is None or (boxes[:, 3:6] < 0).any():
        return None
    scores = None
    if with_scores:
        scores = _number_array(list(itertools.chain.from_iterable(score_lists)), ())
        if scores is None:
            return None
    return _FrameTable(ids=ids, boxes=boxes,
                       counts=np.array([len(b) for b in box_lists], dtype=np.int64),
                       scores=scores, **extras)


def _number_array(values: list, row_shape: tuple[int, ...]) -> np.ndarray | None:
    """``values`` as a finite float64 (len, *row_shape) array, or None when they are not all
    JSON numbers of that shape (numpy makes strings, nulls, nested lists and integers past
    int64 another dtype or an error)."""
    if not values:
        return np.zeros((0, *row_shape))
    try:
        arr = np.array(values)
    except (ValueError, TypeError, OverflowError):
        return None
    if arr.dtype.kind not in "if" or arr.shape[1:] != row_shape:
        return None
    arr = arr.astype(np.float64, copy=False)
    return arr if np.isfinite(arr).all() else None


def _parse_entry(entry, index: int, name: str, with_scores: bool) -> FrameBoxes:
    where = f"{name}: entry {index}"
    if not isinstance(entry, dict):
        raise EvalFileError(f"{where}: expected an object, got {type(entry).__name__}")
    if "frame_id" not in entry:
        raise EvalFileError(f"{where}: missing field 'frame_id'")
    fid = entry["frame_id"]
    if isinstance(fid, bool) or not isinstance(fid, (str, int)) or fid == "":
        raise EvalFileError(f"{where}: 'frame_id' must be a non-empty string or an integer, "
                            f"got {fid!r}")
    fid = str(fid)
    where = f"{name}: frame {fid!r} (entry {index})"
    boxes = _parse_boxes(entry.get("boxes", _MISSING), where)
    scores = None
    if with_scores:
        scores = _parse_numbers(entry.get("scores", _MISSING), where, "scores")
        if len(scores) != len(boxes):
            raise EvalFileError(f"{where}: 'scores' has {len(scores)} values for "
                                f"{len(boxes)} boxes")
    extras = {}
    for key in ("payload_bytes", "latency_ms"):
        value = entry.get(key)
        if value is not None:
            if not _is_number(value) or value < 0:
                raise EvalFileError(f"{where}: '{key}' must be a finite number >= 0, got {value!r}")
            extras[key] = float(value)
    return FrameBoxes(frame_id=fid, boxes=boxes, scores=scores, **extras)


_MISSING = object()


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _parse_numbers(values, where: str, field: str) -> np.ndarray:
    if values is _MISSING:
        raise EvalFileError(f"{where}: missing field '{field}'")
    if not isinstance(values, list):
        raise EvalFileError(f"{where}: '{field}' must be a list, got {type(values).__name__}")
    for k, v in enumerate(values):
        if not _is_number(v):
            raise EvalFileError(f"{where}: {field}[{k}] must be a finite number, got {v!r}")
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _parse_boxes(values, where: str) -> np.ndarray:
    if values is _MISSING:
        raise EvalFileError(f"{where}: missing field 'boxes'")
    if not isinstance(values, list):
        raise EvalFileError(f"{where}: 'boxes' must be a list, got {type(values).__name__}")
    rows = []
    for k, box in enumerate(values):
        if not isinstance(box, list) or len(box) != BOX_DIM:
            size = f"{len(box)} values" if isinstance(box, list) else type(box).__name__
            raise EvalFileError(f"{where}: boxes[{k}] must be {BOX_DIM} numbers "
                                f"[x, y, z, dx, dy, dz, yaw], got {size}")
        for c, v in enumerate(box):
            if not _is_number(v):
                raise EvalFileError(f"{where}: boxes[{k}][{c}] must be a finite number, got {v!r}")
        if min(box[3:6]) < 0:
            raise EvalFileError(f"{where}: boxes[{k}] has a negative size dx, dy or dz: {box}")
        rows.append(box)
    return np.asarray(rows, dtype=np.float64).reshape(-1, BOX_DIM)


def _write(path: str | os.PathLike, frames: Iterable[FrameBoxes], with_scores: bool) -> None:
    out = []
    for frame in frames:
        entry = {"frame_id": frame.frame_id,
                 "boxes": np.asarray(frame.boxes, dtype=np.float64).reshape(-1, BOX_DIM).tolist()}
        if with_scores:
            entry["scores"] = np.asarray(frame.scores, dtype=np.float64).reshape(-1).tolist()
            for key in ("payload_bytes", "latency_ms"):
                if getattr(frame, key) is not None:
                    entry[key] = getattr(frame, key)
        out.append(entry)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, allow_nan=False)
