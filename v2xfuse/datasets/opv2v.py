"""OPV2V and V2XSet (same layout; V2XSet adds roadside units with negative ids).

Indexing: ``<root>/<split>/<scenario>/<agent id>/<key>.yaml|.pcd|_camera<i>.png``. Keys are
CARLA frame numbers (six digits, +2 per 10 Hz sample); they are treated as opaque sorted
strings and delays count samples, not key arithmetic. A sample's time is ``int(key) * 50 ms``.
A scenario is one sequence: history (``history_frames``) is an agent's earlier keys in it.

Agent selection (stated rule, not sort order): the ego is a connected vehicle (``ego``:
``"first"`` = the smallest non-negative id, numerically; ``"each"`` = every vehicle of the
scenario in turn, multiplying the samples). The other agents are those within ``comm_range``
metres of the ego at that instant, nearest first, up to ``max_agents`` in all.

Ground truth: the union of every selected agent's ``vehicles`` (OPV2V lists, per agent, the
vehicles its LiDAR hit), de-duplicated by actor id, built from location + center + angle +
half extents and expressed in the ego LiDAR frame. Every one of those numbers must be finite
(NaN ground truth is an error naming the yaml and the vehicle); so must ``lidar_pose``, which
is rigid by construction (x, y, z, roll, yaw, pitch).

Cameras (``camera_names``, OPV2V's ``camera0..3``): each one the yaml calibrates, with K from
its ``intrinsic`` and its pose from its ``cords`` and ``lidar_pose`` (see
:func:`v2xfuse.formats.opv2v.camera_calibration`). With ``load_images`` each one's
``<key>_<camera>.png`` is decoded (a missing or unreadable file is a :class:`DatasetError`
naming it, as is a PNG beside a yaml that does not calibrate its camera); without, no image
file is opened and the size comes from K (``cx = W / 2``, ``cy = H / 2``). ``sensors``
(``dataset.sensors``, :mod:`v2xfuse.datasets.sensors`) says which agents have which.

Decoded clouds (right-handed, after the y flip) can be kept in memory (``cache_points_mb``, an
LRU) and on disk (``cache_dir``, outside ``root``: :mod:`v2xfuse.datasets.point_cache`), where
later epochs, DataLoader workers and runs memory-map them instead of parsing the PCD again.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..formats import opv2v as fmt
from ..registry import DATASETS
from ..structures.boxes import transform_boxes
from ..structures.coop import AgentObs, CameraObs, CoopFrame
from ..structures.transforms import invert_transform
from .base import CoopAdapter, DatasetError, PointCache, disk_point_cache, load_point_file, reading
from .images import read_image

__all__ = ["Opv2vAdapter", "Opv2vMeta", "CAMERA_NAMES"]

log = logging.getLogger(__name__)
TICK_US = 50_000  # CARLA runs at 20 Hz; OPV2V keeps every second tick
CAMERA_NAMES = ("camera0", "camera1", "camera2", "camera3")


class Opv2vMeta:
    """What the loader keeps of one agent yaml: pose, world boxes, camera calibration.

    Also what ``tools/check_dataset.py`` builds to check a yaml, so both judge a file alike:
    any problem is a :class:`DatasetError` naming the file and the field (a finite
    ``lidar_pose``, finite boxes, a numeric ``ego_speed``, a boolean ``RSU``, camera
    calibrations: ``intrinsic`` 3x3 with positive focal lengths, ``cords`` 6 finite numbers).
    """

    __slots__ = ("path", "world_from_lidar", "ids", "boxes_world", "speed_mps", "is_rsu",
                 "cameras", "uncalibrated")

    def __init__(self, path: Path, camera_names: tuple[str, ...]):
        where = str(path)
        if not path.exists():
            raise DatasetError(f"{path}: yaml file is missing")
        self.path = path
        with reading(path, "yaml"):
            meta = fmt.load_yaml(path)
            self.world_from_lidar = fmt.world_from_lidar_rh(meta, where)
            self.ids, self.boxes_world = fmt.vehicle_boxes(meta, np.eye(4), where)
            self.speed_mps = fmt.yaml_number(meta, "ego_speed", where) / 3.6
            self.is_rsu = fmt.yaml_flag(meta, "RSU", where)
            self.cameras = {name: fmt.camera_calibration(meta, name, where)
                            for name in camera_names if name in meta}
        self.uncalibrated = tuple(name for name in camera_names if name not in self.cameras)

    def image_path(self, name: str) -> Path:
        """``<key>_<name>.png`` beside the yaml."""
        return self.path.with_name(f"{self.path.stem}_{name}.png")

    def check_calibrated(self) -> None:
        """An image of a camera the yaml does not calibrate is an error naming the yaml: its
        pixels could not be placed, and dropping the camera without a word would hide it."""
        for name in self.uncalibrated:
            if self.image_path(name).exists():
                raise DatasetError(f"{self.path}: missing field {name!r} (the calibration of "
                                   f"{self.image_path(name).name})")


@DATASETS.register("opv2v")
class Opv2vAdapter(CoopAdapter):
    name = "opv2v"
    frame_period_us = 2 * TICK_US

    def __init__(self, root: str | Path, split: str = "train", max_agents: int = 5,
                 comm_range: float = 70.0, ego: str = "first", include_rsu: bool = True,
                 camera_names: tuple[str, ...] = CAMERA_NAMES,
                 load_images: bool = False, skip_bad_frames: bool = False, cache_points_mb: float = 0.0,
                 meta_cache_size: int = 65536, history_frames: int = 0,
                 sensors: Mapping | None = None, cache_dir: str | Path | None = None):
        super().__init__(skip_bad_frames, history_frames, sensors)
        if ego not in ("first", "each"):
            raise ValueError(f"ego must be 'first' or 'each', got {ego!r}")
        if max_agents < 1:
            raise ValueError(f"max_agents must be >= 1, got {max_agents}")
        self.root = Path(root)
        self.split_dir = self.root / split
        if not self.split_dir.is_dir():
            raise DatasetError(f"{self.split_dir}: split folder is missing")
        self.max_agents = max_agents
        self.comm_range = comm_range
        self.include_rsu = include_rsu
        self.camera_names = tuple(camera_names)
        self.load_images = load_images
        # the variant names what _flip_points does: entries of another decoding never match
        self.points = PointCache(cache_points_mb, disk_point_cache(cache_dir, [self.root], "opv2v:flip_y"))
        self._meta = lru_cache(maxsize=meta_cache_size)(self._read_meta)
        # scenario -> agent id -> sorted keys
        self.scenarios: dict[str, dict[str, list[str]]] = {}
        self.samples: list[tuple[str, str, int]] = []  # (scenario, ego id, key index)
        for scen in sorted(p for p in self.split_dir.iterdir() if p.is_dir()):
            agents = {}
            for adir in sorted(p for p in scen.iterdir() if p.is_dir()):
                try:
                    aid = int(adir.name)
                except ValueError:
                    continue  # "additional" folders and the like
                if aid < 0 and not include_rsu:
                    continue
                keys = sorted(p.stem for p in adir.glob("*.yaml") if "additional" not in p.name)
                if keys:
                    agents[adir.name] = keys
            cavs = sorted((a for a in agents if int(a) >= 0), key=int)
            if not cavs:
                log.warning("%s: no connected vehicle folders, scenario skipped", scen)
                continue
            self.scenarios[scen.name] = agents
            for ego_id in (cavs if ego == "each" else cavs[:1]):
                self.samples += [(scen.name, ego_id, k) for k in range(len(agents[ego_id]))]
        if not self.samples:
            raise DatasetError(f"{self.split_dir}: no OPV2V samples found")

    def __len__(self) -> int:
        return len(self.samples)

    def _read_meta(self, path: Path) -> Opv2vMeta:
        return Opv2vMeta(path, self.camera_names)

    def describe(self, idx: int) -> str:
        scenario, ego_id, k = self.samples[idx]
        return f"{self._agent_dir(scenario, ego_id)}: frame {self.scenarios[scenario][ego_id][k]}"

    def _agent_dir(self, scenario: str, agent_id: str) -> Path:
        return self.split_dir / scenario / agent_id

    def _select_agents(self, scenario: str, ego_id: str, key: str) -> list[str]:
        agents = self.scenarios[scenario]
        ego_pos = self._meta(self._agent_dir(scenario, ego_id) / f"{key}.yaml").world_from_lidar[:2, 3]
        near = []
        for aid, keys in agents.items():
            if aid == ego_id or key not in keys:
                continue
            pos = self._meta(self._agent_dir(scenario, aid) / f"{key}.yaml").world_from_lidar[:2, 3]
            dist = float(np.hypot(*(pos - ego_pos)))
            if dist <= self.comm_range:
                near.append((dist, aid))
        near.sort()
        return [ego_id] + [aid for _, aid in near[: self.max_agents - 1]]

    def agent_ids(self, idx: int) -> list[str]:
        scenario, ego_id, k = self.samples[idx]
        return self._select_agents(scenario, ego_id, self.scenarios[scenario][ego_id][k])

    def _load(self, idx: int, delays: Mapping[str, int] | None) -> CoopFrame:
        scenario, ego_id, k = self.samples[idx]
        ego_keys = self.scenarios[scenario][ego_id]
        key = ego_keys[k]
        selected = self._select_agents(scenario, ego_id, key)
        agents, gt_ids, gt_boxes_world, gt_seen = [], [], [], set()
        for aid in selected:
            meta = self._meta(self._agent_dir(scenario, aid) / f"{key}.yaml")
            for oid, box in zip(meta.ids, meta.boxes_world):
                if int(oid) not in gt_seen:
                    gt_seen.add(int(oid))
                    gt_ids.append(int(oid))
                    gt_boxes_world.append(box)
            delay = 0 if aid == ego_id or not delays else int(delays.get(aid, 0))
            # a delay reaching before the agent's first frame serves that first frame
            obs_key = self._key_before(scenario, aid, key, delay) or self.scenarios[scenario][aid][0]
            agents.append(self._agent(scenario, aid, obs_key, aid == ego_id))
        ego_from_world = invert_transform(agents[0].world_from_lidar)
        gt = transform_boxes(ego_from_world, np.array(gt_boxes_world).reshape(-1, 7))
        return CoopFrame(self.name, scenario, key, agents, gt, np.array(gt_ids, np.int64),
                         tuple("car" for _ in gt_ids))

    def _key_before(self, scenario: str, aid: str, key: str, steps: int) -> str | None:
        """The key ``steps`` samples before ``key`` in agent ``aid``'s folder, None before its
        first (a scenario is one sequence)."""
        keys = self.scenarios[scenario][aid]
        pos = keys.index(key) - steps
        return keys[pos] if pos >= 0 else None

    def _past(self, idx: int, agent_id: str, steps: int) -> AgentObs | None:
        scenario, ego_id, k = self.samples[idx]
        key = self._key_before(scenario, agent_id, self.scenarios[scenario][ego_id][k], steps)
        return None if key is None else self._agent(scenario, agent_id, key, agent_id == ego_id)

    def _agent(self, scenario: str, aid: str, key: str, ego: bool) -> AgentObs:
        """Agent ``aid``'s observation at ``key``; only the files of the sensors it carries
        (``dataset.sensors``) are read."""
        adir = self._agent_dir(scenario, aid)
        meta = self._meta(adir / f"{key}.yaml")
        kind = "infrastructure" if int(aid) < 0 or meta.is_rsu else "vehicle"
        carried = self.sensors.of(kind, ego)
        points = np.zeros((0, 4), np.float32)
        if "lidar" in carried:
            pcd = adir / f"{key}.pcd"
            points = self.points.get(str(pcd), lambda: _flip_points(load_point_file(pcd)))
        cameras = []
        if "camera" in carried:
            if self.load_images:
                meta.check_calibrated()
            for name, (k_mat, lidar_from_camera) in meta.cameras.items():
                img_path = meta.image_path(name)
                image = read_image(img_path) if self.load_images else None
                size = image.shape[:2] if image is not None else _image_size(k_mat)
                cameras.append(CameraObs(name, k_mat, lidar_from_camera, size, image, str(img_path)))
        lidar_from_world = invert_transform(meta.world_from_lidar)
        return AgentObs(aid, kind, meta.world_from_lidar, int(key) * TICK_US, points, cameras,
                        transform_boxes(lidar_from_world, meta.boxes_world), meta.ids, meta.speed_mps)


def _flip_points(points: np.ndarray) -> np.ndarray:
    points[:, 1] *= -1.0  # CARLA left-handed -> right-handed
    return points


def _image_size(k: np.ndarray) -> tuple[int, int]:
    """Image size implied by a centred principal point (OPV2V's cameras have cx = W/2, cy = H/2)."""
    return int(round(2 * k[1, 2])), int(round(2 * k[0, 2]))

