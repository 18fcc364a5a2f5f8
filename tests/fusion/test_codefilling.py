"""CodeFilling: codebook fidelity, exact bit packing, bytes on the wire, information filling,
and a training step."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from v2xfuse.builder import build_detector
from v2xfuse.comm import CodesCodec, Message, decode, encode, pack_bits
from v2xfuse.comm.batch_link import BatchChannel
from v2xfuse.comm.channel import Channel
from v2xfuse.config import load_config
from v2xfuse.datasets import collate
from v2xfuse.datasets.pipeline import Sample
from v2xfuse.fusion.base import FusionState
from v2xfuse.fusion.codebook import ResidualCodebook
from v2xfuse.fusion.codefilling import CodeFilling, fill_selection
from v2xfuse.structures.bev import BevGrid
from v2xfuse.models.detector import CoopDetector, run_handshake
from v2xfuse.structures.transforms import pose_from_xyz_rpy

GRID = BevGrid(-12.8, -12.8, 12.8, 12.8, 0.8)  # 32 x 32 cells
ROOT = Path(__file__).resolve().parents[2]


def _cfg() -> dict:
    return {"dataset": {"type": "opv2v"},
            "pipeline": {"lidar_range": [-12.8, -12.8, -4.0, 12.8, 12.8, 2.0]},
            "model": {"encoder": {"type": "pointpillars", "voxel_size": [0.8, 0.8],
                                  "out_channels": 8},
                      "backbone": {"layer_strides": [1], "layer_channels": [8],
                                   "layer_nums": [1], "upsample_channels": [8], "out_stride": 1},
                      "fusion": {"type": "codefilling", "codewords": 16}}}


def _scene_batch(n_agents=3, seed=0):
    """Random points around three agents, a car ahead of the ego."""
    rng = np.random.default_rng(seed)
    points = [np.c_[rng.uniform(-12, 12, (800, 2)), rng.uniform(-3, 1, (800, 1)),
                    rng.uniform(0, 1, (800, 1))].astype(np.float32) for _ in range(n_agents)]
    poses = np.stack([pose_from_xyz_rpy(3.0 * i, -2.0 * i, 0.0, 0.0, 0.0, 0.3 * i)
                      for i in range(n_agents)])
    gt = np.array([[5.0, 1.0, -1.0, 4.5, 1.9, 1.6, 0.2]])
    sample = Sample(points, poses, gt, np.zeros(1, np.int64), [str(i) for i in range(n_agents)],
                    ["vehicle"] * n_agents, np.zeros(n_agents), ("synthetic", "s0", "000000"))
    return collate([sample])


def _identity_batch(n_agents: int):
    """Agents all at the ego's pose, so cells map one to one between frames."""
    points = [np.zeros((1, 4), np.float32) for _ in range(n_agents)]
    poses = np.stack([pose_from_xyz_rpy(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)] * n_agents)
    sample = Sample(points, poses, np.zeros((0, 7)), np.zeros(0, np.int64),
                    [str(i) for i in range(n_agents)], ["vehicle"] * n_agents,
                    np.zeros(n_agents), ("synthetic", "s0", "000000"))
    return collate([sample])


def _fitted_error(x, stages, codewords):
    cb = ResidualCodebook(x.shape[1], groups=2, stages=stages, codewords=codewords)
    cb.fit(x, iters=10, generator=torch.Generator().manual_seed(1))
    codes, x_hat = cb.quantise(x)
    assert codes.shape == (len(x), stages, 2) and int(codes.max()) < codewords
    return float(((x_hat.detach() - x) ** 2).mean())


def test_round_trip_error_falls_as_codewords_and_stages_grow():
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    by_k = [_fitted_error(x, 1, k) for k in (4, 16, 64)]
    by_r = [_fitted_error(x, r, 16) for r in (1, 2, 3)]
    assert by_k[0] > by_k[1] > by_k[2]
    assert by_r[0] > by_r[1] > by_r[2]
    assert by_r[2] < 0.5 * by_r[0] and by_k[2] < 0.8 * by_k[0]  # not marginal gains


@pytest.mark.parametrize("codewords", [2, 5, 16, 64, 100])
def test_codes_bit_packing_is_exact(codewords):
    cb = ResidualCodebook(8, groups=2, stages=3, codewords=codewords)
    x = torch.randn(301, 8, generator=torch.Generator().manual_seed(codewords))
    cb.fit(x, iters=2, generator=torch.Generator().manual_seed(0))
    codes = cb.encode(x)
    bits = cb.bits
    assert bits == math.ceil(math.log2(codewords)) == CodesCodec.bits_for(codewords)
    codec = CodesCodec("codes", bits=bits)
    entries = codec.encode(codes)
    assert entries["codes.codes"].size == math.ceil(codes.numel() * bits / 8)
    np.testing.assert_array_equal(entries["codes.codes"], pack_bits(codes.numpy(), bits))
    rx = decode(encode(Message("1", "codes", 0, np.eye(4), entries))).payload
    back = torch.from_numpy(codec.decode(rx).astype(np.int64))
    assert torch.equal(back, codes)
    assert torch.equal(cb.decode(back), cb.decode(codes))  # the receiver rebuilds the same map


def _array_bytes(name: str, ndim: int, data: int) -> int:
    """Wire-format bytes of one payload array (see v2xfuse.comm.message)."""
    return 3 + 4 * ndim + len(name) + data


def _cells_bytes(prefix: str, cells: int, height: int, width: int) -> int:
    mask, idx = math.ceil(height * width / 8), 2 * cells  # uint16 indices on this grid
    positions = (_array_bytes(f"{prefix}.idx", 1, idx) if idx <= mask
                 else _array_bytes(f"{prefix}.bits", 1, mask))
    return _array_bytes(f"{prefix}.shape", 1, 8) + positions


@pytest.mark.parametrize("codewords", [16, 100])
@pytest.mark.parametrize("num_cells", [20, 300])  # positions as uint16 indices / as a bitmask
def test_bytes_are_the_formula_and_the_serialised_length(num_cells, codewords):
    torch.manual_seed(0)
    fusion = CodeFilling(channels=8, groups=2, stages=3, codewords=codewords).eval()
    h, w = GRID.ny, GRID.nx
    chosen = torch.randperm(h * w, generator=torch.Generator().manual_seed(num_cells))[:num_cells]
    conf = torch.zeros(2, 1, h * w)
    conf[1, 0, chosen] = 0.9  # the ego sees nothing, the collaborator is confident there
    state = FusionState(_identity_batch(2), torch.randn(2, 8, h, w), GRID,
                        {"confidence": conf.view(2, 1, h, w)})
    link = BatchChannel(Channel(0))
    run_handshake(fusion, state, [1], link)
    payloads = fusion.encode(state, [1])
    rx = link.transmit(fusion.wire(), state.batch, [1], payloads, state=state)
    assert int(payloads[0]["cells"].sum()) == num_cells  # everything it offered was asked for

    # codes: cells x m x r x ceil(log2 k) bits, the positions, the header
    bits = num_cells * 2 * 3 * math.ceil(math.log2(codewords))
    expected = (112 + len("1") + len("codes")
                + _array_bytes("codes.codes", 1, math.ceil(bits / 8))
                + _array_bytes("codes.shape", 1, 12)
                + _cells_bytes("cells", num_cells, h, w))
    records = {r.kind: r for r in link.ledger.records}
    assert set(records) == {"report", "request", "codes"}
    assert records["codes"].num_bytes == expected
    entries = {}
    for name, tensor in payloads[0].items():
        entries.update(fusion.wire().codec(name).encode(tensor))
    assert len(encode(Message("1", "codes", 0, np.eye(4), entries))) == expected
    # the selection rounds are counted too: report (8-bit confidences) and request (positions)
    assert records["report"].num_bytes == (
        112 + len("1") + len("report") + _cells_bytes("conf_cells", num_cells, h, w)
        + _array_bytes("conf_levels.codes", 1, num_cells) + _array_bytes("conf_levels.shape", 1, 4))
    assert records["request"].num_bytes == (112 + len("0") + len("request")
                                            + _cells_bytes("request", num_cells, h, w))
    assert (records["request"].sender, records["request"].receiver) == ("0", "1")
    assert sum(link.ledger.bytes_per_frame()) == sum(r.num_bytes for r in records.values())
    # what arrived decodes to exactly the sender's codes
    assert torch.equal(rx[0].payload["codes"].long(), payloads[0]["codes"])


def test_fill_selection_rule():
    ego = torch.tensor([[0.0, 0.5, 0.95, 0.2]])
    collab = torch.tensor([[[0.6, 0.3, 0.9, 0.0]],
                           [[0.5, 0.4, 0.1, 0.0]],
                           [[0.3, 0.0, 0.0, 0.9]]])
    fill = fill_selection(ego, collab, "fill", 1.0)
    assert fill[:, 0].int().tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 1]]
    inclusive = fill_selection(ego, collab, "fill", 1.0, inclusive=True)
    assert inclusive[:, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    best = fill_selection(ego, collab, "max")
    assert best[:, 0].int().tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]]
    more = fill_selection(ego, collab, "fill", 2.0)  # a larger demand takes every sender
    assert more[:, 0, :2].all()


@pytest.mark.parametrize("mode, expected", [
    ("fill", {1: [5, 6, 7], 2: [5, 6], 3: [8]}),
    ("max", {1: [5], 3: [8]}),
])
def test_handshake_requests_the_filling_cells(mode, expected):
    """The same hand-made maps through report -> request: each sender is asked for its cells."""
    fusion = CodeFilling(channels=4, mode=mode).eval()
    h, w = GRID.ny, GRID.nx
    conf = torch.zeros(4, 1, h, w)
    conf[0, 0, 10, 5:9] = torch.tensor([0.0, 0.5, 0.95, 0.2])
    conf[1, 0, 10, 5:9] = torch.tensor([0.6, 0.3, 0.9, 0.0])
    conf[2, 0, 10, 5:9] = torch.tensor([0.5, 0.4, 0.1, 0.0])
    conf[3, 0, 10, 5:9] = torch.tensor([0.3, 0.0, 0.0, 0.9])
    state = FusionState(_identity_batch(4), torch.randn(4, 4, h, w), GRID, {"confidence": conf})
    run_handshake(fusion, state, [1, 2, 3])
    asked = {i: torch.nonzero(r["request"][10]).squeeze(1).tolist()
             for i, r in state.requests.items()}
    assert asked == expected
    assert all(int(r["request"].sum()) == len(expected[i]) for i, r in state.requests.items())
    payloads = fusion.encode(state, [1, 2, 3])
    assert [p is None for p in payloads] == [i not in expected for i in (1, 2, 3)]
    fusion.conf_threshold = 0.45  # a sender sends only cells it is confident about
    run_handshake(fusion, state, [1, 2, 3])
    kept = [None if p is None else torch.nonzero(p["cells"][10]).squeeze(1).tolist()
            for p in fusion.encode(state, [1, 2, 3])]
    assert kept == ([[5, 7], [5], [8]] if mode == "fill" else [[5], None, [8]])


def test_gradient_passes_straight_through_the_codes():
    fusion = CodeFilling(channels=4, codewords=8).eval()
    h, w = GRID.ny, GRID.nx
    conf = torch.zeros(2, 1, h, w)
    conf[1, 0, 3:5, 3:6] = 0.8
    features = torch.randn(2, 4, h, w, requires_grad=True)
    state = FusionState(_identity_batch(2), features, GRID, {"confidence": conf})
    run_handshake(fusion, state, [1])
    received = CoopDetector.direct(state.batch, [1], fusion.encode(state, [1]))
    fused = fusion.fuse(state, received)
    fused.square().sum().backward()
    sent = features.grad[1].abs().sum(0) > 0
    assert sent[3:5, 3:6].all() and int(sent.sum()) == 6
    assert fusion.codebook.codebooks.grad is None  # the codebook learns from loss_codebook only


def test_training_step_reaches_encoder_and_codebook():
    torch.manual_seed(0)
    model = build_detector(_cfg()).train()
    batch = _scene_batch()
    out = model(batch)
    losses = model.loss(out, batch)
    assert torch.isfinite(losses["loss"]) and "loss_codebook" in losses
    losses["loss"].backward()
    assert bool(model.fusion.codebook.initialised)  # k-means on the first training batch
    assert out.received  # the senders' codes were fused
    assert model.fusion.codebook.codebooks.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.encoder.parameters() if p.requires_grad)


@pytest.mark.parametrize("seed", [0, 1])
def test_reconstruction_loss_decreases_on_a_fixed_batch(seed):
    """The codebook stage of training (the reference's freeze-for-codebook): the features of a
    fixed batch stay fixed, Adam on ``loss_codebook`` lowers it every step."""
    torch.manual_seed(seed)
    model = build_detector(_cfg()).train()
    batch = _scene_batch(seed=seed)
    with torch.no_grad():
        state = model(batch).state
    opt = torch.optim.Adam(model.fusion.parameters(), lr=3e-3)
    recon = []
    for _ in range(5):
        opt.zero_grad()
        loss = model.fusion.aux_loss(state)["loss_codebook"]
        loss.backward()
        opt.step()
        recon.append(loss.item())
    assert all(b < a for a, b in zip(recon, recon[1:])), recon


def test_method_config_builds():
    cfg = load_config(ROOT / "configs" / "methods" / "codefilling.yaml")
    model = build_detector(cfg)
    assert isinstance(model.fusion, CodeFilling)
    assert model.fusion.codebook.bits_per_cell == 2 * 3 * 6
    assert model.fusion.codebook.channels == model.backbone.out_channels
