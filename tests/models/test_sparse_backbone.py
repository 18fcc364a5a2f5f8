"""The sparse BEV backbone (``model.backbone.type: sparse``) against the dense one and against
a dense reference of what sparse convolutions compute: shapes, exact equivalences, gradients,
empty agents, agents kept apart, and its place in the detector."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from v2xfuse.builder import build_detector
from v2xfuse.models.backbone import BevBackbone
from v2xfuse.models.encoders.pointpillars import Pillars
from v2xfuse.models.inputs import AgentInputs
from v2xfuse.models.sparse_backbone import SparseBevBackbone

# three stride-2 stages as OpenCOOD's PointPillars backbone, narrow
WIDTHS = dict(layer_strides=(2, 2, 2), layer_channels=(8, 16, 16), layer_nums=(1, 2, 1),
              upsample_channels=(4, 4, 4), out_stride=2)
C_IN = 5
# the quickstart's stride-1 first block, here downsampled by its neck (a dense strided conv)
QUICKSTART_LIKE = dict(layer_strides=(1, 2), layer_channels=(8, 16), layer_nums=(2, 1),
                       upsample_channels=(4, 4), out_stride=2)


def _pair(seed: int = 0, grow_first: bool = False, **widths):
    """A dense and a sparse backbone with the same weights (BN statistics made non-trivial)."""
    widths = widths or WIDTHS
    torch.manual_seed(seed)
    dense = BevBackbone(C_IN, **widths)
    with torch.no_grad():
        for m in dense.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    sparse = SparseBevBackbone(C_IN, grow_first=grow_first, **widths)
    sparse.load_state_dict(dense_to_sparse_state(dense.state_dict()))
    return dense, sparse


def dense_to_sparse_state(state: dict) -> dict:
    """Block conv weights from torch's (out, in, kH, kW) to spconv's (out, kH, kW, in)."""
    return {k: v.permute(0, 2, 3, 1) if k.startswith("blocks.") and v.dim() == 4 else v
            for k, v in state.items()}


def _pillars(mask: torch.Tensor, seed: int = 0) -> Pillars:
    """Random features at the True cells of ``mask`` (N, ny, nx)."""
    gen = torch.Generator().manual_seed(seed)
    agent, y, x = torch.nonzero(mask, as_tuple=True)
    coords = torch.stack([agent, torch.zeros_like(agent), y, x], 1).to(torch.int32)
    feats = torch.randn(len(agent), C_IN, generator=gen)
    return Pillars(feats, coords, mask.shape[0], mask.shape[1], mask.shape[2])


def _random_mask(n: int, ny: int, nx: int, fraction: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, ny, nx, generator=gen) < fraction


def masked_dense_reference(dense: BevBackbone, pillars: Pillars, grow_first: bool = False
                           ) -> torch.Tensor:
    """What the sparse backbone computes, with dense ops (evaluation mode): every conv on the
    zero-filled map, outputs kept only at active cells. A strided 3x3 conv (padding 1) makes
    a cell active when any cell of its input window is; a submanifold conv keeps the active
    set; with ``grow_first`` every block's first conv is a regular one (a ring more at stride 1)."""
    x = pillars.dense()
    active = torch.zeros(pillars.num_agents, 1, pillars.ny, pillars.nx)
    c = pillars.coords.long()
    active[c[:, 0], 0, c[:, 2], c[:, 3]] = 1.0
    outs = []
    for block, up in zip(dense.blocks, dense.ups):
        for j, layer in enumerate(block):
            conv = layer[0]
            if conv.stride[0] > 1 or (grow_first and j == 0):
                active = F.max_pool2d(active, 3, conv.stride, 1)
            x = layer(x) * active
        outs.append(up(x))
    return torch.cat(outs, 1)


def test_output_shape_and_channels_equal_the_dense_backbone():
    dense, sparse = _pair()
    pillars = _pillars(_random_mask(3, 24, 40, 0.1))
    assert sparse(pillars).shape == dense(pillars.dense()).shape == (3, 12, 12, 20)
    assert sparse.out_channels == dense.out_channels and sparse.out_stride == dense.out_stride
    assert list(sparse.state_dict()) == list(dense.state_dict())  # same names, same necks


@pytest.mark.parametrize("grow_first", [False, True])
@pytest.mark.parametrize("widths", [WIDTHS, QUICKSTART_LIKE], ids=["opv2v", "quickstart"])
@pytest.mark.parametrize("train", [True, False])
def test_on_a_fully_occupied_grid_it_is_the_dense_backbone(train, widths, grow_first):
    """Every cell active: strided sparse convs yield every output cell, submanifold convs are
    dense convs, BN over the active cells is BN over the map (batch statistics in training)."""
    dense, sparse = _pair(grow_first=grow_first, **widths)
    pillars = _pillars(torch.ones(2, 16, 24, dtype=torch.bool))
    dense.train(train)
    sparse.train(train)
    torch.testing.assert_close(sparse(pillars), dense(pillars.dense()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grow_first", [False, True])
@pytest.mark.parametrize("fraction", [0.05, 0.3])
@pytest.mark.parametrize("widths", [WIDTHS, QUICKSTART_LIKE], ids=["opv2v", "quickstart"])
def test_on_a_partly_occupied_grid_it_is_the_masked_dense_convolution(fraction, widths,
                                                                      grow_first):
    dense, sparse = _pair(seed=1, grow_first=grow_first, **widths)
    pillars = _pillars(_random_mask(2, 24, 32, fraction, seed=2), seed=3)
    dense.eval()
    sparse.eval()
    with torch.no_grad():
        got, want = sparse(pillars), masked_dense_reference(dense, pillars, grow_first)
        plain = dense(pillars.dense())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the reference is not the dense backbone itself


def test_a_submanifold_block_keeps_empty_cells_empty():
    """Stride-1 blocks start with a submanifold conv: the active set, and so the cells the
    block's output can differ from its neck's value on zeros, is the pillars' own."""
    widths = dict(layer_strides=(1,), layer_channels=(8,), layer_nums=(2,), upsample_channels=(4,),
                  out_stride=1)
    dense, sparse = _pair(**widths)
    mask = _random_mask(1, 16, 16, 0.1, seed=4)
    pillars = _pillars(mask)
    sparse.eval()
    with torch.no_grad():
        out = sparse(pillars)
        empty = sparse(Pillars(pillars.features[:0], pillars.coords[:0], 1, 16, 16))
    differs = (out - empty).abs().amax(1) > 0
    assert differs[0][~mask[0]].sum() == 0 and differs[0][mask[0]].any()


def test_on_a_fully_occupied_grid_its_gradients_are_the_dense_backbone_s():
    """The CPU sparse convs' backward (spconv_compat's implicit GEMM for 2D) against autograd
    through dense convs."""
    dense, sparse = _pair()
    pillars = _pillars(torch.ones(2, 16, 24, dtype=torch.bool))
    x_dense = pillars.dense().requires_grad_(True)
    pillars.features.requires_grad_(True)
    out_dense, out_sparse = dense(x_dense), sparse(pillars)
    weights = torch.randn(out_dense.shape, generator=torch.Generator().manual_seed(9))
    (out_dense * weights).sum().backward()
    (out_sparse * weights).sum().backward()
    want = dense_to_sparse_state({k: p.grad for k, p in dense.named_parameters()})
    for name, p in sparse.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-3, atol=1e-4, msg=name)
    torch.testing.assert_close(pillars.features.grad,
                               x_dense.grad.permute(0, 2, 3, 1).reshape(-1, C_IN),
                               rtol=1e-3, atol=1e-5)


def test_gradients_reach_every_parameter_and_the_pillar_features():
    _, sparse = _pair()
    pillars = _pillars(_random_mask(2, 24, 32, 0.2))
    pillars.features.requires_grad_(True)
    sparse.train()
    out = sparse(pillars)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in sparse.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert pillars.features.grad.abs().sum(1).gt(0).all()


def test_no_pillar_at_all_gives_the_necks_of_zero_maps():
    dense, sparse = _pair()
    empty = Pillars(torch.zeros(0, C_IN), torch.zeros(0, 4, dtype=torch.int32), 2, 16, 24)
    for train in (False, True):
        dense.train(train)
        sparse.train(train)
        out = sparse(empty)
        # no cell is active in any block (the dense backbone's BN shifts would fill them)
        zeros = [torch.zeros(2, c, 8 // 2 ** i, 12 // 2 ** i) for i, c in enumerate((8, 16, 16))]
        want = torch.cat([up(z) for up, z in zip(dense.ups, zeros)], 1)
        assert out.shape == (2, 12, 8, 12)
        torch.testing.assert_close(out, want)


def test_an_agent_without_pillars_gets_what_it_gets_alone():
    _, sparse = _pair()
    mask = _random_mask(3, 16, 24, 0.2)
    mask[1] = False
    sparse.eval()
    with torch.no_grad():
        out = sparse(_pillars(mask))
        alone = sparse(Pillars(torch.zeros(0, C_IN), torch.zeros(0, 4, dtype=torch.int32), 1, 16, 24))
    torch.testing.assert_close(out[1], alone[0], rtol=0, atol=1e-6)
    assert (out[0] - alone[0]).abs().max() > 1e-2


def test_agents_do_not_see_each_others_pillars():
    """A pillar added to agent 0 and agent 0's features changed: agent 1's maps stay."""
    _, sparse = _pair()
    mask = _random_mask(2, 16, 24, 0.2, seed=5)
    mask[0, 8, 12] = False
    before = _pillars(mask, seed=6)
    sel = before.coords[:, 0] == 0
    features = before.features.clone()
    features[sel] = torch.randn(int(sel.sum()), C_IN)
    after = Pillars(torch.cat([features, torch.randn(1, C_IN)]),
                    torch.cat([before.coords, torch.tensor([[0, 0, 8, 12]], dtype=torch.int32)]),
                    2, 16, 24)
    sparse.eval()
    with torch.no_grad():
        a, b = sparse(before), sparse(after)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)
    assert (a[0] - b[0]).abs().max() > 1e-2


def _spread_pair(kernel):
    """The sparse backbone without ``spread`` and with ``spread=3`` whose depthwise kernels are
    all ``kernel`` (3, 3), the rest of the weights the same."""
    _, plain = _pair(**QUICKSTART_LIKE)
    spread = SparseBevBackbone(C_IN, spread=3, **QUICKSTART_LIKE)
    missing, unexpected = spread.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("spreads.") for k in missing)
    with torch.no_grad():
        for conv in spread.spreads:
            conv.weight.copy_(kernel.expand_as(conv.weight))
    return plain.eval(), spread.eval()


def test_spread_is_a_depthwise_conv_between_each_neck_s_conv_and_norm():
    """A centred one-hot kernel changes nothing; one at the right of the centre moves every
    neck's output one cell left: what was at a pillar's cell reaches the empty cell beside it."""
    pillars = _pillars(_random_mask(2, 16, 24, 0.1, seed=7), seed=8)
    identity, shift = torch.zeros(3, 3), torch.zeros(3, 3)
    identity[1, 1] = shift[1, 2] = 1.0
    plain, spread = _spread_pair(identity)
    with torch.no_grad():
        torch.testing.assert_close(spread(pillars), plain(pillars), rtol=0, atol=0)
        plain, spread = _spread_pair(shift)
        want = plain(pillars)
        # the last column reads the padding: each neck's norm and ReLU of a zero
        zero = torch.cat([up[1:](torch.zeros(1, up[0].out_channels, 1, 1)) for up in plain.ups], 1)
        want = torch.cat([want[..., 1:], zero.expand(2, -1, want.shape[2], 1)], -1)
        torch.testing.assert_close(spread(pillars), want, rtol=1e-5, atol=1e-6)


def test_spread_fills_the_cells_around_the_pillars_and_is_trained():
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 8, 8] = True  # one pillar: a stride-1 block keeps only its cell active
    widths = dict(layer_strides=(1,), layer_channels=(8,), layer_nums=(1,), upsample_channels=(4,),
                  out_stride=1)
    pillars = _pillars(mask)
    empty = Pillars(pillars.features[:0], pillars.coords[:0], 1, 16, 16)
    for spread, reach in ((0, 0), (5, 2)):
        torch.manual_seed(0)
        net = SparseBevBackbone(C_IN, spread=spread, **widths).eval()
        with torch.no_grad():
            changed = (net(pillars) - net(empty)).abs().amax(1)[0] > 0
        rows, cols = torch.nonzero(changed, as_tuple=True)
        assert rows.min() == cols.min() == 8 - reach and rows.max() == cols.max() == 8 + reach
    net.train()  # batch statistics need two active cells
    pillars = _pillars(_random_mask(1, 16, 16, 0.2))
    pillars.features.requires_grad_(True)
    out = net(pillars)
    (out * torch.randn_like(out)).sum().backward()
    assert net.spreads[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("spread", [-1, 2, 4])
def test_spread_must_be_an_odd_kernel_size_or_zero(spread):
    with pytest.raises(ValueError, match="model.backbone.spread"):
        SparseBevBackbone(C_IN, spread=spread, **QUICKSTART_LIKE)


# ----------------------------------------------------------------------------------- detector


def test_the_detector_runs_on_sparse_pillars(tiny_detector_cfg, random_points_batch):
    widths = dict(layer_strides=[2], layer_channels=[8], layer_nums=[1], upsample_channels=[8],
                  out_stride=2)
    torch.manual_seed(0)
    dense = build_detector(tiny_detector_cfg(backbone=dict(widths)))
    torch.manual_seed(0)
    sparse = build_detector(tiny_detector_cfg(backbone=dict(widths, type="sparse")))
    assert isinstance(sparse.backbone, SparseBevBackbone) and isinstance(dense.backbone, BevBackbone)
    batch = random_points_batch([np.eye(4), np.eye(4)])
    inputs = AgentInputs.from_batch(batch)
    sparse.eval()
    dense.eval()
    with torch.no_grad():
        assert sparse.bev(inputs).shape == dense.bev(inputs).shape == (2, 8, 16, 16)
    sparse.train()
    out = sparse(batch)
    assert out.state.features.shape == (2, 8, 16, 16)


def test_a_sparse_backbone_needs_a_pillar_encoder(tiny_detector_cfg):
    cfg = tiny_detector_cfg(backbone={"type": "sparse", "layer_strides": [2],
                                      "layer_channels": [8], "layer_nums": [1],
                                      "upsample_channels": [8], "out_stride": 2})
    cfg["model"]["encoder"] = {"type": "second", "voxel_size": [0.8, 0.8, 0.5],
                               "channels": [4, 4]}
    with pytest.raises(ValueError, match="sparse pillars"):
        build_detector(cfg)
