"""Write simulated frames in the exact OPV2V / V2XSet on-disk format.

Layout (shared/reference/opencood-opv2v.md section 2)::

    <root>/<split>/<scenario>/data_protocol.yaml
    <root>/<split>/<scenario>/<agent id>/<%06d>.yaml | .pcd | _camera<i>.png

Agent folders are CARLA-style actor ids; roadside units get negative ids as in V2XSet. Frame
keys are six-digit CARLA frame numbers that advance by 2 per 10 Hz sample. Everything is
converted to CARLA's left-handed axes on the way out; poses are in degrees; vehicle boxes use
half extents; the point cloud is an ascii PCD with intensity packed in the red byte of ``rgb``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from ..formats.opv2v import (FLIP_Y, camera_entry_from_cv, matrix_to_carla_pose,
                             vehicle_entry_from_box)
from ..io.pcd import write_points_opv2v
from .generate import SimAgentFrame, SimFrame
from .world import Scene

__all__ = ["Opv2vWriter", "carla_centre_offset"]

_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def carla_centre_offset(actor_id: int) -> tuple[float, float]:
    """A fixed, per-actor offset of the box centre from the actor origin (CARLA blueprints
    place the origin off the box centre by up to a few decimetres along the length)."""
    r = np.random.default_rng(abs(int(actor_id)) + 7919)
    return float(r.uniform(-0.3, 0.3)), float(r.uniform(-0.02, 0.02))


def _plain(obj):
    """numpy -> plain Python for yaml.safe_dump."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


class Opv2vWriter:
    """Writes one scenario; call :meth:`write_frame` for each simulated frame in order."""

    def __init__(self, root: Path, split: str, scenario: str, scene: Scene, start_us: int,
                 first_key: int, rng: np.random.Generator, protocol: dict):
        self.dir = Path(root) / split / scenario
        self.dir.mkdir(parents=True, exist_ok=True)
        self.scene = scene
        self.start_us = start_us
        self.first_key = first_key
        self.rng = rng
        with open(self.dir / "data_protocol.yaml", "w") as f:
            yaml.dump(_plain(protocol), f, Dumper=_Dumper, sort_keys=False)

    def key(self, frame_index: int) -> str:
        return "%06d" % (self.first_key + 2 * frame_index)

    def write_frame(self, frame: SimFrame) -> dict:
        """Write every agent's files of one frame; returns ``{"key": frame key}``."""
        key = self.key(frame.frame_index)
        for agent in frame.agents:
            adir = self.dir / str(agent.agent_id)
            adir.mkdir(exist_ok=True)
            meta = self._agent_yaml(agent)
            with open(adir / f"{key}.yaml", "w") as f:
                yaml.dump(_plain(meta), f, Dumper=_Dumper, sort_keys=False)
            xyz = agent.points[:, :3].copy()
            xyz[:, 1] *= -1.0  # our right-handed LiDAR frame -> CARLA's left-handed one
            write_points_opv2v(adir / f"{key}.pcd", xyz, agent.points[:, 3])
            for cam in agent.cameras:
                Image.fromarray(cam.image).save(adir / f"{key}_{cam.name}.png", compress_level=1)
        return {"key": key}

    def _agent_yaml(self, agent: SimAgentFrame) -> dict:
        lidar_lh = FLIP_Y @ agent.world_from_lidar @ FLIP_Y
        body_lh = FLIP_Y @ agent.world_from_body @ FLIP_Y
        noisy = matrix_to_carla_pose(body_lh)
        noisy[0:2] = [v + self.rng.normal(0.0, 0.2) for v in noisy[0:2]]
        noisy[4] += self.rng.normal(0.0, 0.2)
        vehicles = {}
        seen = agent.seen_ids()
        for oid, box, speed in zip(agent.object_ids, agent.object_boxes, agent.object_speeds):
            if int(oid) in seen:
                vehicles[int(oid)] = vehicle_entry_from_box(box, speed, carla_centre_offset(oid))
        meta = {
            "lidar_pose": matrix_to_carla_pose(lidar_lh),
            "true_ego_pos": matrix_to_carla_pose(body_lh),
            "predicted_ego_pos": noisy,
            "ego_speed": agent.speed_mps * 3.6,
            "plan_trajectory": self._plan(agent),
        }
        for cam in agent.cameras:
            meta[cam.name] = camera_entry_from_cv(agent.world_from_lidar, cam.lidar_from_camera,
                                                  cam.intrinsic)
        meta["vehicles"] = vehicles
        if agent.kind == "infrastructure":
            meta["RSU"] = True
        return meta

    def _plan(self, agent: SimAgentFrame) -> list:
        """Waypoints 1..5 s ahead (world, CARLA axes) with the speed in km/h."""
        actor = next((a for a in self.scene.actors if a.actor_id == agent.agent_id), None)
        if actor is None or actor.path is None:
            return []
        t0 = (agent.timestamp_us - self.start_us) / 1e6
        out = []
        for dt in range(1, 6):
            box = self.scene.actor_box(actor, t0 + dt)
            out.append([float(box[0]), -float(box[1]), actor.speed * 3.6])
        return out


def opv2v_scenario_name(rng: np.random.Generator) -> str:
    """A collection-timestamp folder name like OPV2V's ``2021_08_22_21_41_24``."""
    month, day = int(rng.integers(8, 10)), int(rng.integers(10, 29))
    h, m, s = int(rng.integers(0, 24)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    return f"2021_{month:02d}_{day:02d}_{h:02d}_{m:02d}_{s:02d}"


__all__ += ["opv2v_scenario_name"]
