"""Write simulated vehicle + roadside pairs in the exact DAIR-V2X-C on-disk format.

Layout and field spellings follow shared/reference/dair-v2x.md section 1::

    <root>/cooperative-vehicle-infrastructure/
        vehicle-side/{image,velodyne,calib/{camera_intrinsic,lidar_to_camera,lidar_to_novatel,
                      novatel_to_world},label/{camera,lidar}}/<id>.* + data_info.json
        infrastructure-side/{image,velodyne,calib/{camera_intrinsic,virtuallidar_to_camera,
                             virtuallidar_to_world},label/{camera,virtuallidar}}/<id>.* + data_info.json
        cooperative/label_world/<vehicle id>.json + data_info.json
    <root>/cooperative-split-data.json

Each scene is one batch. The world frame is shifted to DAIR-like coordinates (``WORLD_SHIFT``).
The roadside pose written in ``virtuallidar_to_world`` is off by the pair's
``system_error_offset``, which the loader must add back, as with the real data. Side labels
store numbers as strings; cooperative labels give boxes only through ``world_8_points``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..formats.dair import DAIR_CORNER_ORDER, matrix_to_rt
from ..io.pcd import write_points_dair
from ..structures.boxes import box_corners, transform_boxes, wrap_angle
from ..structures.transforms import invert_transform, make_transform, rotation_from_rpy
from .generate import SimAgentFrame, SimCamera, SimFrame
from .world import Scene

__all__ = ["DairWriter", "WORLD_SHIFT", "NOVATEL_FROM_LIDAR"]

WORLD_SHIFT = make_transform(np.eye(3), (2400.0, 1500.0, 20.0))
# The GNSS/INS unit sits below the roof LiDAR with its y axis forward (DAIR's novatel frame).
NOVATEL_FROM_LIDAR = make_transform(rotation_from_rpy(0.002, -0.003, math.pi / 2), (0.05, 0.9, 1.25))
VEHICLE_SIDE = "vehicle-side"
INFRA_SIDE = "infrastructure-side"


def _s(x: float) -> str:
    """DAIR side labels store numbers as strings; repr keeps every digit."""
    return repr(float(x))


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


class DairWriter:
    """Accumulates batches (scenes) and writes the index files on :meth:`close`."""

    def __init__(self, root: Path, rng: np.random.Generator, first_vehicle_id: int = 10000,
                 first_infra_id: int = 0):
        self.base = Path(root)
        self.root = self.base / "cooperative-vehicle-infrastructure"
        self.rng = rng
        self.next_vehicle = first_vehicle_id
        self.next_infra = first_infra_id
        self.rows = {VEHICLE_SIDE: [], INFRA_SIDE: [], "cooperative": []}
        self.split = {name: {"train": [], "val": [], "test": [], "test_A": []}
                      for name in ("batch_split", "vehicle_split", "infrastructure_split",
                                   "cooperative_split")}
        self.batch = -1

    # ---- batches --------------------------------------------------------------------------
    def begin_batch(self, scene: Scene, start_us: int, n_frames: int, split: str) -> None:
        if split not in self.split["batch_split"]:
            raise ValueError(f"DAIR-V2X split names are {sorted(self.split['batch_split'])}, "
                             f"got {split!r}")
        self.batch += 1
        self.scene = scene
        self.start_us = start_us
        self.split_name = split
        self.veh_ids = [self.next_vehicle + k for k in range(n_frames)]
        self.inf_ids = [self.next_infra + k for k in range(n_frames)]
        self.next_vehicle += n_frames + int(self.rng.integers(3, 30))
        self.next_infra += n_frames + int(self.rng.integers(3, 30))
        self.intersection = f"yizhuang{int(self.rng.integers(1, 20)):02d}"
        self.split["batch_split"][split].append(str(self.batch))

    # ---- frames ---------------------------------------------------------------------------
    def write_frame(self, frame: SimFrame) -> dict:
        """Write one vehicle/roadside pair; returns the offsets used (for the round-trip tests)."""
        veh, inf = frame.agents[0], frame.agents[1]
        if veh.kind != "vehicle" or inf.kind != "infrastructure":
            raise ValueError("DAIR-V2X-C pairs are (vehicle, infrastructure); got "
                             f"({veh.kind}, {inf.kind})")
        vid, iid = "%06d" % self.veh_ids[frame.frame_index], "%06d" % self.inf_ids[frame.frame_index]
        if self.rng.random() < 0.33:
            offset = {"delta_x": 0, "delta_y": 0}
        else:
            grid = np.arange(-1.1, 0.6601, 0.04)
            offset = {"delta_x": float(self.rng.choice(grid)), "delta_y": float(self.rng.choice(grid))}
        self._write_vehicle(veh, vid)
        self._write_infra(inf, iid, offset)
        self._write_cooperative(veh, inf, vid, iid, offset)
        self.split["vehicle_split"][self.split_name].append(vid)
        self.split["infrastructure_split"][self.split_name].append(iid)
        self.split["cooperative_split"][self.split_name].append(vid)
        return {"vehicle_id": vid, "infra_id": iid, "system_error_offset": offset}

    def _common(self, side: str, agent: SimAgentFrame, fid: str, cam: SimCamera | None) -> dict:
        d = self.root / side
        (d / "velodyne").mkdir(parents=True, exist_ok=True)
        write_points_dair(d / "velodyne" / f"{fid}.pcd", agent.points[:, :3], agent.points[:, 3] * 255.0)
        row = {"pointcloud_path": f"velodyne/{fid}.pcd",
               "pointcloud_timestamp": str(agent.timestamp_us)}
        if cam is not None:
            (d / "image").mkdir(parents=True, exist_ok=True)
            Image.fromarray(cam.image).save(d / "image" / f"{fid}.jpg", quality=90)
            row.update({"image_path": f"image/{fid}.jpg", "image_timestamp": str(cam.timestamp_us)})
            _dump(d / "calib" / "camera_intrinsic" / f"{fid}.json",
                  {"cam_D": [0.0] * 5, "cam_K": cam.intrinsic.reshape(-1).tolist()})
        return row

    def _batch_fields(self, ids: list[int]) -> dict:
        return {"batch_id": str(self.batch), "batch_start_id": "%06d" % ids[0],
                "batch_end_id": "%06d" % ids[-1]}

    def _write_vehicle(self, veh: SimAgentFrame, vid: str) -> None:
        cam = veh.cameras[0] if veh.cameras else None
        row = self._common(VEHICLE_SIDE, veh, vid, cam)
        d = self.root / VEHICLE_SIDE
        world_from_lidar = WORLD_SHIFT @ veh.world_from_lidar
        _dump(d / "calib" / "lidar_to_novatel" / f"{vid}.json", {"transform": matrix_to_rt(NOVATEL_FROM_LIDAR)})
        _dump(d / "calib" / "novatel_to_world" / f"{vid}.json",
              matrix_to_rt(world_from_lidar @ invert_transform(NOVATEL_FROM_LIDAR)))
        row.update({"calib_novatel_to_world_path": f"calib/novatel_to_world/{vid}.json",
                    "calib_lidar_to_novatel_path": f"calib/lidar_to_novatel/{vid}.json"})
        if cam is not None:
            _dump(d / "calib" / "lidar_to_camera" / f"{vid}.json",
                  matrix_to_rt(invert_transform(cam.lidar_from_camera)))
            row.update({"calib_lidar_to_camera_path": f"calib/lidar_to_camera/{vid}.json",
                        "calib_camera_intrinsic_path": f"calib/camera_intrinsic/{vid}.json",
                        "label_camera_std_path": f"label/camera/{vid}.json"})
            _dump(d / "label" / "camera" / f"{vid}.json", self._camera_labels(veh, cam))
        _dump(d / "label" / "lidar" / f"{vid}.json", self._lidar_labels(veh, cam))
        row["label_lidar_std_path"] = f"label/lidar/{vid}.json"
        row.update(self._batch_fields(self.veh_ids))
        row["intersection_loc"] = ""
        self.rows[VEHICLE_SIDE].append(row)

    def _write_infra(self, inf: SimAgentFrame, iid: str, offset: dict) -> None:
        cam = inf.cameras[0] if inf.cameras else None
        row = self._common(INFRA_SIDE, inf, iid, cam)
        d = self.root / INFRA_SIDE
        written = WORLD_SHIFT @ inf.world_from_lidar
        written[0, 3] -= offset["delta_x"]
        written[1, 3] -= offset["delta_y"]
        calib = matrix_to_rt(written)
        calib["relative_error"] = dict(offset)
        _dump(d / "calib" / "virtuallidar_to_world" / f"{iid}.json", calib)
        row["calib_virtuallidar_to_world_path"] = f"calib/virtuallidar_to_world/{iid}.json"
        if cam is not None:
            _dump(d / "calib" / "virtuallidar_to_camera" / f"{iid}.json",
                  matrix_to_rt(invert_transform(cam.lidar_from_camera)))
            row.update({"calib_virtuallidar_to_camera_path": f"calib/virtuallidar_to_camera/{iid}.json",
                        "calib_camera_intrinsic_path": f"calib/camera_intrinsic/{iid}.json",
                        "label_camera_std_path": f"label/camera/{iid}.json",
                        "camera_ip": f"172_18_9_{100 + self.batch % 100}", "camera_id": "1"})
            _dump(d / "label" / "camera" / f"{iid}.json", self._camera_labels(inf, cam))
        _dump(d / "label" / "virtuallidar" / f"{iid}.json", self._lidar_labels(inf, cam))
        row["label_lidar_std_path"] = f"label/virtuallidar/{iid}.json"
        row["lidar_id"] = str(140 + self.batch % 50)
        row["intersection_loc"] = self.intersection
        fields = self._batch_fields(self.inf_ids)
        row.update(fields)
        row["valid_batch_splits"] = [{"batch_start_id": fields["batch_start_id"],
                                      "batch_end_id": fields["batch_end_id"]}]
        self.rows[INFRA_SIDE].append(row)

    # ---- labels ---------------------------------------------------------------------------
    def _side_entry(self, category: str, box: np.ndarray, cam: SimCamera | None) -> dict:
        x, y, z, l, w, h, yaw = (float(v) for v in box)
        box2d = {"xmin": "0", "ymin": "0", "xmax": "0", "ymax": "0"}
        alpha = 0.0
        if cam is not None:
            cam_from_lidar = invert_transform(cam.lidar_from_camera)
            corners = box_corners(box[None])[0] @ cam_from_lidar[:3, :3].T + cam_from_lidar[:3, 3]
            if np.all(corners[:, 2] > 0.1):
                uv = corners[:, :2] / corners[:, 2:3] * np.diag(cam.intrinsic)[:2] + cam.intrinsic[:2, 2]
                h_img, w_img = cam.image.shape[:2]
                u0, v0 = np.clip(uv.min(0), 0, [w_img, h_img])
                u1, v1 = np.clip(uv.max(0), 0, [w_img, h_img])
                if u1 > u0 and v1 > v0:
                    box2d = {"xmin": _s(u0), "ymin": _s(v0), "xmax": _s(u1), "ymax": _s(v1)}
                centre = cam_from_lidar[:3, :3] @ box[:3] + cam_from_lidar[:3, 3]
                alpha = float(wrap_angle(-yaw - math.pi / 2 - math.atan2(centre[0], centre[2])))
        return {"type": category.capitalize(), "truncated_state": "0", "occluded_state": "0",
                "alpha": _s(alpha), "2d_box": box2d,
                "3d_dimensions": {"h": _s(h), "w": _s(w), "l": _s(l)},
                "3d_location": {"x": _s(x), "y": _s(y), "z": _s(z)}, "rotation": _s(yaw)}

    def _lidar_labels(self, agent: SimAgentFrame, cam: SimCamera | None) -> list:
        """Boxes at the point-cloud time of every vehicle this agent's LiDAR hit, 360 degrees."""
        lidar_from_world = invert_transform(agent.world_from_lidar)
        seen = agent.seen_ids()
        out = []
        for oid, cat, box in zip(agent.object_ids, agent.object_categories, agent.object_boxes):
            if int(oid) in seen:
                out.append(self._side_entry(cat, transform_boxes(lidar_from_world, box[None])[0], cam))
        return out

    def _camera_labels(self, agent: SimAgentFrame, cam: SimCamera) -> list:
        """Boxes at the image time, in the LiDAR frame, of vehicles visible in the image."""
        t = (cam.timestamp_us - self.start_us) / 1e6
        lidar_from_world = invert_transform(cam.world_from_camera @ invert_transform(cam.lidar_from_camera))
        ids, counts = np.unique(cam.owner[cam.owner >= 0], return_counts=True)
        visible = {int(i) for i, c in zip(ids, counts) if c >= 20 and i != agent.agent_id}
        out = []
        for actor in self.scene.actors:
            if actor.actor_id in visible:
                box = transform_boxes(lidar_from_world, self.scene.actor_box(actor, t)[None])[0]
                out.append(self._side_entry(actor.category, box, cam))
        return out

    def _write_cooperative(self, veh: SimAgentFrame, inf: SimAgentFrame, vid: str, iid: str,
                           offset: dict) -> None:
        seen = veh.seen_ids() | inf.seen_ids()
        veh_from_world = invert_transform(veh.world_from_lidar)
        labels = []
        for oid, cat, box in zip(veh.object_ids, veh.object_categories, veh.object_boxes):
            if int(oid) not in seen:
                continue
            corners = box_corners(box[None])[0] + WORLD_SHIFT[:3, 3]
            yaw_vehicle_frame = transform_boxes(veh_from_world, box[None])[0, 6]
            labels.append({
                "type": cat.capitalize(), "occluded_state": 0, "truncated_state": 0,
                "2d_box": {"xmin": 0.0, "ymin": 0.0, "xmax": 0.0, "ymax": 0.0},
                "3d_dimensions": {"h": float(box[5]), "w": float(box[4]), "l": float(box[3])},
                "3d_location": dict(zip("xyz", (float(v) for v in box[:3] + WORLD_SHIFT[:3, 3]))),
                # Real files carry the side label's yaw here, not the world heading; only
                # world_8_points is geometry a reader may use.
                "rotation": float(yaw_vehicle_frame),
                "world_8_points": corners[DAIR_CORNER_ORDER].tolist(),
                "system_error_offset": dict(offset),
            })
        _dump(self.root / "cooperative" / "label_world" / f"{vid}.json", labels)
        has_images = bool(veh.cameras) and bool(inf.cameras)
        self.rows["cooperative"].append({
            "infrastructure_image_path": f"{INFRA_SIDE}/image/{iid}.jpg" if has_images else "",
            "infrastructure_pointcloud_path": f"{INFRA_SIDE}/velodyne/{iid}.pcd",
            "vehicle_image_path": f"{VEHICLE_SIDE}/image/{vid}.jpg" if has_images else "",
            "vehicle_pointcloud_path": f"{VEHICLE_SIDE}/velodyne/{vid}.pcd",
            "cooperative_label_path": f"cooperative/label_world/{vid}.json",
            "system_error_offset": dict(offset),
        })

    def close(self) -> None:
        _dump(self.root / VEHICLE_SIDE / "data_info.json", self.rows[VEHICLE_SIDE])
        _dump(self.root / INFRA_SIDE / "data_info.json", self.rows[INFRA_SIDE])
        _dump(self.root / "cooperative" / "data_info.json", self.rows["cooperative"])
        _dump(self.base / "cooperative-split-data.json", self.split)
