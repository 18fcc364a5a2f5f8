"""The synthetic cooperative world: an intersection with buildings, parked and moving vehicles.

Everything is laid out in a *road-local* frame (roads along x and y, crossing at the origin,
right-hand traffic) and placed in the scene's world frame by a random yaw and offset, so that
scenes differ in heading as real recordings do. Motion is a continuous function of time:
each vehicle travels along a lane path at constant speed, so any sensor can sample the scene
at its own timestamp (needed for asynchronous infrastructure/vehicle pairs).

One traffic-light phase per scene avoids collisions without a traffic simulator: the green
axis drives through (outer lanes may turn right), the red axis waits at its stop lines, and
vehicles that already crossed leave on the red axis' exit lanes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..structures.transforms import make_transform, pose_from_xyz_rpy, rotation_z
from .config import CameraSpec, LidarSpec, SimConfig

__all__ = ["LanePath", "Actor", "Building", "Agent", "Scene", "build_scene", "CATEGORY_SIZES"]

# (length, width, height) ranges in metres, from common passenger cars to city buses.
CATEGORY_SIZES = {
    "car": ((4.2, 4.9), (1.75, 1.95), (1.40, 1.60)),
    "van": ((4.6, 5.4), (1.90, 2.10), (1.80, 2.15)),
    "truck": ((6.5, 10.0), (2.30, 2.55), (2.80, 3.80)),
    "bus": ((10.5, 12.5), (2.50, 2.60), (3.00, 3.40)),
}
MOVING_MIX = {"car": 0.65, "van": 0.2, "truck": 0.1, "bus": 0.05}
PARKED_MIX = {"truck": 0.45, "van": 0.3, "car": 0.25}
PAINTS = np.array([
    [0.80, 0.10, 0.10], [0.10, 0.20, 0.70], [0.90, 0.90, 0.92], [0.08, 0.08, 0.08],
    [0.55, 0.57, 0.60], [0.15, 0.45, 0.20], [0.85, 0.65, 0.10], [0.35, 0.20, 0.12],
])


@dataclass
class LanePath:
    """A drivable path: a dense polyline with arc length ``s``, in road-local coordinates."""

    xy: np.ndarray       # (K, 2)
    s: np.ndarray        # (K,) cumulative arc length
    heading: np.ndarray  # (K,) radians

    @classmethod
    def from_points(cls, xy: np.ndarray) -> "LanePath":
        d = np.diff(xy, axis=0)
        seg = np.hypot(d[:, 0], d[:, 1])
        s = np.concatenate([[0.0], np.cumsum(seg)])
        heading = np.arctan2(d[:, 1], d[:, 0])
        heading = np.concatenate([heading, heading[-1:]])
        return cls(xy, s, np.unwrap(heading))

    def pose_at(self, s: float) -> tuple[float, float, float]:
        """(x, y, yaw) at arc length ``s``; beyond the ends the path continues straight."""
        if s <= self.s[0] or s >= self.s[-1]:
            end = 0 if s <= self.s[0] else -1
            h = self.heading[end]
            ds = s - self.s[end]
            return (self.xy[end, 0] + ds * math.cos(h), self.xy[end, 1] + ds * math.sin(h), float(h))
        i = int(np.searchsorted(self.s, s, side="right")) - 1
        f = (s - self.s[i]) / max(self.s[i + 1] - self.s[i], 1e-9)
        x, y = self.xy[i] + f * (self.xy[i + 1] - self.xy[i])
        return float(x), float(y), float(self.heading[i] + f * (self.heading[i + 1] - self.heading[i]))


@dataclass
class Actor:
    """A vehicle. Body frame: x forward, origin at the ground below the box centre.

    ``parts`` (P, 6) [cx, cy, z0, z1, half_length, half_width] are the solid blocks the sensors
    see (body, cabin, cargo); the labelled box is the bounding box of all of them.
    """

    actor_id: int
    category: str
    size: tuple[float, float, float]          # length, width, height
    parts: np.ndarray
    colour: np.ndarray
    reflectivity: float
    path: LanePath | None = None
    s0: float = 0.0
    speed: float = 0.0
    static_pose: tuple[float, float, float] | None = None  # road-local (x, y, yaw) when parked

    def local_pose_at(self, t: float) -> tuple[float, float, float]:
        if self.path is None:
            return self.static_pose
        return self.path.pose_at(self.s0 + self.speed * t)


@dataclass
class Building:
    """A static block in road-local coordinates: (cx, cy, yaw, length, width, height)."""

    cx: float
    cy: float
    yaw: float
    length: float
    width: float
    height: float
    colour: np.ndarray
    reflectivity: float


@dataclass
class Agent:
    """A connected vehicle (``actor`` set) or a roadside unit (fixed ``rsu_pose``)."""

    agent_id: int
    kind: str                                   # "vehicle" | "infrastructure"
    lidar: LidarSpec
    cameras: list[CameraSpec]
    body_from_lidar: np.ndarray                 # (4, 4)
    actor: Actor | None = None
    rsu_pose: np.ndarray | None = None          # (4, 4) world_from_body for a roadside unit


@dataclass
class Scene:
    scene_id: str
    world_from_road: np.ndarray                 # (4, 4): yaw + offset of the layout
    actors: list[Actor]
    buildings: list[Building]
    agents: list[Agent]
    spec_lane_width: float
    lanes_per_direction: int
    green_axis: int                             # 0: roads along x drive, 1: along y
    ego_agent_id: int = 0
    meta: dict = field(default_factory=dict)

    # ---- world state -------------------------------------------------------------------
    def world_from_body(self, actor: Actor, t: float) -> np.ndarray:
        x, y, yaw = actor.local_pose_at(t)
        return self.world_from_road @ pose_from_xyz_rpy(x, y, 0.0, yaw=yaw)

    def actor_box(self, actor: Actor, t: float) -> np.ndarray:
        """(7,) world box [x, y, z, dx, dy, dz, yaw] of ``actor`` at time ``t``."""
        pose = self.world_from_body(actor, t)
        length, width, height = actor.size
        return np.array([pose[0, 3], pose[1, 3], pose[2, 3] + height / 2, length, width, height,
                         math.atan2(pose[1, 0], pose[0, 0])])

    def actor_speed(self, actor: Actor) -> float:
        return actor.speed if actor.path is not None else 0.0

    def world_from_lidar(self, agent: Agent, t: float) -> np.ndarray:
        body = agent.rsu_pose if agent.actor is None else self.world_from_body(agent.actor, t)
        return body @ agent.body_from_lidar


def _sample_category(rng: np.random.Generator, mix: dict[str, float]) -> str:
    names = list(mix)
    return names[rng.choice(len(names), p=np.array([mix[n] for n in names]))]


def _make_actor(rng, actor_id: int, category: str) -> Actor:
    (l0, l1), (w0, w1), (h0, h1) = CATEGORY_SIZES[category]
    length, width, height = rng.uniform(l0, l1), rng.uniform(w0, w1), rng.uniform(h0, h1)
    hl, hw = length / 2, width / 2
    if category == "car":
        parts = [[0.0, 0.0, 0.18, 0.55 * height, hl, hw],
                 [-0.06 * length, 0.0, 0.55 * height, height, 0.27 * length, 0.45 * width]]
    elif category == "van":
        parts = [[0.0, 0.0, 0.2, 0.45 * height, hl, hw],
                 [-0.1 * length, 0.0, 0.45 * height, height, 0.4 * length, hw]]
    elif category == "truck":
        cab = 2.2
        parts = [[hl - cab / 2, 0.0, 0.35, 0.85 * height, cab / 2, hw],
                 [-cab / 2 - 0.1, 0.0, 0.9, height, hl - cab / 2 - 0.1, hw]]
    else:  # bus
        parts = [[0.0, 0.0, 0.3, height, hl, hw]]
    colour = PAINTS[rng.integers(len(PAINTS))] * rng.uniform(0.85, 1.0)
    return Actor(actor_id, category, (length, width, height), np.array(parts, dtype=np.float64),
                 colour, float(rng.uniform(0.35, 0.8)))


def _rotate_k(xy: np.ndarray, k: int) -> np.ndarray:
    """Rotate road-local points by k quarter turns (approach direction k)."""
    c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][k % 4]
    return np.stack([c * xy[:, 0] - s * xy[:, 1], s * xy[:, 0] + c * xy[:, 1]], axis=1)


class _Layout:
    """Lane geometry of the eastbound approach (k = 0); other approaches are quarter turns."""

    def __init__(self, spec):
        self.w = spec.lane_width
        self.n = spec.lanes_per_direction
        self.L = spec.road_half_length
        self.parking_offset = self.n * self.w + 1.25
        self.road_half = self.n * self.w + 2.5          # carriageway plus parking lane
        self.box_half = self.road_half + 0.5            # the intersection square
        self.stop_line = self.box_half + 1.0
        self.sidewalk_outer = self.road_half + 3.5

    def lane_offset(self, lane: int) -> float:
        return -(lane + 0.5) * self.w

    def through(self, lane: int, k: int) -> LanePath:
        o = self.lane_offset(lane)
        xs = np.linspace(-self.L, self.L, 65)
        return LanePath.from_points(_rotate_k(np.stack([xs, np.full_like(xs, o)], 1), k))

    def right_turn(self, lane: int, k: int) -> LanePath:
        o = self.lane_offset(lane)
        r = self.box_half - abs(o)
        approach = np.stack([np.linspace(-self.L, o - r, 40), np.full(40, o)], 1)
        a = np.linspace(math.pi / 2, 0.0, 24)[1:]
        arc = np.stack([(o - r) + r * np.cos(a), (o - r) + r * np.sin(a)], 1)
        exit_ = np.stack([np.full(40, o), np.linspace(o - r, -self.L, 40)], 1)
        return LanePath.from_points(_rotate_k(np.concatenate([approach, arc, exit_[1:]]), k))


def build_scene(rng: np.random.Generator, cfg: SimConfig, scene_id: str,
                duration_s: float) -> Scene:
    """Lay out one intersection scene and pick its connected vehicles and roadside units."""
    spec = cfg.scene
    lay = _Layout(spec)
    green = int(rng.integers(2))
    actors: list[Actor] = []
    next_id = int(rng.integers(200, 2000))

    def new_actor(mix) -> Actor:
        nonlocal next_id
        actor = _make_actor(rng, next_id, _sample_category(rng, mix))
        next_id += int(rng.integers(1, 40))  # CARLA-like sparse actor ids
        return actor

    def place_stream(path: LanePath, s_start: float, s_end: float, speed: float, gaps,
                     mix=MOVING_MIX):
        pending = new_actor(mix)
        front = s_end
        while True:
            length = pending.size[0]
            centre = front - length / 2
            if centre - length / 2 < s_start:
                break
            pending.path, pending.s0, pending.speed = path, centre, speed
            actors.append(pending)
            front = centre - length / 2 - rng.uniform(*gaps)
            pending = new_actor(mix)

    travel = spec.speed_max * duration_s
    for k in range(4):
        on_green = (k % 2) == green
        for lane in range(lay.n):
            outer = lane == lay.n - 1
            through = lay.through(lane, k)
            # Arc length of the stop line on a through path (paths start at x = -L).
            s_stop = lay.L - lay.stop_line
            if on_green:
                speed = rng.uniform(spec.speed_min, spec.speed_max)
                gaps = (spec.vehicle_gap_min, spec.vehicle_gap_max)
                if outer and rng.random() < spec.turn_fraction:
                    # A right-turning stream on the outer lane, ahead of the stop line only.
                    place_stream(lay.right_turn(lane, k), 0.0, s_stop + 2 * lay.box_half, speed, gaps)
                else:
                    place_stream(through, rng.uniform(0, 20), 2 * lay.L - travel, speed, gaps)
            else:
                gaps = (spec.queue_gap_min, spec.queue_gap_max)
                place_stream(through, rng.uniform(0, 60), s_stop, 0.0, gaps)
                if not outer:
                    # Vehicles that crossed before the light turned red, leaving the junction.
                    speed = rng.uniform(spec.speed_min, spec.speed_max)
                    place_stream(through, s_stop + 2 * lay.box_half + rng.uniform(2, 25),
                                 2 * lay.L - travel, speed,
                                 (spec.vehicle_gap_min, spec.vehicle_gap_max))
        # Parked vehicles on this approach's kerb, both sides of the junction.
        for sign in (-1.0, 1.0):
            x = sign * (lay.box_half + 4.0)
            while abs(x) < lay.L - 10:
                actor = new_actor(PARKED_MIX)
                length = actor.size[0]
                x += sign * (length / 2)
                if rng.random() < spec.parked_fraction:
                    xy = _rotate_k(np.array([[x, -lay.parking_offset]]), k)[0]
                    actor.static_pose = (float(xy[0]), float(xy[1]), k * math.pi / 2)
                    actors.append(actor)
                x += sign * (length / 2 + rng.uniform(1.0, 4.0))

    buildings = _place_buildings(rng, spec, lay)
    yaw = rng.uniform(-math.pi, math.pi)
    world_from_road = make_transform(rotation_z(yaw), (*rng.uniform(-500, 500, 2), 0.0))
    scene = Scene(scene_id, world_from_road, actors, buildings, [], spec.lane_width,
                  spec.lanes_per_direction, green, meta={"road_yaw": yaw})
    scene.agents = _pick_agents(rng, cfg, scene, lay)
    scene.ego_agent_id = scene.agents[0].agent_id
    return scene


def _place_buildings(rng, spec, lay: _Layout) -> list[Building]:
    buildings = []
    for k in range(4):
        # Lots along the right-hand side of approach k, beyond the sidewalk, both arms.
        for sign in (-1.0, 1.0):
            x = sign * (lay.sidewalk_outer + rng.uniform(0.5, 4.0))
            while abs(x) < lay.L - 5:
                length = rng.uniform(12.0, 40.0)
                depth = rng.uniform(10.0, 30.0)
                setback = lay.sidewalk_outer + rng.uniform(0.5, 5.0)
                if rng.random() < spec.building_density:
                    cx, cy = x + sign * length / 2, -(setback + depth / 2)
                    c = _rotate_k(np.array([[cx, cy]]), k)[0]
                    grey = rng.uniform(0.35, 0.8)
                    tint = np.clip(grey + rng.normal(0, 0.06, 3), 0, 1)
                    # A quarter turn maps the lot's (length, depth) onto the world axes.
                    buildings.append(Building(float(c[0]), float(c[1]), k * math.pi / 2, length, depth,
                                              rng.uniform(spec.building_height_min,
                                                          spec.building_height_max),
                                              tint, float(rng.uniform(0.2, 0.5))))
                x += sign * (length + rng.uniform(2.0, 10.0))
    return _drop_overlapping(buildings)


def _drop_overlapping(buildings: list[Building]) -> list[Building]:
    """Lots of adjacent arms can overlap near the corners; keep the first of any overlapping pair."""
    kept: list[Building] = []

    def extent(b: Building):
        quarter = int(round(b.yaw / (math.pi / 2))) % 2
        hx, hy = (b.length / 2, b.width / 2) if quarter == 0 else (b.width / 2, b.length / 2)
        return b.cx - hx, b.cx + hx, b.cy - hy, b.cy + hy

    for b in buildings:
        x0, x1, y0, y1 = extent(b)
        if all(x1 <= e[0] or x0 >= e[1] or y1 <= e[2] or y0 >= e[3] for e in map(extent, kept)):
            kept.append(b)
    return kept


def _pick_agents(rng, cfg: SimConfig, scene: Scene, lay: _Layout) -> list[Agent]:
    spec = cfg.scene
    candidates = []
    for actor in scene.actors:
        if actor.category not in ("car", "van") or actor.path is None:
            continue
        x, y, _ = actor.local_pose_at(0.0)
        if math.hypot(x, y) < spec.cav_radius:
            candidates.append(actor)
    if len(candidates) < spec.n_cavs:
        raise RuntimeError(f"scene {scene.scene_id}: only {len(candidates)} vehicles could be CAVs")
    # Spread the CAVs out: farthest-point sampling from a random first pick.
    chosen = [candidates[int(rng.integers(len(candidates)))]]
    while len(chosen) < spec.n_cavs:
        def spread(a):
            x, y, _ = a.local_pose_at(0.0)
            return min(math.hypot(x - c.local_pose_at(0.0)[0], y - c.local_pose_at(0.0)[1]) for c in chosen)
        rest = [a for a in candidates if a not in chosen]
        scores = np.array([spread(a) for a in rest])
        chosen.append(rest[int(rng.choice(np.argsort(-scores)[:3]))])
    agents = []
    for actor in chosen:
        lidar_z = max(cfg.vehicle_lidar_height, actor.size[2] + 0.3)
        agents.append(Agent(actor.actor_id, "vehicle", cfg.vehicle_lidar, list(cfg.vehicle_cameras),
                            make_transform(np.eye(3), (0.0, 0.0, lidar_z)), actor=actor))
    corners = rng.permutation(4)[: spec.n_rsus]
    for i, q in enumerate(corners):
        sx, sy = [(1, 1), (-1, 1), (-1, -1), (1, -1)][q]
        d = lay.road_half + 1.5
        x, y = sx * d, sy * d
        yaw = math.atan2(-y, -x)  # face the junction centre
        road_from_body = pose_from_xyz_rpy(x, y, 0.0, yaw=yaw)
        agents.append(Agent(-(i + 1), "infrastructure", cfg.rsu_lidar, list(cfg.rsu_cameras),
                            make_transform(np.eye(3), (0.0, 0.0, spec.rsu_height)),
                            rsu_pose=scene.world_from_road @ road_from_body))
    return agents
