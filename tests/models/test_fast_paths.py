"""The model's fast paths against straightforward references: same outputs and gradients."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


def _shift_reference(feature, dx, dy):
    out = torch.zeros_like(feature)
    ny, nx = feature.shape[-2:]
    if abs(dx) < nx and abs(dy) < ny:
        out[:, max(dy, 0):ny + min(dy, 0), max(dx, 0):nx + min(dx, 0)] = \
            feature[:, max(-dy, 0):ny + min(-dy, 0), max(-dx, 0):nx + min(-dx, 0)]
    return out


def test_shift_map_matches_zero_and_slice():
    from v2xfuse.structures.bev import shift_map

    f = torch.randn(3, 5, 7)
    for dx, dy in [(0, 0), (2, -1), (-3, 4), (6, 0), (7, 0), (0, -5), (-9, 9)]:
        torch.testing.assert_close(shift_map(f, dx, dy), _shift_reference(f, dx, dy), rtol=0, atol=0)


def test_max_fusion_matches_stack_and_warp_reference():
    from v2xfuse.comm.received import Received
    from v2xfuse.fusion.base import Arrivals
    from v2xfuse.fusion.basic import MaxFusion
    from v2xfuse.structures.bev import BevGrid, ego_to_agent_theta

    gen = torch.Generator().manual_seed(3)
    grid = BevGrid(-6.4, -6.4, 6.4, 6.4, 0.8)
    c = 4
    poses = []
    for dx, dy in [(3, -2), (0, 0), (-5, 1)]:  # ego-aligned: whole-cell shifts
        t = torch.eye(4)
        t[0, 3], t[1, 3] = dx * grid.cell, dy * grid.cell
        poses.append(t)
    rotated = _random_rigid(gen).float()
    rotated[:3, 3] = torch.tensor([1.3, -0.7, 0.0])
    poses.insert(1, rotated)
    ego = torch.randn(c, grid.ny, grid.nx, generator=gen).relu().requires_grad_(True)
    maps = [torch.randn(c, grid.ny, grid.nx, generator=gen).requires_grad_(True) for _ in poses]
    # ties with the ego and with zeros, where the maximum's gradient splits
    with torch.no_grad():
        maps[0][:, :2] = 0.0
        maps[2][:, 3:5] = ego[:, 3:5]
    msgs = [Received(0, k + 1, {"features": m}, p) for k, (m, p) in enumerate(zip(maps, poses))]
    arrived = Arrivals(0, ego, msgs, torch.stack(poses), grid)
    out = MaxFusion.fuse_one(arrived)

    ego_r = ego.detach().clone().requires_grad_(True)
    maps_r = [m.detach().clone().requires_grad_(True) for m in maps]
    warped = []
    for m, p in zip(maps_r, poses):
        dx, dy = round(float(p[0, 3]) / grid.cell), round(float(p[1, 3]) / grid.cell)
        if p is not rotated:
            warped.append(_shift_reference(m, dx, dy))
        else:
            theta = ego_to_agent_theta(p[None].double(), grid).float()
            sampling = torch.nn.functional.affine_grid(theta, [1, c, grid.ny, grid.nx], align_corners=False)
            warped.append(torch.nn.functional.grid_sample(m[None], sampling, mode="bilinear",
                                                          align_corners=False)[0])
    ref = ego_r
    for w in torch.stack(warped).unbind(0):
        ref = torch.maximum(ref, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(out.shape, generator=gen)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ego.grad, ego_r.grad, rtol=1e-5, atol=1e-5)
    for m, m_r in zip(maps, maps_r):
        torch.testing.assert_close(m.grad, m_r.grad, rtol=1e-5, atol=1e-5)


def test_malloc_tuning_applies_once_and_can_be_turned_off():
    import os
    import subprocess
    import sys

    code = "import v2xfuse.models; from v2xfuse.utils.malloc import tune_malloc; print(tune_malloc())"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "V2XFUSE_TUNE_MALLOC")}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        check=True).stdout.strip()
    off = subprocess.run([sys.executable, "-c", code], env=dict(env, V2XFUSE_TUNE_MALLOC="0"),
                         capture_output=True, text=True, check=True).stdout.strip()
    assert off == "disabled"
    expected = "tuned" if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") else on
    assert on == expected


FAULTS_CHILD = """
import resource, torch
import v2xfuse.models
def round_():  # 4 x 300 MB written, then all freed: a heap top of 1.2 GB
    blocks = [torch.ones(75_000_000) for _ in range(4)]
    del blocks
for _ in range(5):  # the heap's layout settles within three rounds (up to 3.3 GB)
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_with_the_tuning_freed_blocks_are_reused_without_page_faults():
    """Blocks under the mmap threshold that together free more than the old 1 GB trim
    threshold: trimmed, every round faulted their 293k pages in again (the sixth measured)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "V2XFUSE_TUNE_MALLOC")}
    faults = [int(subprocess.run([sys.executable, "-c", FAULTS_CHILD], env=dict(env, **extra),
                                 capture_output=True, text=True, check=True).stdout.split()[-1])
              for extra in ({}, {"V2XFUSE_TUNE_MALLOC": "0"})]
    assert faults[0] < 10_000 < 200_000 < faults[1], faults
