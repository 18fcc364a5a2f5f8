"""One DAIR-V2X side frame (vehicle or roadside), file by file.

These are the readers the DAIR-V2X-C and V2X-Seq adapters load a side frame with, and the ones
``tools/check_dataset.py`` checks every side frame with, so a file the checker passes is a file
the loader reads, and a file the loader rejects is one the checker reports. Each reader takes
the side folder, the frame id and the frame's ``data_info.json`` row, reads one file (or the
files of one thing: a pose, a camera), validates it and raises
:class:`~v2xfuse.datasets.base.DatasetError` naming the file and the field. ``json`` is the JSON
reader to use (the adapters pass a cached :func:`read_json`).

Field spellings and defaults follow shared/reference/dair-v2x.md section 1 (docs vs data:
``label_lidar_std_path`` / ``label_lidar_path``, ``calib/camera_intrinsic`` / ``calib/camera``).
"""
from __future__ import annotations

import json as _json
from pathlib import Path

import numpy as np

from ..formats import dair as fmt
from ..formats.checks import json_type
from ..structures.coop import CameraObs
from ..structures.transforms import invert_transform
from . import images
from .base import DatasetError, error_message, reading

__all__ = ["VEHICLE", "INFRA", "POSE_FILES", "read_json", "rel_path", "timestamp_us",
           "calib_path", "read_calib", "read_pose_file", "read_pose", "read_relative_error",
           "pointcloud_path", "read_side_labels", "read_cameras", "read_image"]

VEHICLE, INFRA = "vehicle", "infrastructure"
# The calibrations a side's pose is built from, in order: vehicle
# world_from_lidar = novatel_to_world @ lidar_to_novatel; roadside = virtuallidar_to_world.
POSE_FILES = {VEHICLE: ("lidar_to_novatel", "novatel_to_world"), INFRA: ("virtuallidar_to_world",)}
# data_info key naming each calibration file (the official code falls back to calib/<name>/<id>.json).
CALIB_KEYS = {"lidar_to_novatel": "calib_lidar_to_novatel_path",
              "novatel_to_world": "calib_novatel_to_world_path",
              "virtuallidar_to_world": "calib_virtuallidar_to_world_path"}
LABEL_KEYS = ("label_lidar_std_path", "label_lidar_path")
CAMERA_TO_KEYS = {VEHICLE: ("calib_lidar_to_camera_path",),
                  INFRA: ("calib_virtuallidar_to_camera_path", "calib_virtuallidar_to_cam_path")}
INTRINSIC_FOLDERS = ("camera_intrinsic", "camera")


def read_json(path: Path, what: str = "json file"):
    """Parsed JSON; a missing, unreadable (a directory...) or malformed file raises
    :class:`DatasetError` naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(f"{path}: {what} is missing") from None
    except OSError as e:
        raise DatasetError(error_message(path, e, what)) from e
    try:
        return _json.loads(data)
    except (_json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DatasetError(f"{path}: malformed JSON ({e})") from None


def rel_path(value, default: str | None, where: str) -> str:
    """A relative path read from an index row field (``default`` when the row has none)."""
    if value in (None, "") and default is not None:
        return default
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: expected a relative file path, got {value!r}")
    return value


def row_where(side_dir: Path, fid: str) -> str:
    return f"{side_dir / 'data_info.json'}: frame {fid}"


def timestamp_us(row: dict, where: str) -> int:
    value = row.get("pointcloud_timestamp")
    try:
        return int(str(value).split(".")[0])
    except ValueError:
        raise DatasetError(f"{where}.pointcloud_timestamp: expected integer microseconds, "
                           f"got {value!r}") from None


def calib_path(side_dir: Path, row: dict, fid: str, name: str) -> Path:
    key = CALIB_KEYS[name]
    return side_dir / rel_path(row.get(key), f"calib/{name}/{fid}.json", f"{row_where(side_dir, fid)}.{key}")


def read_calib(side_dir: Path, row: dict, fid: str, name: str, json=read_json) -> tuple[dict, Path]:
    """(the JSON object of calibration ``name``, its path)."""
    path = calib_path(side_dir, row, fid, name)
    data = json(path, f"calibration file ({CALIB_KEYS[name]})")
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object, got a JSON {json_type(data)}")
    return data, path


def read_pose_file(side_dir: Path, row: dict, fid: str, name: str, json=read_json) -> np.ndarray:
    """(4, 4) rigid transform of one pose calibration (``lidar_to_novatel`` nests it under
    ``"transform"``)."""
    data, path = read_calib(side_dir, row, fid, name, json)
    where = str(path)
    if name == "lidar_to_novatel":
        if "transform" not in data:
            raise DatasetError(f"{path}: missing field 'transform'")
        data, where = data["transform"], f"{path}: transform"
    with reading(path):
        return fmt.pose_from_rt(data, where)


def read_pose(side_dir: Path, kind: str, fid: str, row: dict, json=read_json) -> np.ndarray:
    """(4, 4) world_from_lidar as calibrated (the roadside one before its offset correction)."""
    out = np.eye(4)
    for name in POSE_FILES[kind]:
        out = read_pose_file(side_dir, row, fid, name, json) @ out
    return out


def read_relative_error(side_dir: Path, fid: str, row: dict, json=read_json) -> tuple[float, float]:
    """The roadside calibration's ``relative_error`` (dx, dy): ``""`` anywhere in it is 0."""
    data, path = read_calib(side_dir, row, fid, "virtuallidar_to_world", json)
    with reading(path):
        return fmt.parse_offset(data.get("relative_error", ""), f"{path}: relative_error")


def pointcloud_path(side_dir: Path, fid: str, row: dict) -> Path:
    return side_dir / rel_path(row.get("pointcloud_path"), None, f"{row_where(side_dir, fid)}.pointcloud_path")


def read_side_labels(side_dir: Path, fid: str, row: dict, json=read_json) -> np.ndarray | None:
    """(M, 7) the side's own vehicle labels in its LiDAR frame, or None when its row names no
    label file (that agent has no labels; the rest of its sample is still good)."""
    key = next((k for k in LABEL_KEYS if row.get(k)), None)
    if key is None:
        return None
    path = side_dir / rel_path(row[key], None, f"{row_where(side_dir, fid)}.{key}")
    with reading(path, "label file"):
        return fmt.side_label_boxes(json(path, "label file"), str(path))


def read_cameras(side_dir: Path, kind: str, fid: str, row: dict, load_images: bool = False,
                 json=read_json) -> list[CameraObs]:
    """The front camera (intrinsic, extrinsic, image size and path, pixels if ``load_images``),
    or ``[]`` for a frame whose row names no image or no camera extrinsic.

    A row naming both is a camera: its intrinsic (``calib_camera_intrinsic_path``, else
    ``calib/camera_intrinsic/<id>.json`` or ``calib/camera/<id>.json``), its extrinsic and its
    image must all be readable, or the error names the file. The extrinsic is kept as given,
    inverted as a matrix: some released DAIR rotations are not orthonormal (issue #64), and
    ``K @ inv(lidar_from_camera) @ p`` then projects with the file's own ``R p + t``.
    """
    where = row_where(side_dir, fid)
    extr_key = next((k for k in CAMERA_TO_KEYS[kind] if row.get(k)), None)
    if not (extr_key and row.get("image_path")):
        return []  # a LiDAR-only frame
    intr_rel = row.get("calib_camera_intrinsic_path")
    if not intr_rel:
        intr_rel = next((f"calib/{d}/{fid}.json" for d in INTRINSIC_FOLDERS
                         if (side_dir / "calib" / d / f"{fid}.json").is_file()), None)
    if not intr_rel:
        raise DatasetError(f"{side_dir / 'calib' / INTRINSIC_FOLDERS[0] / f'{fid}.json'}: camera "
                           f"intrinsic is missing ({where} names image {row['image_path']!r} and "
                           f"{extr_key}, and no calib_camera_intrinsic_path)")
    intr_path = side_dir / rel_path(intr_rel, None, f"{where}.calib_camera_intrinsic_path")
    extr_path = side_dir / rel_path(row[extr_key], None, f"{where}.{extr_key}")
    img = side_dir / rel_path(row["image_path"], None, f"{where}.image_path")
    with reading(intr_path, "camera intrinsic"):
        k = fmt.camera_intrinsic(json(intr_path, "camera intrinsic"), str(intr_path))
    with reading(extr_path, "camera extrinsic"):
        cam_from_lidar = fmt.camera_from_rt(json(extr_path, "camera extrinsic"), str(extr_path))
    image, size = read_image(img, load_images)
    return [CameraObs("front", k, invert_transform(cam_from_lidar), size, image, str(img))]


def read_image(path: Path, load: bool):
    """(image or None, (height, width)): the pixels decoded (:func:`~.images.read_image`) when
    ``load``, else only the size from the JPEG header; a missing or unreadable file raises
    :class:`DatasetError` naming it."""
    if load:
        image = images.read_image(path)
        return image, image.shape[:2]
    return None, images.image_size(path)
