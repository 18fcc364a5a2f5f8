"""Run the synthetic world: sample every agent's sensors over a sequence and keep the truth.

The records produced here (:class:`SimFrame`) are the generator's ground truth: the format
writers serialise them, and the round-trip tests compare what the dataset readers load back
against them. Everything is in the scene's right-handed world frame; the writers apply each
dataset's own conventions (CARLA left-handed axes, DAIR-V2X's shifted world).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..structures.transforms import invert_transform
from .config import SimConfig
from .raycast import BUILDING, Solids
from .sensors import (camera_intrinsic, lidar_from_camera, render_camera, scan_lidar)
from .world import Agent, Scene

__all__ = ["SimCamera", "SimAgentFrame", "SimFrame", "simulate_scene", "ground_model",
           "solids_at", "visibility_stats"]

MIN_POINTS_SEEN = 1  # OPV2V lists a vehicle for a CAV when at least one of its points hit it


@dataclass
class SimCamera:
    name: str
    intrinsic: np.ndarray          # (3, 3)
    lidar_from_camera: np.ndarray  # (4, 4), OpenCV camera axes
    world_from_camera: np.ndarray  # (4, 4)
    timestamp_us: int
    image: np.ndarray              # (H, W, 3) uint8
    owner: np.ndarray              # (H, W) int64 what each pixel shows


@dataclass
class SimAgentFrame:
    """One agent's sensors and the world state at that agent's capture time.

    ``object_boxes`` (M, 7) are world-frame boxes of every actor at ``timestamp_us``;
    ``points_on`` maps actor id -> number of this agent's LiDAR points on it.
    """

    agent_id: int
    kind: str
    timestamp_us: int
    world_from_lidar: np.ndarray
    world_from_body: np.ndarray
    speed_mps: float
    points: np.ndarray             # (N, 4) float32, LiDAR frame
    point_owner: np.ndarray        # (N,) int64
    object_ids: np.ndarray         # (M,) int64
    object_boxes: np.ndarray       # (M, 7) world frame
    object_categories: list[str]
    object_speeds: np.ndarray      # (M,) m/s
    points_on: dict[int, int]
    cameras: list[SimCamera] = field(default_factory=list)

    def seen_ids(self, min_points: int = MIN_POINTS_SEEN) -> set[int]:
        return {i for i, n in self.points_on.items() if n >= min_points and i != self.agent_id}


@dataclass
class SimFrame:
    scene_id: str
    frame_index: int
    agents: list[SimAgentFrame]    # the scene's ego first


def ground_model(scene: Scene):
    """Reflectivity and albedo of the ground: asphalt, lane markings, sidewalks, verges."""
    road_from_world = invert_transform(scene.world_from_road)
    w = scene.spec_lane_width
    n = scene.lanes_per_direction
    road_half = n * w + 2.5
    sidewalk = road_half + 3.5

    def model(xy_world: np.ndarray):
        xy = xy_world @ road_from_world[:2, :2].T + road_from_world[:2, 3]
        x, y = xy[:, 0], xy[:, 1]
        ax, ay = np.abs(x), np.abs(y)
        on_x_road = ay < road_half
        on_y_road = ax < road_half
        road = on_x_road | on_y_road
        walk = ~road & ((ay < sidewalk) | (ax < sidewalk))
        reflect = np.where(road, 0.12, np.where(walk, 0.32, 0.22))
        albedo = np.where(road[:, None], [0.28, 0.28, 0.30],
                          np.where(walk[:, None], [0.62, 0.60, 0.58], [0.30, 0.45, 0.22]))
        junction = on_x_road & on_y_road
        # Lane lines: dashed between lanes, solid double centre line, outside the junction.
        marks = np.zeros(len(x), dtype=bool)
        for along, across, on in ((x, ay, on_x_road), (y, ax, on_y_road)):
            dashed = (np.mod(along, 9.0) < 3.0)
            for lane in range(1, n):
                marks |= on & ~junction & dashed & (np.abs(across - lane * w) < 0.08)
            marks |= on & ~junction & (np.abs(across - 0.15) < 0.08)
            marks |= on & ~junction & (np.abs(across - n * w) < 0.1)
        stop = road_half + 1.0
        marks |= on_x_road & (np.abs(ax - stop) < 0.25) & ~on_y_road & (ay < n * w)
        marks |= on_y_road & (np.abs(ay - stop) < 0.25) & ~on_x_road & (ax < n * w)
        reflect = np.where(marks, 0.75, reflect)
        albedo = np.where(marks[:, None], [0.92, 0.92, 0.88], albedo)
        return reflect, albedo

    return model


def _building_solids(scene: Scene) -> Solids:
    road_yaw = math.atan2(scene.world_from_road[1, 0], scene.world_from_road[0, 0])
    rows = []
    for b in scene.buildings:
        c = scene.world_from_road[:2, :2] @ [b.cx, b.cy] + scene.world_from_road[:2, 3]
        rows.append((c[0], c[1], b.yaw + road_yaw, b.length / 2, b.width / 2, b.height,
                     b.reflectivity, *b.colour))
    a = np.array(rows, dtype=np.float64).reshape(-1, 10)
    return Solids(a[:, 0:2], np.zeros(len(a)), a[:, 5], a[:, 3:5], a[:, 2],
                  np.full(len(a), BUILDING, np.int64), a[:, 6], a[:, 7:10])


def solids_at(scene: Scene, t: float, buildings: Solids | None = None) -> Solids:
    """Every block in the world at time ``t`` (s): vehicle parts, then buildings."""
    centre, z0, z1, half, yaw, owner, refl, colour = [], [], [], [], [], [], [], []
    for actor in scene.actors:
        pose = scene.world_from_body(actor, t)
        heading = math.atan2(pose[1, 0], pose[0, 0])
        p = actor.parts
        cxy = p[:, 0:2] @ pose[:2, :2].T + pose[:2, 3]
        centre.append(cxy)
        z0.append(p[:, 2])
        z1.append(p[:, 3])
        half.append(p[:, 4:6])
        yaw.append(np.full(len(p), heading))
        owner.append(np.full(len(p), actor.actor_id, np.int64))
        refl.append(np.full(len(p), actor.reflectivity))
        colour.append(np.repeat(actor.colour[None], len(p), 0))
    vehicles = Solids(np.concatenate(centre), np.concatenate(z0), np.concatenate(z1),
                      np.concatenate(half), np.concatenate(yaw), np.concatenate(owner),
                      np.concatenate(refl), np.concatenate(colour))
    b = buildings if buildings is not None else _building_solids(scene)
    return Solids(*(np.concatenate([getattr(vehicles, f), getattr(b, f)]) for f in
                    ("centre", "z0", "z1", "half", "yaw", "owner", "reflectivity", "colour")))


def _near(solids: Solids, xy: np.ndarray, radius: float) -> Solids:
    reach = radius + np.hypot(solids.half[:, 0], solids.half[:, 1])
    return solids.subset(np.hypot(*(solids.centre - xy).T) <= reach)


def simulate_scene(scene: Scene, cfg: SimConfig, n_frames: int, rng: np.random.Generator,
                   start_us: int, agent_offsets_us: dict[int, int] | None = None,
                   camera_offsets_us: dict[int, int] | None = None, cameras: bool | None = None,
                   progress=None):
    """Yield one :class:`SimFrame` per tick at ``cfg.frame_rate_hz``.

    Args:
        start_us: the scene's t = 0 in microseconds (an epoch time, like DAIR-V2X's).
        agent_offsets_us: per agent id, a capture-time offset from the tick (asynchrony).
        camera_offsets_us: per agent id, the camera's offset from that agent's LiDAR time.
        cameras: render images (defaults to ``cfg.cameras``).
    """
    cameras = cfg.cameras if cameras is None else cameras
    agent_offsets_us = agent_offsets_us or {}
    camera_offsets_us = camera_offsets_us or {}
    ground = ground_model(scene)
    buildings = _building_solids(scene)
    period_us = int(round(1e6 / cfg.frame_rate_hz))
    cache: dict[int, Solids] = {}

    def world_at(ts_us: int) -> Solids:
        if ts_us not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[ts_us] = solids_at(scene, (ts_us - start_us) / 1e6, buildings)
        return cache[ts_us]

    for k in range(n_frames):
        agent_frames = []
        for agent in scene.agents:
            ts = start_us + k * period_us + agent_offsets_us.get(agent.agent_id, 0)
            agent_frames.append(_capture(scene, agent, ts, start_us, world_at, ground, rng,
                                         cameras, camera_offsets_us.get(agent.agent_id, 0)))
            if progress is not None:
                progress.update(1)
        yield SimFrame(scene.scene_id, k, agent_frames)


def _capture(scene: Scene, agent: Agent, ts_us: int, start_us: int, world_at, ground, rng,
             cameras: bool, camera_offset_us: int) -> SimAgentFrame:
    t = (ts_us - start_us) / 1e6
    world_from_lidar = scene.world_from_lidar(agent, t)
    world_from_body = world_from_lidar @ invert_transform(agent.body_from_lidar)
    own = agent.actor.actor_id if agent.actor is not None else None
    solids = _near(world_at(ts_us), world_from_lidar[:2, 3], agent.lidar.max_range)
    scan = scan_lidar(agent.lidar, world_from_lidar, solids, ground, rng, exclude_owner=own)
    ids, counts = np.unique(scan.owner, return_counts=True)
    points_on = {int(i): int(c) for i, c in zip(ids, counts) if i >= 0}
    boxes = np.stack([scene.actor_box(a, t) for a in scene.actors])
    frame = SimAgentFrame(
        agent_id=agent.agent_id, kind=agent.kind, timestamp_us=ts_us,
        world_from_lidar=world_from_lidar, world_from_body=world_from_body,
        speed_mps=scene.actor_speed(agent.actor) if agent.actor is not None else 0.0,
        points=scan.points, point_owner=scan.owner,
        object_ids=np.array([a.actor_id for a in scene.actors], np.int64), object_boxes=boxes,
        object_categories=[a.category for a in scene.actors],
        object_speeds=np.array([scene.actor_speed(a) for a in scene.actors]),
        points_on=points_on)
    if cameras:
        cam_ts = ts_us + camera_offset_us
        cam_t = (cam_ts - start_us) / 1e6
        lidar_pose_at_cam = scene.world_from_lidar(agent, cam_t)
        cam_solids = _near(world_at(cam_ts), lidar_pose_at_cam[:2, 3], 250.0)
        for spec in agent.cameras:
            l_from_c = lidar_from_camera(spec)
            world_from_camera = lidar_pose_at_cam @ l_from_c
            image, owner = render_camera(spec, world_from_camera, cam_solids, ground, exclude_owner=own)
            frame.cameras.append(SimCamera(spec.name, camera_intrinsic(spec), l_from_c, world_from_camera,
                                           cam_ts, image, owner))
    return frame


def visibility_stats(frames: list[SimFrame], eval_range: float, agent_ids=None) -> dict:
    """How much cooperation can help: objects near the ego seen only by collaborators.

    An object counts when its centre is within ``eval_range`` metres (xy box) of the ego LiDAR
    and at least one of ``agent_ids`` (default: all) saw it.
    """
    seen_any = seen_ego = 0
    per_frame = []
    for f in frames:
        agents = [a for a in f.agents if agent_ids is None or a.agent_id in agent_ids]
        ego = agents[0]
        ego_from_world = invert_transform(ego.world_from_lidar)
        centres = ego.object_boxes[:, :3] @ ego_from_world[:3, :3].T + ego_from_world[:3, 3]
        near = {int(i) for i, c in zip(ego.object_ids, centres)
                if abs(c[0]) <= eval_range and abs(c[1]) <= eval_range}
        union = set().union(*(a.seen_ids() for a in agents)) & near
        union -= {a.agent_id for a in agents[:1]}
        mine = ego.seen_ids() & union
        seen_any += len(union)
        seen_ego += len(mine)
        if union:
            per_frame.append(1.0 - len(mine) / len(union))
    return {
        "objects_seen": seen_any,
        "objects_seen_by_ego": seen_ego,
        "collaborator_only_fraction": (1.0 - seen_ego / seen_any) if seen_any else 0.0,
        "collaborator_only_fraction_per_frame_mean": float(np.mean(per_frame)) if per_frame else 0.0,
    }
