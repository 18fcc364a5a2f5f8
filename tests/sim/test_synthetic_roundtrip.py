"""Everything the generator writes, read back with the project's readers, against its truth."""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from v2xfuse.formats import dair as dairfmt
from v2xfuse.formats import opv2v as opv2vfmt
from v2xfuse.io.pcd import read_points
from v2xfuse.sim import SimConfig, generate_dataset
from v2xfuse.sim.write_dair import WORLD_SHIFT
from v2xfuse.structures import box_corners, invert_transform, transform_boxes, wrap_angle

REPO = Path(__file__).resolve().parents[2]
TOL_M = 1e-4
TOL_RAD = 1e-4


def small_config(cameras=True) -> SimConfig:
    cfg = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 512, "beams": 16},
                               "rsu_lidar": {"azimuth_steps": 512, "beams": 24}})
    cfg.cameras = cameras
    for cam in cfg.vehicle_cameras + cfg.rsu_cameras:
        cam.width, cam.height = cam.width // 4, cam.height // 4
    return cfg


def assert_pose_close(actual, expected, where):
    np.testing.assert_allclose(actual[:3, 3], expected[:3, 3], atol=TOL_M, err_msg=where)
    np.testing.assert_allclose(actual[:3, :3], expected[:3, :3], atol=TOL_RAD, err_msg=where)


def assert_boxes_close(actual, expected, where):
    assert actual.shape == expected.shape, where
    np.testing.assert_allclose(actual[:, :6], expected[:, :6], atol=TOL_M, err_msg=where)
    np.testing.assert_allclose(wrap_angle(actual[:, 6] - expected[:, 6]), 0.0, atol=TOL_RAD, err_msg=where)


def assert_objects_where_calibration_says(owner_map, intrinsic, lidar_from_camera, boxes_lidar, ids, where):
    """Every object pixel (column c, row r: the ray through image point (c, r)) lies inside the
    projection of that object's box through the stored calibration, and every object shows up
    where its box projects."""
    cam_from_lidar = invert_transform(lidar_from_camera)
    checked = 0
    for oid, box in zip(ids, boxes_lidar):
        rows, cols = np.nonzero(owner_map == oid)
        if len(rows) < 5:
            continue
        corners = box_corners(box[None])[0] @ cam_from_lidar[:3, :3].T + cam_from_lidar[:3, 3]
        if np.any(corners[:, 2] <= 0.1):
            continue
        u = intrinsic[0, 0] * corners[:, 0] / corners[:, 2] + intrinsic[0, 2]
        v = intrinsic[1, 1] * corners[:, 1] / corners[:, 2] + intrinsic[1, 2]
        assert cols.min() >= u.min() - 1e-6 and cols.max() <= u.max() + 1e-6, f"{where}: object {oid} u"
        assert rows.min() >= v.min() - 1e-6 and rows.max() <= v.max() + 1e-6, f"{where}: object {oid} v"
        checked += 1
    return checked


@pytest.fixture(scope="module")
def opv2v_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("opv2v")
    stats, kept = generate_dataset("opv2v", out, n_scenes=1, n_frames=2, seed=3, cfg=small_config(),
                                   splits={"train": 1.0}, progress=False, keep_frames=True)
    return out, stats, kept


@pytest.fixture(scope="module")
def dair_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("dair")
    stats, kept = generate_dataset("dair", out, n_scenes=1, n_frames=3, seed=4, cfg=small_config(),
                                   splits={"train": 1.0}, progress=False, keep_frames=True)
    return out, stats, kept


def test_opv2v_round_trip(opv2v_data):
    out, stats, kept = opv2v_data
    (scene, frames, scenario_dir), = kept
    assert (scenario_dir / "data_protocol.yaml").is_file()
    agent_dirs = sorted(p.name for p in scenario_dir.iterdir() if p.is_dir())
    assert sorted(str(a.agent_id) for a in scene.agents) == agent_dirs
    assert any(int(d) < 0 for d in agent_dirs), "roadside units get negative ids (V2XSet)"
    checked_cams = 0
    for frame, info in frames:
        for agent in frame.agents:
            stem = scenario_dir / str(agent.agent_id) / info["key"]
            where = str(stem)
            meta = opv2vfmt.load_yaml(f"{stem}.yaml")
            world_from_lidar = opv2vfmt.world_from_lidar_rh(meta, where)
            assert_pose_close(world_from_lidar, agent.world_from_lidar, where)

            pts = read_points(f"{stem}.pcd")
            pts[:, 1] *= -1.0  # CARLA left-handed -> ours
            np.testing.assert_allclose(pts[:, :3], agent.points[:, :3], atol=TOL_M, err_msg=where)
            np.testing.assert_allclose(pts[:, 3], agent.points[:, 3], atol=0.5 / 255, err_msg=where)

            ids, boxes = opv2vfmt.vehicle_boxes(meta, world_from_lidar, where)
            seen = sorted(agent.seen_ids())
            assert sorted(ids.tolist()) == seen and len(seen) > 0
            order = np.argsort(ids)
            truth_ids = agent.object_ids
            truth = np.stack([agent.object_boxes[np.nonzero(truth_ids == i)[0][0]] for i in ids[order]])
            truth_lidar = transform_boxes(invert_transform(agent.world_from_lidar), truth)
            assert_boxes_close(boxes[order], truth_lidar, where)
            assert meta["ego_speed"] == pytest.approx(agent.speed_mps * 3.6)

            for cam in agent.cameras:
                k, lidar_from_camera = opv2vfmt.camera_calibration(meta, cam.name, where)
                np.testing.assert_allclose(k, cam.intrinsic, atol=1e-9)
                assert_pose_close(lidar_from_camera, cam.lidar_from_camera, f"{where} {cam.name}")
                image = np.asarray(Image.open(f"{stem}_{cam.name}.png").convert("RGB"))
                np.testing.assert_array_equal(image, cam.image)
                all_lidar = transform_boxes(invert_transform(agent.world_from_lidar), agent.object_boxes)
                checked_cams += assert_objects_where_calibration_says(
                    cam.owner, k, lidar_from_camera, all_lidar, agent.object_ids, f"{where} {cam.name}")
    assert checked_cams > 5


def test_dair_round_trip(dair_data):
    out, stats, kept = dair_data
    root = out / "cooperative-vehicle-infrastructure"
    coop = json.loads((root / "cooperative" / "data_info.json").read_text())
    veh_rows = {r["pointcloud_path"]: r for r in json.loads((root / "vehicle-side" / "data_info.json").read_text())}
    inf_rows = {r["pointcloud_path"]: r for r in json.loads((root / "infrastructure-side" / "data_info.json").read_text())}
    (scene, frames, _), = kept
    start_us = frames[0][0].agents[0].timestamp_us  # the vehicle samples on the scene's ticks
    assert len(coop) == len(frames) == 3
    nonzero_offsets = 0
    for (frame, info), row in zip(frames, coop):
        veh, inf = frame.agents
        vrow = veh_rows[row["vehicle_pointcloud_path"].split("/", 1)[1]]
        irow = inf_rows[row["infrastructure_pointcloud_path"].split("/", 1)[1]]
        assert all(isinstance(v, str) for k, v in vrow.items()), "DAIR data_info values are strings"
        assert int(vrow["pointcloud_timestamp"]) == veh.timestamp_us
        assert int(irow["pointcloud_timestamp"]) == inf.timestamp_us
        side = root / "vehicle-side"
        where = str(side / vrow["pointcloud_path"])
        w_from_vl = dairfmt.vehicle_world_from_lidar(
            json.loads((side / vrow["calib_lidar_to_novatel_path"]).read_text()),
            json.loads((side / vrow["calib_novatel_to_world_path"]).read_text()), where)
        assert_pose_close(w_from_vl, WORLD_SHIFT @ veh.world_from_lidar, where)
        offset = dairfmt.parse_offset(row["system_error_offset"], "system_error_offset")
        nonzero_offsets += offset != (0.0, 0.0)
        iside = root / "infrastructure-side"
        calib = json.loads((iside / irow["calib_virtuallidar_to_world_path"]).read_text())
        assert dairfmt.parse_offset(calib["relative_error"], "relative_error") == offset
        w_from_il = dairfmt.infra_world_from_lidar(calib, offset, str(iside))
        assert_pose_close(w_from_il, WORLD_SHIFT @ inf.world_from_lidar, str(iside))

        for agent, base, r in ((veh, side, vrow), (inf, iside, irow)):
            pts = read_points(base / r["pointcloud_path"])
            np.testing.assert_allclose(pts[:, :3], agent.points[:, :3], atol=TOL_M)
            np.testing.assert_allclose(pts[:, 3] / 255.0, agent.points[:, 3], atol=1e-6)
            labels = json.loads((base / r["label_lidar_std_path"]).read_text())
            assert isinstance(labels[0]["3d_location"]["x"], str), "side labels store numbers as strings"
            boxes = np.stack([dairfmt.side_label_box(e, "label") for e in labels])
            truth = np.stack([b for i, b in zip(agent.object_ids, agent.object_boxes) if int(i) in agent.seen_ids()])
            assert_boxes_close(boxes, transform_boxes(invert_transform(agent.world_from_lidar), truth), str(base))
            cam = agent.cameras[0]
            k = np.asarray(json.loads((base / r["calib_camera_intrinsic_path"]).read_text())["cam_K"]).reshape(3, 3)
            key = "calib_lidar_to_camera_path" if agent is veh else "calib_virtuallidar_to_camera_path"
            cam_from_lidar = dairfmt.rt_to_matrix(json.loads((base / r[key]).read_text()), key)
            image = np.asarray(Image.open(base / r["image_path"]).convert("RGB"))
            assert image.shape == cam.image.shape
            assert np.abs(image.astype(float) - cam.image).mean() < 8.0  # JPEG
            lidar_pose_at_image = cam.world_from_camera @ invert_transform(cam.lidar_from_camera)
            t = (cam.timestamp_us - start_us) / 1e6
            boxes_img = np.stack([transform_boxes(invert_transform(lidar_pose_at_image),
                                                  scene.actor_box(a, t)[None])[0] for a in scene.actors])
            ids = np.array([a.actor_id for a in scene.actors])
            assert assert_objects_where_calibration_says(cam.owner, k, invert_transform(cam_from_lidar),
                                                         boxes_img, ids, str(base)) > 0

        labels = json.loads((root / row["cooperative_label_path"]).read_text())
        vfw = invert_transform(w_from_vl)
        boxes = np.stack([dairfmt.world_8_points_to_box(e["world_8_points"], vfw, "label") for e in labels])
        seen = veh.seen_ids() | inf.seen_ids()
        truth = np.stack([b for i, b in zip(veh.object_ids, veh.object_boxes) if int(i) in seen])
        assert_boxes_close(boxes, transform_boxes(invert_transform(veh.world_from_lidar), truth), "label_world")
    split = json.loads((out / "cooperative-split-data.json").read_text())
    assert sorted(split["cooperative_split"]["train"]) == sorted(r["vehicle_pointcloud_path"][-10:-4] for r in coop)
    assert split["batch_split"]["train"] == ["0"]
    assert nonzero_offsets > 0, "the round trip must exercise a non-zero system_error_offset"


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "v2xfuse_synthetic.json":
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("fmt", ["opv2v", "dair", "v2xseq"])
def test_generation_is_deterministic(tmp_path, fmt):
    cfg = small_config(cameras=False)
    generate_dataset(fmt, tmp_path / "a", 1, 2, seed=11, cfg=cfg, progress=False)
    generate_dataset(fmt, tmp_path / "b", 1, 2, seed=11, cfg=cfg, progress=False)
    generate_dataset(fmt, tmp_path / "c", 1, 2, seed=12, cfg=cfg, progress=False)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def test_parallel_generation_writes_the_same_files(tmp_path):
    cfg = small_config(cameras=False)
    serial, _ = generate_dataset("opv2v", tmp_path / "serial", 2, 1, seed=5, cfg=cfg, progress=False,
                                 workers=1)
    parallel, _ = generate_dataset("opv2v", tmp_path / "parallel", 2, 1, seed=5, cfg=cfg,
                                   progress=False, workers=2)
    assert parallel["workers"] == 2
    assert _tree_digest(tmp_path / "serial") == _tree_digest(tmp_path / "parallel")
    same = ("frames", "agent_frames", "objects", "box_labels", "objects_near_ego_seen",
            "collaborator_only_fraction")
    assert {k: serial[k] for k in same} == {k: parallel[k] for k in same}


def test_cooperation_matters(opv2v_data):
    _, stats, kept = opv2v_data
    (scene, frames, _), = kept
    # Each agent misses objects another agent sees.
    for frame, _ in frames:
        union = set().union(*(a.seen_ids() for a in frame.agents))
        for agent in frame.agents:
            assert union - agent.seen_ids(), f"agent {agent.agent_id} saw everything"
    assert 0.0 < stats["collaborator_only_fraction"] < 1.0


def test_motion_is_consistent_at_10hz(opv2v_data):
    _, _, kept = opv2v_data
    (scene, frames, _), = kept
    a0, a1 = frames[0][0].agents[0], frames[1][0].agents[0]
    assert a1.timestamp_us - a0.timestamp_us == 100_000
    moved = np.linalg.norm(a1.object_boxes[:, :2] - a0.object_boxes[:, :2], axis=1)
    speeds = a0.object_speeds
    np.testing.assert_allclose(moved[speeds > 0], speeds[speeds > 0] * 0.1, rtol=0.05, atol=0.05)
    assert np.all(moved[speeds == 0] < 1e-9)


def test_cli_writes_both_formats(tmp_path):
    for fmt in ("opv2v", "dair"):
        res = subprocess.run([sys.executable, str(REPO / "tools" / "make_synthetic.py"), "--format", fmt,
                              "--out", str(tmp_path / fmt), "--scenes", "1", "--frames", "1", "--seed", "0",
                              "--no-cameras", "--quiet"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(REPO)})  # this checkout's v2xfuse
        assert res.returncode == 0, res.stderr
        assert "seen only by a collaborator" in res.stdout
        manifest = json.loads((tmp_path / fmt / "v2xfuse_synthetic.json").read_text())
        assert manifest["format"] == fmt and manifest["seed"] == 0
    assert any((tmp_path / "opv2v" / "train").rglob("*.pcd"))
    assert any((tmp_path / "dair" / "cooperative-vehicle-infrastructure" / "vehicle-side" / "velodyne").glob("*.pcd"))


def test_formats_reject_bad_fields():
    with pytest.raises(ValueError, match="lidar_pose"):
        opv2vfmt.world_from_lidar_rh({"lidar_pose": [1, 2, 3]}, "x.yaml")
    with pytest.raises(ValueError, match=r"vehicles\[5\]"):
        opv2vfmt.vehicle_boxes({"vehicles": {5: {"location": [0, 0, 0]}}}, np.eye(4), "x.yaml")
    with pytest.raises(ValueError, match="3d_location.x"):
        dairfmt.side_label_box({"3d_location": {"x": "abc", "y": "0", "z": "0"},
                                "3d_dimensions": {"l": "1", "w": "1", "h": "1"}}, "label")
    with pytest.raises(ValueError, match="world_8_points"):
        dairfmt.world_8_points_to_box([[0, 0, 0]] * 7, np.eye(4), "label")
    assert dairfmt.parse_offset("", "x") == (0.0, 0.0)
    m = dairfmt.rt_to_matrix({"rotation": np.eye(3).tolist(), "translation": [1, 2, 3]}, "flat")
    np.testing.assert_allclose(m[:3, 3], [1, 2, 3])


def test_carla_pose_formula_matches_reference_values():
    # UE4's rotation formula (OpenCOOD x_to_world) at hand-picked angles.
    m = opv2vfmt.carla_pose_to_matrix([1, 2, 3, 0, 90, 0])
    np.testing.assert_allclose(m[:3, :3] @ [1, 0, 0], [0, 1, 0], atol=1e-12)  # yaw 90: x -> y (left-handed "right")
    m = opv2vfmt.carla_pose_to_matrix([0, 0, 0, 0, 0, 30])
    np.testing.assert_allclose(m[2, 0], math.sin(math.radians(30)))  # pitch lifts the nose
    rng = np.random.default_rng(0)
    for _ in range(50):
        pose = [*rng.uniform(-100, 100, 3), *rng.uniform(-80, 80, 3)]
        np.testing.assert_allclose(opv2vfmt.matrix_to_carla_pose(opv2vfmt.carla_pose_to_matrix(pose)), pose,
                                   atol=1e-9)
