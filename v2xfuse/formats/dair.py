"""DAIR-V2X-C / V2X-Seq conventions (see shared/reference/dair-v2x.md sections 1-2).

* Frames are right-handed (x forward, y left, z up) already: no axis flips.
* Calibration JSONs hold ``rotation`` (3x3 nested lists) and ``translation`` as a 3x1 nested
  list ``[[x], [y], [z]]`` (a flat ``[x, y, z]`` is accepted too); ``lidar_to_novatel`` nests
  both under ``"transform"``. ``p_out = R @ p_in + t``.
* ``world_8_points`` corner order (object frame, x = heading, y = left): p0 (+l/2, +w/2),
  p1 (+l/2, -w/2), p2 (-l/2, -w/2), p3 (-l/2, +w/2), bottom face first then the top face.
  Ours starts at front-right and runs counter-clockwise, hence ``DAIR_CORNER_ORDER``.
* Side labels store numbers as JSON strings; every reader coerces with ``float()``.
"""
from __future__ import annotations

import numpy as np

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
    """(4, 4) transform from a ``{"rotation", "translation"}`` dict (nested or flat translation)."""
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
def vehicle_world_from_lidar(lidar_to_novatel: dict, novatel_to_world: dict, where: str) -> np.ndarray:
    """``world_from_lidar = novatel_to_world @ lidar_to_novatel`` ("transform" is nested in the first)."""
    if "transform" not in lidar_to_novatel:
        raise ValueError(f"{where}: lidar_to_novatel lacks the nested 'transform'")
    return rt_to_matrix(novatel_to_world, f"{where}: novatel_to_world") @ \
        rt_to_matrix(lidar_to_novatel["transform"], f"{where}: lidar_to_novatel.transform")


def parse_offset(offset, where: str) -> tuple[float, float]:
    """``system_error_offset`` / ``relative_error``: a dict of delta_x/delta_y, or "" meaning 0."""
    if offset in ("", None):
        return 0.0, 0.0
    if not isinstance(offset, dict):
        raise ValueError(f"{where}: expected {{'delta_x', 'delta_y'}} or \"\", got {offset!r}")
    return (parse_float(offset.get("delta_x", 0.0), f"{where}.delta_x"),
            parse_float(offset.get("delta_y", 0.0), f"{where}.delta_y"))


def infra_world_from_lidar(virtuallidar_to_world: dict, offset_xy: tuple[float, float],
                           where: str) -> np.ndarray:
    """The roadside LiDAR pose with the pair's systematic error corrected in the world frame."""
    m = rt_to_matrix(virtuallidar_to_world, f"{where}: virtuallidar_to_world")
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


__all__ += ["vehicle_world_from_lidar", "parse_offset", "infra_world_from_lidar",
            "world_8_points_to_box", "side_label_box"]
