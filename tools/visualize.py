#!/usr/bin/env python
"""Bird's-eye view of one cooperative frame: points, ground truth, detections, what was sent.

    python tools/visualize.py --config configs/quickstart.yaml --checkpoint last.pt \\
        --split val --index 3 --out frame.png
    python tools/visualize.py --checkpoint where2comm/last.pt --index 0 --out frame.png \\
        --set channel.loss=0.3 --size 1600 1600 --open3d
    python tools/visualize.py --config configs/experimental/hetero.yaml --checkpoint last.pt \\
        --cameras --out frame.png

The frame runs through the detector with every message serialised through the config's
simulated channel. Drawn in the ego frame (x forward, right; y left, up; metres): every agent's
points coloured by agent (placed with the pose the ego believes), ground-truth boxes (green),
detections (red, with scores) and, per collaborator, what the ego received from it: the BEV cells
a sparse method (Where2comm) sent, shaded; the outline of a full map (F-Cooper, AttFuse); the
boxes of late fusion (dashed). A message lost on the link draws nothing.

``--cameras`` puts every agent's camera images to the right of the BEV, in columns of up to
four, each with the ground-truth boxes (green) projected as 3D wireframes and, when a
``--checkpoint`` is given, the detections (red). They are the images the batch holds (resized
and cropped by ``pipeline.cameras``, or as stored when the config has none), enlarged to a
quarter of the BEV's height with the intrinsics following, and boxes are placed with each
agent's true pose: where they are, not where the ego believes. OUT must then be a raster
format OpenCV writes (``.png``, ``.jpg``).

``--open3d`` also saves a 3D screenshot (OUT with ``_3d`` before the suffix) when open3d is
installed and can open a window (it needs a display); otherwise it says why and skips it.
Without ``--checkpoint`` the weights are random (a warning says so).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("visualize")

__all__ = ["run_frame", "draw_bev", "camera_panels", "draw_boxes_on_camera", "compose", "main"]

GT_COLOUR, DET_COLOUR = "#1a9850", "#d73027"
# matplotlib's tab10 without its green and red, which mean ground truth and detections here
AGENT_COLOURS = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
                 "#7f7f7f"]
CAMERA_ROWS = 4  # camera panels per column beside the BEV


def load_model(args):
    """(config, model on ``args.device``); the model section comes from the checkpoint."""
    import torch

    from v2xfuse.builder import build_detector
    from v2xfuse.config import apply_overrides, load_config
    from v2xfuse.engine.checkpoint import load_detector

    if not args.checkpoint and not args.config:
        raise SystemExit("give --config, --checkpoint or both")
    config = load_config(args.config) if args.config else None
    if args.checkpoint:
        cfg, model, state = load_detector(args.checkpoint, config, args.overrides, args.device)
        return cfg, model.eval()
    cfg = apply_overrides(config, args.overrides)
    torch.manual_seed(0)
    log.warning("no --checkpoint: drawing the detections of randomly initialised weights")
    return cfg, build_detector(cfg).to(args.device).eval()


def run_frame(model, sample, cfg: dict, device="cpu"):
    """Detect on one sample through the config's channel.

    Returns:
        (Detections of the ego, list of Received messages, bytes sent this frame).
    """
    import torch

    from v2xfuse.datasets import collate
    from v2xfuse.engine.evaluate import build_channel

    channel = build_channel(cfg)
    batch = collate([sample]).to(device)
    with torch.no_grad():
        out = model(batch, channel=channel)
        det = model.predict(out)[0]
    return det, out.received, int(sum(channel.ledger.bytes_per_frame()))


def _to_ego(ego_from_agent: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(M, 2) xy in an agent's frame -> (M, 2) in the ego frame."""
    return xy @ ego_from_agent[:2, :2].T + ego_from_agent[:2, 3]


def _cell_polygons(cells: np.ndarray, grid, ego_from_sender: np.ndarray) -> np.ndarray:
    """(K,) flat cell indices of a sender's (ny, nx) grid -> (K, 4, 2) cell corners, ego frame."""
    row, col = np.divmod(cells.astype(np.int64), grid.nx)
    x0 = grid.x_min + col * grid.cell
    y0 = grid.y_min + row * grid.cell
    corners = np.stack([np.c_[x0, y0], np.c_[x0 + grid.cell, y0],
                        np.c_[x0 + grid.cell, y0 + grid.cell], np.c_[x0, y0 + grid.cell]], 1)
    return _to_ego(ego_from_sender, corners.reshape(-1, 2)).reshape(-1, 4, 2)


def draw_bev(sample, det, received, grid, lidar_range, size_px=(1000, 1000), dpi=100,
             title: str = "", max_points: int = 40000):
    """The figure (``size_px`` pixels at ``dpi``).

    Args:
        sample: the :class:`~v2xfuse.datasets.pipeline.Sample` drawn (its ``ego_from_agent``
            places each agent's points).
        det: the ego's Detections; received: list of Received (``sender`` indexes the sample's
            agents, payloads decoded); grid: the BevGrid of the senders' feature maps.
        lidar_range: [x_min, y_min, z_min, x_max, y_max, z_max] of the axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from v2xfuse.structures.boxes import boxes_bev_corners, transform_boxes

    fig = plt.figure(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    ax = fig.add_axes([0.08, 0.07, 0.9, 0.86])
    colours = AGENT_COLOURS
    rng = np.random.default_rng(0)
    handles = []
    for k, pts in enumerate(sample.points):
        colour = colours[k % len(colours)]
        if len(pts) > max_points:
            pts = pts[rng.choice(len(pts), max_points, replace=False)]
        xy = _to_ego(sample.ego_from_agent[k], pts[:, :2])
        ax.scatter(xy[:, 0], xy[:, 1], s=0.3, color=colour, alpha=0.5, linewidths=0,
                   rasterized=True)
        ax.plot(*sample.ego_from_agent[k][:2, 3], marker="^" if k == 0 else "o", color=colour,
                markeredgecolor="k", markersize=8)
        role = "ego" if k == 0 else sample.agent_kinds[k]
        handles.append(Line2D([], [], marker="o", linestyle="none", color=colour,
                              label=f"agent {sample.agent_ids[k]} ({role}) points"))
    for r in received:
        colour = colours[r.sender % len(colours)]
        pose = r.ego_from_sender.detach().cpu().double().numpy()
        if "cells" in r.payload:
            cells = r.payload["cells"].cpu().numpy()
            ax.add_collection(PolyCollection(_cell_polygons(cells, grid, pose), facecolors=colour,
                                             edgecolors="none", alpha=0.25))
            handles.append(Patch(color=colour, alpha=0.4,
                                 label=f"cells sent by {sample.agent_ids[r.sender]} "
                                       f"({len(cells)})"))
        elif "features" in r.payload:
            frame = np.array([[grid.x_min, grid.y_min], [grid.x_max, grid.y_min],
                              [grid.x_max, grid.y_max], [grid.x_min, grid.y_max]])
            outline = _to_ego(pose, frame)
            ax.add_patch(plt.Polygon(outline, closed=True, fill=False, edgecolor=colour,
                                     linestyle="--", linewidth=1.5))
            handles.append(Line2D([], [], color=colour, linestyle="--",
                                  label=f"full map sent by {sample.agent_ids[r.sender]}"))
        elif "boxes" in r.payload:
            boxes = transform_boxes(pose, r.payload["boxes"].cpu().double().numpy())
            for c in boxes_bev_corners(boxes):
                ax.add_patch(plt.Polygon(c, closed=True, fill=False, edgecolor=colour,
                                         linestyle="--", linewidth=1.0))
            handles.append(Line2D([], [], color=colour, linestyle="--",
                                  label=f"boxes sent by {sample.agent_ids[r.sender]} "
                                        f"({len(boxes)})"))
    for c in boxes_bev_corners(np.asarray(sample.gt_boxes, dtype=np.float64)):
        ax.add_patch(plt.Polygon(c, closed=True, fill=False, edgecolor=GT_COLOUR, linewidth=1.5))
    boxes = det.boxes.detach().cpu().double().numpy()
    scores = det.scores.detach().cpu().numpy()
    for c, box, score in zip(boxes_bev_corners(boxes), boxes, scores):
        ax.add_patch(plt.Polygon(c, closed=True, fill=False, edgecolor=DET_COLOUR, linewidth=1.2))
        ax.annotate(f"{score:.2f}", box[:2], fontsize=6, color=DET_COLOUR, ha="center",
                    va="center")
    handles += [Line2D([], [], color=GT_COLOUR, label=f"ground truth ({len(sample.gt_boxes)})"),
                Line2D([], [], color=DET_COLOUR, label=f"detections ({len(boxes)}), score")]
    ax.set_xlim(lidar_range[0], lidar_range[3])
    ax.set_ylim(lidar_range[1], lidar_range[4])
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("x (m, forward)")
    ax.set_ylabel("y (m, left)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.2)
    ax.legend(handles=handles, fontsize=7, loc="upper right", framealpha=0.85)
    return fig


def rgb(colour: str) -> tuple[int, int, int]:
    """A matplotlib colour as 0..255 RGB."""
    from matplotlib.colors import to_rgb

    return tuple(int(round(255 * c)) for c in to_rgb(colour))


def draw_boxes_on_camera(image: np.ndarray, intrinsic: np.ndarray, lidar_from_camera: np.ndarray,
                         boxes: np.ndarray, colour: str, thickness: int = 2) -> None:
    """Draw the 12 edges of each box, as the camera sees them, into ``image`` in place.

    Args:
        image: (H, W, 3) uint8 RGB whose pixels ``intrinsic`` (3, 3) describes.
        lidar_from_camera: (4, 4); boxes: (M, 7) in that LiDAR frame.
        colour: a matplotlib colour; lines are ``thickness`` pixels, not anti-aliased (every
            pixel on an edge has exactly that colour), placed to 1/16 pixel.
    """
    import cv2

    from v2xfuse.datasets.images import project_box_edges

    colour = rgb(colour)
    for edge in project_box_edges(boxes, intrinsic, lidar_from_camera):
        if not np.isfinite(edge).all():
            continue
        (u0, v0), (u1, v1) = np.round(np.clip(edge, -1e6, 1e6) * 16).astype(np.int64).tolist()
        cv2.line(image, (u0, v0), (u1, v1), colour, thickness, cv2.LINE_8, shift=4)


def camera_panels(sample, det=None, height: int = 240) -> list[tuple[str, np.ndarray]]:
    """Every camera image of ``sample`` resized to ``height`` rows (the intrinsics following),
    with the ground truth and, when ``det`` is given, its boxes drawn as projected 3D boxes.

    Boxes are in the ego frame; each agent's cameras see them through the agent's true pose
    (``true_ego_from_agent``). A title (agent id, kind, camera) sits in the top-left corner.

    Returns:
        (title, (height, W, 3) uint8 RGB) per camera, agents in order.
    """
    import cv2

    from v2xfuse.datasets.images import resize_camera
    from v2xfuse.structures.boxes import transform_boxes

    poses = sample.ego_from_agent if sample.true_ego_from_agent is None else sample.true_ego_from_agent
    gt = np.asarray(sample.gt_boxes, np.float64)
    pred = None if det is None else det.boxes.detach().cpu().double().numpy()
    panels = []
    for k, cams in enumerate(sample.cameras):
        agent_from_ego = np.linalg.inv(np.asarray(poses[k], np.float64))
        for cam in cams:
            h, w = cam.image_size
            cam = resize_camera(cam, (height, max(1, round(height * w / h))))
            image = cam.image.copy()
            if pred is not None:
                draw_boxes_on_camera(image, cam.intrinsic, cam.lidar_from_camera,
                                     transform_boxes(agent_from_ego, pred), DET_COLOUR)
            draw_boxes_on_camera(image, cam.intrinsic, cam.lidar_from_camera,
                                 transform_boxes(agent_from_ego, gt), GT_COLOUR)
            title = f"{sample.agent_ids[k]} ({sample.agent_kinds[k]}) {cam.name}"
            (tw, th), base = cv2.getTextSize(title, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
            cv2.rectangle(image, (0, 0), (tw + 4, th + base + 4), (0, 0, 0), cv2.FILLED)
            cv2.putText(image, title, (2, th + 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        (255, 255, 255), 1, cv2.LINE_AA)
            panels.append((title, image))
    return panels


def compose(bev: np.ndarray, panels: list[tuple[str, np.ndarray]], rows: int = CAMERA_ROWS
            ) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The BEV image (H, W, 3) with the panels to its right, ``rows`` per column (each
    ``H // rows`` tall), on white.

    Returns:
        (the canvas (H, W', 3) uint8, the (top, left) of each panel on it).
    """
    height = bev.shape[0] // rows
    columns = [panels[i:i + rows] for i in range(0, len(panels), rows)]
    widths = [max(image.shape[1] for _, image in column) for column in columns]
    canvas = np.full((bev.shape[0], bev.shape[1] + sum(widths), 3), 255, np.uint8)
    canvas[:, :bev.shape[1]] = bev
    origins, left = [], bev.shape[1]
    for column, width in zip(columns, widths):
        for row, (_, image) in enumerate(column):
            canvas[row * height:row * height + image.shape[0], left:left + image.shape[1]] = image
            origins.append((row * height, left))
        left += width
    return canvas, origins


def figure_pixels(fig) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a matplotlib figure as ``savefig`` at its dpi would write it."""
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


def save_open3d(sample, det, path: Path, size_px=(1280, 960)) -> bool:
    """A 3D screenshot of the frame with open3d; False (with a message) when it cannot."""
    try:
        import open3d as o3d
    except (ImportError, OSError) as exc:  # OSError: a system library it needs is missing
        print(f"--open3d: open3d is not usable here ({exc}); 3D view skipped")
        return False
    from matplotlib.colors import to_rgb

    from v2xfuse.structures.boxes import BOX_EDGES, box_corners

    vis = o3d.visualization.Visualizer()
    if not vis.create_window(visible=False, width=size_px[0], height=size_px[1]):
        print("--open3d: cannot open a window (no display?); 3D view skipped")
        return False
    colours = [to_rgb(c) for c in AGENT_COLOURS]
    for k, pts in enumerate(sample.points):
        xyz = pts[:, :3] @ sample.ego_from_agent[k][:3, :3].T + sample.ego_from_agent[k][:3, 3]
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz.astype(np.float64)))
        cloud.paint_uniform_color(colours[k % len(colours)])
        vis.add_geometry(cloud)
    edges = BOX_EDGES.tolist()
    for boxes, colour in ((np.asarray(sample.gt_boxes, np.float64), (0.1, 0.6, 0.3)),
                          (det.boxes.detach().cpu().double().numpy(), (0.85, 0.2, 0.15))):
        for corners in box_corners(boxes):
            lines = o3d.geometry.LineSet(o3d.utility.Vector3dVector(corners),
                                         o3d.utility.Vector2iVector(edges))
            lines.paint_uniform_color(colour)
            vis.add_geometry(lines)
    vis.poll_events()
    vis.update_renderer()
    ok = vis.capture_screen_image(str(path), do_render=True)
    vis.destroy_window()
    if ok:
        print(f"wrote {path}")
    else:
        print("--open3d: the screenshot failed; 3D view skipped")
    return bool(ok)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML for data and channel (default: the "
                                    "checkpoint's config); the model section is the checkpoint's")
    p.add_argument("--checkpoint", help="a last.pt written by tools/train.py")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--split", default="val")
    p.add_argument("--index", type=int, default=0, help="sample index in the split")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--size", type=int, nargs=2, default=(1000, 1000), metavar=("W", "H"),
                   help="image size in pixels")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--open3d", action="store_true", help="also save a 3D screenshot")
    p.add_argument("--cameras", action="store_true",
                   help="also draw every camera image with the ground-truth boxes (and, with a "
                        "checkpoint, the detections) projected, to the right of the BEV")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: this torch has no usable CUDA device", file=sys.stderr)
        return 2
    from v2xfuse.builder import build_dataset
    from v2xfuse.datasets import PipelineConfig

    cfg, model = load_model(args)
    pipeline = PipelineConfig.from_dict(cfg.get("pipeline"))
    # --cameras without pipeline.cameras: the images as stored (the pipeline decodes none)
    extra = {"load_images": True} if args.cameras and pipeline.cameras is None else {}
    dataset = build_dataset(cfg, args.split, train=False, **extra)
    if not 0 <= args.index < len(dataset):
        print(f"--index {args.index}: split {args.split!r} has {len(dataset)} samples",
              file=sys.stderr)
        return 2
    sample = dataset[args.index]
    if args.cameras and not any(sample.cameras):
        print(f"--cameras: sample {args.index} of split {args.split!r} has no camera images "
              f"(a dataset generated without cameras, or dataset.sensors giving none)",
              file=sys.stderr)
        return 2
    det, received, sent = run_frame(model, sample, cfg, args.device)
    method = cfg["model"].get("fusion", {}).get("type", "none")
    _, sequence, frame = sample.frame
    title = (f"{cfg['dataset']['type']} {args.split} #{args.index} ({sequence}/{frame}), "
             f"{method}: {sent / 1000:.1f} KB sent, {len(received)} messages received")
    fig = draw_bev(sample, det, received, model.feature_grid, pipeline.lidar_range,
                   tuple(args.size), title=title)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.cameras:
        import cv2

        bev = figure_pixels(fig)
        panels = camera_panels(sample, det if args.checkpoint else None,
                               bev.shape[0] // CAMERA_ROWS)
        canvas, _ = compose(bev, panels)
        try:
            ok, encoded = cv2.imencode(out.suffix or ".png",
                                       np.ascontiguousarray(canvas[..., ::-1]))
        except cv2.error:  # no writer for that extension
            ok = False
        if not ok:
            print(f"--cameras: OpenCV cannot write {out.suffix!r} images; use .png or .jpg",
                  file=sys.stderr)
            return 2
        out.write_bytes(encoded.tobytes())
    else:
        fig.savefig(out, dpi=fig.dpi)
    print(f"wrote {out}")
    if args.open3d:
        save_open3d(sample, det, out.with_name(out.stem + "_3d" + out.suffix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
