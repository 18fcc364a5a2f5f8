"""Settings of the synthetic cooperative world: scene layout, sensors, agents.

Every number that shapes the generated data lives here, with the value the default
benchmark uses. ``SimConfig.from_dict`` lets a YAML config or the command line override any
field by name.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace

__all__ = ["LidarSpec", "CameraSpec", "SceneSpec", "SimConfig"]


@dataclass
class LidarSpec:
    """A spinning LiDAR: ``beams`` rows of elevations, ``azimuth_steps`` columns over 360 degrees."""

    beams: int = 32
    elevation_min_deg: float = -25.0
    elevation_max_deg: float = 3.0
    azimuth_steps: int = 1024
    max_range: float = 100.0
    min_range: float = 1.0
    range_noise_std: float = 0.02   # metres, along the ray
    dropout: float = 0.05           # fraction of returns lost at random
    intensity_noise_std: float = 0.03


@dataclass
class CameraSpec:
    """A pinhole camera on an agent. The mount is given in the agent's LiDAR frame (x forward,
    y left, z up): position, yaw (counter-clockwise) and pitch (positive looks down)."""

    name: str
    width: int
    height: int
    hfov_deg: float
    mount_xyz: tuple[float, float, float]
    mount_yaw_deg: float = 0.0
    mount_pitch_deg: float = 0.0


def default_vehicle_cameras() -> list[CameraSpec]:
    # OPV2V's rig: camera0 front, camera1 right-rear, camera2 left-rear, camera3 back, 100 deg FOV.
    # Rendered at half OPV2V's 800x600 to keep generation near 1 s per agent-frame.
    return [
        CameraSpec("camera0", 400, 300, 100.0, (2.5, 0.0, -0.4), 0.0),
        CameraSpec("camera1", 400, 300, 100.0, (0.0, -1.0, -0.4), -100.0),
        CameraSpec("camera2", 400, 300, 100.0, (0.0, 1.0, -0.4), 100.0),
        CameraSpec("camera3", 400, 300, 100.0, (-2.6, 0.0, -0.4), 180.0),
    ]


def default_rsu_cameras() -> list[CameraSpec]:
    return [CameraSpec("camera0", 480, 270, 90.0, (0.0, 0.0, -0.3), 0.0, 15.0)]


@dataclass
class SceneSpec:
    """Layout of one intersection scene (road-local frame: roads along x and y, centre at 0)."""

    lane_width: float = 3.5
    lanes_per_direction: int = 2
    road_half_length: float = 160.0
    vehicle_gap_min: float = 8.0      # bumper-to-bumper gap of moving traffic, metres
    vehicle_gap_max: float = 30.0
    queue_gap_min: float = 1.5        # gap between vehicles waiting at a red light
    queue_gap_max: float = 3.5
    speed_min: float = 6.0            # m/s
    speed_max: float = 13.0
    turn_fraction: float = 0.4        # of outer-lane vehicles on green approaches
    parked_fraction: float = 0.25     # chance that a parking slot is occupied
    building_density: float = 0.85    # chance that a building lot is built
    building_height_min: float = 6.0
    building_height_max: float = 30.0
    n_cavs: int = 3
    n_rsus: int = 1
    cav_radius: float = 45.0          # CAVs are picked among vehicles this close to the centre
    rsu_height: float = 6.0


@dataclass
class SimConfig:
    scene: SceneSpec = field(default_factory=SceneSpec)
    vehicle_lidar: LidarSpec = field(default_factory=LidarSpec)
    rsu_lidar: LidarSpec = field(default_factory=lambda: LidarSpec(
        beams=48, elevation_min_deg=-40.0, elevation_max_deg=2.0, azimuth_steps=1024, max_range=100.0))
    vehicle_cameras: list[CameraSpec] = field(default_factory=default_vehicle_cameras)
    rsu_cameras: list[CameraSpec] = field(default_factory=default_rsu_cameras)
    cameras: bool = True
    frame_rate_hz: float = 10.0
    vehicle_lidar_height: float = 1.9  # above the ground, metres (OPV2V's roof LiDAR)

    @classmethod
    def from_dict(cls, overrides: dict | None) -> "SimConfig":
        cfg = cls()
        for key, value in (overrides or {}).items():
            _set_nested(cfg, key, value)
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    def scale_cameras(self, scale: float) -> None:
        """Render every camera at ``scale`` times its size (width and height rounded to whole
        pixels; the field of view, hence the intrinsics' shape, unchanged). The generated data
        records the scaled sizes, so data rendered at another scale is told apart."""
        if not 0.0 < scale <= 4.0:
            raise ValueError(f"sim config: camera_scale must be in (0, 4], got {scale}")
        for name in ("vehicle_cameras", "rsu_cameras"):
            setattr(self, name, [replace(c, width=max(1, round(c.width * scale)),
                                         height=max(1, round(c.height * scale)))
                                 for c in getattr(self, name)])


def _set_nested(obj, key: str, value) -> None:
    if isinstance(value, dict):
        target = getattr(obj, key)
        if not is_dataclass(target):
            raise KeyError(f"sim config: {key} is not a section")
        for k, v in value.items():
            _set_nested(target, k, v)
        return
    names = {f.name for f in fields(obj)}
    if key not in names:
        raise KeyError(f"sim config: unknown field {key!r} in {type(obj).__name__} (known: {sorted(names)})")
    if key.endswith("cameras") and isinstance(value, list):
        value = [CameraSpec(**v) if isinstance(v, dict) else v for v in value]
    setattr(obj, key, value)
