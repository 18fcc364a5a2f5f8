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


def test_anchor_head_one_conv_matches_separate_convs():
    from v2xfuse.models.heads.anchor_head import AnchorHead
    from v2xfuse.structures.bev import BevGrid

    torch.manual_seed(0)
    for uncertainty in (False, True):
        head = AnchorHead(6, BevGrid(-4.0, -4.0, 4.0, 4.0, 0.8), uncertainty=uncertainty)
        for p in head.parameters():  # away from the init's near-zero weights
            torch.nn.init.normal_(p)
        x = torch.randn(2, 6, 10, 10, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_(True)
        out = head(x)
        fields = ["cls", "reg", "dir"] + (["log_var", "log_var_cls"] if uncertainty else [])
        refs = [getattr(head, f)(x_ref) for f in fields]
        upstream = [torch.randn(r.shape) for r in refs]
        for f, r in zip(fields, refs):
            torch.testing.assert_close(getattr(out, f), r, rtol=1e-5, atol=1e-5)
        sum((getattr(out, f) * u).sum() for f, u in zip(fields, upstream)).backward()
        grads = {n: p.grad.clone() for n, p in head.named_parameters()}
        head.zero_grad()
        sum((r * u).sum() for r, u in zip(refs, upstream)).backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
        for n, p in head.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-5)
        # checkpoints keep the separate parameter names
        assert {"cls.weight", "reg.weight", "dir.bias"} <= set(head.state_dict())
