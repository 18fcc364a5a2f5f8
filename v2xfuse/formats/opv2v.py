"""OPV2V / V2XSet conventions (CARLA, Unreal Engine 4), and their conversion to ours.

Facts (see shared/reference/opencood-opv2v.md section 2):

* CARLA's world and sensor frames are **left-handed**: x forward, y right, z up. We flip y
  (``FLIP_Y``) at load time; a transform converts as ``FLIP_Y @ T @ FLIP_Y``.
* Poses are ``[x, y, z, roll, yaw, pitch]`` in metres and **degrees**, CARLA order, and build a
  matrix with UE4's rotation formula (:func:`carla_pose_to_matrix`).
* ``vehicles[id]``: ``location`` is the actor origin in the world, ``center`` the box centre
  offset in the actor's own frame, ``angle`` ``[roll, yaw, pitch]`` degrees, ``extent`` **half**
  sizes along the actor's x (length), y (width), z (height).
* ``camera{i}.cords`` is the camera's world pose ``[x, y, z, roll, yaw, pitch]`` (UE4 camera
  axes: x forward, y right, z up) and ``camera{i}.extrinsic`` is ``camera_ue4_from_lidar``; the
  loader takes the camera's pose from ``cords`` (:func:`camera_calibration` says why). OpenCV
  axes relate to UE4 axes by ``UE4_FROM_CV``.

OpenCOOD adds ``center`` to ``location`` without rotating it; it is an offset in the actor
frame, so we rotate it (identical for level actors whose offset is vertical, which is nearly
every released box).
"""
from __future__ import annotations

import math

import numpy as np
import yaml

from ..structures.boxes import CORNER_SIGNS, corners_to_boxes
from ..structures.transforms import invert_transform
from .checks import RIGID_TOL, check_finite, check_rigid

__all__ = ["FLIP_Y", "UE4_FROM_CV", "carla_pose_to_matrix", "matrix_to_carla_pose", "lh_to_rh",
           "vehicle_box_in_lidar", "vehicle_entry_from_box", "camera_lidar_from_cv",
           "camera_entry_from_cv"]

FLIP_Y = np.diag([1.0, -1.0, 1.0, 1.0])

# p_ue4 = UE4_FROM_CV @ p_cv: UE4 x (forward) = cv z, y (right) = cv x, z (up) = -cv y.
UE4_FROM_CV = np.array([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0],
                        [0.0, 0.0, 0.0, 1.0]])


def carla_pose_to_matrix(pose) -> np.ndarray:
    """(4, 4) left-handed ``world_from_x`` from a CARLA pose ``[x, y, z, roll, yaw, pitch]`` (deg)."""
    x, y, z, roll, yaw, pitch = (float(v) for v in pose)
    cr, sr = math.cos(math.radians(roll)), math.sin(math.radians(roll))
    cy, sy = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
    cp, sp = math.cos(math.radians(pitch)), math.sin(math.radians(pitch))
    m = np.eye(4)
    m[:3, 3] = (x, y, z)
    m[:3, :3] = [
        [cp * cy, cy * sp * sr - sy * cr, -cy * sp * cr - sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, -sy * sp * cr + cy * sr],
        [sp, -cp * sr, cp * cr],
    ]
    return m


def matrix_to_carla_pose(m: np.ndarray) -> list[float]:
    """Inverse of :func:`carla_pose_to_matrix`: ``[x, y, z, roll, yaw, pitch]`` (deg)."""
    r = np.asarray(m, dtype=np.float64)
    yaw = math.degrees(math.atan2(r[1, 0], r[0, 0]))
    roll = math.degrees(math.atan2(-r[2, 1], r[2, 2]))
    pitch = math.degrees(math.atan2(r[2, 0], math.hypot(r[2, 1], r[2, 2])))
    return [float(r[0, 3]), float(r[1, 3]), float(r[2, 3]), roll, yaw, pitch]


def lh_to_rh(m: np.ndarray) -> np.ndarray:
    """Convert a transform between left-handed CARLA frames to our right-handed frames (and back)."""
    return FLIP_Y @ np.asarray(m, dtype=np.float64) @ FLIP_Y


def _vector(entry: dict, key: str, where: str) -> np.ndarray:
    """(3,) finite float64 of ``entry[key]`` (``KeyError`` when absent)."""
    value = entry[key]
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{where}.{key}: expected 3 finite numbers, got {value!r}")
    return arr


def _vehicle_inputs(entry: dict, where: str):
    """(location, [roll, yaw, pitch], center, extent), each (3,) finite float64, of a
    ``vehicles[id]`` entry; ``KeyError`` for an absent field, ``ValueError`` for a bad one."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(entry).__name__}")
    loc = _vector(entry, "location", where)
    angle = _vector(entry, "angle", where)
    centre = _vector(entry, "center", where)
    half = _vector(entry, "extent", where)
    if np.any(half < 0):
        raise ValueError(f"{where}.extent: expected 3 non-negative half sizes, got {entry['extent']!r}")
    return loc, angle, centre, half


def vehicle_box_in_lidar(entry: dict, world_from_lidar_rh: np.ndarray,
                         where: str = "vehicle") -> np.ndarray:
    """(7,) finite box in our right-handed LiDAR frame from an OPV2V ``vehicles[id]`` entry.

    Args:
        entry: dict with ``location``, ``center``, ``angle``, ``extent`` as in the yaml, each
            3 finite numbers (NaN would become NaN ground truth), ``extent`` non-negative.
        world_from_lidar_rh: (4, 4) right-handed pose of the LiDAR the box is expressed in.
        where: names the entry in error messages (``"<file>: vehicles[12]"``).
    """
    loc, (roll, yaw, pitch), centre, half = _vehicle_inputs(entry, where)
    world_from_actor = lh_to_rh(carla_pose_to_matrix([*loc, roll, yaw, pitch]))
    centre_local = FLIP_Y[:3, :3] @ centre
    local = centre_local + CORNER_SIGNS * half
    lidar_from_actor = invert_transform(world_from_lidar_rh) @ world_from_actor
    corners = local @ lidar_from_actor[:3, :3].T + lidar_from_actor[:3, 3]
    return check_finite(corners_to_boxes(corners[None])[0], f"{where}: box")


def _vehicle_boxes_in_lidar(loc: np.ndarray, angle: np.ndarray, centre: np.ndarray,
                            half: np.ndarray, world_from_lidar_rh: np.ndarray) -> np.ndarray:
    """(M, 7) boxes of M vehicles at once, bit for bit what :func:`vehicle_box_in_lidar` gives
    each (possibly non-finite: the caller checks).

    Args: loc, angle ``[roll, yaw, pitch]`` (degrees), centre, half: (M, 3) float64 as in the
    yaml. Every step repeats the per-vehicle arithmetic in the same order: the trigonometry
    with ``math`` (numpy's vectorised sin/cos may differ in the last bit), the rotation's
    terms elementwise as :func:`carla_pose_to_matrix` writes them, the products as stacked
    ``np.matmul`` (one BLAS call per matrix, the same call as the 2-D product), and the fit
    through :func:`corners_to_boxes` on all boxes.
    """
    m = len(loc)
    trig = np.array([[f(math.radians(v)) for v in row for f in (math.cos, math.sin)]
                     for row in angle.tolist()], dtype=np.float64).reshape(m, 6)
    cr, sr, cy, sy, cp, sp = trig.T
    carla = np.zeros((m, 4, 4))
    carla[:, 3, 3] = 1.0
    carla[:, :3, 3] = loc
    carla[:, 0, 0] = cp * cy
    carla[:, 0, 1] = cy * sp * sr - sy * cr
    carla[:, 0, 2] = -cy * sp * cr - sy * sr
    carla[:, 1, 0] = sy * cp
    carla[:, 1, 1] = sy * sp * sr + cy * cr
    carla[:, 1, 2] = -sy * sp * cr + cy * sr
    carla[:, 2, 0] = sp
    carla[:, 2, 1] = -cp * sr
    carla[:, 2, 2] = cp * cr
    world_from_actor = np.matmul(np.matmul(FLIP_Y, carla), FLIP_Y)
    centre_local = np.matmul(FLIP_Y[:3, :3], centre[:, :, None])[:, :, 0]
    local = centre_local[:, None, :] + CORNER_SIGNS * half[:, None, :]
    lidar_from_actor = np.matmul(invert_transform(world_from_lidar_rh), world_from_actor)
    corners = np.matmul(local, lidar_from_actor[:, :3, :3].transpose(0, 2, 1)) + \
        lidar_from_actor[:, None, :3, 3]
    return corners_to_boxes(corners)


def vehicle_entry_from_box(box_world_rh: np.ndarray, speed_mps: float,
                           centre_offset_xy=(0.0, 0.0)) -> dict:
    """The OPV2V ``vehicles[id]`` entry of a level box given in our right-handed world frame.

    ``centre_offset_xy`` is the box centre's offset from the actor origin in the actor's
    frame (CARLA ``bounding_box.location``; the origin sits on the ground).
    """
    x, y, z, dx, dy, dz, yaw = (float(v) for v in box_world_rh)
    ox, oy = centre_offset_xy
    # Our actor frame (right-handed) -> the same physical offset in CARLA's actor frame.
    c, s = math.cos(yaw), math.sin(yaw)
    origin_rh = (x - (c * ox - s * oy), y - (s * ox + c * oy), z - dz / 2)
    return {
        "angle": [0.0, -math.degrees(yaw), 0.0],
        "center": [ox, -oy, dz / 2],
        "extent": [dx / 2, dy / 2, dz / 2],
        "location": [origin_rh[0], -origin_rh[1], origin_rh[2]],
        "speed": speed_mps * 3.6,
    }


def camera_lidar_from_cv(extrinsic_ue4_from_lidar: np.ndarray) -> np.ndarray:
    """Our ``lidar_from_camera`` (right-handed LiDAR, OpenCV camera) from an OPV2V extrinsic."""
    lidar_lh_from_cv = invert_transform(extrinsic_ue4_from_lidar) @ UE4_FROM_CV
    return FLIP_Y @ lidar_lh_from_cv


def camera_entry_from_cv(world_from_lidar_rh: np.ndarray, lidar_from_camera_cv: np.ndarray,
                         intrinsic: np.ndarray) -> dict:
    """An OPV2V ``camera{i}`` entry: ``cords`` (world pose, CARLA), ``intrinsic``, ``extrinsic``."""
    world_lh_from_cam_ue4 = FLIP_Y @ world_from_lidar_rh @ lidar_from_camera_cv @ invert_transform(UE4_FROM_CV)
    cam_ue4_from_lidar_lh = invert_transform(FLIP_Y @ lidar_from_camera_cv @ invert_transform(UE4_FROM_CV))
    return {
        "cords": matrix_to_carla_pose(world_lh_from_cam_ue4),
        "intrinsic": np.asarray(intrinsic, dtype=np.float64).tolist(),
        "extrinsic": cam_ue4_from_lidar_lh.tolist(),
    }


# ---- reading --------------------------------------------------------------------------------
# One loader class, configured once. OpenCOOD adds implicit resolvers to the global PyYAML
# loader on every call, which grows without bound and slows loading down over an epoch.
YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path) -> dict:
    """Parse one OPV2V yaml with the safe (C when available) loader; errors name the file."""
    try:
        with open(path, "rb") as f:
            data = yaml.load(f, Loader=YamlLoader)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _pose6(meta: dict, key: str, where: str) -> list[float]:
    if key not in meta:
        raise ValueError(f"{where}: missing field {key!r}")
    value = meta[key]
    try:
        pose = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field {key!r} must be 6 numbers, got {value!r}") from None
    if len(pose) != 6 or not all(math.isfinite(v) for v in pose):
        raise ValueError(f"{where}: field {key!r} must be 6 finite numbers, got {value!r}")
    return pose


def world_from_lidar_rh(meta: dict, where: str) -> np.ndarray:
    """Our right-handed ``world_from_lidar`` from a yaml's ``lidar_pose``.

    ``lidar_pose`` is ``[x, y, z, roll, yaw, pitch]``: any 6 finite numbers make a rigid
    transform, so finiteness (:func:`_pose6`) is the whole check."""
    return lh_to_rh(carla_pose_to_matrix(_pose6(meta, "lidar_pose", where)))


def _vehicles(meta: dict, where: str) -> dict:
    vehicles = meta.get("vehicles") or {}
    if not isinstance(vehicles, dict):
        raise ValueError(f"{where}: field 'vehicles' must be a mapping, got {type(vehicles).__name__}")
    return vehicles


def _entry_error(field_name: str, e: Exception) -> ValueError:
    if isinstance(e, KeyError):
        return ValueError(f"{field_name}: missing field {e.args[0]!r}")
    text = str(e)
    return ValueError(text if text.startswith(field_name) else f"{field_name}: {text}")


def _valid_inputs(vehicles: dict):
    """(ids (M,) int64, (loc, angle, centre, half) each (M, 3) float64) when every entry passes
    :func:`_vehicle_inputs` and has an integer id, converted in one go; else None."""
    if not vehicles:
        return None
    try:
        ids = np.array([int(vid) for vid in vehicles], dtype=np.int64)
        values = np.array([[entry["location"], entry["angle"], entry["center"], entry["extent"]]
                           for entry in vehicles.values()], dtype=np.float64)
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    if values.shape != (len(vehicles), 4, 3) or not np.all(np.isfinite(values)) or \
            np.any(values[:, 3] < 0) or not all(type(e) is dict for e in vehicles.values()):
        return None
    return ids, tuple(np.ascontiguousarray(values[:, k]) for k in range(4))


def vehicle_boxes(meta: dict, world_from_lidar: np.ndarray, where: str):
    """(ids (M,) int64, boxes (M, 7) in the right-handed LiDAR frame) of a yaml's ``vehicles``.

    All boxes are computed in one batch; values and errors (the first bad vehicle in file
    order, as a per-vehicle loop would find it) are those of :func:`vehicle_box_in_lidar`
    applied to each entry.
    """
    vehicles = _vehicles(meta, where)
    fast = _valid_inputs(vehicles)
    if fast is not None:
        ids, (loc, angle, centre, half) = fast
        boxes = _vehicle_boxes_in_lidar(loc, angle, centre, half, world_from_lidar)
        if np.all(np.isfinite(boxes)):
            return ids, np.asarray(boxes, dtype=np.float64).reshape(-1, 7)
    # Something is wrong (or there is nothing): check entry by entry to name the first culprit.
    ids, inputs = [], []
    pending = None  # (vehicle index, error) of the first entry that fails its own checks
    for index, (vid, entry) in enumerate(vehicles.items()):
        field_name = f"{where}: vehicles[{vid}]"
        try:
            inputs.append(_vehicle_inputs(entry, field_name))
            ids.append(int(vid))
        except (KeyError, TypeError, ValueError) as e:
            pending = (index, _entry_error(field_name, e))
            break
    boxes = np.zeros((0, 7))
    if inputs:
        loc, angle, centre, half = (np.stack(column) for column in zip(*inputs))
        boxes = _vehicle_boxes_in_lidar(loc, angle, centre, half, world_from_lidar)
        bad = np.flatnonzero(~np.all(np.isfinite(boxes), axis=1))
        if len(bad) and (pending is None or bad[0] <= pending[0]):
            vid = list(vehicles)[bad[0]]
            raise ValueError(f"{where}: vehicles[{vid}]: box: expected finite numbers, got "
                             f"{boxes[bad[0]].tolist()!r}")
    if pending is not None:
        raise pending[1]
    return np.array(ids, dtype=np.int64), np.asarray(boxes, dtype=np.float64).reshape(-1, 7)


def _vehicle_boxes_per_entry(meta: dict, world_from_lidar: np.ndarray, where: str):
    """:func:`vehicle_boxes` one vehicle at a time: the reference its tests and
    ``tools/bench_pcd.py`` compare against."""
    vehicles = _vehicles(meta, where)
    ids, boxes = [], []
    for vid, entry in vehicles.items():
        field_name = f"{where}: vehicles[{vid}]"
        try:
            boxes.append(vehicle_box_in_lidar(entry, world_from_lidar, field_name))
            ids.append(int(vid))
        except (KeyError, TypeError, ValueError) as e:
            raise _entry_error(field_name, e) from None
    return np.array(ids, dtype=np.int64), np.array(boxes, dtype=np.float64).reshape(-1, 7)


def yaml_number(meta: dict, key: str, where: str, default: float = 0.0) -> float:
    """A finite number field (``ego_speed``...); ``default`` when absent."""
    value = meta.get(key, default)
    try:
        out = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out):
        raise ValueError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    return out


def yaml_flag(meta: dict, key: str, where: str) -> bool:
    """A boolean field (``RSU``); absent is False. ``bool("no")`` would be True, so strings fail."""
    value = meta.get(key, False)
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ValueError(f"{where}: field {key!r} must be true or false, got {value!r}")


def _matrix(entry: dict, field: str, shape: tuple[int, int], where: str) -> np.ndarray:
    """``entry[<last part of field>]`` as a float64 matrix of ``shape``; errors name ``field``."""
    key = field.rsplit(".", 1)[-1]
    if key not in entry:
        raise ValueError(f"{where}: missing field {field}")
    try:
        m = np.asarray(entry[key], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {field} is not a numeric matrix") from None
    if m.shape != shape:
        raise ValueError(f"{where}: {field} must be {shape[0]}x{shape[1]}, got {m.shape}")
    return m


def camera_calibration(meta: dict, name: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(K (3, 3), lidar_from_camera (4, 4) OpenCV axes) of ``camera<i>`` in a yaml.

    The camera's pose comes from its ``cords`` (its CARLA world pose) and the yaml's
    ``lidar_pose``, as HEAL and CoAlign compute it for their OPV2V camera models (they read
    ``cords`` and leave ``extrinsic`` aside; CoAlign has the ``extrinsic`` line commented out,
    and OpenCOOD#24 reports a projection with ``extrinsic`` that failed). A yaml without
    ``cords`` falls back to ``extrinsic`` (``camera_ue4_from_lidar``, checked rigid). The
    generator writes both, consistent with each other.
    """
    if name not in meta:
        raise ValueError(f"{where}: missing field {name!r}")
    entry = meta[name]
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: field {name!r} must be a mapping, got {type(entry).__name__}")
    k = check_finite(_matrix(entry, f"{name}.intrinsic", (3, 3), where),
                     f"{where}: {name}.intrinsic")
    if not (k[0, 0] > 0 and k[1, 1] > 0):
        raise ValueError(f"{where}: {name}.intrinsic focal lengths must be positive, got "
                         f"fx {k[0, 0]}, fy {k[1, 1]}")
    if "cords" in entry:
        world_from_cam_ue4 = carla_pose_to_matrix(_pose6(entry, "cords", f"{where}: {name}"))
        world_from_lidar = carla_pose_to_matrix(_pose6(meta, "lidar_pose", where))
        return k, camera_lidar_from_cv(invert_transform(world_from_cam_ue4) @ world_from_lidar)
    if "extrinsic" not in entry:
        raise ValueError(f"{where}: missing field {name}.cords (or {name}.extrinsic)")
    ext = _matrix(entry, f"{name}.extrinsic", (4, 4), where)
    # CARLA computes it from two rigid transforms, so it is rigid to float precision.
    check_rigid(ext, f"{where}: {name}.extrinsic", RIGID_TOL)
    return k, camera_lidar_from_cv(ext)


__all__ += ["YamlLoader", "load_yaml", "world_from_lidar_rh", "vehicle_boxes", "yaml_number",
            "yaml_flag", "camera_calibration"]
