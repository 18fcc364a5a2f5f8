"""Encoders: spconv's CPU backward (fixed at import) against a dense conv; BEV map shapes."""
import pytest
import torch

from v2xfuse.models.encoders.pointpillars import PointPillars
from v2xfuse.models.encoders.second import Second
from v2xfuse.models.inputs import AgentInputs
from v2xfuse.utils.spconv_compat import spconv_pytorch


def _dense_and_sparse(sp, sparse_cls, active, **conv_kwargs):
    """A dense Conv3d and a spconv layer with the same weights, on inputs zero where inactive."""
    torch.manual_seed(0)
    dense_in = torch.randn(1, 3, 4, 5, 6) * active  # (B, C, D, H, W)
    conv = torch.nn.Conv3d(3, 2, 3, bias=False, **conv_kwargs)
    sparse = sparse_cls(3, 2, 3, bias=False, **conv_kwargs)
    with torch.no_grad():  # spconv 2 weights are (out, kD, kH, kW, in)
        sparse.weight.copy_(conv.weight.permute(0, 2, 3, 4, 1))
    coords = active[0, 0].nonzero()
    coords = torch.cat([torch.zeros_like(coords[:, :1]), coords], 1).int()  # (batch, d, h, w)
    feats = dense_in[0].permute(1, 2, 3, 0)[active[0, 0]]
    return conv, sparse, dense_in, feats, coords


@pytest.mark.parametrize("kind", ["sparse", "sparse_strided", "subm"])
def test_sparse_conv_forward_and_backward_match_dense_conv(kind):
    """Repeated at torch's default thread count: spconv's own CPU kernels race there."""
    sp = spconv_pytorch()
    torch.manual_seed(1)
    active = torch.ones(1, 1, 4, 5, 6, dtype=torch.bool) if kind != "subm" else \
        torch.rand(1, 1, 4, 5, 6) < 0.4
    cls = sp.SubMConv3d if kind == "subm" else sp.SparseConv3d
    kwargs = {"padding": 1, "stride": 2 if kind == "sparse_strided" else 1}
    for _ in range(10):
        conv, sparse, dense_in, feats, coords = _dense_and_sparse(sp, cls, active, **kwargs)
        x_dense = dense_in.clone().requires_grad_(True)
        y_dense = conv(x_dense)
        x_sparse = feats.clone().requires_grad_(True)
        y_sparse = sparse(sp.SparseConvTensor(x_sparse, coords, [4, 5, 6], 1)).dense()
        grad = torch.randn_like(y_dense)
        if kind == "subm":  # a submanifold conv only produces outputs at the active input sites
            y_dense = y_dense * active
        torch.testing.assert_close(y_sparse, y_dense, atol=1e-5, rtol=1e-5)
        (y_dense * grad).sum().backward()
        (y_sparse * grad).sum().backward()
        torch.testing.assert_close(x_sparse.grad, x_dense.grad[0].permute(1, 2, 3, 0)[active[0, 0]],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sparse.weight.grad, conv.weight.grad.permute(0, 2, 3, 4, 1),
                                   atol=1e-4, rtol=1e-5)


def _points(num_agents=2, n=3000):
    torch.manual_seed(1)
    pts = torch.rand(n, 5) * torch.tensor([1, 40, 40, 6, 1]) - torch.tensor([0, 20, 20, 4, 0])
    pts[:, 0] = torch.randint(0, num_agents, (n,)).float()
    return pts


def test_second_and_pointpillars_give_per_agent_bev_maps_and_gradients():
    rng = (-19.2, -19.2, -4.0, 19.2, 19.2, 2.0)
    for enc in (Second(rng, voxel_size=(0.8, 0.8, 0.5), channels=(8, 16)),
                PointPillars(rng, voxel_size=(0.8, 0.8), out_channels=8)):
        out = enc(AgentInputs(3, _points()))  # agent 2 has no points: an all-zero map, not an error
        assert out.shape == (3, enc.out_channels, enc.grid.ny, enc.grid.nx) == (3, enc.out_channels, 48, 48)
        assert out[:2].abs().sum() > 0
        out.sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in enc.parameters() if p.requires_grad)


def test_pillar_net_inference_max_equals_normalising_every_point():
    from v2xfuse.models.encoders.pointpillars import PillarFeatureNet
    from v2xfuse.models.voxelize import Voxels

    torch.manual_seed(0)
    net = PillarFeatureNet(16, (0.8, 0.8), (-12.8, -12.8, -4.0, 12.8, 12.8, 2.0))
    with torch.no_grad():  # running statistics and an affine map with negative scales
        net.norm.running_mean.normal_()
        net.norm.running_var.uniform_(0.2, 3.0)
        net.norm.weight.normal_()
        net.norm.bias.normal_()
    assert (net.norm.weight < 0).any() and (net.norm.weight > 0).any()
    v, t = 50, 8
    num = torch.randint(1, t + 1, (v,), dtype=torch.int32)
    num[:3] = torch.tensor([1, t, 0], dtype=torch.int32)
    coords = torch.stack([torch.zeros(v, dtype=torch.int32), torch.zeros(v, dtype=torch.int32),
                          torch.randint(0, 32, (v,), dtype=torch.int32),
                          torch.randint(0, 32, (v,), dtype=torch.int32)], dim=1)
    pts = torch.randn(v, t, 4) * 3
    pts *= (torch.arange(t)[None] < num[:, None])[..., None]
    voxels = Voxels(pts, num, coords)
    net.eval()
    got = net(voxels)
    # The reference: normalise and rectify every valid point, then take the max.
    net.train()
    net.norm.eval()  # running statistics, as at inference
    want = net(voxels)
    torch.testing.assert_close(got[num > 0], want[num > 0], atol=1e-5, rtol=1e-5)
    assert (got[num == 0] == 0).all()
