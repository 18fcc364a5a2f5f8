"""Scoring files: the array-wise reading accepts and rejects what the value-by-value walk does,
frames may come in any order, and the file path of tools/eval.py never imports torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from v2xfuse.evaluation import OpenCOODEvaluator, files
from v2xfuse.evaluation.files import EvalFileError, FrameBoxes, score_files

ROOT = Path(__file__).resolve().parents[2]
BOX = [0, 0, 0, 4, 2, 1.5, 0]


def _load_both(path: Path, with_scores: bool, monkeypatch):
    """(array-wise result or error, value-by-value result or error)."""
    def run():
        try:
            table = files._load_table(path, with_scores)
        except EvalFileError as exc:
            return "error: " + str(exc)
        return (table.ids, table.boxes.tolist(), table.counts.tolist(),
                None if table.scores is None else table.scores.tolist(), table.payload_bytes,
                table.latency_ms)

    fast = run()
    with monkeypatch.context() as m:
        m.setattr(files, "_parse_arrays", lambda data, with_scores: None)
        slow = run()
    return fast, slow


GOOD = [
    [],
    [{"frame_id": "a", "boxes": [], "scores": []}],
    [{"frame_id": 7, "boxes": [[1, 2, 3, 4, 5, 6, 7]], "scores": [1]},  # integers only
     {"frame_id": "8", "boxes": [BOX, [0.5, -1e3, 2, 0, 0, -0.0, 3.25]], "scores": [0.5, 0],
      "payload_bytes": 10, "latency_ms": None, "extra": {"note": "[x]"}}],
    [{"frame_id": "b", "boxes": [[2 ** 62, 0, 0, 1, 1, 1, 0]], "scores": [1e-300]},
     {"frame_id": "c", "boxes": [[10 ** 30, 0, 0, 1, 1, 1, 0]], "scores": [0.1]}],  # past int64
]
BAD = [
    [{"frame_id": "a", "boxes": [[0, 0, 0, 4, 2, True, 0]], "scores": [0.5]}],
    [{"frame_id": "a", "boxes": [[0, 0, 0, 4, 2, None, 0]], "scores": [0.5]}],
    [{"frame_id": "a", "boxes": [[0, 0, 0, 4, 2, "1.5", 0]], "scores": [0.5]}],
    [{"frame_id": "a", "boxes": [[0, 0, 0, 4, 2, [1.5], 0]], "scores": [0.5]}],
    [{"frame_id": "a", "boxes": [BOX, BOX[:6]], "scores": [0.5, 0.5]}],
    [{"frame_id": "a", "boxes": ["abcdefg"], "scores": [0.5]}],
    [{"frame_id": "a", "boxes": BOX, "scores": [0.5]}],
    [{"frame_id": "a", "boxes": [BOX], "scores": [[0.5]]}],
    [{"frame_id": "a", "boxes": [BOX], "scores": [False]}],
    [{"frame_id": "a", "boxes": [BOX], "scores": [0.5]},
     {"frame_id": "b", "boxes": [[0, 0, 0, -4, 2, 1, 0]], "scores": [0.5]}],
    [{"frame_id": "a", "boxes": [BOX], "scores": [0.5], "latency_ms": -1}],
    [{"frame_id": "a", "boxes": [BOX], "scores": [0.5], "latency_ms": "3"}],
    [{"frame_id": "", "boxes": [], "scores": []}],
    [{"frame_id": 1.5, "boxes": [], "scores": []}],
    [{"frame_id": "1", "boxes": [], "scores": []}, {"frame_id": 1, "boxes": [], "scores": []}],
]


@pytest.mark.parametrize("with_scores", [True, False])
@pytest.mark.parametrize("case", range(len(GOOD) + len(BAD)))
def test_array_wise_reading_is_the_value_walk(case, with_scores, tmp_path, monkeypatch):
    entries = (GOOD + BAD)[case]
    path = tmp_path / "frames.json"
    path.write_text(json.dumps(entries))
    fast, slow = _load_both(path, with_scores, monkeypatch)
    assert fast == slow
    if case < len(GOOD):
        assert not str(fast).startswith("error")
        if case in (1, 2):  # plain numbers: read without the walk
            assert files._parse_arrays(entries, with_scores) is not None
    elif with_scores:
        assert str(fast).startswith("error: " + str(path))


def test_nan_and_a_true_elsewhere(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    path.write_text('[{"frame_id": "a", "boxes": [[0, 0, 0, 4, 2, Infinity, 0]], '
                    '"scores": [0.5]}]')
    fast, slow = _load_both(path, True, monkeypatch)
    assert fast == slow and "boxes[0][5] must be a finite number, got inf" in fast
    path.write_text(json.dumps([{"frame_id": "a", "boxes": [BOX], "scores": [0.5],
                                 "flagged": True}]))  # read value by value, still fine
    assert files.load_predictions(path)["a"].boxes.tolist() == [BOX]


def test_frames_in_another_order_score_the_same(tmp_path, opencood_vectors):
    preds = [FrameBoxes(f, d, s, payload_bytes=10.0 * (i + 1), latency_ms=None if i else 5.0)
             for i, (f, d, s, _) in enumerate(opencood_vectors)]
    gt = [FrameBoxes(f, g) for f, _, _, g in opencood_vectors]
    gt_path = tmp_path / "gt.json"
    files.write_ground_truth(gt_path, gt)
    results = []
    for name, order in (("same", preds), ("reversed", preds[::-1])):
        files.write_predictions(tmp_path / f"{name}.json", order)
        results.append([r.to_dict() for mode in ("opencood", "dair")
                        for r in score_files(tmp_path / f"{name}.json", gt_path, mode=mode)])
    assert results[0] == results[1]
    assert results[0][0]["ap"] == pytest.approx({"0.3": 0.6, "0.5": 0.6, "0.7": 0.3})
    assert results[0][0]["bytes_per_frame"] == 15.0 and results[0][0]["latency_ms"] == 5.0


def test_add_frames_is_a_loop_of_add(opencood_vectors):
    one, many = OpenCOODEvaluator(), OpenCOODEvaluator()
    for f, d, s, g in opencood_vectors:
        one.add(f, d, s, g, payload_bytes=3)
    ids = [f for f, _, _, _ in opencood_vectors]
    many.add_frames(ids, np.concatenate([d for _, d, _, _ in opencood_vectors]),
                    np.concatenate([s for _, _, s, _ in opencood_vectors]),
                    [len(d) for _, d, _, _ in opencood_vectors],
                    np.concatenate([g for _, _, _, g in opencood_vectors]),
                    [len(g) for _, _, _, g in opencood_vectors], payload_bytes=[3, 3])
    assert one.result().to_dict() == many.result().to_dict()
    bad = np.array([BOX, BOX], dtype=np.float64)
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="frame 'y': det_boxes holds non-finite"):
        many.add_frames(["x", "y"], bad, [0.5, 0.5], [1, 1], np.zeros((0, 7)), [0, 0])
    assert many.frames.frame_ids == ["f1", "f2", "x"]  # as a loop of add would leave it
    with pytest.raises(ValueError, match="frame 'x' was already added"):
        many.add_frames(["x"], np.zeros((0, 7)), [], [0], np.zeros((0, 7)), [0])
    with pytest.raises(ValueError, match="counts must be >= 0 and add up"):
        many.add_frames(["z"], bad[:1], [0.5], [2], np.zeros((0, 7)), [0])


def _run_tool(args: list[str], *python_flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, *python_flags, str(ROOT / "tools" / "eval.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_eval_tool_file_path_does_not_import_torch(tmp_path, opencood_vectors):
    pred, gt = tmp_path / "pred.json", tmp_path / "gt.json"
    files.write_predictions(pred, [FrameBoxes(f, d, s) for f, d, s, _ in opencood_vectors])
    files.write_ground_truth(gt, [FrameBoxes(f, g) for f, _, _, g in opencood_vectors])
    for mode in ("opencood", "dair"):
        done = _run_tool(["--pred", str(pred), "--gt", str(gt), "--mode", mode], "-X",
                         "importtime")
        assert done.returncode == 0, done.stderr
        imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
                    if line.startswith("import time:")]
        assert "v2xfuse.evaluation.files" in imported
        assert not [m for m in imported if m == "torch" or m.startswith("torch.")]
    assert "AP@0.3 0.6000" in _run_tool(["--pred", str(pred), "--gt", str(gt)]).stdout


_SCORE_WITHOUT_TORCH = """
import importlib.util, json, sys
from v2xfuse.evaluation.files import score_files
spec = importlib.util.spec_from_file_location("eval_tool", sys.argv[3])
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # tools/eval.py's imports
aps = {mode: [r.ap for r in score_files(sys.argv[1], sys.argv[2], mode=mode)]
       for mode in ("opencood", "dair")}
print(json.dumps({"torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"),
                  "ap": aps["opencood"][0], "dair_rows": len(aps["dair"])}))
"""


def test_file_scoring_leaves_torch_unimported(tmp_path, opencood_vectors):
    """Importing the file-scoring path and scoring both protocols loads no torch module."""
    pred, gt = tmp_path / "pred.json", tmp_path / "gt.json"
    files.write_predictions(pred, [FrameBoxes(f, d, s) for f, d, s, _ in opencood_vectors])
    files.write_ground_truth(gt, [FrameBoxes(f, g) for f, _, _, g in opencood_vectors])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, "-c", _SCORE_WITHOUT_TORCH, str(pred), str(gt),
                           str(ROOT / "tools" / "eval.py")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["torch"] == []
    assert out["ap"]["0.3"] == pytest.approx(0.6) and out["dair_rows"] == 8
