"""The synthetic camera's pixel convention and render scale."""
import numpy as np
import pytest

from v2xfuse.sim import SimConfig
from v2xfuse.sim import _mismatch, _request
from v2xfuse.sim.config import CameraSpec
from v2xfuse.sim.raycast import Solids
from v2xfuse.sim.sensors import (CAMERA_RENDERER, camera_intrinsic, lidar_from_camera,
                                 render_camera)
from v2xfuse.structures.transforms import make_transform


def _flat_ground(xy):
    return np.full(len(xy), 0.3), np.full((len(xy), 3), 0.5)


def test_pixel_column_c_is_the_ray_through_u_equal_c():
    # A 40x30 camera (f = 20, cx = 20) 1.5 m up, looking along +x at a block whose front face
    # (x = 10) spans y in [-2.1, 4.875]: its edges project to u = 20 - 20 y / 10 = 10.25 and 24.2.
    # Rays through whole u show the block in columns 11..24 exactly; rays through c + 0.5 (the
    # old renderer) would show it in columns 10..23.
    spec = CameraSpec("c", 40, 30, 90.0, (0.0, 0.0, 0.0))
    k = camera_intrinsic(spec)
    assert k[0, 0] == pytest.approx(20.0) and k[0, 2] == 20.0
    world_from_camera = make_transform(np.eye(3), [0.0, 0.0, 1.5]) @ lidar_from_camera(spec)
    y0, y1 = -2.1, 4.875
    block = Solids(centre=np.array([[11.0, (y0 + y1) / 2]]), z0=np.array([0.0]), z1=np.array([3.0]),
                   half=np.array([[1.0, (y1 - y0) / 2]]), yaw=np.array([0.0]),
                   owner=np.array([7]), reflectivity=np.array([0.5]), colour=np.array([[1.0, 0.0, 0.0]]))
    _, owner = render_camera(spec, world_from_camera, block, _flat_ground)
    row = owner[15]  # v = 15 = cy: the horizontal ray at 1.5 m, inside the block's 0..3 m
    assert np.flatnonzero(row == 7).tolist() == list(range(11, 25))


def test_camera_scale_renders_every_camera_at_that_size():
    cfg = SimConfig()
    before = [(c.width, c.height, c.hfov_deg) for c in cfg.vehicle_cameras + cfg.rsu_cameras]
    cfg.scale_cameras(0.48)
    after = [(c.width, c.height, c.hfov_deg) for c in cfg.vehicle_cameras + cfg.rsu_cameras]
    assert after == [(round(w * 0.48), round(h * 0.48), fov) for w, h, fov in before]
    assert (after[0][0], after[0][1]) == (192, 144)
    # Same field of view: the focal length scales with the width.
    k0, k1 = camera_intrinsic(SimConfig().vehicle_cameras[0]), camera_intrinsic(cfg.vehicle_cameras[0])
    assert k1[0, 0] == pytest.approx(k0[0, 0] * 0.48)
    with pytest.raises(ValueError, match="camera_scale"):
        cfg.scale_cameras(0.0)


def test_camera_data_of_another_renderer_is_regenerated_lidar_data_is_not():
    splits = {"train": 1.0}
    with_cams, lidar_only = SimConfig(), SimConfig()
    lidar_only.cameras = False
    request = _request("opv2v", 2, 3, 0, with_cams, splits)
    assert request["camera_renderer"] == CAMERA_RENDERER
    old = {k: v for k, v in request.items() if k != "camera_renderer"}
    assert "camera_renderer" in _mismatch(old, request)
    assert "camera_renderer" not in _request("opv2v", 2, 3, 0, lidar_only, splits)
    # The scaled sizes are part of the request: data rendered at another scale is told apart.
    scaled = SimConfig()
    scaled.scale_cameras(0.5)
    assert "config" in _mismatch(request, _request("opv2v", 2, 3, 0, scaled, splits))


def test_a_misspelt_synthetic_key_is_refused_before_anything_is_written(tmp_path):
    from v2xfuse.builder import ensure_synthetic

    root = tmp_path / "opv2v"
    with pytest.raises(KeyError, match="camera_scal"):
        ensure_synthetic({"type": "opv2v", "root": str(root),
                          "synthetic": {"scenes": 1, "frames": 1, "cameras": True, "camera_scal": 0.5}})
    assert not root.exists()
