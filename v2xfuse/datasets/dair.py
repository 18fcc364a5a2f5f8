"""DAIR-V2X-C (``cooperative-vehicle-infrastructure``): one vehicle and one roadside unit per sample.

Facts and sources are in shared/reference/dair-v2x.md; the choices this adapter makes:

* **Samples** are the rows of ``cooperative/data_info.json``, filtered by the official split file
  (``cooperative-split-data.json``: ``cooperative_split[split]`` lists *vehicle* frame ids, the
  id being the stem of ``vehicle_pointcloud_path``). Side rows are joined by frame id (the stem
  of each side row's ``pointcloud_path``).
* **Duplicated vehicle frames** (the same vehicle frame paired with two consecutive roadside
  frames, seen 6 times in the real val split): ``duplicates="keep"`` (default) keeps every row,
  as the official ``VICDataset`` evaluates both; ``"first"`` / ``"last"`` keep one (HEAL/CoAlign
  keep the last through a dict). Duplicates share ``frame_id``; ``sample_keys`` disambiguates.
* **Poses**: vehicle ``world_from_lidar = novatel_to_world @ lidar_to_novatel``; roadside
  ``world_from_lidar = virtuallidar_to_world`` with ``system_error_offset`` *added* to its
  x/y translation in the world frame (``T_inf->world = (R, t + [dx, dy, 0])``: official
  ``tools/dataset_converter/calib_i2v.py`` and ``v2x/dataset/dataset_utils/frame.py``; HEAL and
  FFNet do the same). ``offset_source="pair"`` (default) reads the offset from the cooperative
  row, ``"calib"`` from ``virtuallidar_to_world.relative_error`` (what the official evaluator
  reads). ``""`` means 0.
* **Ground truth**: ``cooperative/label_world/<vehicle id>.json``, geometry from
  ``world_8_points`` only, taken to the vehicle LiDAR frame; Car/Van/Truck/Bus -> ``"car"``,
  other classes and zero-size boxes dropped, an entry without ``"type"`` an error. DAIR-V2X-C
  has no track ids (``gt_ids`` = -1). Side labels (``side_labels=True``): a side row that names
  no label file gives that agent ``boxes=None`` rather than failing the sample.
* **Checks**: every pose is rigid (tolerance in :mod:`v2xfuse.formats.checks`), camera
  extrinsics nearly so, ground truth finite, label files JSON arrays; any failure while reading
  a sample is a :class:`DatasetError` naming the file and field.
* **Asynchrony** (VIC-Async-k): ``load(idx, {"infrastructure": k})`` serves the roadside frame k
  steps earlier in the same batch segment, ordered by ``pointcloud_timestamp``; the pair's
  offset is kept (the official TCLF reuses it). Where fewer than k earlier frames exist the
  earliest one is used (the official code drops such samples); the age actually served is in
  the timestamps.
* **History** (``history_frames``): each side's earlier frames in its own segment (the same
  timestamp order asynchrony uses; the vehicle's segment from its row's batch bounds). An
  earlier roadside frame gets the sample's offset and, for V2X-Seq, the correction through the
  sample's vehicle pose, as a delayed one does.
* **Intensity** is stored 0..255; it is divided by ``intensity_scale`` (255, as the KITTI
  converters; the official ``read_pcd`` uses 256).

Agent ids are ``"vehicle"`` (the ego) and ``"infrastructure"``.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..formats import dair as fmt
from ..registry import DATASETS
from ..structures.coop import AgentObs, CoopFrame
from ..structures.transforms import invert_transform
from .base import CoopAdapter, DatasetError, PointCache, disk_point_cache, load_point_file, reading
from .dair_side import (INFRA, VEHICLE, pointcloud_path, read_cameras, read_json, read_pose,
                        read_relative_error, read_side_labels, rel_path, row_where, timestamp_us)

__all__ = ["DairV2XCAdapter", "read_json", "find_split_file", "split_ids", "side_rows",
           "frame_id_of", "segment_of", "read_ground_truth", "VEHICLE", "INFRA"]

log = logging.getLogger(__name__)
VEHICLE_SIDE, INFRA_SIDE = "vehicle-side", "infrastructure-side"
SPLIT_NAMES = ("cooperative-split-data.json",)

# ---- index helpers shared with the V2X-Seq adapter and tools/check_dataset.py -----------------
def frame_id_of(path: str, where: str) -> str:
    """``"vehicle-side/velodyne/015376.pcd"`` -> ``"015376"``."""
    if not isinstance(path, str) or not path:
        raise DatasetError(f"{where}: expected a file path, got {path!r}")
    return Path(path).stem


def find_split_file(root: Path, names=SPLIT_NAMES) -> Path | None:
    for base in (root, root.parent):
        for name in names:
            if (base / name).is_file():
                return base / name
    return None


def split_ids(path: Path, split: str, key: str = "cooperative_split") -> set[str]:
    """Frame ids of ``split`` from an official split file (``{key: {split: [...]}}``) or a flat
    ``{split: [...]}`` / ``[...]`` one (HEAL's ``train.json``)."""
    data = read_json(path, "split file")
    if isinstance(data, dict) and key in data:
        data = data[key]
    if isinstance(data, dict):
        if split not in data:
            raise DatasetError(f"{path}: no split {split!r} under {key!r} (has {sorted(data)})")
        data = data[split]
    if not isinstance(data, list):
        raise DatasetError(f"{path}: {key}.{split} must be a list of frame ids")
    return {str(v) for v in data}


def side_rows(side_dir: Path, dropped: list[str] | None = None) -> dict[str, dict]:
    """A side's ``data_info.json`` rows by frame id (stem of ``pointcloud_path``).

    A row without a usable ``pointcloud_path`` raises :class:`DatasetError`, or, given a
    ``dropped`` list, is left out and described there (its frame is then "not listed", and a
    sample using it fails to load by itself).
    """
    path = side_dir / "data_info.json"
    rows = read_json(path, "data_info")
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a JSON array of rows")
    out = {}
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict) or "pointcloud_path" not in row:
                raise DatasetError(f"{path}: row {i} has no 'pointcloud_path'")
            out[frame_id_of(row["pointcloud_path"], f"{path}: row {i}.pointcloud_path")] = row
        except DatasetError as e:
            if dropped is None:
                raise
            dropped.append(str(e))
    return out


def read_ground_truth(root: Path, row: dict, vid: str, lidar_from_world: np.ndarray, where: str,
                      json=read_json) -> tuple[np.ndarray, np.ndarray]:
    """((M, 7) boxes in the frame of ``lidar_from_world``, (M,) ids = -1) of a cooperative row,
    from its ``cooperative_label_path`` (default ``cooperative/label_world/<vehicle id>.json``).
    Shared with ``tools/check_dataset.py``."""
    rel = rel_path(row.get("cooperative_label_path"), f"cooperative/label_world/{vid}.json",
                   f"{where}.cooperative_label_path")
    path = root / rel
    with reading(path, "cooperative label file"):
        gt = fmt.cooperative_label_boxes(json(path, "cooperative label file"), lidar_from_world, str(path))
    return gt, np.full(len(gt), -1, np.int64)


def segment_of(row: dict, fid: str) -> tuple[str, str]:
    """(batch_id, start id) of the continuous segment holding frame ``fid``.

    Accepts top-level ``batch_start_id``/``batch_end_id`` (vehicle side, official code) or
    ``valid_batch_splits: [{"batch_start_id", "batch_end_id"}, ...]`` (infrastructure side).
    """
    batch = str(row.get("batch_id", row.get("sequence_id", "")))
    splits = row.get("valid_batch_splits") or row.get("valid_frames_splits") or []
    for split in splits if isinstance(splits, list) else []:
        if not isinstance(split, dict):
            continue  # malformed segment bounds only cost the asynchrony lookup its precision
        start = str(split.get("batch_start_id", split.get("start_frame_id", "")))
        end = str(split.get("batch_end_id", split.get("end_frame_id", "")))
        if start.isdigit() and end.isdigit() and fid.isdigit() and int(start) <= int(fid) <= int(end):
            return batch, start
    return batch, str(row.get("batch_start_id", row.get("start_frame_id", "")))


@DATASETS.register("dair_v2x_c")
class DairV2XCAdapter(CoopAdapter):
    """DAIR-V2X-C samples as :class:`CoopFrame` (ego = the vehicle, plus the roadside unit).

    Args:
        root: the DAIR-V2X-C root (holding ``cooperative/``, ``vehicle-side/`` and
            ``infrastructure-side/``), or the folder above it.
        split: ``cooperative_split`` key (``"train"``, ``"val"``...), or ``"all"`` for every row.
        split_file: defaults to ``cooperative-split-data.json`` in ``root`` or its parent.
        offset_source: ``"pair"`` | ``"calib"`` | ``"none"`` (see the module docstring).
        duplicates: ``"keep"`` | ``"first"`` | ``"last"`` for repeated vehicle frames.
        cameras: attach the front camera (intrinsic, extrinsic, image path and size); off by
            default because released infrastructure images are partly missing (issue #113).
        load_images: decode JPEGs into ``CameraObs.image`` (else only their path and size);
            implies ``cameras`` (pixels of a camera not attached would go nowhere).
        side_labels: also read each side's own LiDAR labels into ``AgentObs.boxes``.
        intensity_scale: stored intensity is divided by this.
        skip_bad_frames: drop index rows that cannot be read (listed in ``dropped_rows``) and
            let the sampler skip samples whose files are bad (:mod:`v2xfuse.datasets.base`).
        history_frames: older frames per agent (:mod:`v2xfuse.datasets.base`).
        sensors: which sensors the vehicle (the ego) and the roadside unit carry
            (``dataset.sensors``, :mod:`v2xfuse.datasets.sensors`); the files of the others
            are not read.
        cache_points_mb: decoded clouds kept in memory (an LRU of that size; 0 = none).
        cache_dir: decoded clouds kept on disk, memory-mapped by later epochs, workers and
            runs (:mod:`v2xfuse.datasets.point_cache`); must lie outside ``root``.
    """

    name = "dair-v2x-c"
    frame_period_us = 100_000
    root_folder = "cooperative-vehicle-infrastructure"
    split_file_names = SPLIT_NAMES

    def __init__(self, root: str | Path, split: str = "train", split_file: str | Path | None = None,
                 offset_source: str = "pair", duplicates: str = "keep", load_images: bool = False,
                 cameras: bool = False, side_labels: bool = False, intensity_scale: float = 255.0,
                 skip_bad_frames: bool = False, cache_points_mb: float = 0.0,
                 history_frames: int = 0, sensors: Mapping | None = None,
                 cache_dir: str | Path | None = None):
        super().__init__(skip_bad_frames, history_frames, sensors)
        given_root = Path(root)
        if offset_source not in ("pair", "calib", "none"):
            raise ValueError(f"offset_source must be 'pair', 'calib' or 'none', got {offset_source!r}")
        if duplicates not in ("keep", "first", "last"):
            raise ValueError(f"duplicates must be 'keep', 'first' or 'last', got {duplicates!r}")
        root = Path(root)
        if not (root / "cooperative").is_dir() and (root / self.root_folder).is_dir():
            root = root / self.root_folder
        self.root = root
        self.offset_source = offset_source
        self.load_images = load_images
        self.cameras = cameras or load_images
        self.side_labels = side_labels
        self.intensity_scale = intensity_scale
        self.points = PointCache(cache_points_mb, disk_point_cache(
            cache_dir, [given_root, root], f"dair:intensity/{float(intensity_scale)!r}"))
        self._json = lru_cache(maxsize=16384)(read_json)
        # Index rows dropped here, under skip_bad_frames, before any DataLoader worker exists:
        # the index shrinks once, the same in every process.
        self.dropped_rows: list[str] = []
        dropped = self.dropped_rows if skip_bad_frames else None
        self.vehicle_rows = side_rows(root / VEHICLE_SIDE, dropped)
        self.infra_rows = side_rows(root / INFRA_SIDE, dropped)
        self.infra_segments = self._segments(self.infra_rows, root / INFRA_SIDE / "data_info.json")
        self.vehicle_segments = self._vehicle_segments()

        coop_path = self.index_path = root / "cooperative" / "data_info.json"
        rows = read_json(coop_path, "data_info")
        if not isinstance(rows, list):
            raise DatasetError(f"{coop_path}: expected a JSON array of rows")
        wanted = None
        if split != "all":
            split_file = (Path(split_file) if split_file is not None
                          else find_split_file(root, self.split_file_names))
            if split_file is None:
                raise DatasetError(f"{root}: no {self.split_file_names[0]} here or in the parent; "
                                   f"pass split_file or split='all'")
            wanted = split_ids(split_file, split)
        self.samples: list[dict] = []  # the cooperative rows, with "_vehicle_id", "_infra_id", "_row"
        by_vehicle: dict[str, int] = {}
        for i, row in enumerate(rows):
            where = f"{coop_path}: row {i}"
            try:
                if not isinstance(row, dict):
                    raise DatasetError(f"{where}: expected an object")
                vid, iid = self.row_ids(row, where)
            except DatasetError as e:
                if not skip_bad_frames:
                    raise
                self.dropped_rows.append(str(e))
                continue
            if wanted is not None and vid not in wanted:
                continue
            sample = dict(row, _vehicle_id=vid, _infra_id=iid, _row=i)
            if vid in by_vehicle and duplicates != "keep":
                if duplicates == "last":
                    self.samples[by_vehicle[vid]] = sample
                continue
            by_vehicle.setdefault(vid, len(self.samples))
            self.samples.append(sample)
        for problem in self.dropped_rows:
            log.warning("%s: skipping index row: %s", self.name, problem)
        if not self.samples:
            raise DatasetError(f"{coop_path}: no cooperative samples for split {split!r}")

    @staticmethod
    def row_ids(row: dict, where: str) -> tuple[str, str]:
        """(vehicle frame id, infrastructure frame id) of a cooperative data_info row."""
        vid = frame_id_of(row.get("vehicle_pointcloud_path") or row.get("vehicle_image_path"),
                          f"{where}.vehicle_pointcloud_path")
        iid = frame_id_of(row.get("infrastructure_pointcloud_path") or row.get("infrastructure_image_path"),
                          f"{where}.infrastructure_pointcloud_path")
        return vid, iid

    @staticmethod
    def _segments(rows: dict[str, dict], where: Path) -> dict[str, tuple[tuple[str, str], list[str]]]:
        """frame id -> (segment key, that segment's frame ids in timestamp order)."""
        groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
        for fid, row in rows.items():
            try:
                ts = timestamp_us(row, f"{where}: frame {fid}")
            except DatasetError:
                ts = int(fid) if fid.isdigit() else 0  # reported when the frame is loaded
            groups.setdefault(segment_of(row, fid), []).append((ts, fid))
        out = {}
        for key, members in groups.items():
            order = [fid for _, fid in sorted(members)]
            for fid in order:
                out[fid] = (key, order)
        return out

    def _vehicle_segments(self) -> dict:
        """:meth:`_segments` of the vehicle side; only history reads them, so without it the
        index is not built."""
        if not self.history_frames:
            return {}
        return self._segments(self.vehicle_rows, self.root / VEHICLE_SIDE / "data_info.json")

    def __len__(self) -> int:
        return len(self.samples)

    def sample_keys(self) -> list[tuple[str, str]]:
        """(vehicle id, infrastructure id) of every sample, unique even with duplicated vehicles."""
        return [(s["_vehicle_id"], s["_infra_id"]) for s in self.samples]

    def agent_ids(self, idx: int) -> list[str]:
        return [VEHICLE, INFRA]

    def describe(self, idx: int) -> str:
        s = self.samples[idx]
        return (f"{self.index_path}: row {s['_row']} (vehicle frame {s['_vehicle_id']}, "
                f"infrastructure frame {s['_infra_id']})")

    # ---- loading ---------------------------------------------------------------------------
    def _load(self, idx: int, delays: Mapping[str, int] | None) -> CoopFrame:
        s = self.samples[idx]
        where = f"{self.index_path}: row {s['_row']}"
        vid, iid = s["_vehicle_id"], s["_infra_id"]
        delay = int((delays or {}).get(INFRA, 0))
        if delay < 0:
            raise ValueError(f"delays[{INFRA!r}] must be >= 0, got {delay}")
        if delay:
            iid = self._earlier_infra(iid, delay, where)
        offset = self._offset(s, iid, where)
        vrow = self._side_row(self.vehicle_rows, vid, VEHICLE_SIDE, where)
        irow = self._side_row(self.infra_rows, iid, INFRA_SIDE, where)
        vehicle_pose = self._pose(VEHICLE, VEHICLE_SIDE, vid, vrow)
        infra_pose = self._corrected_infra_pose(self._pose(INFRA, INFRA_SIDE, iid, irow), vehicle_pose, offset)
        vehicle = self._agent(VEHICLE, VEHICLE_SIDE, vid, vrow, vehicle_pose)
        infra = self._agent(INFRA, INFRA_SIDE, iid, irow, infra_pose)
        gt, gt_ids = self._ground_truth(s, vid, invert_transform(vehicle_pose))
        return CoopFrame(self.name, self._sequence_of(s, vrow, vid), vid, [vehicle, infra], gt,
                         gt_ids, tuple("car" for _ in gt))

    def _corrected_infra_pose(self, world_from_infra: np.ndarray, world_from_vehicle: np.ndarray,
                              offset: tuple[float, float]) -> np.ndarray:
        """DAIR-V2X-C adds the offset to the roadside pose's translation in the world frame."""
        out = world_from_infra.copy()
        out[:2, 3] += offset
        return out

    def _ground_truth(self, sample: dict, vid: str, lidar_from_world: np.ndarray):
        """(M, 7) vehicle-frame boxes and (M,) ids of a sample."""
        return read_ground_truth(self.root, sample, vid, lidar_from_world,
                                 f"{self.index_path}: row {sample['_row']}", self._json)

    def _sequence_of(self, sample: dict, vehicle_row: dict, vid: str) -> str:
        return segment_of(vehicle_row, vid)[0]

    def _earlier_infra(self, iid: str, k: int, where: str) -> str:
        """The roadside frame ``k`` before ``iid``, or its segment's first (VIC-Async-k)."""
        earlier = self._frame_before(INFRA, iid, k, where)
        return earlier if earlier is not None else self.infra_segments[iid][1][0]

    def _frame_before(self, kind: str, fid: str, k: int, where: str) -> str | None:
        """The ``kind`` side's frame ``k`` before ``fid`` in its segment, None before its start."""
        segments, side = ((self.infra_segments, INFRA_SIDE) if kind == INFRA
                          else (self.vehicle_segments, VEHICLE_SIDE))
        if fid not in segments:
            raise DatasetError(f"{where}: {kind} frame {fid} is not in "
                               f"{self.root / side / 'data_info.json'}")
        _, order = segments[fid]
        pos = order.index(fid) - k
        return order[pos] if pos >= 0 else None

    def _past(self, idx: int, agent_id: str, steps: int) -> AgentObs | None:
        s = self.samples[idx]
        where = f"{self.index_path}: row {s['_row']}"
        vid = s["_vehicle_id"]
        vrow = self._side_row(self.vehicle_rows, vid, VEHICLE_SIDE, where)
        if agent_id == VEHICLE:
            fid = self._frame_before(VEHICLE, vid, steps, where)
            if fid is None:
                return None
            row = self._side_row(self.vehicle_rows, fid, VEHICLE_SIDE, where)
            return self._agent(VEHICLE, VEHICLE_SIDE, fid, row, self._pose(VEHICLE, VEHICLE_SIDE, fid, row))
        fid = self._frame_before(INFRA, s["_infra_id"], steps, where)
        if fid is None:
            return None
        row = self._side_row(self.infra_rows, fid, INFRA_SIDE, where)
        pose = self._corrected_infra_pose(self._pose(INFRA, INFRA_SIDE, fid, row),
                                          self._pose(VEHICLE, VEHICLE_SIDE, vid, vrow),
                                          self._offset(s, fid, where))
        return self._agent(INFRA, INFRA_SIDE, fid, row, pose)

    def _offset(self, sample: dict, iid: str, where: str) -> tuple[float, float]:
        if self.offset_source == "pair":
            with reading(where, "system_error_offset"):
                return fmt.parse_offset(sample.get("system_error_offset", ""), f"{where}.system_error_offset")
        if self.offset_source == "calib":
            row = self._side_row(self.infra_rows, iid, INFRA_SIDE, where)
            return read_relative_error(self.root / INFRA_SIDE, iid, row, self._json)
        return 0.0, 0.0

    def _side_row(self, rows: dict, fid: str, side: str, where: str) -> dict:
        try:
            return rows[fid]
        except KeyError:
            raise DatasetError(f"{where}: frame {fid} is not listed in "
                               f"{self.root / side / 'data_info.json'}") from None

    def _pose(self, kind: str, side: str, fid: str, row: dict) -> np.ndarray:
        """(4, 4) rigid world_from_lidar as calibrated (the roadside one before the offset)."""
        return read_pose(self.root / side, kind, fid, row, self._json)

    def _agent(self, kind: str, side: str, fid: str, row: dict, world_from_lidar: np.ndarray) -> AgentObs:
        """One side's frame; only the files of the sensors it carries are read (the vehicle is
        the ego)."""
        side_dir = self.root / side
        carried = self.sensors.of(kind, ego=kind == VEHICLE)
        points = np.zeros((0, 4), np.float32)
        if "lidar" in carried:
            pcd = pointcloud_path(side_dir, fid, row)
            points = self.points.get(str(pcd), lambda: load_point_file(pcd, self.intensity_scale))
        boxes = read_side_labels(side_dir, fid, row, self._json) if self.side_labels else None
        cams = (read_cameras(side_dir, kind, fid, row, self.load_images, self._json)
                if self.cameras and "camera" in carried else [])
        return AgentObs(kind, kind, world_from_lidar, timestamp_us(row, row_where(side_dir, fid)),
                        points, cams, boxes)
