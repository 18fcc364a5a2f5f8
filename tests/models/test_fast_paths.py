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


def _random_rigid(gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    t = torch.eye(4, dtype=torch.float64)
    t[:3, :3] = q * torch.sign(torch.det(q))
    t[:3, 3] = torch.randn(3, generator=gen, dtype=torch.float64) * 30
    return t


def test_sender_points_move_like_per_point_homogeneous_transform():
    from v2xfuse.models.detector import _move_agents_points

    gen = torch.Generator().manual_seed(1)
    n, p = 4, 500
    agent = torch.randint(0, n, (p,), generator=gen).float()
    points = torch.cat([agent[:, None], torch.rand(p, 3, generator=gen) * 100 - 50,
                        torch.rand(p, 1, generator=gen)], 1)
    a = torch.stack([_random_rigid(gen) for _ in range(n)])
    moved = [1, 3]
    for i in range(n):
        if i not in moved:
            a[i] = torch.eye(4, dtype=torch.float64)
    per_point = a[agent.long()].to(points.dtype)
    ref_xyz = torch.einsum("pij,pj->pi", per_point[:, :3, :3], points[:, 1:4]) + per_point[:, :3, 3]
    out = _move_agents_points(points, a, moved)
    torch.testing.assert_close(out[:, 1:4], ref_xyz, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out[:, [0, 4]], points[:, [0, 4]], rtol=0, atol=0)
    still = (agent != 1) & (agent != 3)
    assert torch.equal(out[still], points[still])
    assert not torch.allclose(out[agent == 1, 1:4], points[agent == 1, 1:4])


def test_voxelizer_same_voxels_for_grouped_and_shuffled_points():
    from v2xfuse.models.voxelize import Voxelizer

    gen = torch.Generator().manual_seed(2)
    vox = Voxelizer([0.8, 0.8, 8.0], [-8.0, -8.0, -5.0, 8.0, 8.0, 3.0], 4, 1000)
    n, p = 3, 900
    agent = torch.sort(torch.randint(0, n, (p,), generator=gen)).values.float()
    xyz = torch.rand(p, 3, generator=gen) * torch.tensor([16.0, 16.0, 8.0]) - torch.tensor([8.0, 8.0, 5.0])
    grouped = torch.cat([agent[:, None], xyz, torch.rand(p, 1, generator=gen)], 1)
    # reference: the old path, a stable argsort by agent whatever the order
    shuffled = grouped[torch.randperm(p, generator=gen)]
    order = torch.argsort(shuffled[:, 0].long(), stable=True)
    for got, want in [(vox(grouped, n), None), (vox(shuffled, n), vox(shuffled[order], n))]:
        if want is None:  # grouped input: the same as voxelising each agent alone
            for i in range(n):
                alone = vox(torch.cat([torch.zeros_like(grouped[agent == i, :1]),
                                       grouped[agent == i, 1:]], 1), 1)
                sel = got.coords[:, 0] == i
                torch.testing.assert_close(got.features[sel], alone.features, rtol=0, atol=0)
                torch.testing.assert_close(got.coords[sel, 1:], alone.coords[:, 1:], rtol=0, atol=0)
            continue
        torch.testing.assert_close(got.features, want.features, rtol=0, atol=0)
        torch.testing.assert_close(got.coords, want.coords, rtol=0, atol=0)
        torch.testing.assert_close(got.num_points, want.num_points, rtol=0, atol=0)
