"""The model's fast paths against straightforward references: same outputs and gradients."""
from __future__ import annotations

import torch

from v2xfuse.models.encoders.pointpillars import scatter_pillars


def _unique_coords(gen: torch.Generator, num_agents: int, ny: int, nx: int, count: int):
    cells = torch.randperm(num_agents * ny * nx, generator=gen)[:count]
    agent, rest = cells // (ny * nx), cells % (ny * nx)
    return torch.stack([agent, torch.zeros_like(agent), rest // nx, rest % nx], 1).to(torch.int32)


def _scatter_reference(feats, coords, num_agents, ny, nx):
    canvas = feats.new_zeros((num_agents * ny * nx, feats.shape[1]))
    c = coords.long()
    canvas[c[:, 0] * ny * nx + c[:, 2] * nx + c[:, 3]] = feats
    return canvas.view(num_agents, ny, nx, -1).permute(0, 3, 1, 2).contiguous()


def test_scatter_matches_reference_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    n, ny, nx, c = 3, 7, 11, 5
    coords = _unique_coords(gen, n, ny, nx, 60)
    feats = torch.randn(60, c, generator=gen, requires_grad=True)
    ref_feats = feats.detach().clone().requires_grad_(True)
    out = scatter_pillars(feats, coords, n, ny, nx)
    ref = _scatter_reference(ref_feats, coords, n, ny, nx)
    assert out.shape == (n, c, ny, nx)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    upstream = torch.randn(out.shape, generator=gen)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(feats.grad, ref_feats.grad, rtol=0, atol=0)
    # a pillar lands where its coordinates say
    a, _, y, x = coords[0].tolist()
    torch.testing.assert_close(out[a, :, y, x], feats[0].detach())
