"""Write simulated vehicle + roadside sequences in the V2X-Seq SPD (sequential perception) format.

Layout and field spellings follow shared/reference/dair-v2x.md section 1.9::

    <root>/V2X-Seq-SPD/
        vehicle-side/, infrastructure-side/    as DAIR-V2X-C's, but data_info rows carry
                                               frame_id, sequence_id, num_frames and
                                               start/end_frame_id (vehicle) or
                                               valid_frames_splits (infrastructure);
                                               side labels add token and track_id, numbers numeric
        cooperative/label/<vehicle frame>.json boxes in the VEHICLE LiDAR frame, with track ids
        cooperative/data_info.json             {vehicle_frame, infrastructure_frame,
                                                vehicle_sequence, infrastructure_sequence,
                                                system_error_offset}
    <root>/cooperative-split-data-spd.json

Each scene is one sequence. SPD's ``system_error_offset`` is added to the infrastructure ->
vehicle translation *in the vehicle frame* (official ``Coord_transformation_spd``), unlike
DAIR-V2X-C's world-frame offset; the written ``virtuallidar_to_world`` is off accordingly.
"""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from ..formats.dair import matrix_to_rt
from ..structures.boxes import transform_boxes
from ..structures.transforms import invert_transform
from .generate import SimAgentFrame, SimFrame
from .world import Scene
from .write_dair import INFRA_SIDE, VEHICLE_SIDE, WORLD_SHIFT, DairWriter, _dump

__all__ = ["V2XSeqWriter", "SPD_FOLDER", "SPD_SPLIT_FILE"]

SPD_FOLDER = "V2X-Seq-SPD"
SPD_SPLIT_FILE = "cooperative-split-data-spd.json"
_BATCH_KEYS = ("batch_id", "batch_start_id", "batch_end_id", "valid_batch_splits")


def _token(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


class V2XSeqWriter(DairWriter):
    """Accumulates sequences (scenes) and writes the index files on :meth:`close`."""

    def __init__(self, root: Path, rng: np.random.Generator):
        super().__init__(root, rng, first_vehicle_id=0, first_infra_id=0)
        self.root = self.base / SPD_FOLDER
        self.tokens: dict[tuple[str, int], str] = {}

    def begin_batch(self, scene: Scene, start_us: int, n_frames: int, split: str) -> None:
        super().begin_batch(scene, start_us, n_frames, split)
        self.sequence = "%04d" % self.batch
        self.split["batch_split"][split][-1] = self.sequence

    def write_frame(self, frame: SimFrame) -> dict:
        veh, inf = frame.agents[0], frame.agents[1]
        if veh.kind != "vehicle" or inf.kind != "infrastructure":
            raise ValueError(f"V2X-Seq pairs are (vehicle, infrastructure); got ({veh.kind}, {inf.kind})")
        vid, iid = "%06d" % self.veh_ids[frame.frame_index], "%06d" % self.inf_ids[frame.frame_index]
        if self.rng.random() < 0.33:
            offset = {"delta_x": 0, "delta_y": 0}
        else:
            grid = np.arange(-1.1, 0.6601, 0.02)
            offset = {"delta_x": float(self.rng.choice(grid)), "delta_y": float(self.rng.choice(grid))}
        self._write_vehicle(veh, vid)
        self._write_infra(inf, iid, {"delta_x": 0, "delta_y": 0})
        # SPD: written pose such that  inv(W_veh) @ W_inf_written + [dx, dy, 0] == the true i->v.
        w_veh = WORLD_SHIFT @ veh.world_from_lidar
        veh_from_inf = invert_transform(veh.world_from_lidar) @ inf.world_from_lidar
        veh_from_inf[0, 3] -= offset["delta_x"]
        veh_from_inf[1, 3] -= offset["delta_y"]
        _dump(self.root / INFRA_SIDE / "calib" / "virtuallidar_to_world" / f"{iid}.json",
              matrix_to_rt(w_veh @ veh_from_inf))
        self._sequence_fields(self.rows[VEHICLE_SIDE][-1], vid, self.veh_ids, vehicle=True)
        self._sequence_fields(self.rows[INFRA_SIDE][-1], iid, self.inf_ids, vehicle=False)
        self._write_spd_cooperative(veh, inf, vid, iid, offset)
        self.split["vehicle_split"][self.split_name].append(vid)
        self.split["infrastructure_split"][self.split_name].append(iid)
        self.split["cooperative_split"][self.split_name].append(vid)
        return {"vehicle_id": vid, "infra_id": iid, "sequence_id": self.sequence,
                "system_error_offset": offset}

    def _sequence_fields(self, row: dict, fid: str, ids: list[int], vehicle: bool) -> None:
        for key in _BATCH_KEYS:
            row.pop(key, None)
        start, end = "%06d" % ids[0], "%06d" % ids[-1]
        row.update({"frame_id": fid, "sequence_id": self.sequence, "num_frames": len(ids)})
        if vehicle:
            row.update({"start_frame_id": start, "end_frame_id": end})
        else:
            row["valid_frames_splits"] = [{"start_frame_id": start, "end_frame_id": end}]

    def _token_of(self, side: str, oid: int) -> str:
        key = (side + self.sequence, int(oid))
        if key not in self.tokens:
            self.tokens[key] = _token(self.rng)
        return self.tokens[key]

    def _lidar_labels(self, agent: SimAgentFrame, cam) -> list:
        """DAIR-style side labels plus SPD's token and track_id, numbers as numbers."""
        lidar_from_world = invert_transform(agent.world_from_lidar)
        seen = agent.seen_ids()
        out = []
        for oid, cat, box in zip(agent.object_ids, agent.object_categories, agent.object_boxes):
            if int(oid) in seen:
                entry = _numeric(self._side_entry(cat, transform_boxes(lidar_from_world, box[None])[0], cam))
                side = "veh" if agent.kind == "vehicle" else "inf"
                out.append({"token": self._token_of(side, oid), "track_id": "%06d" % int(oid), **entry})
        return out

    def _write_spd_cooperative(self, veh: SimAgentFrame, inf: SimAgentFrame, vid: str, iid: str,
                               offset: dict) -> None:
        seen_v, seen_i = veh.seen_ids(), inf.seen_ids()
        veh_from_world = invert_transform(veh.world_from_lidar)
        labels = []
        for oid, cat, box in zip(veh.object_ids, veh.object_categories, veh.object_boxes):
            in_v, in_i = int(oid) in seen_v, int(oid) in seen_i
            if not (in_v or in_i):
                continue
            x, y, z, l, w, h, yaw = (float(v) for v in transform_boxes(veh_from_world, box[None])[0])
            # a cooperative label reuses the token of the side label it came from (real SPD rows)
            token = self._token_of("veh" if in_v else "inf", oid)
            labels.append({
                "token": token, "type": cat.capitalize(), "track_id": "%06d" % int(oid),
                "truncated_state": 0, "occluded_state": 0, "alpha": 0.0,
                "2d_box": {"xmin": 0.0, "ymin": 0.0, "xmax": 0.0, "ymax": 0.0},
                "3d_dimensions": {"l": l, "w": w, "h": h}, "3d_location": {"x": x, "y": y, "z": z},
                "rotation": yaw, "from_side": "coop" if in_v and in_i else "veh" if in_v else "inf",
                "veh_pointcloud_timestamp": str(veh.timestamp_us),
                "inf_pointcloud_timestamp": str(inf.timestamp_us),
                "veh_frame_id": vid, "inf_frame_id": iid,
                "veh_track_id": "%06d" % int(oid) if in_v else "-1",
                "inf_track_id": "%06d" % int(oid) if in_i else "-1",
                "veh_token": self._token_of("veh", oid) if in_v else "-1",
                "inf_token": self._token_of("inf", oid) if in_i else "-1",
            })
        _dump(self.root / "cooperative" / "label" / f"{vid}.json", labels)
        self.rows["cooperative"].append({
            "vehicle_frame": vid, "infrastructure_frame": iid, "vehicle_sequence": self.sequence,
            "infrastructure_sequence": self.sequence, "system_error_offset": dict(offset)})

    def close(self) -> None:
        _dump(self.root / VEHICLE_SIDE / "data_info.json", self.rows[VEHICLE_SIDE])
        _dump(self.root / INFRA_SIDE / "data_info.json", self.rows[INFRA_SIDE])
        _dump(self.root / "cooperative" / "data_info.json", self.rows["cooperative"])
        _dump(self.base / SPD_SPLIT_FILE, self.split)


def _numeric(entry: dict) -> dict:
    """SPD labels store numbers as JSON numbers (DAIR-V2X-C side labels use strings)."""
    out = {}
    for k, v in entry.items():
        if isinstance(v, dict):
            out[k] = {kk: float(vv) for kk, vv in v.items()}
        elif k in ("truncated_state", "occluded_state"):
            out[k] = int(v)
        elif k in ("alpha", "rotation"):
            out[k] = float(v)
        else:
            out[k] = v
    return out
