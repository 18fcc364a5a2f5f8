"""Camera files in the real formats: OPV2V ``<key>_camera<i>.png`` with the yaml's ``intrinsic``
and ``cords``, DAIR-V2X-C ``image/<id>.jpg`` with ``calib/camera_intrinsic`` and
``(virtual)lidar_to_camera``. A missing or unreadable image and a missing or malformed
calibration are each one DatasetError naming the file; ``skip_bad_frames`` drops that frame
only; ``tools/check_dataset.py --images`` reports the file. DAIR's non-orthonormal camera
rotations are used as given.

Each case breaks one file of sample 1 of 3 in a copy of a tiny generated dataset.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from v2xfuse.datasets import CoopSampler, DatasetError, PipelineConfig, collate
from v2xfuse.datasets.images import project_points
from v2xfuse.formats.dair import matrix_to_rt

BAD = 1
# sized like the generator's images (50 x 37, 60 x 33): resized and cropped by the pipeline
PIPELINE = {"lidar_range": [-100.0, -100.0, -20.0, 100.0, 100.0, 20.0],
            "cameras": {"image_size": [24, 40]}}


# ---- the cases: corrupt(root) -> (the file the error must name, text it must contain) ----
def _opv2v_files(root):
    """(ego folder, roadside folder, key of sample BAD)."""
    scenario = next((root / "train").iterdir())
    agents = sorted((p for p in scenario.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    ego = next(p for p in agents if int(p.name) >= 0)
    rsu = next(p for p in agents if int(p.name) < 0)
    return ego, rsu, sorted(p.stem for p in ego.glob("*.yaml"))[BAD]


def _edit_yaml(path, edit):
    meta = yaml.safe_load(path.read_text())
    edit(meta)
    path.write_text(yaml.safe_dump(meta))


def _opv2v_image_missing(root):
    ego, _, key = _opv2v_files(root)
    path = ego / f"{key}_camera0.png"
    path.unlink()
    return path, "camera image is missing"


def _opv2v_image_truncated(root):
    _, rsu, key = _opv2v_files(root)
    path = rsu / f"{key}_camera0.png"
    path.write_bytes(path.read_bytes()[:200])
    return path, "unreadable image"


def _opv2v_calibration_missing(root):
    ego, _, key = _opv2v_files(root)
    path = ego / f"{key}.yaml"
    _edit_yaml(path, lambda meta: meta.pop("camera2"))
    return path, "missing field 'camera2' (the calibration of"


def _opv2v_cords_malformed(root):
    ego, _, key = _opv2v_files(root)
    path = ego / f"{key}.yaml"
    _edit_yaml(path, lambda meta: meta["camera1"].update(cords=[1.0, 2.0, 3.0]))
    return path, "camera1: field 'cords' must be 6 finite numbers"


def _opv2v_intrinsic_malformed(root):
    _, rsu, key = _opv2v_files(root)
    path = rsu / f"{key}.yaml"
    _edit_yaml(path, lambda meta: meta["camera0"]["intrinsic"][0].__setitem__(0, -300.0))
    return path, "camera0.intrinsic focal lengths must be positive"


def _dair_row(root, side, field):
    """(side folder, frame id of sample BAD on that side, its data_info row)."""
    root = root / "cooperative-vehicle-infrastructure"
    coop = json.loads((root / "cooperative/data_info.json").read_text())[BAD]
    fid = Path(coop[field]).stem
    rows = json.loads((root / side / "data_info.json").read_text())
    return root / side, fid, next(r for r in rows if Path(r["pointcloud_path"]).stem == fid)


def _infra(root):
    return _dair_row(root, "infrastructure-side", "infrastructure_pointcloud_path")


def _dair_image_missing(root):
    side, _, row = _infra(root)
    path = side / row["image_path"]
    path.unlink()
    return path, "camera image is missing"


def _dair_image_not_a_jpeg(root):
    side, _, row = _dair_row(root, "vehicle-side", "vehicle_pointcloud_path")
    path = side / row["image_path"]
    path.write_text("<html>404 Not Found</html>")
    return path, "unreadable image"


def _dair_intrinsic_missing(root):
    side, _, row = _infra(root)
    path = side / row["calib_camera_intrinsic_path"]
    path.unlink()
    return path, "camera intrinsic is missing"


def _dair_intrinsic_missing_and_unnamed(root):
    side, fid, row = _infra(root)
    path = side / row["calib_camera_intrinsic_path"]
    path.unlink()
    info = side / "data_info.json"
    rows = json.loads(info.read_text())
    for r in rows:
        if Path(r["pointcloud_path"]).stem == fid:
            r.pop("calib_camera_intrinsic_path")
    info.write_text(json.dumps(rows))
    return path, "camera intrinsic is missing"


def _dair_intrinsic_malformed(root):
    side, _, row = _dair_row(root, "vehicle-side", "vehicle_pointcloud_path")
    path = side / row["calib_camera_intrinsic_path"]
    calib = json.loads(path.read_text())
    calib["cam_K"] = calib["cam_K"][:8]
    path.write_text(json.dumps(calib))
    return path, "cam_K must be 9 finite numbers"


def _dair_extrinsic_scaled(root):
    side, _, row = _infra(root)
    path = side / row["calib_virtuallidar_to_camera_path"]
    calib = json.loads(path.read_text())
    calib["rotation"] = (3 * np.array(calib["rotation"])).tolist()
    path.write_text(json.dumps(calib))
    return path, "not orthonormal"


CASES = {
    "opv2v image missing": ("opv2v", _opv2v_image_missing),
    "opv2v roadside image truncated": ("opv2v", _opv2v_image_truncated),
    "opv2v image without its calibration": ("opv2v", _opv2v_calibration_missing),
    "opv2v cords of 3 numbers": ("opv2v", _opv2v_cords_malformed),
    "opv2v negative focal length": ("opv2v", _opv2v_intrinsic_malformed),
    "dair roadside image missing": ("dair", _dair_image_missing),
    "dair vehicle image not a jpeg": ("dair", _dair_image_not_a_jpeg),
    "dair intrinsic file missing": ("dair", _dair_intrinsic_missing),
    "dair intrinsic missing, row names none": ("dair", _dair_intrinsic_missing_and_unnamed),
    "dair cam_K of 8 numbers": ("dair", _dair_intrinsic_malformed),
    "dair extrinsic scaled by 3": ("dair", _dair_extrinsic_scaled),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_camera_file_is_one_named_error_and_costs_its_frame_only(
        case, tiny_camera_data, tmp_path, capsys, train_adapter, frame_of, load_tool):
    fmt, corrupt = CASES[case]
    root = tmp_path / "data"
    shutil.copytree(tiny_camera_data(fmt), root)
    good = [frame_of(train_adapter(fmt, root, load_images=True), i) for i in range(3)]
    path, text = corrupt(root)

    with pytest.raises(DatasetError) as err:
        train_adapter(fmt, root, load_images=True).load(BAD)
    assert str(path) in str(err.value) and text in str(err.value), str(err.value)

    skipping = train_adapter(fmt, root, load_images=True, skip_bad_frames=True)
    sampler = CoopSampler(skipping, PipelineConfig.from_dict(PIPELINE), train=False)
    batch = collate([sampler[i] for i in range(len(sampler))])
    assert [m.frame for m in batch.frames] == [f for i, f in enumerate(good) if i != BAD]
    assert [s.index for s in batch.skipped] == [BAD] and str(path) in batch.skipped[0].reason
    assert batch.cameras is not None and batch.cameras.images.shape[-2:] == (24, 40)

    capsys.readouterr()
    assert load_tool("check_dataset").main(["--format", fmt, "--root", str(root), "--images"]) == 1
    out = capsys.readouterr().out
    reported = [line for line in out.splitlines() if line.startswith(str(path))]
    assert reported and text in reported[0], out


def test_the_generated_camera_data_checks_clean(load_tool, tiny_camera_data, capsys):
    for fmt in ("opv2v", "dair"):
        root = tiny_camera_data(fmt)
        assert load_tool("check_dataset").main(["--format", fmt, "--root", str(root), "--images",
                                                "--quiet"]) == 0
        assert "problems: 0" in capsys.readouterr().out


def test_opv2v_cameras_are_placed_by_cords_and_lidar_pose(tiny_camera_data, tmp_path, train_adapter):
    """``cords`` (the camera's world pose) with ``lidar_pose`` place the camera, as HEAL and
    CoAlign read OPV2V; ``extrinsic`` is the fallback of a yaml without ``cords``. The
    generator writes both consistently, so a wrong ``extrinsic`` shows which one is used."""
    root = tmp_path / "data"
    shutil.copytree(tiny_camera_data("opv2v"), root)
    ego, _, key = _opv2v_files(root)

    def placed():
        ego_cameras = train_adapter("opv2v", root, load_images=True).load(BAD).ego.cameras
        return {c.name: c.lidar_from_camera for c in ego_cameras}

    before = placed()
    path = ego / f"{key}.yaml"
    _edit_yaml(path, lambda meta: meta["camera0"]["extrinsic"][0].__setitem__(3, 99.0))
    after = placed()
    np.testing.assert_array_equal(after["camera0"], before["camera0"])
    _edit_yaml(path, lambda meta: [meta[f"camera{i}"].pop("cords") for i in range(4)])
    fallback = placed()
    np.testing.assert_allclose(fallback["camera1"], before["camera1"], atol=1e-9)
    assert not np.allclose(fallback["camera0"], before["camera0"])  # its extrinsic was moved


def test_dair_non_orthonormal_camera_rotations_project_as_given(tiny_camera_data, tmp_path,
                                                                train_adapter):
    """Frame 000009's released ``virtuallidar_to_camera`` (det 0.813, issue #64) is kept as it
    is: a point projects, after the pipeline's resize and crop, where ``K (R p + t)`` of the
    files puts it (scaled with the image), not where an orthonormalised R would."""
    root = tmp_path / "data"
    shutil.copytree(tiny_camera_data("dair"), root)
    side, _, row = _infra(root)
    released = np.array([[-0.0638033225610772, -0.9910914864003576, -0.04429948490729328],
                         [-0.2102873406178483, 0.043997692433495696, -0.7987692871343754],
                         [0.97575114561348, -0.06031492538699515, -0.17158543199893228]])
    cam_from_lidar = np.eye(4)
    cam_from_lidar[:3, :3] = released
    cam_from_lidar[:3, 3] = [-5.779144404715124, 6.037615758600886, 1.0636424034755758]
    extrinsic = side / row["calib_virtuallidar_to_camera_path"]
    extrinsic.write_text(json.dumps(matrix_to_rt(cam_from_lidar)))
    intrinsic = json.loads((side / row["calib_camera_intrinsic_path"]).read_text())
    k = np.array(intrinsic["cam_K"]).reshape(3, 3)

    pipeline = PipelineConfig.from_dict(PIPELINE)
    sample = CoopSampler(train_adapter("dair", root, load_images=True), pipeline, train=False)[BAD]
    cam = sample.cameras[1][0]
    points = np.array([[12.0, 1.0, -4.0], [20.0, -3.0, -5.0], [30.0, 4.0, -5.5]])
    uv, depth = project_points(points, cam.intrinsic, cam.lidar_from_camera)
    p_cam = points @ released.T + cam_from_lidar[:3, 3]
    np.testing.assert_allclose(depth, p_cam[:, 2], rtol=1e-9)
    h0, w0 = sample.cameras[1][0].image_size  # after fitting; the file's image is 60 x 33
    raw = p_cam @ k.T
    raw_uv = raw[:, :2] / raw[:, 2:]
    # what fit_image did: scale s (both axes, rounded up), half-pixel term, then the crop
    s = max(24 / 33, 40 / 60)
    new_w, new_h = int(np.ceil(60 * s - 1e-9)), int(np.ceil(33 * s - 1e-9))
    sx, sy = new_w / 60, new_h / 33
    want = np.c_[sx * raw_uv[:, 0] + (sx - 1) / 2 - (new_w - 40) // 2,
                 sy * raw_uv[:, 1] + (sy - 1) / 2 - (new_h - 24)]
    assert (h0, w0) == (24, 40)
    np.testing.assert_allclose(uv, want, atol=1e-9)
    u, sv, vt = np.linalg.svd(released)
    ortho_uv, _ = project_points(points, cam.intrinsic,
                                 np.linalg.inv(np.block([[u @ vt, cam_from_lidar[:3, 3:]],
                                                         [np.zeros((1, 3)), np.ones((1, 1))]])))
    assert np.abs(ortho_uv - uv).max() > 1.0
