"""The results record every evaluation writes (DESIGN.md, "Evaluation")."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EvalResult", "results_to_json", "results_from_json"]

RESULTS_FORMAT = "v2xfuse-eval/1"


@dataclass
class EvalResult:
    """One AP row: one protocol, one IoU type, one range, several IoU thresholds.

    AP values are fractions in [0, 1] (DAIR-V2X's own tool prints them x100), NaN when the range
    holds no ground truth; JSON writes NaN as ``null``.

    Attributes:
        dataset: e.g. "opv2v", "dair-v2x-c".
        split: e.g. "test", "val".
        method: fusion method or model name.
        protocol: "opencood" or "dair".
        sort_mode: "local" or "global" (OpenCOOD protocol) or "dair" (its own pooled sort).
        iou_type: "bev" or "3d".
        range_name: "all", "overall", "0-30"... a short label of the region.
        range: [xmin, ymin, zmin, xmax, ymax, zmax] in the ego frame, or None (no filter).
        range_rule: how boxes were judged inside ``range`` (see evaluation.common.RANGE_RULES).
        ap: {"0.3": AP, "0.5": AP, "0.7": AP}, keyed by IoU threshold.
        num_frames: frames evaluated.
        num_gt: ground-truth boxes inside the range, summed over frames.
        num_det: detections inside the range, summed over frames.
        bytes_per_frame: mean bytes sent per frame (non-ego senders), None when not measured.
        latency_ms: mean per-frame latency, None when not measured.
        extra: free-form provenance (checkpoint path, config name...), JSON-serialisable.
    """

    dataset: str
    split: str
    method: str
    protocol: str
    sort_mode: str
    iou_type: str
    range_name: str
    range: list[float] | None
    range_rule: str | None
    ap: dict[str, float]
    num_frames: int
    num_gt: int
    num_det: int
    bytes_per_frame: float | None = None
    latency_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def ap_at(self, threshold: float) -> float:
        """AP at one IoU threshold, e.g. ``result.ap_at(0.5)``."""
        return self.ap[f"{threshold:g}"]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["ap"] = {k: _json_float(v) for k, v in self.ap.items()}
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalResult":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown EvalResult fields: {sorted(unknown)}")
        data = dict(data)
        data["ap"] = {k: (math.nan if v is None else float(v)) for k, v in data["ap"].items()}
        return cls(**data)

    def summary(self) -> str:
        """One line for a terminal."""
        aps = "  ".join(f"AP@{k} {_fmt(v)}" for k, v in self.ap.items())
        rng = "none" if self.range is None else f"{self.range_name} {self.range}"
        line = (f"[{self.protocol} {self.iou_type} sort={self.sort_mode} range={rng}] {aps}  "
                f"frames {self.num_frames}  gt {self.num_gt}  det {self.num_det}")
        if self.bytes_per_frame is not None:
            line += f"  bytes/frame {self.bytes_per_frame:.1f}"
        if self.latency_ms is not None:
            line += f"  latency {self.latency_ms:.2f} ms"
        return line


def results_to_json(results: list[EvalResult], indent: int | None = 2) -> str:
    """A results file: ``{"format": "v2xfuse-eval/1", "results": [EvalResult, ...]}``."""
    return json.dumps({"format": RESULTS_FORMAT, "results": [r.to_dict() for r in results]},
                      indent=indent, allow_nan=False)


def results_from_json(text: str) -> list[EvalResult]:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ValueError(f"not a {RESULTS_FORMAT} results file")
    return [EvalResult.from_dict(r) for r in data["results"]]


def _json_float(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.4f}"
