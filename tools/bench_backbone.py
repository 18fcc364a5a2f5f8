#!/usr/bin/env python
"""CPU time of the dense BEV backbone against the sparse one (``model.backbone.type: sparse``)
on the same pillars, at the OPV2V-standard grid (0.4 m cells, 704 x 200, 64 channels, blocks
64/128/256 at strides 2/2/2 with 3/5/8 extra convs, 3 x 128 upsampled to stride 2).

    python tools/bench_backbone.py                         # bench_model.py's synthetic clouds
    python tools/bench_backbone.py --source dataset --root data/synthetic/opv2v

Both backbones start from the pillar encoder's output (:class:`Pillars`): the dense side pays
the scatter to a (N, 64, 200, 704) map, as the detector does, the sparse side reads the
occupied cells. ``forward`` is evaluation mode without autograd; ``train`` is training mode,
forward and backward of a fixed random projection of the output, gradients down to the pillar
features. Both sides run in this one process with ``--threads`` torch threads, taking turns
rep by rep (the first of each pair alternates); times are the medians of process CPU time
(``time.process_time``, which other load on the machine inflates less than wall time; the
wall-clock medians are printed too, with the load average).

Occupancy: the fraction of active cells per agent at the input and after each block (a strided
sparse conv activates a cell when its 3x3 input window has an active cell). ``MACs``: the
multiply-adds of the blocks' convs, dense (every cell) and sparse: as run (spconv_compat's
implicit GEMM: every active output's full 3x3 window) and at least (one per rule-book pair:
active output, active input in its window), plus the necks (the sparse side's 1x1 and
transposed ones on its active cells); their ratio is the speed-up the sparse backbone could
give if each of its MACs cost what a dense conv's does.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _bench_model():
    """tools/bench_model.py as a module (its OPV2V model, range and synthetic clouds)."""
    spec = importlib.util.spec_from_file_location("_bench_model", ROOT / "tools" / "bench_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def points_of_make_inputs(bm, agents: int, per_agent: int, seed: int) -> torch.Tensor:
    """(P, 5) [agent, x, y, z, intensity]: bench_model's clouds (density falling with range)."""
    data = bm.make_inputs(np.random.default_rng(seed), agents, per_agent, 1, bm.OPV2V_RANGE)
    return torch.from_numpy(data["points"])


def points_of_dataset(bm, root: Path, agents: int) -> torch.Tensor:
    """(P, 5): the ray-cast clouds of a synthetic OPV2V-format dataset's first validation
    frames, agent after agent (in each agent's own frame) until ``agents`` are taken."""
    from v2xfuse.builder import build_dataset
    from v2xfuse.datasets import collate

    cfg = bm.scenario_config("opv2v")
    cfg["dataset"].update(root=str(root), cache_points_mb=0, cache_dir=None)
    cfg["dataset"].pop("synthetic", None)
    sampler = build_dataset(cfg, "validate", train=False)
    clouds: list[torch.Tensor] = []
    for i in range(len(sampler)):
        batch = collate([sampler[i]])
        for a in range(batch.num_agents):
            if len(clouds) < agents:
                pts = batch.points[batch.points[:, 0] == a].clone()
                pts[:, 0] = len(clouds)
                clouds.append(pts)
        if len(clouds) == agents:
            return torch.cat(clouds)
    raise SystemExit(f"{root}: fewer than {agents} agents in the validation split")


def rulebook_macs(pillars, backbone) -> tuple[float, float, float, list[float]]:
    """(dense MACs, sparse MACs as run, sparse MACs at least, active fraction after each block)
    of ``backbone``'s widths."""
    active = torch.zeros(pillars.num_agents, 1, pillars.ny, pillars.nx)
    c = pillars.coords.long()
    active[c[:, 0], 0, c[:, 2], c[:, 3]] = 1.0
    ones = torch.ones(1, 1, 3, 3)
    dense = sparse = least = 0.0
    fractions = [float(active.mean())]
    for block in backbone.blocks:
        for layer in block:
            conv = layer[0]
            stride = conv.stride[0]
            out = F.max_pool2d(active, 3, stride, 1) if stride > 1 else active
            pairs = F.conv2d(active, ones, stride=stride, padding=1) * out
            cin, cout = conv.in_channels, conv.out_channels
            dense += out.numel() * 9 * cin * cout
            sparse += float(out.sum()) * 9 * cin * cout  # the implicit GEMM's full windows
            least += float(pairs.sum()) * cin * cout
            active = out
        fractions.append(float(active.mean()))
    for up, in_shape, fraction in zip(backbone.ups, _block_shapes(pillars, backbone), fractions[1:]):
        conv = up[0]
        k = conv.kernel_size[0] * conv.kernel_size[1]
        cells = in_shape[0] * in_shape[1] * pillars.num_agents
        if isinstance(conv, torch.nn.Conv2d) and conv.stride[0] > 1:
            cells //= conv.stride[0] * conv.stride[1]
        neck = cells * k * conv.in_channels * conv.out_channels
        dense += neck
        if isinstance(conv, torch.nn.Conv2d) and conv.stride[0] > 1:
            sparse, least = sparse + neck, least + neck  # a downsampling neck runs densely
        else:  # 1x1 or transposed: on the active cells only (sparse_backbone._sparse_neck)
            sparse, least = sparse + neck * fraction, least + neck * fraction
    # the sparse side's spread: a dense depthwise conv over every output cell of every neck
    ny, nx = pillars.ny // backbone.out_stride, pillars.nx // backbone.out_stride
    for spread in backbone.spreads:
        if isinstance(spread, torch.nn.Conv2d):
            k = spread.kernel_size[0] * spread.kernel_size[1]
            cost = pillars.num_agents * ny * nx * k * spread.out_channels
            sparse, least = sparse + cost, least + cost
    return dense, sparse, least, fractions


def _block_shapes(pillars, backbone) -> list[tuple[int, int]]:
    ny, nx, out = pillars.ny, pillars.nx, []
    for s in backbone.layer_strides:
        if s > 1:
            ny, nx = (ny - 1) // s + 1, (nx - 1) // s + 1
        out.append((ny, nx))
    return out


def make_step(backbone, pillars, mode: str, sparse: bool):
    """A function running one forward (``mode`` forward) or forward + backward (train)."""
    def inputs():
        if mode == "train":
            p = type(pillars)(pillars.features.detach().clone().requires_grad_(True),
                              pillars.coords, pillars.num_agents, pillars.ny, pillars.nx)
        else:
            p = pillars
        return p if sparse else p.dense()

    projection = {}

    def step():
        x = inputs()
        if mode == "forward":
            with torch.no_grad():
                backbone(x)
            return
        out = backbone(x)
        if "w" not in projection:
            projection["w"] = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        (out * projection["w"]).sum().backward()
        backbone.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["make_inputs", "dataset"], default="make_inputs")
    parser.add_argument("--root", type=Path, default=ROOT / "data" / "synthetic" / "opv2v",
                        help="--source dataset: a synthetic OPV2V-format dataset")
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--points", type=int, default=40000, help="make_inputs: points per agent")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="forward,train",
                        help='comma-separated, of forward and train; "" for occupancy and MACs only')
    parser.add_argument("--target", type=float, default=3.0, help="the speed-up aimed at")
    parser.add_argument("--grow-first", action="store_true",
                        help="the sparse backbone's grow_first (its blocks here all start strided)")
    parser.add_argument("--spread", type=int, default=0,
                        help="the sparse backbone's spread: a depthwise conv of this size per neck")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from v2xfuse.builder import build_encoder
    from v2xfuse.models.backbone import BevBackbone
    from v2xfuse.models.inputs import AgentInputs
    from v2xfuse.models.sparse_backbone import SparseBevBackbone

    bm = _bench_model()
    cfg = bm.scenario_config("opv2v")
    torch.manual_seed(0)
    encoder = build_encoder(cfg["model"], cfg["pipeline"]["lidar_range"]).eval()
    if args.source == "make_inputs":
        points = points_of_make_inputs(bm, args.agents, args.points, seed=0)
    else:
        points = points_of_dataset(bm, args.root, args.agents)
    with torch.no_grad():
        pillars = encoder.pillars(AgentInputs(args.agents, points))
    widths = {k: v for k, v in cfg["model"]["backbone"].items() if k != "type"}
    dense = BevBackbone(encoder.out_channels, **widths)
    sparse = SparseBevBackbone(encoder.out_channels, grow_first=args.grow_first,
                               spread=args.spread, **widths)
    sparse.load_state_dict({k: v.permute(0, 2, 3, 1) if k.startswith("blocks.") and v.dim() == 4
                            else v for k, v in dense.state_dict().items()}, strict=not args.spread)

    macs_dense, macs_sparse, macs_least, fractions = rulebook_macs(pillars, sparse)
    print(f"source {args.source}: {args.agents} agents, {len(points)} points, {len(pillars.features)} "
          f"pillars on {pillars.ny} x {pillars.nx}; {args.threads} torch thread(s), medians of "
          f"{args.reps} reps after {args.warmup} warm-up, sides interleaved")
    print("active cells: input {:.1%}, after blocks {}".format(
        fractions[0], ", ".join(f"{f:.1%}" for f in fractions[1:])))
    print(f"MACs (necks included): dense {macs_dense / 1e9:.1f} G, sparse as run {macs_sparse / 1e9:.1f} G "
          f"(ratio {macs_dense / macs_sparse:.2f}), sparse rule-book pairs only "
          f"{macs_least / 1e9:.1f} G (ratio {macs_dense / macs_least:.2f})")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for mode in [m for m in args.modes.split(",") if m]:
        for module in (dense, sparse):
            module.train(mode == "train")
        steps = {"dense": make_step(dense, pillars, mode, sparse=False),
                 "sparse": make_step(sparse, pillars, mode, sparse=True)}
        cpu = {k: [] for k in steps}
        wall = {k: [] for k in steps}
        for rep in range(args.warmup + args.reps):
            for name in (("dense", "sparse") if rep % 2 == 0 else ("sparse", "dense")):
                c0, w0 = time.process_time(), time.perf_counter()
                steps[name]()
                c1, w1 = time.process_time(), time.perf_counter()
                if rep >= args.warmup:
                    cpu[name].append(c1 - c0)
                    wall[name].append(w1 - w0)
        d, s = statistics.median(cpu["dense"]), statistics.median(cpu["sparse"])
        dw, sw = statistics.median(wall["dense"]), statistics.median(wall["sparse"])
        print(f"{mode:<8} dense {1e3 * d:8.0f} ms  sparse {1e3 * s:8.0f} ms  dense/sparse "
              f"{d / s:5.2f} (target {args.target:g}: {'met' if d / s >= args.target else 'not met'})"
              f"   wall: dense {1e3 * dw:.0f} ms, sparse {1e3 * sw:.0f} ms")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
