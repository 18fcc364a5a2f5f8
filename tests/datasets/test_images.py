"""Images through OpenCV: decoded RGB from bytes (a bad file is an error naming it), resized and
cropped with intrinsics that keep every projected point on the content that shows it."""
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from v2xfuse.datasets.base import DatasetError
from v2xfuse.datasets.images import (CameraConfig, crop_camera, fit_image, image_size,
                                     project_box_edges, project_points, read_image, resize_camera)
from v2xfuse.structures.boxes import BOX_EDGES, box_corners
from v2xfuse.structures.coop import CameraObs


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt)
    return buf.getvalue()


def test_images_are_decoded_rgb_whatever_their_format(tmp_path):
    image = np.zeros((6, 10, 3), np.uint8)
    image[..., 0] = 200  # red: a BGR image would come back blue
    image[2, 3] = (10, 20, 30)
    (tmp_path / "a.png").write_bytes(_encoded(image, "PNG"))
    got = read_image(tmp_path / "a.png")
    assert got.dtype == np.uint8 and got.shape == (6, 10, 3)
    assert np.array_equal(got, image)
    (tmp_path / "a.jpg").write_bytes(_encoded(image, "JPEG"))
    assert np.abs(read_image(tmp_path / "a.jpg").astype(int) - image).mean() < 8
    assert image_size(tmp_path / "a.jpg") == (6, 10)
    (tmp_path / "grey.png").write_bytes(_encoded(image[..., 0], "PNG"))
    assert np.array_equal(read_image(tmp_path / "grey.png"), np.repeat(image[..., :1], 3, 2))
    rgba = np.concatenate([image, np.full((6, 10, 1), 7, np.uint8)], 2)
    (tmp_path / "rgba.png").write_bytes(_encoded(rgba, "PNG"))
    assert np.array_equal(read_image(tmp_path / "rgba.png"), image)


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "truncated png",
                                  "truncated jpeg", "text"])
def test_a_missing_or_unreadable_image_is_an_error_naming_the_file(tmp_path, case):
    image = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)
    path = tmp_path / "000068_camera0.png"
    if case == "directory":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case.startswith("truncated"):
        data = _encoded(image, case.split()[1].upper())
        path.write_bytes(data[: len(data) // 2])
    elif case == "text":
        path.write_text("version https://git-lfs.github.com/spec/v1\n")  # an LFS pointer
    want = {"missing": "camera image is missing", "directory": "is a directory"}.get(
        case, "unreadable image")
    with pytest.raises(DatasetError, match=want) as err:
        read_image(path)
    assert str(err.value).startswith(str(path))
    if case in ("missing", "text"):  # the header of a truncated file is still whole
        with pytest.raises(DatasetError) as err:
            image_size(path)
        assert str(err.value).startswith(str(path))


@pytest.mark.parametrize("mode", [cv2.INTER_LINEAR, cv2.INTER_AREA])
@pytest.mark.parametrize("width", [24, 32, 40, 70, 96, 150, 300])
def test_opencv_maps_output_pixel_i_to_input_i_plus_half_over_s_minus_half(mode, width):
    """The mapping the intrinsics follow, checked on a linear ramp (whose box average is its
    value at the box's centre): exact for INTER_LINEAR, for INTER_AREA at integer ratios, and
    within 0.12 input pixel for INTER_AREA at other ratios (used only to shrink)."""
    w0 = 96
    ramp = np.repeat(np.arange(w0, dtype=np.float32)[None], 5, 0)
    out = cv2.resize(ramp, (width, 5), interpolation=mode)[2]
    s = width / w0
    want = (np.arange(width) + 0.5) / s - 0.5
    inner = slice(3, -3)  # the edges clamp
    err = np.abs(out - want)[inner].max()
    if mode == cv2.INTER_LINEAR or w0 % width == 0:
        assert err < 1e-3
    elif width < w0:
        assert err < 0.12


def _blob(shape, centre, sigma):
    """A bright Gaussian marker at sub-pixel ``centre`` (u, v), pixel centres at integers."""
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    d2 = (cols - centre[0]) ** 2 + (rows - centre[1]) ** 2
    return np.round(255 * np.exp(-d2 / (2 * sigma ** 2))).astype(np.uint8)


def _centroid(channel: np.ndarray, near, radius: int) -> np.ndarray:
    rows, cols = np.mgrid[:channel.shape[0], :channel.shape[1]]
    weight = channel.astype(np.float64) * ((np.abs(cols - near[0]) <= radius)
                                           & (np.abs(rows - near[1]) <= radius))
    return np.array([(weight * cols).sum(), (weight * rows).sum()]) / weight.sum()


@pytest.mark.parametrize("size,crop", [((48, 80), "bottom"), ((80, 120), "centre"),
                                       ((37, 91), "centre"), ((120, 120), "bottom"),
                                       ((320, 480), "bottom"), ((333, 401), "centre")])
def test_a_marker_at_a_projected_point_stays_at_the_projected_point(size, crop):
    """Markers rendered where 3D points project (sub-pixel, away from the image centre, where a
    wrong half-pixel or crop term shows) are found, after fit_image, where the same points
    project through the adjusted K: shrinking by 2 (exact), by 2.7 or 3.5 (INTER_AREA),
    cropping, and enlarging (INTER_LINEAR)."""
    h0, w0 = 160, 240
    k = np.array([[150.0, 0, 119.5], [0, 140.0, 79.5], [0, 0, 1]])
    points = np.array([[-3.1, -1.7, 8.0], [2.9, 1.3, 9.0], [0.7, 2.4, 12.0], [-4.2, 1.9, 7.5]])
    uv0, _ = project_points(points, k, np.eye(4))
    assert (np.abs(uv0 - np.round(uv0)) > 0.1).any()  # sub-pixel positions
    scale = max(size[0] / h0, size[1] / w0)
    sigma = 2.5 / min(scale, 1.0)  # at least 2.5 output pixels wide
    checked = 0
    for p, (u, v) in zip(points, uv0):
        image = np.repeat(_blob((h0, w0), (u, v), sigma)[..., None], 3, 2)
        out = fit_image(CameraObs("c", k, np.eye(4), (h0, w0), image), CameraConfig(size, crop))
        assert out.image.shape == (*size, 3)
        (uv,), (depth,) = project_points(p[None], out.intrinsic, np.eye(4))
        assert depth == pytest.approx(p[2])
        inside = (4 * sigma * scale <= uv[0] <= size[1] - 1 - 4 * sigma * scale
                  and 4 * sigma * scale <= uv[1] <= size[0] - 1 - 4 * sigma * scale)
        if not inside:  # cropped away (or cut by the edge): nothing to find
            continue
        found = _centroid(out.image[..., 1], uv, int(np.ceil(4 * sigma * scale)))
        # found within 0.012 px in every case; a missing (s - 1) / 2 term is 0.25 to 0.5 px off
        np.testing.assert_allclose(found, uv, atol=0.05)
        checked += 1
    assert checked >= 1


def test_resize_then_crop_moves_the_principal_point_and_refuses_a_crop_outside():
    k = np.array([[50.0, 0, 31.5], [0, 50.0, 19.5], [0, 0, 1]])
    cam = CameraObs("c", k, np.eye(4), (40, 64), np.zeros((40, 64, 3), np.uint8))
    assert resize_camera(cam, (40, 64)) is cam
    half = resize_camera(cam, (20, 32))
    np.testing.assert_allclose(half.intrinsic, [[25.0, 0, 15.5], [0, 25.0, 9.5], [0, 0, 1]])
    cropped = crop_camera(half, 4, 6, (10, 20))
    np.testing.assert_allclose(cropped.intrinsic[:2, 2], [9.5, 5.5])
    assert cropped.image.shape == (10, 20, 3) and cropped.image_size == (10, 20)
    with pytest.raises(ValueError, match="leaves the 20x32 image"):
        crop_camera(half, 12, 0, (10, 20))
    with pytest.raises(DatasetError, match="was not loaded"):
        resize_camera(CameraObs("c", k, np.eye(4), (40, 64)), (20, 32))


def test_box_edges_behind_the_camera_are_cut_at_the_near_plane():
    k = np.array([[100.0, 0, 50], [0, 100.0, 40], [0, 0, 1]])
    cv_axes = np.eye(4)  # camera looking along LiDAR +x: OpenCV x = -y, y = -z, z = +x
    cv_axes[:3, :3] = [[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]]
    ahead = np.array([[10.0, 0, 0, 4, 2, 1.5, 0.3]])
    edges = project_box_edges(ahead, k, cv_axes)
    assert edges.shape == (12, 2, 2)
    uv, _ = project_points(box_corners(ahead)[0], k, cv_axes)
    np.testing.assert_allclose(edges, uv[BOX_EDGES])
    assert project_box_edges(np.array([[-10.0, 0, 0, 4, 2, 1.5, 0]]), k, cv_axes).shape == (0, 2, 2)
    across = project_box_edges(np.array([[0.5, 0, 0, 4, 2, 1.5, 0]]), k, cv_axes, min_depth=0.5)
    # the 4 edges along x are cut at depth 0.5; the back face (x = -1.5) is dropped
    assert across.shape == (8, 2, 2) and np.isfinite(across).all()
    assert np.abs(across).max() == pytest.approx(100.0 * 1.0 / 0.5 + 50)
