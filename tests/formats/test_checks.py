"""Rigidity and finiteness checks shared by the format readers, the adapters and check_dataset."""
import math

import numpy as np
import pytest

from v2xfuse.formats import dair as dfmt
from v2xfuse.formats import opv2v as ofmt
from v2xfuse.formats.checks import CAMERA_RIGID_TOL, RIGID_TOL, check_rigid
from v2xfuse.structures.transforms import make_transform, rotation_from_rpy

R = rotation_from_rpy(0.02, -0.01, 0.7)
# DAIR-V2X issue #64 / #22, infrastructure frame 000009 virtuallidar_to_camera: det 0.813.
ISSUE_64 = np.array([[-0.0638033225610772, -0.9910914864003576, -0.04429948490729328],
                     [-0.2102873406178483, 0.043997692433495696, -0.7987692871343754],
                     [0.97575114561348, -0.06031492538699515, -0.17158543199893228]])


@pytest.mark.parametrize("rot,tol,problem", [
    (2 * R, RIGID_TOL, "not orthonormal"),
    (2 * R, CAMERA_RIGID_TOL, "not orthonormal"),
    (R @ np.array([[1, 0.1, 0], [0, 1, 0], [0, 0, 1]]), RIGID_TOL, "not orthonormal"),
    (R @ np.diag([1, -1, 1]), CAMERA_RIGID_TOL, "reflection"),
    (R @ np.diag([1, 1, 0]), CAMERA_RIGID_TOL, "singular"),
    (ISSUE_64, RIGID_TOL, "not orthonormal"),
])
def test_non_rigid_rotations_fail(rot, tol, problem):
    with pytest.raises(ValueError, match=f"calib.json: rotation is .*{problem}|calib.json: .*{problem}"):
        check_rigid(make_transform(rot, (1.0, 2.0, 3.0)), "calib.json", tol)


def test_near_rigid_rotations_pass():
    # ~1e-2 off orthonormal, as real DAIR calibrations are reported to be
    check_rigid(make_transform(R @ np.array([[1, 0.01, 0], [0, 1.0, 0], [0, 0, 1.005]]), (0, 0, 0)),
                "calib.json", RIGID_TOL)
    check_rigid(make_transform(ISSUE_64, (0, 0, 0)), "calib.json", CAMERA_RIGID_TOL)
    bad = make_transform(R, (0, 0, 0))
    bad[3, 0] = 1.0
    with pytest.raises(ValueError, match="bottom row"):
        check_rigid(bad, "calib.json")
    bad[3, 0], bad[0, 3] = 0.0, math.nan
    with pytest.raises(ValueError, match="NaN"):
        check_rigid(bad, "calib.json")


def test_dair_readers_name_file_and_field():
    assert dfmt.parse_offset({"delta_x": "", "delta_y": ""}, "x") == (0.0, 0.0)
    assert dfmt.parse_offset({"delta_x": "1.5", "delta_y": None}, "x") == (1.5, 0.0)
    with pytest.raises(ValueError, match=r"f.json: \[1\]: missing field 'type'"):
        dfmt.side_label_boxes([{"type": "Pedestrian"}, {"3d_location": {}}], "f.json")
    with pytest.raises(ValueError, match="f.json: expected a JSON array of label objects, got a JSON object"):
        dfmt.side_label_boxes({}, "f.json")
    with pytest.raises(ValueError, match=r"f.json: \[0\].type: expected a class name"):
        dfmt.cooperative_label_boxes([{"type": 3}], np.eye(4), "f.json")
    with pytest.raises(ValueError, match="k.json: expected a JSON object with 'cam_K', got a JSON array"):
        dfmt.camera_intrinsic([1, 2], "k.json")
    with pytest.raises(ValueError, match="c.json: expected a JSON object with rotation"):
        dfmt.pose_from_rt([[1, 0, 0]], "c.json")


def test_opv2v_fields_name_file_and_field():
    assert ofmt.yaml_number({"ego_speed": "12.5"}, "ego_speed", "a.yaml") == 12.5
    for bad in ("fast", math.nan, True, [1]):
        with pytest.raises(ValueError, match="a.yaml: field 'ego_speed' must be a finite number"):
            ofmt.yaml_number({"ego_speed": bad}, "ego_speed", "a.yaml")
    assert ofmt.yaml_flag({}, "RSU", "a.yaml") is False
    with pytest.raises(ValueError, match="a.yaml: field 'RSU' must be true or false"):
        ofmt.yaml_flag({"RSU": "no"}, "RSU", "a.yaml")
    entry = {"location": [1, 2, 0], "center": [0, 0, 0.8], "angle": [0, 30, 0], "extent": [2, 1, 0.8]}
    ofmt.vehicle_box_in_lidar(entry, np.eye(4), "a.yaml: vehicles[7]")
    for key in ("location", "extent", "angle", "center"):
        with pytest.raises(ValueError, match=rf"a.yaml: vehicles\[7\].{key}: expected 3 finite numbers"):
            ofmt.vehicle_box_in_lidar({**entry, key: [0, math.nan, 1]}, np.eye(4), "a.yaml: vehicles[7]")
