"""The AP values the per-detection matching loop gave on deterministic frames stay the same."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from v2xfuse.evaluation import DairEvaluator, OpenCOODEvaluator

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("v2xfuse_golden_frames", HERE / "golden_frames.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)
GOLDEN = json.loads((HERE / "golden_ap.json").read_text())


def _same(got: dict[str, float], want: dict[str, float | None]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if value is None:
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12, rel=0), key


def test_opencood_ap_is_unchanged():
    _same(golden.opencood_aps(OpenCOODEvaluator, golden.golden_frames()), GOLDEN["opencood"])


def test_dair_ap_is_unchanged():
    _same(golden.dair_aps(DairEvaluator(), golden.golden_frames()), GOLDEN["dair"])


def test_golden_cases_are_not_trivial():
    values = [v for v in GOLDEN["opencood"].values()] + \
        [v for v in GOLDEN["dair"].values() if v is not None]
    assert sum(0.0 < v < 1.0 for v in values) >= 60
