"""Camera images in the sample pipeline: decoding, resizing and cropping to one size with the
intrinsics that keep projection exact, and projecting LiDAR points to pixels.

**Decoding** goes through OpenCV (``opencv-python-headless``: no X libraries, so servers without
a display import it). A file is read as bytes here and decoded with ``cv2.imdecode``, because
``cv2.imread`` returns None for a missing, truncated or non-image file without saying which:
here each is a :class:`DatasetError` naming the file. OpenCV decodes to BGR; images leave this
module RGB (what ``CameraObs.image`` holds and image networks expect).

**Pixel convention** (OpenCV's): ``[u, v, 1]^T ~ K @ p_cam`` puts pixel ``(col, row)``'s centre
at ``u = col, v = row``; the image covers ``u`` in ``[-0.5, W - 0.5)``.

**Resizing** from ``W0`` to ``W`` columns (``s = W / W0``; rows alike) with OpenCV maps output
pixel ``i`` to input ``(i + 0.5) / s - 0.5``: ``INTER_LINEAR`` samples there (half-pixel
centres), and ``INTER_AREA``, used when shrinking, averages the input area ``[i / s, (i + 1) /
s)`` (in pixel edges) whose centre is that same point. So ``u`` moves to ``s * u + (s - 1) / 2``
and cropping at column ``x0`` subtracts ``x0``: ``fx' = s fx``, ``cx' = s cx + (s - 1) / 2 -
x0``, and a point projects onto the same content before and after. ``INTER_AREA`` is used when
shrinking because the reductions here are large (800 x 600 or 1920 x 1080 down to a few hundred
columns) and bilinear sampling would then read 2 x 2 of every 4 x 4 to 9 x 9 pixels and alias;
the box average does not. Its geometry is exact at integer ratios; at other ratios OpenCV's
fractional-area weights put the content within about 0.1 input pixel of the mapping (measured
on linear ramps: 0.1 px for 800 -> 224 columns, 0.04 px for 1920 -> 228, i.e. a few hundredths
of an output pixel). ``tests/datasets/test_images.py`` checks both on ramps and markers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

from ..structures.boxes import BOX_EDGES, box_corners
from ..structures.coop import CameraObs
from .base import DatasetError, error_message, opening

__all__ = ["CameraConfig", "read_image", "image_size", "resize_camera", "crop_camera", "fit_image",
           "project_points", "project_box_edges", "CROPS"]

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


def read_image(path) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of an image file (PNG, JPEG...; grey or 16-bit ones become
    8-bit RGB, an alpha channel is dropped).

    Raises:
        DatasetError: naming the file, when it is missing, a directory, unreadable, empty, or
            not an image OpenCV can decode (truncated, corrupt, another format).
    """
    path = Path(path)
    with opening(path, "camera image"):
        data = path.read_bytes()
    image = None
    if data:  # imdecode asserts on an empty buffer
        try:
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        except cv2.error:
            image = None
    if image is None:
        raise DatasetError(f"{path}: unreadable image ({len(data)} bytes: empty, truncated, corrupt "
                           f"or not an image format OpenCV decodes)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def image_size(path) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels (Pillow
    reads only the header; OpenCV has no such call).

    Raises:
        DatasetError: naming the file, when it is missing or its header is not an image's.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except FileNotFoundError:
        raise DatasetError(f"{path}: camera image is missing") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(error_message(path, e, "unreadable image")) from None


def _pixels(cam: CameraObs) -> np.ndarray:
    if cam.image is None:
        raise DatasetError(f"{cam.image_path or cam.name}: camera image was not loaded "
                           f"(pipeline.cameras needs the adapter's load_images)")
    return cam.image


def resize_camera(cam: CameraObs, size: tuple[int, int]) -> CameraObs:
    """``cam`` with its image resized to exactly ``size`` (H, W) and its intrinsic moved with
    it, each axis by its own factor (module docstring: ``INTER_AREA`` when neither axis grows,
    else ``INTER_LINEAR``); ``lidar_from_camera`` is unchanged.

    Raises:
        DatasetError: the camera has no pixels (the adapter was not asked to load images).
    """
    image = _pixels(cam)
    h0, w0 = image.shape[:2]
    h, w = (int(v) for v in size)
    if (h, w) == (h0, w0):
        return cam
    shrink = h <= h0 and w <= w0
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    sx, sy = w / w0, h / h0
    k = cam.intrinsic.copy()
    k[0] *= sx
    k[1] *= sy
    k[0, 2] += (sx - 1) / 2
    k[1, 2] += (sy - 1) / 2
    return replace(cam, intrinsic=k, image=image, image_size=(h, w))


def crop_camera(cam: CameraObs, top: int, left: int, size: tuple[int, int]) -> CameraObs:
    """``cam`` with its image cropped to rows ``top:top + H``, columns ``left:left + W``
    (inside the image) and its principal point moved with them."""
    image = _pixels(cam)
    h, w = (int(v) for v in size)
    if not (0 <= top and top + h <= image.shape[0] and 0 <= left and left + w <= image.shape[1]):
        raise ValueError(f"camera {cam.name}: crop {h}x{w} at ({top}, {left}) leaves the "
                         f"{image.shape[0]}x{image.shape[1]} image")
    k = cam.intrinsic.copy()
    k[0, 2] -= left
    k[1, 2] -= top
    return replace(cam, intrinsic=k, image=np.ascontiguousarray(image[top:top + h, left:left + w]),
                   image_size=(h, w))


def fit_image(cam: CameraObs, cfg: CameraConfig) -> CameraObs:
    """``cam`` with its image resized to cover ``cfg.image_size`` (one scale for both axes, each
    rounded up to whole pixels), cropped to it, and the intrinsic moved with it (see the module
    docstring); ``lidar_from_camera`` is unchanged.

    Raises:
        DatasetError: the camera has no pixels (the adapter was not asked to load images).
    """
    h0, w0 = _pixels(cam).shape[:2]
    out_h, out_w = cfg.image_size
    scale = max(out_h / h0, out_w / w0)
    new_h, new_w = max(out_h, math.ceil(h0 * scale - 1e-9)), max(out_w, math.ceil(w0 * scale - 1e-9))
    cam = resize_camera(cam, (new_h, new_w))
    left = (new_w - out_w) // 2
    top = new_h - out_h if cfg.crop == "bottom" else (new_h - out_h) // 2
    return crop_camera(cam, top, left, (out_h, out_w))


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


def project_box_edges(boxes: np.ndarray, intrinsic: np.ndarray, lidar_from_camera: np.ndarray,
                      min_depth: float = 0.1) -> np.ndarray:
    """Pixels of the parts of boxes' edges in front of a camera, for drawing.

    Args:
        boxes: (M, 7) [x, y, z, dx, dy, dz, yaw] in the LiDAR frame ``lidar_from_camera``
            refers to.
        intrinsic: (3, 3) K; lidar_from_camera: (4, 4), inverted as a matrix (see
            :func:`project_points`).
        min_depth: metres; an edge is cut where it passes this close in front of the camera
            (a box beside or behind the camera still draws the part the camera sees), and an
            edge wholly nearer is dropped.
    Returns:
        (E, 2, 2) float64 ``[[u0, v0], [u1, v1]]`` per kept edge (E <= 12 M), not clipped to
        the image.
    """
    corners = box_corners(np.asarray(boxes, np.float64).reshape(-1, 7))     # (M, 8, 3)
    cam_from_lidar = np.linalg.inv(lidar_from_camera)
    p = corners @ cam_from_lidar[:3, :3].T + cam_from_lidar[:3, 3]
    a, b = p[:, BOX_EDGES[:, 0]].reshape(-1, 3), p[:, BOX_EDGES[:, 1]].reshape(-1, 3)
    keep = (a[:, 2] >= min_depth) | (b[:, 2] >= min_depth)
    a, b = a[keep], b[keep]
    with np.errstate(divide="ignore", invalid="ignore"):  # used only where an edge crosses it
        t = ((min_depth - a[:, 2]) / (b[:, 2] - a[:, 2]))[:, None]
        cut = a + t * (b - a)  # where the edge crosses depth min_depth
    a, b = np.where(a[:, 2:] < min_depth, cut, a), np.where(b[:, 2:] < min_depth, cut, b)
    ends = np.stack([a, b], 1) @ np.asarray(intrinsic, np.float64).T      # (E, 2, 3)
    return ends[..., :2] / ends[..., 2:]
