"""tools/visualize.py --cameras: the camera images beside the BEV, with the ground-truth boxes
(and a checkpoint's detections) drawn where they project."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from v2xfuse.builder import build_dataset, build_detector
from v2xfuse.config import dump_config, load_config
from v2xfuse.datasets.images import project_box_edges, resize_camera
from v2xfuse.engine.checkpoint import save_checkpoint
from v2xfuse.structures.boxes import transform_boxes

SIZE = (480, 360)  # W, H of the BEV
INDEX = 1


@pytest.fixture(scope="module")
def camera_config(tiny_camera_data, tmp_path_factory) -> Path:
    cfg = {
        "dataset": {"type": "opv2v", "root": str(tiny_camera_data("opv2v")), "max_agents": 4,
                    "comm_range": 1e3, "splits": {"val": "train"}},
        "pipeline": {"lidar_range": [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0]},
        "model": {"encoder": {"type": "pointpillars", "voxel_size": [1.6, 1.6], "out_channels": 8,
                              "max_points_per_pillar": 8},
                  "backbone": {"layer_strides": [1], "layer_channels": [8], "layer_nums": [1],
                               "upsample_channels": [8], "out_stride": 1},
                  "fusion": {"type": "late"}, "post": {"score_threshold": 0.0}},
        "channel": {"seed": 0},
    }
    path = tmp_path_factory.mktemp("cfg") / "cameras.yaml"
    dump_config(cfg, path)
    return path


def _read(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR),
                        cv2.COLOR_BGR2RGB)


def _run(load_tool, config, out, *extra) -> int:
    return load_tool("visualize").main(["--config", str(config), "--split", "val", "--index", str(INDEX),
                         "--out", str(out), "--size", *map(str, SIZE), "--cameras", *extra])


def test_ground_truth_boxes_are_drawn_where_they_project(load_tool, camera_config, tmp_path):
    tool = load_tool("visualize")
    out = tmp_path / "frame.png"
    assert _run(load_tool, camera_config, out) == 0 and out.is_file()
    image = _read(out)
    assert image.shape[0] == SIZE[1] and image.shape[1] > SIZE[0]

    # the same sample and panels, as the tool made them
    sample = build_dataset(load_config(camera_config), "val", train=False, load_images=True)[INDEX]
    height = SIZE[1] // tool.CAMERA_ROWS
    panels = tool.camera_panels(sample, None, height)
    assert len(panels) == sum(map(len, sample.cameras)) == 4 + 4 + 1  # 2 cars, 1 roadside unit
    _, origins = tool.compose(np.zeros((SIZE[1], SIZE[0], 3), np.uint8), panels)
    for (_, panel), (top, left) in zip(panels, origins):  # the file holds the panels as drawn
        np.testing.assert_array_equal(image[top:top + height, left:left + panel.shape[1]], panel)

    green = np.array(tool.rgb(tool.GT_COLOUR))
    checked = 0
    panel_iter = iter(panels)
    for k, cams in enumerate(sample.cameras):
        gt = transform_boxes(np.linalg.inv(sample.true_ego_from_agent[k]), sample.gt_boxes)
        for cam in cams:
            _, panel = next(panel_iter)
            plain = resize_camera(cam, panel.shape[:2])
            for edge in project_box_edges(gt, plain.intrinsic, plain.lidar_from_camera):
                u, v = np.round(edge.mean(0)).astype(int)  # the middle of a projected edge
                if not (0 <= u < panel.shape[1] and 16 <= v < panel.shape[0]):
                    continue  # outside the image, or under the title
                assert (panel[v, u] == green).all(), (cam.name, u, v)
                checked += int((plain.image[v, u] != green).any())  # the pixel changed
    assert checked >= 3


def test_a_checkpoint_s_detections_are_drawn_too(load_tool, camera_config, tmp_path):
    tool = load_tool("visualize")
    cfg = load_config(camera_config)
    torch.manual_seed(0)
    ckpt = tmp_path / "last.pt"
    save_checkpoint(ckpt, {"model": build_detector(cfg).state_dict(), "config": cfg})
    out = tmp_path / "frame.png"
    assert _run(load_tool, camera_config, out, "--checkpoint", str(ckpt)) == 0
    cameras = _read(out)[:, SIZE[0]:]
    red = np.array(tool.rgb(tool.DET_COLOUR))
    assert (cameras == red).all(-1).sum() > 50
    without = tmp_path / "no_ckpt.png"
    assert _run(load_tool, camera_config, without) == 0
    assert not (_read(without)[:, SIZE[0]:] == red).all(-1).any()  # random weights: none drawn


def test_a_sample_without_images_says_so(load_tool, camera_config, tmp_path, capsys):
    out = tmp_path / "frame.png"
    rc = _run(load_tool, camera_config, out, "--set",
              "dataset.sensors={vehicle: [lidar], infrastructure: [lidar]}")
    assert rc == 2 and not out.exists()
    assert "has no camera images" in capsys.readouterr().err
