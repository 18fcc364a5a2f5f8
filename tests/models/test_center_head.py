"""The center head: gaussian targets, encode -> decode round trip, training on a tiny batch."""
import math

import pytest
import torch

from v2xfuse.structures.bev import BevGrid
from v2xfuse.models.heads.center_head import CenterHead, CenterOutput, gaussian_radius
from v2xfuse.structures.boxes import wrap_angle

# Not square and not centred on the origin, so a swapped row/column or a missing offset shows:
# x in [0, 25.6) over 32 columns, y in [-12.8, 6.4) over 24 rows.
GRID = BevGrid(0.0, -12.8, 25.6, 6.4, 0.8)


def boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


GT = boxes([3.3, -10.1, -1.0, 4.5, 1.9, 1.6, 0.3],
           [20.7, 4.9, -0.8, 4.0, 1.8, 1.5, -2.9],        # near -pi
           [12.05, -2.35, -1.2, 5.0, 2.1, 1.7, math.pi / 2],
           [7.9, 2.1, -0.9, 4.2, 1.7, 1.4, 3.1])          # near +pi


def perfect_output(head, gt):
    """The head output that is exactly its targets (heatmap logits of the gaussian, box values
    at the centre cells)."""
    t = head.targets(gt)
    heat = t.heatmap.clamp(1e-6, 1 - 1e-6)
    code = t.reg.clone()
    if head.yaw_code == "axis_direction":
        code[:, 8] = code[:, 8] * 20 - 10  # the front/back target 0/1 as a confident logit
    reg = torch.zeros(1, head.reg_channels, GRID.ny * GRID.nx)
    reg[0, :, t.index] = code.T
    return CenterOutput(torch.log(heat / (1 - heat))[None],
                        reg.view(1, head.reg_channels, GRID.ny, GRID.nx))


def test_a_box_peaks_at_its_cell_with_a_gaussian_around_it():
    head = CenterHead(8, GRID, yaw_code="sin_cos")
    gt = boxes([3.3, -10.1, -1.0, 4.5, 1.9, 1.6, 0.3])
    t = head.targets(gt)
    col, row = int(3.3 // 0.8), int((-10.1 + 12.8) // 0.8)  # x picks the column, y the row
    assert t.heatmap.shape == (1, GRID.ny, GRID.nx)
    assert t.heatmap[0, row, col] == 1.0 and int((t.heatmap == 1).sum()) == 1
    assert t.index.tolist() == [row * GRID.nx + col]
    # Falls off with distance, symmetric, zero beyond the radius (2 cells for a car on 0.8 m).
    h = t.heatmap[0]
    assert 0 < h[row, col + 1] < 1 and h[row, col + 1] == h[row, col - 1] == h[row + 1, col]
    assert h[row, col + 1] > h[row, col + 2] > 0 and h[row + 1, col + 1] < h[row, col + 1]
    assert h[row, col + 3] == 0 and h[row + 3, col] == 0
    # Offsets in [0, 1) cells, then z, log dims, sin/cos yaw.
    torch.testing.assert_close(t.reg[0], torch.tensor([3.3 / 0.8 - col, 2.7 / 0.8 - row, -1.0,
                                                      math.log(4.5), math.log(1.9), math.log(1.6),
                                                      math.sin(0.3), math.cos(0.3)]))


def test_the_radius_grows_with_the_box_and_has_a_floor():
    r = gaussian_radius(torch.tensor([5.6, 12.0, 30.0]), torch.tensor([2.4, 5.0, 12.0]), 0.1)
    assert r[0] < r[1] < r[2]
    head = CenterHead(8, GRID, min_radius=2)
    big = boxes([12.0, -3.0, -1.0, 16.0, 8.0, 3.0, 0.0])  # a 20 x 10 cell bus: wider gaussian
    small = head.targets(GT[:1]).heatmap
    assert int((head.targets(big).heatmap > 0).sum()) > int((small > 0).sum()) == 25  # 5 x 5


def test_the_axis_code_is_the_same_for_either_heading_and_a_front_bit_tells_them_apart():
    head = CenterHead(8, GRID, yaw_code="axis_direction")
    yaws = torch.tensor([0.3, 0.3 - math.pi, -1.2, -1.2 + math.pi])
    gt = GT[[0, 0, 0, 0]].clone()
    gt[:, 0] = torch.tensor([3.3, 8.3, 13.3, 18.3])
    gt[:, 6] = yaws
    reg = head.targets(gt).reg
    assert reg.shape == (4, 9)
    torch.testing.assert_close(reg[0, 6:8], reg[1, 6:8])
    torch.testing.assert_close(reg[2, 6:8], reg[3, 6:8])
    torch.testing.assert_close(reg[0, 6:8], torch.tensor([math.sin(0.6), math.cos(0.6)]))
    assert reg[:, 8].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_an_unknown_yaw_code_fails():
    with pytest.raises(ValueError, match="yaw_code 'quaternion'"):
        CenterHead(8, GRID, yaw_code="quaternion")


@pytest.mark.parametrize("yaw_code", ["sin_cos", "axis_direction"])
def test_targets_decode_back_to_the_boxes(yaw_code):
    head = CenterHead(8, GRID, yaw_code=yaw_code)
    gt = torch.cat([GT, GT + torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0])])
    gt[4:, 6] = torch.linspace(-math.pi, math.pi, 9)[:4]  # quadrant edges: -180, -135, -90, -45
    gt = torch.cat([gt, gt[4:] + torch.tensor([0, -2.0, 0, 0, 0, 0, 3 * math.pi / 4])])
    t = head.targets(gt)
    t.reg[:, 8:] = t.reg[:, 8:] * 2 - 1  # a front/back target as a logit of the right sign
    out = head.decode_boxes(t.reg, t.index)
    torch.testing.assert_close(out[:, :6], gt[:, :6], atol=1e-5, rtol=1e-5)
    assert wrap_angle(out[:, 6] - gt[:, 6]).abs().max() < 1e-5


@pytest.mark.parametrize("yaw_code", ["sin_cos", "axis_direction"])
def test_decode_finds_every_box_in_the_map_frame_best_first(yaw_code):
    head = CenterHead(8, GRID, max_peaks=50, yaw_code=yaw_code)
    dets = head.decode(perfect_output(head, GT), 0, score_threshold=0.5)
    assert len(dets) == len(GT) and dets.scores.min() > 0.99
    assert dets.labels.dtype == torch.int64 and not dets.labels.any()
    order = torch.cdist(dets.boxes[:, :2], GT[:, :2]).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(dets.boxes[:, :6], GT[order, :6], atol=1e-4, rtol=1e-4)
    assert wrap_angle(dets.boxes[:, 6] - GT[order, 6]).abs().max() < 1e-4
    assert torch.all(dets.scores[:-1] >= dets.scores[1:])
    # Only local maxima: a gaussian's shoulders are not boxes, whatever the threshold.
    assert len(head.decode(perfect_output(head, GT), 0, score_threshold=0.01)) == len(GT)


def test_boxes_off_the_grid_have_no_peak_but_keep_their_tails():
    head = CenterHead(8, GRID)
    t = head.targets(boxes([-0.5, 0.0, -1.0, 4.5, 1.9, 1.6, 0.0]))  # 0.5 m left of column 0
    assert len(t.index) == 0 and t.reg.shape == (0, 9)
    assert 0 < t.heatmap.max() < 1
    empty = head.targets(torch.zeros(0, 7))
    assert empty.heatmap.abs().sum() == 0 and len(empty.index) == 0


def test_loss_decreases_on_a_tiny_batch():
    torch.manual_seed(0)
    head = CenterHead(8, GRID, head_channels=16)
    features = torch.randn(2, 8, GRID.ny, GRID.nx)
    gts = [GT[:2], GT[2:]]
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = head.loss(head(features), gts)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert {"loss", "loss_heatmap", "loss_reg"} <= set(out)
    assert losses[-1] < 0.3 * losses[0], losses


def test_ignored_cells_teach_no_background():
    torch.manual_seed(0)
    head = CenterHead(8, GRID, head_channels=16)
    out = head(torch.randn(1, 8, GRID.ny, GRID.nx))
    everywhere = [lambda xy: torch.ones(len(xy), dtype=torch.bool)]
    nowhere = [lambda xy: torch.zeros(len(xy), dtype=torch.bool)]
    empty = [torch.zeros(0, 7)]
    assert float(head.loss(out, empty, everywhere)["loss_heatmap"]) == 0.0
    assert float(head.loss(out, empty, nowhere)["loss_heatmap"]) == \
        pytest.approx(float(head.loss(out, empty)["loss_heatmap"]))
    assert float(head.loss(out, empty)["loss_heatmap"]) > 0
    # A centre inside an ignored region is still a centre.
    assert float(head.loss(out, [GT[:1]], everywhere)["loss_heatmap"]) > 0


def test_confidence_is_a_probability_per_cell():
    head = CenterHead(8, GRID, head_channels=16)
    conf = head.confidence(torch.randn(3, 8, GRID.ny, GRID.nx)).detach()
    assert conf.shape == (3, 1, GRID.ny, GRID.nx)
    assert float(conf.min()) >= 0 and float(conf.max()) <= 1
