"""Bad files users met, one per case: the loader raises one DatasetError naming the file and the
field, ``skip_bad_frames`` drops exactly that frame (no other frame served in its place, none
counted twice, also through DataLoader workers), and tools/check_dataset.py reports the file.

Each case corrupts one file of frame 1 of a tiny generated dataset (3 frames, 1 scene).
"""
import json
import math
import re
import shutil

import numpy as np
import pytest
import yaml
from torch.utils.data import DataLoader

from v2xfuse.datasets import (CoopSampler, DairV2XCAdapter, DatasetError, Opv2vAdapter,
                              PipelineConfig, SkippedSample, V2XSeqAdapter, collate)
from v2xfuse.formats.dair import matrix_to_rt
from v2xfuse.sim import SimConfig, generate_dataset

INNER = {"dair": "cooperative-vehicle-infrastructure", "v2xseq": "V2X-Seq-SPD", "opv2v": ""}
ADAPTERS = {"dair": DairV2XCAdapter, "v2xseq": V2XSeqAdapter, "opv2v": Opv2vAdapter}
BAD = 1  # every case breaks sample 1 of 3: the old skip served sample 2 twice


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    cfg = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 64, "beams": 4},
                               "rsu_lidar": {"azimuth_steps": 64, "beams": 4}, "scene": {"n_cavs": 2}})
    cfg.cameras = False
    out = {}
    for fmt in INNER:
        root = tmp_path_factory.mktemp(fmt)
        generate_dataset(fmt, root, n_scenes=1, n_frames=3, seed=1, cfg=cfg, splits={"train": 1.0},
                         progress=False, workers=1)
        out[fmt] = root
    return out


@pytest.fixture
def copy(generated, tmp_path):
    """``copy(fmt)`` -> the root of a private copy of the generated dataset (the adapter's root)."""
    def make(fmt):
        shutil.copytree(generated[fmt], tmp_path / fmt)
        return tmp_path / fmt / INNER[fmt]
    return make


def _edit_json(path, edit, replace=False):
    """Apply ``edit`` to the parsed file in place (or write what it returns, with ``replace``)."""
    data = json.loads(path.read_text())
    out = edit(data)
    path.write_text(json.dumps(out if replace else data))


def _edit_yaml(path, edit):
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))


def _opv2v_dirs(root):
    scenario = next((root / "train").iterdir())
    agents = sorted((p for p in scenario.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    cavs = [p for p in agents if int(p.name) >= 0]
    key = sorted(p.stem for p in cavs[0].glob("*.yaml"))[BAD]
    return cavs[0], [p for p in agents if p != cavs[0]], key


def _undercount_points(path):
    """Make the header say one point fewer than the file holds."""
    blob = path.read_bytes()
    head, sep, body = blob.partition(b"DATA ")
    n = int(re.search(rb"POINTS (\d+)", head).group(1))
    head = head.replace(b"WIDTH %d\n" % n, b"WIDTH %d\n" % (n - 1)).replace(b"POINTS %d\n" % n, b"POINTS %d\n" % (n - 1))
    path.write_bytes(head + sep + body)


def _rotation(path, edit, nested=None):
    def apply(calib):
        rt = calib[nested] if nested else calib
        rt["rotation"] = edit(np.array(rt["rotation"])).tolist()
    _edit_json(path, apply)


def _add_camera(root, intrinsic):
    """Give infrastructure frame 000001 a camera whose intrinsic file holds ``intrinsic``."""
    from PIL import Image

    side = root / "infrastructure-side"
    rows = json.loads((side / "data_info.json").read_text())
    row = next(r for r in rows if r["pointcloud_path"].endswith("000001.pcd"))
    row.update({"image_path": "image/000001.jpg",
                "calib_camera_intrinsic_path": "calib/camera_intrinsic/000001.json",
                "calib_virtuallidar_to_camera_path": "calib/virtuallidar_to_camera/000001.json"})
    (side / "data_info.json").write_text(json.dumps(rows))
    for rel, obj in ((row["calib_camera_intrinsic_path"], intrinsic),
                     (row["calib_virtuallidar_to_camera_path"], matrix_to_rt(np.eye(4)))):
        (side / rel).parent.mkdir(parents=True, exist_ok=True)
        (side / rel).write_text(json.dumps(obj))
    (side / "image").mkdir(exist_ok=True)
    Image.new("RGB", (8, 4)).save(side / row["image_path"])
    return side / row["calib_camera_intrinsic_path"]


# Each case: (format, corrupt(root) -> (path, field text), adapter keyword arguments).
def _dair_pcd_undercount(root):
    path = root / "infrastructure-side/velodyne/000001.pcd"
    _undercount_points(path)
    return path, "header inconsistent with the data size"


def _pcd_is_a_directory(root):
    path = root / "vehicle-side/velodyne/010001.pcd"
    path.unlink()
    path.mkdir()
    return path, "is a directory"


def _pose_scaled_by_2(root):
    path = root / "infrastructure-side/calib/virtuallidar_to_world/000001.json"
    _rotation(path, lambda r: 2 * r)
    return path, "not orthonormal"


def _pose_sheared(root):
    path = root / "vehicle-side/calib/novatel_to_world/010001.json"
    _rotation(path, lambda r: r @ np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    return path, "not orthonormal"


def _pose_reflected(root):
    path = root / "vehicle-side/calib/lidar_to_novatel/010001.json"
    _rotation(path, lambda r: r @ np.diag([1.0, -1.0, 1.0]), nested="transform")
    return path, "reflection"


def _pose_singular(root):
    path = root / "infrastructure-side/calib/virtuallidar_to_world/000001.json"
    _rotation(path, lambda r: r @ np.diag([1.0, 1.0, 0.0]))
    return path, "singular"


def _label_without_type(root):
    path = root / "cooperative/label_world/010001.json"
    _edit_json(path, lambda labels: labels[0].pop("type"))
    return path, "[0]: missing field 'type'"


def _side_label_without_type(root):
    path = root / "infrastructure-side/label/virtuallidar/000001.json"
    _edit_json(path, lambda labels: labels[0].pop("type"))
    return path, "[0]: missing field 'type'"


def _side_label_is_an_object(root):
    path = root / "vehicle-side/label/lidar/010001.json"
    _edit_json(path, lambda labels: {"labels": labels}, replace=True)
    return path, "expected a JSON array of label objects, got a JSON object"


def _intrinsic_not_an_object(root):
    return _add_camera(root, [[1000, 0, 4], [0, 1000, 2], [0, 0, 1]]), "expected a JSON object with 'cam_K'"


def _relative_error_not_a_number(root):
    path = root / "infrastructure-side/calib/virtuallidar_to_world/000001.json"
    _edit_json(path, lambda c: c.update(relative_error={"delta_x": "abc", "delta_y": 0}))
    return path, "relative_error.delta_x"


def _spd_label_without_type(root):
    path = root / "cooperative/label/000001.json"
    _edit_json(path, lambda labels: labels[0].pop("type"))
    return path, "[0]: missing field 'type'"


def _spd_pose_reflected(root):
    path = root / "infrastructure-side/calib/virtuallidar_to_world/000001.json"
    _rotation(path, lambda r: -r)
    return path, "reflection"


def _opv2v_nan_extent(root):
    ego, _, key = _opv2v_dirs(root)
    path = ego / f"{key}.yaml"
    holder = {}

    def edit(meta):
        holder["vid"] = vid = sorted(meta["vehicles"])[0]
        meta["vehicles"][vid]["extent"][0] = math.nan
    _edit_yaml(path, edit)
    return path, f"vehicles[{holder['vid']}].extent"


def _opv2v_nan_location_of_another_agent(root):
    _, others, key = _opv2v_dirs(root)
    path = others[0] / f"{key}.yaml"
    holder = {}

    def edit(meta):
        holder["vid"] = vid = sorted(meta["vehicles"])[-1]
        meta["vehicles"][vid]["location"][1] = math.nan
    _edit_yaml(path, edit)
    return path, f"vehicles[{holder['vid']}].location"


def _opv2v_ego_speed_fast(root):
    ego, _, key = _opv2v_dirs(root)
    path = ego / f"{key}.yaml"
    _edit_yaml(path, lambda meta: meta.update(ego_speed="fast"))
    return path, "field 'ego_speed' must be a finite number, got 'fast'"


def _opv2v_nan_pose(root):
    ego, _, key = _opv2v_dirs(root)
    path = ego / f"{key}.yaml"
    _edit_yaml(path, lambda meta: meta["lidar_pose"].__setitem__(4, math.nan))
    return path, "'lidar_pose' must be 6 finite numbers"


def _opv2v_ascii_pcd_undercount(root):
    ego, _, key = _opv2v_dirs(root)
    path = ego / f"{key}.pcd"
    _undercount_points(path)
    return path, "more rows than POINTS"


def _opv2v_pcd_is_a_directory(root):
    _, others, key = _opv2v_dirs(root)
    path = others[0] / f"{key}.pcd"
    path.unlink()
    path.mkdir()
    return path, "is a directory"


CASES = {
    "dair binary pcd POINTS too small": ("dair", _dair_pcd_undercount, {}),
    "dair pcd path is a directory": ("dair", _pcd_is_a_directory, {}),
    "dair pose scaled by 2": ("dair", _pose_scaled_by_2, {}),
    "dair pose sheared": ("dair", _pose_sheared, {}),
    "dair pose reflected": ("dair", _pose_reflected, {}),
    "dair singular rotation": ("dair", _pose_singular, {}),
    "dair label without type": ("dair", _label_without_type, {}),
    "dair side label without type": ("dair", _side_label_without_type, {"side_labels": True}),
    "dair side label file is an object": ("dair", _side_label_is_an_object, {"side_labels": True}),
    "dair intrinsic not an object": ("dair", _intrinsic_not_an_object, {"cameras": True}),
    "dair relative_error not a number": ("dair", _relative_error_not_a_number, {"offset_source": "calib"}),
    "v2x-seq label without type": ("v2xseq", _spd_label_without_type, {}),
    "v2x-seq pose reflected": ("v2xseq", _spd_pose_reflected, {}),
    "opv2v NaN extent": ("opv2v", _opv2v_nan_extent, {}),
    "opv2v NaN location in another agent's yaml": ("opv2v", _opv2v_nan_location_of_another_agent, {}),
    "opv2v ego_speed fast": ("opv2v", _opv2v_ego_speed_fast, {}),
    "opv2v NaN lidar_pose": ("opv2v", _opv2v_nan_pose, {}),
    "opv2v ascii pcd POINTS too small": ("opv2v", _opv2v_ascii_pcd_undercount, {}),
    "opv2v pcd path is a directory": ("opv2v", _opv2v_pcd_is_a_directory, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_is_one_named_error_skipped_once_and_reported(case, copy, capsys, train_adapter,
                                                               frame_of, load_tool):
    fmt, corrupt, kw = CASES[case]
    root = copy(fmt)
    good = [frame_of(train_adapter(fmt, root, **kw), i) for i in range(3)]
    path, field = corrupt(root)

    with pytest.raises(DatasetError) as err:
        train_adapter(fmt, root, **kw).load(BAD)
    assert str(path) in str(err.value) and field in str(err.value), str(err.value)

    skipping = train_adapter(fmt, root, skip_bad_frames=True, **kw)
    sampler = CoopSampler(skipping, PipelineConfig(), train=False)
    batch = collate([sampler[i] for i in range(len(sampler))])
    assert [m.frame for m in batch.frames] == [f for i, f in enumerate(good) if i != BAD]
    assert [s.index for s in batch.skipped] == [BAD] and str(path) in batch.skipped[0].reason
    assert list(skipping.bad_frames) == [BAD]

    capsys.readouterr()
    assert load_tool("check_dataset").main(["--format", fmt, "--root", str(root)]) == 1
    out = capsys.readouterr().out
    reported = [line for line in out.splitlines() if line.startswith(str(path))]
    assert reported and field in reported[0], out


def test_skips_in_dataloader_workers_count_each_frame_once(copy):
    root = copy("dair")
    _pcd_is_a_directory(root)
    sampler = CoopSampler(DairV2XCAdapter(root, "train", skip_bad_frames=True), PipelineConfig(), train=False)
    loader = DataLoader(sampler, batch_size=2, num_workers=2, collate_fn=collate)
    served, skipped = [], []
    for batch in loader:
        served += [m.frame for m in batch.frames]
        skipped += [(s.index, "010001.pcd" in s.reason) for s in batch.skipped]
    assert served == ["010000", "010002"] and skipped == [(BAD, True)]


def test_a_batch_of_skipped_samples_is_empty():
    batch = collate([SkippedSample("x", 3, "bad")])
    assert batch.batch_size == 0 and batch.points.shape == (0, 5) and batch.ego_from_agent.shape == (0, 4, 4)
    assert batch.skipped == [SkippedSample("x", 3, "bad")]


def test_stray_errors_become_dataset_errors_naming_the_sample(copy, monkeypatch):
    root = copy("dair")
    adapter = DairV2XCAdapter(root, "train", skip_bad_frames=True)
    monkeypatch.setattr(adapter, "_ground_truth", lambda *a: [][0])
    with pytest.raises(DatasetError, match=r"cooperative/data_info.json: row \d+ .*IndexError"):
        adapter.load(0)
    assert isinstance(CoopSampler(adapter, PipelineConfig(), train=False)[0], SkippedSample)


def test_relative_error_with_empty_strings_reads_as_zero(load_tool, copy, capsys):
    root = copy("dair")
    path = root / "infrastructure-side/calib/virtuallidar_to_world/000001.json"
    _edit_json(path, lambda c: c.update(relative_error={"delta_x": "", "delta_y": ""}))
    calib = DairV2XCAdapter(root, "train", offset_source="calib").load(BAD).agents[1].world_from_lidar
    raw = DairV2XCAdapter(root, "train", offset_source="none").load(BAD).agents[1].world_from_lidar
    np.testing.assert_array_equal(calib, raw)
    assert load_tool("check_dataset").main(["--format", "dair", "--root", str(root), "--quiet"]) == 0
    assert "problems: 0" in capsys.readouterr().out


def test_side_row_without_label_file_gives_that_agent_no_boxes(load_tool, copy, capsys):
    root = copy("dair")
    info = root / "infrastructure-side/data_info.json"
    _edit_json(info, lambda rows: [r.pop("label_lidar_std_path") for r in rows
                                   if r["pointcloud_path"].endswith("000001.pcd")])
    frame = DairV2XCAdapter(root, "train", side_labels=True).load(BAD)
    assert frame.agents[1].boxes is None and frame.ego.boxes is not None and len(frame.gt_boxes)
    assert load_tool("check_dataset").main(["--format", "dair", "--root", str(root), "--quiet"]) == 0
    assert "problems: 0" in capsys.readouterr().out


def test_slightly_non_orthonormal_dair_rotations_still_load(load_tool, copy, capsys):
    """Real DAIR rotations are off by ~1e-3..1e-2; those must keep loading."""
    root = copy("dair")
    path = root / "vehicle-side/calib/novatel_to_world/010001.json"
    _rotation(path, lambda r: r @ np.array([[1.0, 0.01, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.004]]))
    DairV2XCAdapter(root, "train").load(BAD)
    assert load_tool("check_dataset").main(["--format", "dair", "--root", str(root), "--quiet"]) == 0
    capsys.readouterr()


def test_unreadable_side_row_is_dropped_from_the_index_under_skip(copy):
    root = copy("dair")
    info = root / "infrastructure-side/data_info.json"
    _edit_json(info, lambda rows: [r.pop("pointcloud_path") for r in rows
                                   if r["pointcloud_path"].endswith("000001.pcd")])
    with pytest.raises(DatasetError, match=r"infrastructure-side/data_info.json: row \d has no 'pointcloud_path'"):
        DairV2XCAdapter(root, "train")
    adapter = DairV2XCAdapter(root, "train", skip_bad_frames=True)
    assert len(adapter.dropped_rows) == 1
    batch = collate([CoopSampler(adapter, PipelineConfig(), train=False)[i] for i in range(3)])
    assert [m.frame for m in batch.frames] == ["010000", "010002"]
    assert [s.index for s in batch.skipped] == [BAD] and "000001 is not listed" in batch.skipped[0].reason
