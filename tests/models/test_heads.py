"""Heads are peers chosen by model.head.type through the HEADS registry; the detector only
uses the Head interface (forward, loss, decode, confidence, grid)."""
import math

import pytest
import torch

from v2xfuse.builder import build_detector, build_head
from v2xfuse.structures.bev import BevGrid
from v2xfuse.models.heads import Head, OutsideGrid
from v2xfuse.models.heads.anchor_head import AnchorHead
from v2xfuse.models.heads.center_head import CenterHead
from v2xfuse.registry import HEADS
from v2xfuse.structures import Detections
from v2xfuse.structures.transforms import pose_from_xyz_rpy

GRID = BevGrid(-12.8, -12.8, 12.8, 12.8, 0.8)


def test_the_registry_holds_the_heads_as_peers():
    build_head(None, 8, GRID)  # registers the built-in heads
    assert {"anchor", "center"} <= set(HEADS.names())
    assert HEADS.get("anchor") is AnchorHead and HEADS.get("center") is CenterHead
    assert all(issubclass(HEADS.get(n), Head) for n in HEADS.names())


def test_model_head_type_picks_the_head(tiny_detector_cfg):
    assert isinstance(build_detector(tiny_detector_cfg()).head, AnchorHead)  # the default
    model = build_detector(tiny_detector_cfg(head={"type": "anchor", "anchor_z": -1.3}))
    assert float(model.head.anchors[0, 2]) == pytest.approx(-1.3)
    assert model.head.grid == model.feature_grid
    model = build_detector(tiny_detector_cfg(head={"type": "center", "min_radius": 3}))
    assert isinstance(model.head, CenterHead) and model.head.min_radius == 3
    assert model.head.grid == model.feature_grid


def test_an_unknown_head_names_the_known_ones(tiny_detector_cfg):
    with pytest.raises(KeyError, match=r"model.head.type: unknown detection head 'centre'; "
                                       r"known: anchor, center"):
        build_detector(tiny_detector_cfg(head={"type": "centre"}))


def test_a_key_the_head_does_not_take_fails_naming_it():
    with pytest.raises(KeyError, match=r"unknown keys \['radius'\] for the 'anchor' head"):
        build_head({"type": "anchor", "radius": 2}, 8, GRID)
    with pytest.raises(KeyError, match=r"unknown keys \['grid'\]"):  # derived, never configured
        build_head({"type": "anchor", "grid": 1}, 8, GRID)


def test_a_head_s_options_may_sit_under_its_name():
    options = {"anchor_size": [3.9, 1.6, 1.56], "anchor_z": -1.0}
    head = build_head({"type": "anchor", "anchor": options}, 8, GRID)
    torch.testing.assert_close(head.anchors[0, 2:6], torch.tensor([-1.0, 3.9, 1.6, 1.56]))
    with pytest.raises(KeyError, match=r"\['anchor_z'\] given both"):
        build_head({"type": "anchor", "anchor_z": -1.0, "anchor": {"anchor_z": -1.0}}, 8, GRID)


def test_another_head_s_key_fails_naming_it_and_its_head():
    with pytest.raises(KeyError, match=r"unknown keys \['anchor_size'\] for the 'center' head.*"
                                       r"'anchor_size' is an option of the 'anchor' and 'query' head"):
        build_head({"type": "center", "anchor_size": [3.9, 1.6, 1.56]}, 8, GRID)


def test_per_head_sections_let_the_type_switch():
    cfg = {"type": "anchor", "anchor": {"anchor_size": [3.9, 1.6, 1.56], "anchor_z": -1.0},
           "center": {"min_radius": 3}}
    assert isinstance(build_head(cfg, 8, GRID), AnchorHead)
    center = build_head({**cfg, "type": "center"}, 8, GRID)
    assert isinstance(center, CenterHead) and center.min_radius == 3


def test_outside_grid_is_checked_in_the_outer_frame():
    # A map 20 m ahead of the ego and turned 90 degrees: its +x points along the ego's +y.
    rule = OutsideGrid(torch.from_numpy(pose_from_xyz_rpy(20.0, 0, 0, 0, 0, math.pi / 2)), GRID)
    xy = torch.tensor([[0.0, 0.0], [0.0, 10.0], [5.0, 0.0], [0.0, -10.0]])
    # ego positions: (20, 0) out, (10, 0) in, (20, 5) out, (30, 0) out
    assert rule(xy).tolist() == [True, False, True, True]


@pytest.mark.parametrize("head", ["anchor", "center"])
@pytest.mark.parametrize("fusion", ["max", "where2comm", "late"])
def test_each_head_trains_and_predicts_with_each_kind_of_fusion(head, fusion, tiny_detector_cfg,
                                                                 random_points_batch):
    torch.manual_seed(0)
    model = build_detector(tiny_detector_cfg(fusion, head={"type": head}, agent_loss_weight=1.0))
    poses = [pose_from_xyz_rpy(0, 0, 0, 0, 0, 0), pose_from_xyz_rpy(6.0, -3.0, 0, 0, 0, 0.4)]
    batch = random_points_batch(poses)
    gt = torch.tensor([[4.0, 2.0, -1.0, 4.5, 1.9, 1.6, 0.3],
                       [-6.0, -8.0, -1.0, 4.0, 1.8, 1.5, 2.0]])
    batch.gt_boxes = [gt]
    model.train()
    losses = model.loss(model(batch), batch)
    assert torch.isfinite(losses["loss"]) and "loss_agent" in losses
    losses["loss"].backward()
    model.eval()
    with torch.no_grad():
        dets = model.predict(model(batch))
    assert len(dets) == 1 and isinstance(dets[0], Detections)
    assert dets[0].boxes.shape[1] == 7 and len(dets[0]) <= model.max_detections
    assert dets[0].labels.shape == dets[0].scores.shape


def test_agent_loss_ignores_the_same_anchors_as_before(tiny_detector_cfg, random_points_batch):
    """The anchor head's ignore rule through OutsideGrid marks exactly the anchors whose centre
    falls outside the ego's grid (what agent_loss computed inline before heads were peers)."""
    model = build_detector(tiny_detector_cfg())
    ego_from_agent = torch.from_numpy(pose_from_xyz_rpy(9.3, -4.1, 0.0, 0, 0, 0.7)).float()
    centres = model.head.anchors[:, :2]
    g = model.head.grid
    xy = centres @ ego_from_agent[:2, :2].T + ego_from_agent[:2, 3]
    expected = ~((xy[:, 0] >= g.x_min) & (xy[:, 0] < g.x_max) & (xy[:, 1] >= g.y_min) &
                 (xy[:, 1] < g.y_max))
    got = OutsideGrid(ego_from_agent.double(), g)(centres)
    assert torch.equal(got, expected) and 0 < int(got.sum()) < len(got)


def test_anchor_sizes_put_every_size_in_every_rotation():
    grid = BevGrid(-4.0, -4.0, 4.0, 4.0, 0.8)
    one = AnchorHead(8, grid, anchor_size=(4.5, 1.9, 1.6), anchor_z=-1.1)
    same = AnchorHead(8, grid, anchor_sizes=[(4.5, 1.9, 1.6)], anchor_z=[-1.1])
    assert torch.equal(one.anchors, same.anchors)
    two = AnchorHead(8, grid, anchor_sizes=[(4.5, 1.9, 1.6), (9.0, 2.5, 3.3)],
                     anchor_z=[-1.1, -0.25])
    assert two.num_anchors == 4 and two.cls.out_channels == 4 and two.reg.out_channels == 28
    per_anchor = two.anchors.view(4, grid.ny, grid.nx, 7)  # (A, H, W) order
    car, truck = (4.5, 1.9, 1.6), (9.0, 2.5, 3.3)
    expected = [(car, -1.1, 0.0), (car, -1.1, 90.0), (truck, -0.25, 0.0), (truck, -0.25, 90.0)]
    for a, (size, z, yaw) in enumerate(expected):
        torch.testing.assert_close(per_anchor[a, ..., 3:6],
                                   torch.tensor(size).expand(grid.ny, grid.nx, 3))
        assert bool((per_anchor[a, ..., 2] == z).all())
        assert bool((per_anchor[a, ..., 6] == math.radians(yaw)).all())
    centres = one.anchors.view(2, grid.ny, grid.nx, 7)[0, ..., :2]
    torch.testing.assert_close(per_anchor[2, ..., :2], centres)
    # a bus overlaps no car anchor by pos_iou, but the bus-sized ones
    bus = torch.tensor([[0.4, 0.4, -0.2, 11.0, 2.5, 3.2, 0.0]])
    assert int((one.assign(bus)[0] == 1).sum()) == 1  # the per-box best only
    labels, _ = two.assign(bus)
    positives = (labels.view(4, -1) == 1).sum(dim=1)
    assert int(positives[2]) > 1 and int(positives[:2].sum()) == 0
    with pytest.raises(ValueError, match="anchor_sizes"):
        AnchorHead(8, grid, anchor_sizes=[(4.5, 1.9, 1.6), (9.0, 2.5, 3.3)], anchor_z=[-1.1])
    with pytest.raises(ValueError, match="anchor_sizes"):
        AnchorHead(8, grid, anchor_sizes=[(4.5, 1.9)])


def test_a_detector_with_two_anchor_sizes_learns_a_bus(tiny_detector_cfg, random_points_batch):
    torch.manual_seed(0)
    model = build_detector(tiny_detector_cfg(head={"type": "anchor", "anchor": {
        "anchor_sizes": [[4.5, 1.9, 1.6], [9.0, 2.5, 3.3]], "anchor_z": [-1.1, -0.25]}}))
    assert model.head.num_anchors == 4
    batch = random_points_batch([pose_from_xyz_rpy(0, 0, 0, 0, 0, 0)])
    bus = torch.tensor([[2.0, -1.0, -0.3, 11.0, 2.5, 3.2, 0.2]])
    batch.gt_boxes = [bus]
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        optim.zero_grad()
        model.loss(model(batch), batch)["loss"].backward()
        optim.step()
    model.eval()
    with torch.no_grad():
        dets = model.predict(model(batch))[0]
    top = dets.boxes[dets.scores.argmax()]
    assert abs(float(top[3]) - 11.0) < 1.0 and abs(float(top[0]) - 2.0) < 0.5
