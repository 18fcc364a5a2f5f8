"""Camera images in the sample pipeline: resizing and cropping to one size, with the intrinsics
that keep projection exact, and projecting LiDAR points to pixels.

Pixel convention (OpenCV's): ``[u, v, 1]^T ~ K @ p_cam`` puts pixel ``(col, row)``'s centre at
``u = col, v = row``; the image covers ``u`` in ``[-0.5, W - 0.5)``.

Resizing by ``s`` (PIL's bilinear, which samples output pixel ``i`` at input ``(i + 0.5) / s -
0.5``) maps ``u`` to ``s * u + (s - 1) / 2``; cropping at column ``x0`` subtracts ``x0``. So
``fx' = s fx`` and ``cx' = s cx + (s - 1) / 2 - x0`` (rows alike), and a point projects onto the
same content before and after.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..structures.coop import CameraObs
from .base import DatasetError

__all__ = ["CameraConfig", "fit_image", "project_points", "CROPS"]

CROPS = ("bottom", "centre")


@dataclass
class CameraConfig:
    """``pipeline.cameras``: every image is resized to cover ``image_size`` and cropped to it.

    Attributes:
        image_size: (H, W) of every image in the batch.
        crop: which rows a too-tall image keeps: ``"bottom"`` (the road; the sky above the
            horizon holds nothing to detect, as BEVFusion crops) or ``"centre"``. Columns are
            always cropped about the centre.
    """

    image_size: tuple[int, int]
    crop: str = "bottom"

    def __post_init__(self) -> None:
        self.image_size = tuple(int(v) for v in self.image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"pipeline.cameras.image_size must be [H, W] > 0, got {self.image_size}")
        if self.crop not in CROPS:
            raise ValueError(f"pipeline.cameras.crop must be one of {CROPS}, got {self.crop!r}")

    @classmethod
    def from_dict(cls, d: dict | None) -> "CameraConfig | None":
        if d is None or isinstance(d, CameraConfig):
            return d
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise KeyError(f"pipeline.cameras: unknown keys {sorted(unknown)} "
                           f"(known: {sorted(cls.__dataclass_fields__)})")
        return cls(**d)


def fit_image(cam: CameraObs, cfg: CameraConfig) -> CameraObs:
    """``cam`` with its image resized to cover ``cfg.image_size``, cropped to it, and the
    intrinsic moved with it (see the module docstring); ``lidar_from_camera`` is unchanged.

    Raises:
        DatasetError: the camera has no pixels (the adapter was not asked to load images).
    """
    if cam.image is None:
        raise DatasetError(f"{cam.image_path or cam.name}: camera image was not loaded "
                           f"(pipeline.cameras needs the adapter's load_images)")
    from PIL import Image

    h0, w0 = cam.image.shape[:2]
    out_h, out_w = cfg.image_size
    scale = max(out_h / h0, out_w / w0)
    new_h, new_w = max(out_h, math.ceil(h0 * scale - 1e-9)), max(out_w, math.ceil(w0 * scale - 1e-9))
    sy, sx = new_h / h0, new_w / w0  # the exact factors PIL applies per axis
    image = cam.image
    if (new_h, new_w) != (h0, w0):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    x0 = (new_w - out_w) // 2
    y0 = new_h - out_h if cfg.crop == "bottom" else (new_h - out_h) // 2
    image = np.ascontiguousarray(image[y0:y0 + out_h, x0:x0 + out_w])
    k = cam.intrinsic.copy()
    k[0] *= sx
    k[1] *= sy
    k[0, 2] += (sx - 1) / 2 - x0
    k[1, 2] += (sy - 1) / 2 - y0
    return replace(cam, intrinsic=k, image=image, image_size=(out_h, out_w))


def project_points(points: np.ndarray, intrinsic: np.ndarray,
                   lidar_from_camera: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of LiDAR-frame points.

    Args:
        points: (M, 3) in the LiDAR frame ``lidar_from_camera`` refers to.
        intrinsic: (3, 3) K; lidar_from_camera: (4, 4), any invertible affine map (after a
            flip augmentation it contains a reflection, see :mod:`v2xfuse.datasets.pipeline`).
    Returns:
        (uv (M, 2) pixel coordinates, depth (M,) along the optical axis; in front when > 0).
    """
    cam_from_lidar = np.linalg.inv(lidar_from_camera)
    p = points @ cam_from_lidar[:3, :3].T + cam_from_lidar[:3, 3]
    depth = p[:, 2]
    uvw = p @ intrinsic.T
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = uvw[:, :2] / uvw[:, 2:3]
    return uv, depth
