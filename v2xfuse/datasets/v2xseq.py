"""V2X-Seq SPD (sequential perception): DAIR-V2X-C's sides, plus sequences and track ids.

What differs from :mod:`v2xfuse.datasets.dair` (shared/reference/dair-v2x.md section 1.9):

* ``cooperative/data_info.json`` rows are ``{vehicle_frame, infrastructure_frame,
  vehicle_sequence, infrastructure_sequence, system_error_offset}``; side rows carry
  ``frame_id``/``sequence_id`` and ``start_frame_id``/``end_frame_id`` (vehicle) or
  ``valid_frames_splits`` (infrastructure). Side rows are joined by ``frame_id`` (falling back
  to the stem of ``pointcloud_path``).
* Ground truth is ``cooperative/label/<vehicle frame>.json``, already in the **vehicle LiDAR
  frame** (``3d_location`` centre, ``3d_dimensions`` l/w/h, ``rotation`` yaw); ``gt_ids`` are
  the integer ``track_id`` (6-digit strings in the files). Car/Van/Truck/Bus -> ``"car"``; an
  entry without ``"type"`` is an error (:func:`v2xfuse.formats.dair.track_label_boxes`).
* ``system_error_offset`` is added to the infrastructure -> vehicle translation **in the
  vehicle frame** (official ``Coord_transformation_spd.Coord_Infrastructure_lidar2Vehicle_lidar``),
  so the roadside pose served is ``W_veh @ (inv(W_veh) @ W_inf + [dx, dy, 0])``.
* The split file is ``cooperative-split-data-spd.json`` (``cooperative_split`` = vehicle frames).
* ``frame_id`` is the vehicle frame, ``sequence_id`` the ``vehicle_sequence``.

Asynchrony, duplicates, agent ids and intensity are handled as for DAIR-V2X-C.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..formats import dair as fmt
from ..registry import DATASETS
from ..structures.transforms import invert_transform
from .base import DatasetError, reading
from .dair import DairV2XCAdapter
from .dair_side import read_json

__all__ = ["V2XSeqAdapter", "read_track_labels"]

SPD_SPLIT_NAMES = ("cooperative-split-data-spd.json", "cooperative-split-data.json")


@DATASETS.register("v2x_seq_spd")
class V2XSeqAdapter(DairV2XCAdapter):
    """V2X-Seq SPD samples as :class:`CoopFrame`; arguments as :class:`DairV2XCAdapter`
    (``offset_source`` is ``"pair"`` or ``"none"``: SPD calibrations carry no ``relative_error``)."""

    name = "v2x-seq-spd"
    root_folder = "V2X-Seq-SPD"
    split_file_names = SPD_SPLIT_NAMES

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.offset_source == "calib":
            raise ValueError("V2X-Seq SPD has no relative_error in its calibrations; "
                             "use offset_source='pair' or 'none'")
        for rows in (self.vehicle_rows, self.infra_rows):  # join by frame_id where given
            for fid, row in list(rows.items()):
                if str(row.get("frame_id", fid)) != fid:
                    rows[str(row["frame_id"])] = rows.pop(fid)
        self.infra_segments = self._segments(self.infra_rows, self.root / "infrastructure-side" / "data_info.json")
        self.vehicle_segments = self._vehicle_segments()

    @staticmethod
    def row_ids(row: dict, where: str) -> tuple[str, str]:
        try:
            return str(row["vehicle_frame"]), str(row["infrastructure_frame"])
        except KeyError as e:
            raise DatasetError(f"{where}: missing field {e.args[0]!r}") from None

    def _corrected_infra_pose(self, world_from_infra, world_from_vehicle, offset):
        vehicle_from_infra = invert_transform(world_from_vehicle) @ world_from_infra
        vehicle_from_infra[:2, 3] += offset
        return world_from_vehicle @ vehicle_from_infra

    def _sequence_of(self, sample: dict, vehicle_row: dict, vid: str) -> str:
        return str(sample.get("vehicle_sequence", vehicle_row.get("sequence_id", "")))

    def _ground_truth(self, sample: dict, vid: str, lidar_from_world: np.ndarray):
        return read_track_labels(self.root, vid, self._json)


def read_track_labels(root: Path, vid: str, json=read_json) -> tuple[np.ndarray, np.ndarray]:
    """((M, 7) vehicle-frame boxes, (M,) track ids) of ``cooperative/label/<vehicle frame>.json``.
    Shared with ``tools/check_dataset.py``."""
    path = root / "cooperative" / "label" / f"{vid}.json"
    with reading(path, "cooperative label file"):
        return fmt.track_label_boxes(json(path, "cooperative label file"), str(path))
