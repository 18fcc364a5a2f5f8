"""DAIR-V2X-C / V2X-Seq conventions (see shared/reference/dair-v2x.md sections 1-2).

* Frames are right-handed (x forward, y left, z up) already: no axis flips.
* Calibration JSONs hold ``rotation`` (3x3 nested lists) and ``translation`` as a 3x1 nested
  list ``[[x], [y], [z]]`` (a flat ``[x, y, z]`` is accepted too); ``lidar_to_novatel`` nests
  both under ``"transform"``. ``p_out = R @ p_in + t``.
* ``world_8_points`` corner order (object frame, x = heading, y = left): p0 (+l/2, +w/2),
  p1 (+l/2, -w/2), p2 (-l/2, -w/2), p3 (-l/2, +w/2), bottom face first then the top face.
  Ours starts at front-right and runs counter-clockwise, hence ``DAIR_CORNER_ORDER``.
* Side labels store numbers as JSON strings; every reader coerces with ``float()``.

The readers here are what the adapters and ``tools/check_dataset.py`` both call: they raise
``ValueError`` naming the file and field (the adapters re-raise it as ``DatasetError``). Poses
are checked rigid and camera extrinsics nearly so (:mod:`v2xfuse.formats.checks` says why the
tolerances differ); every label entry needs a ``"type"`` (an entry without one used to be
dropped as "not a car", so a label file with none lost all its boxes without a word).
"""
from __future__ import annotations

import numpy as np

from .checks import CAMERA_RIGID_TOL, RIGID_TOL, check_rigid, json_type

__all__ = ["DAIR_CORNER_ORDER", "VEHICLE_CLASSES", "rt_to_matrix", "matrix_to_rt", "parse_float"]

# ours[i] = dair[DAIR_CORNER_ORDER[i]] and, the permutation being an involution, vice versa.
DAIR_CORNER_ORDER = np.array([1, 0, 3, 2, 5, 4, 7, 6])

# DAIR-V2X merges these into the single "car" class of its cooperative benchmark.
VEHICLE_CLASSES = ("car", "van", "truck", "bus")


def parse_float(value, where: str) -> float:
    """``float(value)`` for numbers stored as numbers or strings; errors name the field."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if not np.isfinite(out):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return out


def rt_to_matrix(calib: dict, where: str) -> np.ndarray:
    """(4, 4) transform from a ``{"rotation", "translation"}`` dict (nested or flat translation).

    Only the shape and finiteness are checked: :func:`pose_from_rt` and :func:`camera_from_rt`
    add the rigidity each use needs.
    """
    if not isinstance(calib, dict):
        raise ValueError(f"{where}: expected a JSON object with rotation and translation, got a "
                         f"JSON {json_type(calib)}")
    try:
        rot = np.asarray(calib["rotation"], dtype=np.float64)
        trans = np.asarray(calib["translation"], dtype=np.float64).reshape(-1)
    except KeyError as e:
        raise ValueError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError):
        raise ValueError(f"{where}: rotation/translation are not numeric arrays") from None
    if rot.shape != (3, 3) or trans.shape != (3,):
        raise ValueError(f"{where}: rotation must be 3x3 and translation 3 values, "
                         f"got {rot.shape} and {trans.shape}")
    if not (np.all(np.isfinite(rot)) and np.all(np.isfinite(trans))):
        raise ValueError(f"{where}: rotation/translation contain NaN or inf")
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = trans
    return out


def matrix_to_rt(m: np.ndarray) -> dict:
    """The JSON form DAIR-V2X writes: rotation 3x3, translation as a 3x1 nested list."""
    m = np.asarray(m, dtype=np.float64)
    return {"rotation": m[:3, :3].tolist(), "translation": [[float(v)] for v in m[:3, 3]]}


# ---- reading --------------------------------------------------------------------------------
def pose_from_rt(calib, where: str) -> np.ndarray:
    """(4, 4) rigid transform of a pose calibration (``novatel_to_world``, ``virtuallidar_to_world``,
    ``lidar_to_novatel.transform``): :func:`rt_to_matrix` plus :func:`~.checks.check_rigid`."""
    return check_rigid(rt_to_matrix(calib, where), where, RIGID_TOL)


def camera_from_rt(calib, where: str) -> np.ndarray:
    """(4, 4) ``camera_from_lidar`` of a ``(virtual)lidar_to_camera`` file, allowed the known
    non-orthonormality of DAIR's camera calibrations (:data:`~.checks.CAMERA_RIGID_TOL`)."""
    return check_rigid(rt_to_matrix(calib, where), where, CAMERA_RIGID_TOL)


def camera_intrinsic(data, where: str) -> np.ndarray:
    """(3, 3) K from a ``camera_intrinsic/{id}.json`` object (``cam_K``: 9 numbers, row-major)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object with 'cam_K', got a JSON {json_type(data)}")
    if "cam_K" not in data:
        raise ValueError(f"{where}: missing field 'cam_K'")
    try:
        k = np.asarray(data["cam_K"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: cam_K must be 9 numbers, got {data['cam_K']!r}") from None
    if k.size != 9 or not np.all(np.isfinite(k)):
        raise ValueError(f"{where}: cam_K must be 9 finite numbers, got {k.size} values")
    k = k.reshape(3, 3)
    if not (k[0, 0] > 0 and k[1, 1] > 0):
        raise ValueError(f"{where}: cam_K focal lengths must be positive, got fx {k[0, 0]}, fy {k[1, 1]}")
    return k


def vehicle_world_from_lidar(lidar_to_novatel: dict, novatel_to_world: dict, where: str) -> np.ndarray:
    """``world_from_lidar = novatel_to_world @ lidar_to_novatel`` ("transform" is nested in the first)."""
    if not isinstance(lidar_to_novatel, dict) or "transform" not in lidar_to_novatel:
        raise ValueError(f"{where}: lidar_to_novatel lacks the nested 'transform'")
    return pose_from_rt(novatel_to_world, f"{where}: novatel_to_world") @ \
        pose_from_rt(lidar_to_novatel["transform"], f"{where}: lidar_to_novatel.transform")


def parse_offset(offset, where: str) -> tuple[float, float]:
    """``system_error_offset`` / ``relative_error``: a dict of delta_x/delta_y, or "" meaning 0.

    An empty string *inside* the dict (``{"delta_x": "", "delta_y": ""}``) is 0 as well: the
    official toolkit reads it so, and real calibrations carry it.
    """
    if offset in ("", None):
        return 0.0, 0.0
    if not isinstance(offset, dict):
        raise ValueError(f"{where}: expected {{'delta_x', 'delta_y'}} or \"\", got {offset!r}")
    out = []
    for key in ("delta_x", "delta_y"):
        value = offset.get(key, 0.0)
        out.append(0.0 if value in ("", None) else parse_float(value, f"{where}.{key}"))
    return out[0], out[1]


def infra_world_from_lidar(virtuallidar_to_world: dict, offset_xy: tuple[float, float],
                           where: str) -> np.ndarray:
    """The roadside LiDAR pose with the pair's systematic error corrected in the world frame."""
    m = pose_from_rt(virtuallidar_to_world, f"{where}: virtuallidar_to_world")
    m[0, 3] += offset_xy[0]
    m[1, 3] += offset_xy[1]
    return m


def world_8_points_to_box(points, lidar_from_world: np.ndarray, where: str) -> np.ndarray:
    """(7,) box in a LiDAR frame from a cooperative label's ``world_8_points``."""
    from ..structures.boxes import corners_to_boxes  # local: keep this module light to import

    try:
        corners = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: world_8_points is not numeric") from None
    if corners.shape != (8, 3) or not np.all(np.isfinite(corners)):
        raise ValueError(f"{where}: world_8_points must be 8x3 finite numbers, got shape {corners.shape}")
    local = corners[DAIR_CORNER_ORDER] @ lidar_from_world[:3, :3].T + lidar_from_world[:3, 3]
    return corners_to_boxes(local[None])[0]


def side_label_box(entry: dict, where: str) -> np.ndarray:
    """(7,) box from a side label (``3d_location`` centre, ``3d_dimensions``, ``rotation``)."""
    try:
        loc, dims = entry["3d_location"], entry["3d_dimensions"]
        values = [parse_float(loc[k], f"{where}.3d_location.{k}") for k in "xyz"]
        values += [parse_float(dims[k], f"{where}.3d_dimensions.{k}") for k in "lwh"]
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r}") from None
    except TypeError:
        raise ValueError(f"{where}: 3d_location/3d_dimensions must be objects") from None
    values.append(parse_float(entry.get("rotation", 0.0), f"{where}.rotation"))
    return np.array(values)


def label_entries(labels, where: str) -> list:
    """A label file's parsed content, which must be a JSON array (an object used to give 0 boxes)."""
    if not isinstance(labels, list):
        raise ValueError(f"{where}: expected a JSON array of label objects, got a JSON "
                         f"{json_type(labels)}")
    return labels


def label_class(entry, where: str) -> str:
    """The lower-cased ``"type"`` of one label entry; a missing or empty one is an error."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a label object, got a JSON {json_type(entry)}")
    if "type" not in entry:
        raise ValueError(f"{where}: missing field 'type'")
    cls = entry["type"]
    if not isinstance(cls, str) or not cls.strip():
        raise ValueError(f"{where}.type: expected a class name, got {cls!r}")
    return cls.strip().lower()


def side_label_boxes(labels, where: str) -> np.ndarray:
    """(M, 7) boxes of the vehicle classes of a side label file (``label/lidar``,
    ``label/virtuallidar``), in that side's LiDAR frame; other classes are checked for a
    ``"type"`` only."""
    boxes = [side_label_box(entry, f"{where}: [{j}]")
             for j, entry in enumerate(label_entries(labels, where))
             if label_class(entry, f"{where}: [{j}]") in VEHICLE_CLASSES]
    return np.array(boxes, dtype=np.float64).reshape(-1, 7)


def cooperative_label_boxes(labels, lidar_from_world: np.ndarray, where: str) -> np.ndarray:
    """(M, 7) vehicle-class boxes of a ``cooperative/label_world`` file in a LiDAR frame, from
    ``world_8_points`` only; zero-size boxes are dropped (as the official loader does)."""
    boxes = []
    for j, entry in enumerate(label_entries(labels, where)):
        at = f"{where}: [{j}]"
        if label_class(entry, at) not in VEHICLE_CLASSES:
            continue
        if "world_8_points" not in entry:
            raise ValueError(f"{at}: missing field 'world_8_points'")
        points = entry["world_8_points"]
        if not isinstance(points, list) or not all(isinstance(p, list) for p in points):
            raise ValueError(f"{at}.world_8_points: expected a list of 8 [x, y, z] points")
        corners = [[parse_float(v, f"{at}.world_8_points") for v in p] for p in points]
        box = world_8_points_to_box(corners, lidar_from_world, at)
        if np.all(box[3:6] > 1e-6):
            boxes.append(box)
    return np.array(boxes, dtype=np.float64).reshape(-1, 7)


def track_label_boxes(labels, where: str) -> tuple[np.ndarray, np.ndarray]:
    """((M, 7) boxes, (M,) int64 track ids) of a V2X-Seq ``cooperative/label`` file (vehicle LiDAR
    frame, ``3d_location`` centre); zero-size boxes are dropped."""
    boxes, ids = [], []
    for j, entry in enumerate(label_entries(labels, where)):
        at = f"{where}: [{j}]"
        if label_class(entry, at) not in VEHICLE_CLASSES:
            continue
        box = side_label_box(entry, at)
        track = parse_float(entry.get("track_id", -1), f"{at}.track_id")
        if np.all(box[3:6] > 1e-6):
            boxes.append(box)
            ids.append(int(track))
    return np.array(boxes, dtype=np.float64).reshape(-1, 7), np.array(ids, dtype=np.int64)


__all__ += ["pose_from_rt", "camera_from_rt", "camera_intrinsic", "vehicle_world_from_lidar",
            "parse_offset", "infra_world_from_lidar", "world_8_points_to_box", "side_label_box",
            "label_entries", "label_class", "side_label_boxes", "cooperative_label_boxes",
            "track_label_boxes"]
