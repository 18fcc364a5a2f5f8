"""Prediction / ground-truth files, tools/eval.py, and the results record."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from v2xfuse.evaluation import EvalResult, OpenCOODEvaluator, results_from_json
from v2xfuse.evaluation.files import (EvalFileError, FrameBoxes, load_ground_truth,
                                      load_predictions, score_files, write_ground_truth,
                                      write_predictions)

TOOL = Path(__file__).resolve().parents[2] / "tools" / "eval.py"


@pytest.fixture(scope="module")
def eval_tool():
    spec = importlib.util.spec_from_file_location("v2xfuse_tool_eval", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def vector_files(tmp_path, opencood_vectors):
    preds = [FrameBoxes(f, d, s, payload_bytes=100.0 * (i + 1))
             for i, (f, d, s, _) in enumerate(opencood_vectors)]
    gts = [FrameBoxes(f, g) for f, _, _, g in opencood_vectors]
    pred_path, gt_path = tmp_path / "pred.json", tmp_path / "gt.json"
    write_predictions(pred_path, preds)
    write_ground_truth(gt_path, gts)
    return pred_path, gt_path


def test_round_trip_and_score(vector_files, opencood_vectors):
    pred_path, gt_path = vector_files
    preds, gts = load_predictions(pred_path), load_ground_truth(gt_path)
    assert list(gts) == ["f1", "f2"]
    for f, det, scores, gt in opencood_vectors:
        np.testing.assert_array_equal(preds[f].boxes, det)
        np.testing.assert_array_equal(preds[f].scores, scores)
        np.testing.assert_array_equal(gts[f].boxes, gt)
        assert gts[f].scores is None
    (local,) = score_files(pred_path, gt_path, order="local")
    (glob,) = score_files(pred_path, gt_path)
    assert local.sort_mode == "local" and glob.sort_mode == "global"
    assert local.ap_at(0.3) == pytest.approx(1 / 3 + 2 / 9 + 1 / 5)
    assert glob.ap == pytest.approx({"0.3": 0.6, "0.5": 0.6, "0.7": 0.3})
    assert glob.bytes_per_frame == 150.0 and glob.num_frames == 2
    dair = score_files(pred_path, gt_path, mode="dair")
    assert len(dair) == 8 and {r.protocol for r in dair} == {"dair"}
    with pytest.raises(ValueError, match="opencood mode only"):
        score_files(pred_path, gt_path, mode="dair", order="local")


def test_tool_writes_results(eval_tool, vector_files, tmp_path, capsys):
    pred_path, gt_path = vector_files
    out = tmp_path / "results.json"
    rc = eval_tool.main(["--pred", str(pred_path), "--gt", str(gt_path), "--order", "local",
                         "--range", "-50", "-20", "-3", "50", "20", "1", "--dataset", "toy",
                         "--split", "test", "--method", "late", "--out", str(out)])
    assert rc == 0
    assert "AP@0.3 0.7556" in capsys.readouterr().out
    (r,) = results_from_json(out.read_text())
    assert (r.dataset, r.split, r.method, r.sort_mode) == ("toy", "test", "late", "local")
    assert r.range == [-50, -20, -3, 50, 20, 1] and r.range_rule == "all_corners_bev"
    assert r.ap_at(0.7) == pytest.approx(1 / 3 + 2 / 9)
    assert eval_tool.main(["--pred", str(pred_path), "--gt", str(gt_path), "--mode", "dair"]) == 0
    with pytest.raises(SystemExit):
        eval_tool.main(["--pred", str(pred_path), "--gt", str(gt_path), "--mode", "dair",
                        "--iou", "3d"])


def test_tool_reports_malformed_file(eval_tool, vector_files, tmp_path, capsys):
    pred_path, gt_path = vector_files
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"frame_id": "f1", "boxes": [[1, 2, 3]], "scores": [0.5]}]))
    assert eval_tool.main(["--pred", str(bad), "--gt", str(gt_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.json" in err and "'f1'" in err and "boxes[0]" in err


GOOD_BOX = [0, 0, 0, 4, 2, 1.5, 0]


@pytest.mark.parametrize("text, message", [
    ('{"frame_id": "f1"}', "expected a JSON list"),
    ("[{]", "not valid JSON"),
    ('["f1"]', "entry 0: expected an object"),
    ('[{"boxes": [], "scores": []}]', "entry 0: missing field 'frame_id'"),
    ('[{"frame_id": true, "boxes": [], "scores": []}]', "'frame_id' must be"),
    ('[{"frame_id": "f1", "scores": []}]', "frame 'f1' (entry 0): missing field 'boxes'"),
    ('[{"frame_id": "f1", "boxes": []}]', "frame 'f1' (entry 0): missing field 'scores'"),
    ('[{"frame_id": "f1", "boxes": [[0, 0, 0, 4, 2, 1.5]], "scores": [0.5]}]',
     "boxes[0] must be 7 numbers [x, y, z, dx, dy, dz, yaw], got 6 values"),
    ('[{"frame_id": "f1", "boxes": [[0, 0, "z", 4, 2, 1.5, 0]], "scores": [0.5]}]',
     "boxes[0][2] must be a finite number, got 'z'"),
    ('[{"frame_id": "f1", "boxes": [[0, 0, 0, 4, 2, NaN, 0]], "scores": [0.5]}]',
     "boxes[0][5] must be a finite number, got nan"),
    ('[{"frame_id": "f1", "boxes": [[0, 0, 0, 4, -2, 1.5, 0]], "scores": [0.5]}]',
     "boxes[0] has a negative size"),
    ('[{"frame_id": "f1", "boxes": [[0, 0, 0, 4, 2, 1.5, 0]], "scores": [NaN]}]',
     "scores[0] must be a finite number, got nan"),
    ('[{"frame_id": "f1", "boxes": [[0, 0, 0, 4, 2, 1.5, 0]], "scores": [0.5, 0.4]}]',
     "frame 'f1' (entry 0): 'scores' has 2 values for 1 boxes"),
    ('[{"frame_id": "f1", "boxes": [], "scores": [], "payload_bytes": -1}]', "'payload_bytes'"),
    ('[{"frame_id": "f1", "boxes": [], "scores": []}, {"frame_id": "f1", "boxes": [], '
     '"scores": []}]', "frame 'f1' (entry 1) appears twice"),
])
def test_malformed_prediction_files(tmp_path, text, message):
    path = tmp_path / "preds.json"
    path.write_text(text)
    with pytest.raises(EvalFileError) as info:
        load_predictions(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_and_extra_frames(tmp_path):
    gt, pred = tmp_path / "gt.json", tmp_path / "pred.json"
    gt.write_text(json.dumps([{"frame_id": 1, "boxes": [GOOD_BOX]},
                              {"frame_id": "2", "boxes": []}]))
    pred.write_text(json.dumps([{"frame_id": "1", "boxes": [GOOD_BOX], "scores": [0.9]}]))
    with pytest.raises(EvalFileError, match=r"pred\.json: missing frame '2' present in .*gt\.json"):
        score_files(pred, gt)
    pred.write_text(json.dumps([{"frame_id": f, "boxes": [], "scores": []}
                                for f in ("1", 2, "3")]))
    with pytest.raises(EvalFileError, match=r"pred\.json: frame '3' is not in"):
        score_files(pred, gt)
    with pytest.raises(EvalFileError, match="nope.json: cannot read"):
        score_files(tmp_path / "nope.json", gt)


def test_eval_result_json_round_trip():
    ev = OpenCOODEvaluator()
    ev.add(0, [GOOD_BOX], [0.5], [])  # no ground truth: AP is NaN, written as null
    r = ev.result(dataset="opv2v", split="test", method="none")
    r.extra["checkpoint"] = "none"
    data = json.loads(r.to_json())
    assert data["ap"] == {"0.3": None, "0.5": None, "0.7": None}
    for key in ("dataset", "split", "range", "sort_mode", "method", "bytes_per_frame",
                "latency_ms", "num_frames"):
        assert key in data
    back = EvalResult.from_dict(data)
    assert math.isnan(back.ap_at(0.5)) and back.extra == {"checkpoint": "none"}
    with pytest.raises(ValueError, match="unknown EvalResult fields"):
        EvalResult.from_dict({**data, "ap50": 1.0})


def test_deeply_nested_json_is_refused_naming_the_file(tmp_path, eval_tool, vector_files, capsys):
    from v2xfuse.evaluation import files

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(EvalFileError, match=r"deep\.json: JSON nested deeper than 32 levels"):
        load_predictions(deep)
    _, gt_path = vector_files
    assert eval_tool.main(["--pred", str(deep), "--gt", str(gt_path)]) == 2
    assert "deep.json" in capsys.readouterr().err
    # brackets inside strings do not nest; extra keys may nest a little
    fine = tmp_path / "fine.json"
    fine.write_text(json.dumps([{"frame_id": "[[[[" * 50 + '\\"{', "boxes": [GOOD_BOX],
                                 "scores": [0.5], "meta": [[[{"a": [[1]]}]]]}]))
    assert files.json_depth(fine.read_bytes()) == 8
    assert len(load_predictions(fine)) == 1


def test_json_past_the_recursion_limit_is_an_eval_file_error(tmp_path, monkeypatch):
    from v2xfuse.evaluation import files

    monkeypatch.setattr(files, "MAX_JSON_DEPTH", 10**9)  # let it reach json's own limit
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(EvalFileError, match=r"deep\.json: JSON nested too deeply to parse"):
        load_ground_truth(deep)
