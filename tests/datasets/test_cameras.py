"""Cameras through the batch: images resized and cropped with intrinsics that follow, and every
move of a LiDAR frame (augmentation, ego-aligned sender frames) moving its cameras with it, so
a box corner projects onto the same pixel before and after."""
import numpy as np
import pytest
import torch

from v2xfuse.datasets import CoopSampler, Opv2vAdapter, PipelineConfig, collate
from v2xfuse.datasets.base import DatasetError
from v2xfuse.datasets.images import CameraConfig, fit_image, project_points
from v2xfuse.models.detector import ego_aligned_frames
from v2xfuse.structures.boxes import box_corners
from v2xfuse.structures.coop import CameraObs

WIDE = [-200.0, -200.0, -50.0, 200.0, 200.0, 50.0]  # crops nothing: boxes keep their order
IMAGE_SIZE = [48, 80]


def _pipeline(**aug) -> PipelineConfig:
    return PipelineConfig.from_dict({"lidar_range": WIDE, "cameras": {"image_size": IMAGE_SIZE},
                                     **aug})


def _corner_pixels(gt, ego_from_agent, cameras):
    """Per agent, per camera: (uv (M, 8, 2), depth (M, 8)) of the ground-truth corners."""
    corners = box_corners(np.asarray(gt, np.float64)).reshape(-1, 3)
    out = []
    for pose, cams in zip(ego_from_agent, cameras):
        agent_from_ego = np.linalg.inv(np.asarray(pose, np.float64))
        in_agent = corners @ agent_from_ego[:3, :3].T + agent_from_ego[:3, 3]
        per_cam = []
        for k, l_from_c in cams:
            uv, depth = project_points(in_agent, np.asarray(k, np.float64),
                                       np.asarray(l_from_c, np.float64))
            per_cam.append((uv.reshape(-1, 8, 2), depth.reshape(-1, 8)))
        out.append(per_cam)
    return out


def _assert_same_pixels(before, after, atol):
    """Each box's 8 corners land on the same 8 pixels (a flipped box lists its corners in
    another order, so corners are matched as sets) at the same depths."""
    checked = 0
    for cams_b, cams_a in zip(before, after):
        for (uv_b, d_b), (uv_a, d_a) in zip(cams_b, cams_a):
            for m in range(len(uv_b)):
                front = d_b[m] > 0.5
                if not front.any():
                    continue
                dist = np.linalg.norm(uv_b[m][:, None] - uv_a[m][None], axis=-1)
                dist[~front] = 0.0
                match = dist.argmin(axis=1)
                assert dist.min(axis=1).max() < atol, dist.min(axis=1)
                assert len(set(match[front].tolist())) == int(front.sum())
                np.testing.assert_allclose(d_a[m][match[front]], d_b[m][front], atol=atol)
                checked += int(front.sum())
    assert checked > 50


def _sample_cameras(sample):
    return [[(c.intrinsic, c.lidar_from_camera) for c in cams] for cams in sample.cameras]


def test_corners_project_to_the_same_pixels_after_flip_rotation_and_scale(camera_opv2v_root):
    adapter = Opv2vAdapter(camera_opv2v_root, "train", load_images=True, comm_range=200.0)
    plain = CoopSampler(adapter, _pipeline(), train=False)
    flipped = 0
    for idx in range(len(adapter)):
        for seed in range(3):
            aug = CoopSampler(adapter, _pipeline(flip_prob=0.5, rotate_deg=40.0, scale=[0.9, 1.1]),
                              train=True, seed=seed)
            s0, s1 = plain[idx], aug[idx]
            assert len(s1.gt_boxes) == len(s0.gt_boxes) > 0
            flipped += np.linalg.det(s1.cameras[0][0].lidar_from_camera[:3, :3]) < 0
            _assert_same_pixels(
                _corner_pixels(s0.gt_boxes, s0.true_ego_from_agent, _sample_cameras(s0)),
                _corner_pixels(s1.gt_boxes, s1.true_ego_from_agent, _sample_cameras(s1)), 1e-6)
            # the images themselves are not moved: the same pixels under the new calibration
            for cams0, cams1 in zip(s0.cameras, s1.cameras):
                for c0, c1 in zip(cams0, cams1):
                    assert np.array_equal(c0.image, c1.image)
                    assert np.array_equal(c0.intrinsic, c1.intrinsic)
    assert flipped > 0  # the reflection case was exercised


def test_the_batch_carries_the_cameras_and_ego_aligned_frames_move_them(camera_opv2v_root):
    adapter = Opv2vAdapter(camera_opv2v_root, "train", load_images=True, comm_range=200.0)
    data = CoopSampler(adapter, _pipeline(flip_prob=1.0, rotate_deg=30.0), train=True, seed=1)
    samples = [data[0], data[1]]
    batch = collate(samples)
    cams = batch.cameras
    per_agent = [c for s in samples for c in s.cameras]
    assert cams.images.shape == (sum(map(len, per_agent)), 3, *IMAGE_SIZE)
    assert cams.images.dtype == torch.uint8 and cams.lidar_from_camera.dtype == torch.float64
    assert cams.agent.tolist() == [i for i, c in enumerate(per_agent) for _ in c]
    kinds = [k for s in samples for k in s.agent_kinds]
    assert {len(c) for c, k in zip(per_agent, kinds) if k == "vehicle"} == {4}
    assert {len(c) for c, k in zip(per_agent, kinds) if k == "infrastructure"} == {1}
    first = per_agent[0][0]
    assert np.array_equal(cams.images[0].permute(1, 2, 0).numpy(), first.image)
    assert np.array_equal(cams.lidar_from_camera[0].numpy(), first.lidar_from_camera)

    def pixels(b):
        out = []
        sample = b.sample_of_agent()
        for i in range(b.num_agents):
            mine = b.cameras.agent == i
            out += _corner_pixels(b.gt_boxes[int(sample[i])].numpy(),
                                  b.true_ego_from_agent[i:i + 1].numpy(),
                                  [list(zip(b.cameras.intrinsics[mine].numpy(),
                                            b.cameras.lidar_from_camera[mine].numpy()))])
        return out

    senders = [i for i in range(batch.num_agents) if i not in batch.ego_index().tolist()]
    aligned = ego_aligned_frames(batch, senders, 0.8)
    moved = ~torch.isin(aligned.cameras.agent, batch.ego_index())
    assert not torch.allclose(aligned.cameras.lidar_from_camera[moved], cams.lidar_from_camera[moved])
    assert torch.equal(aligned.cameras.images, cams.images)
    # the batch's poses are float32: pixels agree to a few thousandths of a pixel
    _assert_same_pixels(pixels(batch), pixels(aligned), 5e-3)


def test_resizing_and_cropping_moves_the_intrinsics_with_the_content():
    """A bright square projects, through the adjusted K, onto where the resized, cropped image
    shows it."""
    k = np.array([[50.0, 0, 31.5], [0, 50.0, 19.5], [0, 0, 1]])
    image = np.zeros((40, 64, 3), np.uint8)
    image[10:18, 44:52] = 255  # centre at column 47.5, row 13.5
    cam = CameraObs("c", k, np.eye(4), (40, 64), image)
    p_cam = np.linalg.solve(k, np.array([47.5, 13.5, 1.0])) * 7.0  # the square's centre ray
    for size, crop in (((20, 24), "bottom"), ((30, 30), "centre"), ((40, 64), "bottom"),
                       ((60, 90), "centre")):
        out = fit_image(cam, CameraConfig(size, crop))
        assert out.image.shape == (*size, 3) and out.image_size == size
        uv, depth = project_points(p_cam[None], out.intrinsic, np.eye(4))
        weight = out.image[..., 0].astype(np.float64)
        rows, cols = np.mgrid[:size[0], :size[1]]
        centroid = np.array([(weight * cols).sum(), (weight * rows).sum()]) / weight.sum()
        # the half-pixel terms of the resize are 0.125 to 0.25 px here: a K without them fails
        np.testing.assert_allclose(uv[0], centroid, atol=0.08)
        assert depth[0] == pytest.approx(7.0)


def test_cameras_off_decode_nothing_and_batch_no_images(camera_opv2v_root, monkeypatch):
    from v2xfuse.datasets import opv2v

    def no_decoding(path):
        raise AssertionError(f"decoded {path}")

    monkeypatch.setattr(opv2v, "read_image", no_decoding)
    adapter = Opv2vAdapter(camera_opv2v_root, "train", comm_range=200.0)
    batch = collate([CoopSampler(adapter, PipelineConfig(), train=False)[0]])
    assert batch.cameras is None
    with pytest.raises(DatasetError, match="camera image was not loaded"):
        CoopSampler(adapter, _pipeline(), train=False)[0]
