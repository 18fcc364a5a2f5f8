"""Encoders: spconv's CPU backward (fixed at import) against a dense conv; BEV map shapes."""
import torch

from v2xfuse.models.encoders.pointpillars import PointPillars
from v2xfuse.models.encoders.second import Second
from v2xfuse.utils.spconv_compat import spconv_pytorch


def test_sparse_conv_forward_and_backward_match_dense_conv():
    sp = spconv_pytorch()
    torch.manual_seed(0)
    dense_in = torch.randn(1, 3, 4, 5, 6)  # (B, C, D, H, W), every site active
    conv = torch.nn.Conv3d(3, 2, 3, padding=1, bias=False)
    sparse = sp.SparseConv3d(3, 2, 3, padding=1, bias=False)
    with torch.no_grad():  # spconv 2 weights are (out, kD, kH, kW, in)
        sparse.weight.copy_(conv.weight.permute(0, 2, 3, 4, 1))
    x_dense = dense_in.clone().requires_grad_(True)
    y_dense = conv(x_dense)
    x_sparse_feats = dense_in.clone().permute(0, 2, 3, 4, 1).reshape(-1, 3).requires_grad_(True)
    d, h, w = torch.meshgrid(torch.arange(4), torch.arange(5), torch.arange(6), indexing="ij")
    coords = torch.stack([torch.zeros_like(d), d, h, w], -1).reshape(-1, 4).int()
    y_sparse = sparse(sp.SparseConvTensor(x_sparse_feats, coords, [4, 5, 6], 1)).dense()
    torch.testing.assert_close(y_sparse, y_dense, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y_dense)
    (y_dense * grad).sum().backward()
    (y_sparse * grad).sum().backward()
    torch.testing.assert_close(x_sparse_feats.grad,
                               x_dense.grad.permute(0, 2, 3, 4, 1).reshape(-1, 3),
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
        out = enc(_points(), 3)  # agent 2 has no points: an all-zero map, not an error
        assert out.shape == (3, enc.out_channels, enc.grid.ny, enc.grid.nx) == (3, enc.out_channels, 48, 48)
        assert out[:2].abs().sum() > 0
        out.sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in enc.parameters() if p.requires_grad)
