"""The query head: Hungarian matching, the anchor code, decoding to Detections with the queries'
embeddings, LiDAR and camera maps, the decoder hooks, and a few steps of training."""
import itertools
import math

import numpy as np
import pytest
import torch

from v2xfuse.builder import build_detector, build_head
from v2xfuse.datasets import CoopSampler, Opv2vAdapter, PipelineConfig, collate
from v2xfuse.datasets.pipeline import Sample
from v2xfuse.models.heads.matching import FORBIDDEN, hungarian
from v2xfuse.models.heads.query_decoder import (Queries, anchors_from_boxes, axis_code,
                                                boxes_from_anchors, front_logit)
from v2xfuse.models.heads.query_head import QueryHead, QueryOutput, lattice_anchors
from v2xfuse.structures import Detections
from v2xfuse.structures.bev import BevGrid
from v2xfuse.structures.boxes import wrap_angle

# Not square and not centred on the origin, so a swapped axis shows.
GRID = BevGrid(0.0, -12.8, 25.6, 6.4, 0.8)
SMALL = {"num_queries": 12, "embed_dims": 16, "heads": 2, "ffn_dims": 32, "learned_points": 2,
         "decoder_layers": 2, "heatmap_channels": 8}


def brute_force(cost: np.ndarray) -> float:
    """The least total cost over every assignment of min(Q, M) pairs."""
    q, m = cost.shape
    if q >= m:
        return min(sum(cost[r, c] for c, r in enumerate(rows))
                   for rows in itertools.permutations(range(q), m))
    return min(sum(cost[r, c] for r, c in enumerate(cols))
               for cols in itertools.permutations(range(m), q))


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (4, 2), (2, 5), (5, 5), (6, 3)])
def test_hungarian_finds_the_least_cost_assignment(shape):
    rng = np.random.default_rng(sum(shape))
    for trial in range(5):
        cost = rng.uniform(0, 10, shape)
        if trial % 2:  # ties and forbidden pairs too
            cost = np.round(cost / 3)
            cost[rng.uniform(size=shape) < 0.2] = np.inf
        rows, cols = hungarian(torch.from_numpy(cost))
        assert len(rows) == min(shape) and len(set(rows.tolist())) == len(rows)
        assert len(set(cols.tolist())) == len(cols) and rows.tolist() == sorted(rows.tolist())
        finite = np.where(np.isfinite(cost), cost, FORBIDDEN)
        assert finite[rows.numpy(), cols.numpy()].sum() == pytest.approx(brute_force(finite))


def test_hungarian_of_nothing_is_nothing():
    rows, cols = hungarian(torch.zeros(0, 3))
    assert rows.shape == cols.shape == (0,) and rows.dtype == torch.int64


@pytest.mark.parametrize("yaw", [0.0, 0.4, math.pi / 2, 2.0, math.pi - 0.01, -math.pi,
                                 -2.5, -math.pi / 2 + 0.01])
def test_a_box_survives_its_anchor_and_a_front_logit(yaw):
    box = torch.tensor([[3.0, -2.0, -1.0, 4.5, 1.9, 1.6, yaw]], dtype=torch.float64)
    anchors = anchors_from_boxes(box)
    back = boxes_from_anchors(anchors, front_logit(box[:, 6]))
    torch.testing.assert_close(back[:, :6], box[:, :6])
    assert float(wrap_angle(back[0, 6] - yaw).abs()) < 1e-9
    turned = box.clone()
    turned[:, 6] = yaw + math.pi  # the same axis: the loss cannot tell the two apart
    torch.testing.assert_close(axis_code(anchors_from_boxes(turned)), axis_code(anchors))


def test_learned_anchors_cover_the_grid():
    anchors = lattice_anchors(GRID, 50, (4.5, 1.9, 1.6), -1.1)
    assert anchors.shape == (50, 8)
    xy = anchors[:, :2]
    assert (xy[:, 0] > GRID.x_min).all() and (xy[:, 0] < GRID.x_max).all()
    assert (xy[:, 1] > GRID.y_min).all() and (xy[:, 1] < GRID.y_max).all()
    # spread: both halves of the grid along x and y hold anchors
    assert (xy[:, 0] < 12.8).any() and (xy[:, 0] > 12.8).any()
    assert (xy[:, 1] < -3.2).any() and (xy[:, 1] > -3.2).any()


@pytest.mark.parametrize("query_init", ["heatmap", "learned"])
def test_decode_gives_detections_with_each_box_s_query_and_reference_point(query_init):
    torch.manual_seed(0)
    head = QueryHead(8, GRID, query_init=query_init, **SMALL).eval()
    with torch.no_grad():
        out = head(torch.randn(2, 8, GRID.ny, GRID.nx))
    assert isinstance(out, QueryOutput) and out.batch_size == 2 and len(out.layers) == 2
    assert out.final.features.shape == (2, 12, 16) and out.final.anchors.shape == (2, 12, 8)
    dets = head.decode(out, 1, score_threshold=0.0)
    assert isinstance(dets, Detections) and len(dets) == 12
    assert dets.extras["query"].shape == (12, 16)
    assert dets.extras["reference_point"].shape == (12, 3)
    torch.testing.assert_close(dets.extras["reference_point"], dets.boxes[:, :3])
    assert dets.scores.tolist() == sorted(dets.scores.tolist(), reverse=True)
    # every field follows its box through a selection (NMS, thresholds)
    best = dets.select(torch.tensor([2, 0]))
    torch.testing.assert_close(best.extras["query"][1], dets.extras["query"][0])
    assert len(head.decode(out, 0, score_threshold=1.0)) == 0


def test_heatmap_queries_start_at_the_heatmap_peaks_with_its_boxes():
    torch.manual_seed(0)
    head = QueryHead(8, GRID, **SMALL).eval()
    features = torch.randn(1, 8, GRID.ny, GRID.nx)
    with torch.no_grad():
        dense = head.heatmap(features)
        queries = head.initial(features, dense)
        peaks = head.heatmap.decode(dense, 0, score_threshold=0.0)
    # the center head's own best peaks, as anchors (the same boxes, best first)
    torch.testing.assert_close(boxes_from_anchors(queries.anchors[0], queries.front[0]),
                               peaks.boxes[:12], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.sigmoid(queries.logits[0]), peaks.scores[:12])


@pytest.mark.parametrize("channels, grid", [
    (8, BevGrid(-12.8, -12.8, 12.8, 12.8, 0.8)),      # a LiDAR map
    (4, BevGrid(-12.8, -6.4, 12.8, 6.4, 0.4)),        # a finer camera map, not square
])
def test_any_bev_map_gives_queries_of_the_configured_size(channels, grid):
    torch.manual_seed(0)
    head = build_head({"type": "query", **SMALL}, channels, grid)
    out = head(torch.randn(3, channels, grid.ny, grid.nx))
    assert out.final.features.shape == (3, 12, 16) and out.final.valid.all()
    assert out.dense.heatmap.shape == (3, 1, grid.ny, grid.nx)
    gt = torch.tensor([[1.0, 2.0, -1.0, 4.5, 1.9, 1.6, 0.3]])
    losses = head.loss(out, [gt, gt[:0], gt])
    assert torch.isfinite(losses["loss"]) and set(losses) >= {"loss_cls", "loss_reg", "loss_dense"}


@pytest.mark.parametrize("sensors", [["lidar"], ["camera"], ["lidar", "camera"]])
def test_the_query_head_reads_lidar_camera_and_fused_maps(sensors, tiny_detector_cfg,
                                                          tiny_camera_data):
    encoders = {"lidar": {"type": "pointpillars", "voxel_size": [0.8, 0.8], "out_channels": 8},
                "camera": {"type": "camera_bev", "out_channels": 4, "hidden_channels": 4,
                           "cell": 0.8}}
    cfg = tiny_detector_cfg("none", encoder=None,
                            encoders={s: encoders[s] for s in sensors},
                            head={"type": "query", **SMALL})
    cfg["pipeline"]["cameras"] = {"image_size": [24, 40]}
    torch.manual_seed(0)
    model = build_detector(cfg)
    adapter = Opv2vAdapter(tiny_camera_data("opv2v"), "train", comm_range=1e3, load_images=True)
    pipeline = PipelineConfig.from_dict(cfg["pipeline"])
    batch = collate([CoopSampler(adapter, pipeline, train=False)[i] for i in (0, 1)])
    out = model(batch)
    assert out.head.final.features.shape == (2, 12, 16)
    losses = model.loss(out, batch)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    model.eval()
    with torch.no_grad():
        dets = model.predict(model(batch))
    assert len(dets) == 2 and all(d.extras["query"].shape[1] == 16 for d in dets)


def test_hooks_see_each_layer_s_queries_and_the_later_layers_run_on_what_they_return():
    torch.manual_seed(0)
    head = QueryHead(8, GRID, **SMALL).eval()
    features = torch.randn(2, 8, GRID.ny, GRID.nx)
    seen = []

    def append_one(queries: Queries) -> Queries:
        seen.append(queries)
        parts = [{"features": torch.cat([queries.features[b], queries.features[b, :1]]),
                  "anchors": torch.cat([queries.anchors[b], queries.anchors[b, :1]]),
                  "logits": torch.cat([queries.logits[b], queries.logits[b, :1]]),
                  "front": torch.cat([queries.front[b], queries.front[b, :1]])}
                 for b in range(2)]
        return Queries.pad(parts)

    with torch.no_grad():
        out = head(features, hooks={0: append_one})
        alone = head.queries_after(features, [0, 1])
    assert len(seen) == 1 and seen[0].positions.shape == (2, 12, 16)
    torch.testing.assert_close(seen[0].anchors, alone[0].anchors)
    torch.testing.assert_close(seen[0].positions, alone[0].positions)
    assert out.layers[0].features.shape[1] == 12 and out.final.features.shape[1] == 13
    with pytest.raises(ValueError, match="has 2"):
        head.queries_after(features, [2])


def test_unmatched_queries_outside_the_complete_region_are_not_taught_background():
    torch.manual_seed(0)
    head = QueryHead(8, GRID, query_init="learned", **SMALL)
    out = head(torch.randn(1, 8, GRID.ny, GRID.nx))
    nothing = [torch.zeros(0, 7)]
    everywhere = head.loss(out, nothing)["loss_cls"]
    ignored = head.loss(out, nothing, [lambda xy: torch.ones(len(xy), dtype=torch.bool)])
    assert everywhere > 0 and ignored["loss_cls"] == 0


def _two_car_batch():
    rng = np.random.default_rng(0)
    gt = np.array([[3.0, 2.0, -1.0, 4.5, 1.9, 1.6, 0.3], [-5.0, 7.0, -1.0, 4.0, 1.8, 1.5, 2.0]])
    # points on the cars' surfaces, scattered clutter elsewhere
    cars = [rng.normal(b[:3], [1.5, 0.7, 0.4], (300, 3)) for b in gt]
    clutter = np.c_[rng.uniform(-12, 12, (400, 2)), rng.uniform(-3, 1, (400, 1))]
    xyz = np.concatenate([*cars, clutter])
    points = np.c_[xyz, rng.uniform(0, 1, (len(xyz), 1))].astype(np.float32)
    sample = Sample([points], np.eye(4)[None], gt, np.zeros(2, np.int64), ["0"], ["vehicle"],
                    np.zeros(1), ("synthetic", "s0", "000000"))
    return collate([sample, sample])


def test_a_few_training_steps_decrease_the_loss(tiny_detector_cfg):
    torch.manual_seed(0)
    model = build_detector(tiny_detector_cfg("none", head={"type": "query", **SMALL}))
    batch = _two_car_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model.loss(model(batch), batch)
        optimizer.zero_grad()
        loss["loss"].backward()
        optimizer.step()
        losses.append(float(loss["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
