"""DAIR-V2X-C adapter: against the synthetic generator's truth, and on hand-written fixtures in
the real field spellings (string numbers, "" offsets, doc key spellings, duplicate vehicle rows)."""
import json
import logging
import math
import shutil

import numpy as np
import pytest

from v2xfuse.datasets import CoopSampler, DairV2XCAdapter, PipelineConfig, collate
from v2xfuse.datasets.base import DatasetError
from v2xfuse.formats.dair import DAIR_CORNER_ORDER, matrix_to_rt
from v2xfuse.io.pcd import write_pcd, write_points_dair
from v2xfuse.registry import DATASETS
from v2xfuse.sim import SimConfig, generate_dataset
from v2xfuse.sim.write_dair import WORLD_SHIFT
from v2xfuse.structures import box_corners, invert_transform, transform_boxes, wrap_angle
from v2xfuse.structures.transforms import make_transform, rotation_from_rpy

TOL = 1e-3


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("dair")
    cfg = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 256, "beams": 8},
                               "rsu_lidar": {"azimuth_steps": 256, "beams": 8}})
    cfg.cameras = False
    _, kept = generate_dataset("dair", out, n_scenes=1, n_frames=4, seed=4, cfg=cfg,
                               splits={"train": 1.0}, progress=False, keep_frames=True)
    return out, kept[0][1]


def assert_boxes_close(actual, expected):
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual[:, :6], expected[:, :6], atol=TOL)
    np.testing.assert_allclose(wrap_angle(actual[:, 6] - expected[:, 6]), 0.0, atol=TOL)


def test_ground_truth_poses_and_offsets_match_the_generator(generated):
    out, frames = generated
    adapter = DairV2XCAdapter(out, "train")
    assert DATASETS.get("dair_v2x_c") is DairV2XCAdapter
    assert len(adapter) == len(frames)
    nonzero = 0
    for idx, (sim, info) in enumerate(frames):
        frame = adapter.load(idx)
        veh, inf = sim.agents
        assert frame.frame_id == info["vehicle_id"] and frame.ego_id == "vehicle"
        assert [a.kind for a in frame.agents] == ["vehicle", "infrastructure"]
        # lidar -> novatel -> world, and virtuallidar -> world + system_error_offset
        np.testing.assert_allclose(frame.ego.world_from_lidar, WORLD_SHIFT @ veh.world_from_lidar, atol=1e-6)
        np.testing.assert_allclose(frame.agents[1].world_from_lidar, WORLD_SHIFT @ inf.world_from_lidar,
                                   atol=1e-6)
        np.testing.assert_allclose(frame.ego_from_agent("infrastructure"),
                                   invert_transform(veh.world_from_lidar) @ inf.world_from_lidar, atol=1e-6)
        assert frame.ego.timestamp_us == veh.timestamp_us and frame.agents[1].timestamp_us == inf.timestamp_us
        np.testing.assert_allclose(frame.agents[1].points[:, :3], inf.points[:, :3], atol=1e-4)
        np.testing.assert_allclose(frame.agents[1].points[:, 3], inf.points[:, 3], atol=1e-5)
        seen = veh.seen_ids() | inf.seen_ids()
        truth = np.stack([b for i, b in zip(veh.object_ids, veh.object_boxes) if int(i) in seen])
        assert_boxes_close(frame.gt_boxes, transform_boxes(invert_transform(veh.world_from_lidar), truth))
        assert set(frame.gt_classes) == {"car"}
        off = info["system_error_offset"]
        if (off["delta_x"], off["delta_y"]) != (0, 0):
            nonzero += 1
            # without the offset the roadside pose is wrong by exactly (dx, dy) in the world frame
            raw = DairV2XCAdapter(out, "train", offset_source="none").load(idx).agents[1].world_from_lidar
            np.testing.assert_allclose(frame.agents[1].world_from_lidar[:2, 3] - raw[:2, 3],
                                       [off["delta_x"], off["delta_y"]], atol=1e-9)
            calib = DairV2XCAdapter(out, "train", offset_source="calib").load(idx).agents[1]
            np.testing.assert_allclose(calib.world_from_lidar, frame.agents[1].world_from_lidar, atol=1e-9)
    assert nonzero > 0, "the generated data must exercise a non-zero system_error_offset"


def test_async_infrastructure_frames_come_from_the_same_batch(generated):
    out, frames = generated
    adapter = DairV2XCAdapter(out, "train")
    last = len(frames) - 1
    for k in (1, 2):
        frame = adapter.load(last, {"infrastructure": k})
        assert frame.agents[1].timestamp_us == frames[last - k][0].agents[1].timestamp_us
        np.testing.assert_allclose(frame.agents[1].points[:, :3], frames[last - k][0].agents[1].points[:, :3],
                                   atol=1e-4)
        assert frame.ego.timestamp_us == frames[last][0].agents[0].timestamp_us
    # the first frame has no predecessor: the earliest frame of the batch is served
    assert adapter.load(0, {"infrastructure": 3}).agents[1].timestamp_us == frames[0][0].agents[1].timestamp_us
    sampler = CoopSampler(adapter, PipelineConfig(delay_frames=2), train=False)
    sample = sampler[last]
    delay = (frames[last][0].agents[0].timestamp_us - frames[last - 2][0].agents[1].timestamp_us) / 1e6
    np.testing.assert_array_equal(sample.delay_us, [0, round(delay * 1e6)])
    batch = collate([sample, sampler[0]])
    assert batch.record_len.tolist() == [2, 2] and batch.agent_kind.tolist() == [0, 1, 0, 1]


def test_split_file_selects_cooperative_split(generated, tmp_path):
    out, frames = generated
    split = json.loads((out / "cooperative-split-data.json").read_text())
    split["cooperative_split"]["val"] = [frames[1][1]["vehicle_id"]]
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    adapter = DairV2XCAdapter(out / "cooperative-vehicle-infrastructure", "val", split_file=path)
    assert [f for f, _ in adapter.sample_keys()] == [frames[1][1]["vehicle_id"]]
    assert len(DairV2XCAdapter(out, "all")) == len(frames)
    with pytest.raises(DatasetError, match="no split 'nope'"):
        DairV2XCAdapter(out, "nope")


# ---- hand-written fixtures in the real spellings -------------------------------------------
VEH_WORLD = make_transform(rotation_from_rpy(0.01, -0.02, 0.7), (2636.19, 1745.02, 21.4))
NOV_FROM_LIDAR = make_transform(rotation_from_rpy(0.0, 0.0, math.pi / 2), (0.1, 0.9, 1.2))
INF_WORLD = make_transform(rotation_from_rpy(0.0, 0.0, -1.2), (2660.0, 1760.0, 26.0))
OFFSET = {"delta_x": 0.66, "delta_y": -1.1}
BOX_VEH = np.array([[12.0, -3.0, -0.8, 4.4, 1.8, 1.5, 0.3],
                    [25.0, 4.0, -0.6, 10.0, 2.5, 3.2, -1.0]])


def _world_8_points(box_lidar):
    local = box_corners(box_lidar[None])[0]
    corners = local @ VEH_WORLD[:3, :3].T + VEH_WORLD[:3, 3]
    return [[str(v) for v in p] for p in corners[DAIR_CORNER_ORDER]]  # numbers as strings


def _write_fixture(root, offset=OFFSET, flat_translation=False):
    """Two infra frames (ids 000020, 000021) and vehicle 015376 paired with both (a duplicate)."""
    v, i = root / "vehicle-side", root / "infrastructure-side"
    rng = np.random.default_rng(0)
    for side, fid in ((v, "015376"), (i, "000020"), (i, "000021")):
        (side / "velodyne").mkdir(parents=True, exist_ok=True)
        write_points_dair(side / "velodyne" / f"{fid}.pcd", rng.normal(size=(50, 3)) * 10,
                          rng.uniform(0, 255, 50))
    n2w = VEH_WORLD @ invert_transform(NOV_FROM_LIDAR)
    files = {
        v / "calib/lidar_to_novatel/015376.json": {"transform": matrix_to_rt(NOV_FROM_LIDAR)},
        v / "calib/novatel_to_world/015376.json": matrix_to_rt(n2w),
        v / "data_info.json": [{
            "image_path": "image/015376.jpg", "image_timestamp": "1626165671102639",
            "pointcloud_path": "velodyne/015376.pcd", "pointcloud_timestamp": "1626165671100000",
            "calib_novatel_to_world_path": "calib/novatel_to_world/015376.json",
            "calib_lidar_to_novatel_path": "calib/lidar_to_novatel/015376.json",
            "label_lidar_path": "label/lidar/015376.json",  # the docs' spelling
            "batch_id": "122", "batch_start_id": "015376", "batch_end_id": "015376",
            "intersection_loc": ""}],
        v / "label/lidar/015376.json": [],
        root / "cooperative/label_world/015376.json": [
            {"type": "Car", "occluded_state": 0, "truncated_state": 0, "world_8_points": _world_8_points(BOX_VEH[0]),
             "3d_location": {"x": "0", "y": "0", "z": "0"}, "rotation": "0.01"},
            {"type": "Bus", "world_8_points": _world_8_points(BOX_VEH[1])},
            {"type": "Pedestrian", "world_8_points": _world_8_points(BOX_VEH[0])},
            {"type": "Van", "world_8_points": [[2600.0, 1700.0, 20.0]] * 8},  # zero size: dropped
        ],
        root / "cooperative/data_info.json": [
            {"infrastructure_image_path": "infrastructure-side/image/000020.jpg",
             "infrastructure_pointcloud_path": "infrastructure-side/velodyne/000020.pcd",
             "vehicle_image_path": "vehicle-side/image/015376.jpg",
             "vehicle_pointcloud_path": "vehicle-side/velodyne/015376.pcd",
             "cooperative_label_path": "cooperative/label_world/015376.json",
             "system_error_offset": {k: str(x) for k, x in offset.items()} if offset else ""},
            {"infrastructure_image_path": "infrastructure-side/image/000021.jpg",
             "infrastructure_pointcloud_path": "infrastructure-side/velodyne/000021.pcd",
             "vehicle_image_path": "vehicle-side/image/015376.jpg",
             "vehicle_pointcloud_path": "vehicle-side/velodyne/015376.pcd",
             "cooperative_label_path": "cooperative/label_world/015376.json",
             "system_error_offset": ""}],
        root.parent / "cooperative-split-data.json": {
            "batch_split": {"train": ["122"], "val": [], "test": []},
            "cooperative_split": {"train": ["015376"], "val": [], "test": []}},
    }
    irows = []
    for fid, ts in (("000020", "1626165671062309"), ("000021", "1626165671162309")):
        rt = matrix_to_rt(INF_WORLD)
        if flat_translation:
            rt["translation"] = [t[0] for t in rt["translation"]]
        rt["relative_error"] = ""
        files[i / f"calib/virtuallidar_to_world/{fid}.json"] = rt
        irows.append({"pointcloud_path": f"velodyne/{fid}.pcd", "pointcloud_timestamp": ts,
                      "calib_virtuallidar_to_world_path": f"calib/virtuallidar_to_world/{fid}.json",
                      "label_lidar_std_path": f"label/virtuallidar/{fid}.json", "batch_id": "122",
                      "valid_batch_splits": [{"batch_start_id": "000020", "batch_end_id": "000021"}]})
        files[i / f"label/virtuallidar/{fid}.json"] = [
            {"type": "Car", "3d_dimensions": {"h": "1.5", "w": "1.8", "l": "4.4"},
             "3d_location": {"x": "5.0", "y": "-2.5", "z": "-1.0"}, "rotation": "1.66"},
            {"type": "Cyclist", "3d_dimensions": {"h": "1.7", "w": "0.7", "l": "1.6"},
             "3d_location": {"x": "1", "y": "2", "z": "-1"}, "rotation": "0"}]
    files[i / "data_info.json"] = irows[::-1]  # order comes from the timestamps, not the file
    for path, obj in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj))
    return root


@pytest.fixture
def fixture_root(tmp_path):
    return _write_fixture(tmp_path / "cooperative-vehicle-infrastructure")


def test_handwritten_fixture_real_spellings(fixture_root, tmp_path):
    adapter = DairV2XCAdapter(fixture_root, "train", side_labels=True)
    assert adapter.sample_keys() == [("015376", "000020"), ("015376", "000021")]  # duplicates kept
    frame = adapter.load(0)
    np.testing.assert_allclose(frame.ego.world_from_lidar, VEH_WORLD, atol=1e-9)
    expected_inf = INF_WORLD.copy()
    expected_inf[:2, 3] += [OFFSET["delta_x"], OFFSET["delta_y"]]
    np.testing.assert_allclose(frame.agents[1].world_from_lidar, expected_inf, atol=1e-9)
    assert_boxes_close(frame.gt_boxes, BOX_VEH)  # Pedestrian and the zero-size Van are dropped
    assert frame.sequence_id == "122" and frame.ego.timestamp_us == 1626165671100000
    assert frame.agents[1].boxes.shape == (1, 7) and frame.ego.boxes.shape == (0, 7)
    np.testing.assert_allclose(frame.agents[1].boxes[0], [5.0, -2.5, -1.0, 4.4, 1.8, 1.5, 1.66])
    assert frame.agents[1].points[:, 3].max() <= 1.0
    # the second row has an "" offset
    np.testing.assert_allclose(adapter.load(1).agents[1].world_from_lidar, INF_WORLD, atol=1e-9)
    # asynchrony: row 1's infra frame 000021 delayed by one -> 000020 (100 ms earlier)
    late = adapter.load(1, {"infrastructure": 1})
    assert late.agents[1].timestamp_us == 1626165671062309
    assert [k for k in DairV2XCAdapter(fixture_root, "train", duplicates="first").sample_keys()] == \
        [("015376", "000020")]
    assert DairV2XCAdapter(fixture_root, "train", duplicates="last").sample_keys() == [("015376", "000021")]
    # a flat [x, y, z] translation and an empty-string offset everywhere
    flat = _write_fixture(tmp_path / "flat" / "cooperative-vehicle-infrastructure", offset=None,
                          flat_translation=True)
    np.testing.assert_allclose(DairV2XCAdapter(flat.parent, "train").load(0).agents[1].world_from_lidar,
                               INF_WORLD, atol=1e-9)


def _break(root, what):
    i = root / "infrastructure-side"
    if what == "missing pcd":
        target = i / "velodyne/000020.pcd"
        target.unlink()
        return target.name, "missing"
    if what == "truncated pcd":
        target = i / "velodyne/000020.pcd"
        target.write_bytes(target.read_bytes()[:60])
        return target.name, ""
    if what == "malformed json":
        target = root / "cooperative/label_world/015376.json"
        target.write_text('[{"type": "Car", "world_8_points": [[1, 2')
        return target.name, "malformed JSON"
    if what == "missing calib":
        target = i / "calib/virtuallidar_to_world/000020.json"
        target.unlink()
        return target.name, "calib_virtuallidar_to_world_path"
    if what == "calib field":
        target = root / "vehicle-side/calib/novatel_to_world/015376.json"
        target.write_text(json.dumps({"rotation": np.eye(3).tolist()}))
        return target.name, "translation"
    if what == "nan points":
        target = i / "velodyne/000020.pcd"
        xyz = np.zeros((5, 3), np.float32)
        xyz[2, 1] = np.nan
        write_points_dair(target, xyz, np.zeros(5))
        return target.name, "NaN"
    if what == "string garbage":
        target = root / "cooperative/label_world/015376.json"
        labels = json.loads(target.read_text())
        labels[0]["world_8_points"][3][1] = "abc"
        target.write_text(json.dumps(labels))
        return target.name, "world_8_points"
    if what == "bad timestamp":
        target = i / "data_info.json"
        rows = json.loads(target.read_text())
        rows[1]["pointcloud_timestamp"] = "soon"
        target.write_text(json.dumps(rows))
        return target.name, "pointcloud_timestamp"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["missing pcd", "truncated pcd", "malformed json", "missing calib",
                                  "calib field", "nan points", "string garbage", "bad timestamp"])
def test_bad_inputs_raise_dataset_error_naming_file_and_field(fixture_root, what):
    name, field = _break(fixture_root, what)
    adapter = DairV2XCAdapter(fixture_root, "train")
    with pytest.raises(DatasetError) as err:
        adapter.load(0)
    assert name in str(err.value) and field in str(err.value)


def test_skip_bad_frames_drops_the_frame_and_serves_no_other_in_its_place(fixture_root, caplog):
    _break(fixture_root, "missing pcd")  # breaks row 0 (infra 000020) only
    adapter = DairV2XCAdapter(fixture_root, "train", skip_bad_frames=True)
    with pytest.raises(DatasetError, match="000020.pcd"):
        adapter.load(0)  # the adapter itself never substitutes a frame
    sampler = CoopSampler(adapter, PipelineConfig(), train=False)
    with caplog.at_level(logging.WARNING):
        batch = collate([sampler[0], sampler[1]])
    assert batch.batch_size == 1 and batch.frames[0].timestamp_us[1] == 1626165671162309
    assert [(s.index, "000020.pcd" in s.reason) for s in batch.skipped] == [(0, True)]
    assert set(adapter.bad_frames) == {0} and "000020.pcd" in caplog.text


def test_missing_side_data_info_names_the_file(fixture_root):
    (fixture_root / "vehicle-side" / "data_info.json").unlink()
    with pytest.raises(DatasetError, match="vehicle-side/data_info.json"):
        DairV2XCAdapter(fixture_root, "train")


def test_ascii_pcd_is_read_too(fixture_root):
    target = fixture_root / "vehicle-side" / "velodyne" / "015376.pcd"
    xyz = np.arange(12, dtype=np.float32).reshape(4, 3)
    write_pcd(target, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
                       "intensity": np.full(4, 255.0, np.float32)}, data="ascii")
    frame = DairV2XCAdapter(fixture_root, "train").load(0)
    np.testing.assert_allclose(frame.ego.points, np.c_[xyz, np.ones(4)], atol=1e-6)


def test_copy_of_generated_data_without_split_file_needs_split_all(generated, tmp_path):
    out, _ = generated
    root = tmp_path / "c"
    shutil.copytree(out / "cooperative-vehicle-infrastructure", root)
    with pytest.raises(DatasetError, match="split_file"):
        DairV2XCAdapter(root, "train")
    assert len(DairV2XCAdapter(root, "all")) > 0


def test_camera_from_doc_spellings(fixture_root):
    """Intrinsics under the README's ``calib/camera/`` folder, a non-orthonormal extrinsic (issue #64)."""
    from PIL import Image

    side = fixture_root / "infrastructure-side"
    rows = json.loads((side / "data_info.json").read_text())
    cam_from_lidar = np.array([[-0.0638, -0.9911, -0.0443, -5.78], [-0.2103, 0.0440, -0.7988, 6.04],
                               [0.9758, -0.0603, -0.1716, 1.06], [0, 0, 0, 1]])
    for row in rows:
        fid = row["pointcloud_path"][-10:-4]
        row.update({"image_path": f"image/{fid}.jpg",
                    "calib_virtuallidar_to_camera_path": f"calib/virtuallidar_to_camera/{fid}.json"})
        for rel, obj in ((f"calib/camera/{fid}.json", {"cam_K": [2000, 0, 960, 0, 2000, 540, 0, 0, 1],
                                                        "cam_D": [0] * 5}),
                         (row["calib_virtuallidar_to_camera_path"], matrix_to_rt(cam_from_lidar))):
            (side / rel).parent.mkdir(parents=True, exist_ok=True)
            (side / rel).write_text(json.dumps(obj))
        (side / "image").mkdir(exist_ok=True)
        Image.new("RGB", (32, 18)).save(side / row["image_path"])
    (side / "data_info.json").write_text(json.dumps(rows))
    frame = DairV2XCAdapter(fixture_root, "train", cameras=True, load_images=True).load(0)
    assert frame.ego.cameras == []  # the vehicle row names no camera calibration
    cam = frame.agents[1].cameras[0]
    assert cam.image.shape == (18, 32, 3) and cam.image_size == (18, 32)
    np.testing.assert_allclose(cam.lidar_from_camera @ cam_from_lidar, np.eye(4), atol=1e-9)
    (side / "image" / "000020.jpg").unlink()
    with pytest.raises(DatasetError, match="000020.jpg: camera image is missing"):
        DairV2XCAdapter(fixture_root, "train", cameras=True).load(0)
