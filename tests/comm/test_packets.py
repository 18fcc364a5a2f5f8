"""Messages split into packets: the wire format, per-packet loss, and fusing what arrived."""
import numpy as np
import pytest
import torch

from v2xfuse.comm.batch_link import BatchChannel
from v2xfuse.comm.channel import Channel, LinkConfig
from v2xfuse.comm.message import (HEADER_BYTES, PACKET_HEADER_BYTES, Message, MessageError,
                                  decode, encode)
from v2xfuse.datasets import collate
from v2xfuse.datasets.pipeline import Sample
from v2xfuse.fusion.attention import Where2comm
from v2xfuse.fusion.base import FusionState
from v2xfuse.comm.received import Received
from v2xfuse.structures.bev import BevGrid

GRID = BevGrid(-4.0, -4.0, 4.0, 4.0, 1.0)  # 8 x 8 cells
CHANNELS = 3
SENT_CELLS = [3, 9, 10, 17, 30, 41, 42, 50, 61, 63]  # 10 cells -> packets of 3, 3, 3, 1


def test_a_packet_carries_its_place_in_four_more_bytes():
    whole = Message("7", "sparse_features", 5, np.eye(4), {"x": np.arange(4, dtype=np.int32)})
    part = Message("7", "sparse_features", 5, np.eye(4), {"x": np.arange(4, dtype=np.int32)},
                   packet=(2, 3))
    assert len(encode(part)) == len(encode(whole)) + PACKET_HEADER_BYTES
    back = decode(encode(part))
    assert back.packet == (2, 3) and decode(encode(whole)).packet is None
    np.testing.assert_array_equal(back.payload["x"], np.arange(4))
    bad = bytearray(encode(part))
    bad[HEADER_BYTES:HEADER_BYTES + 2] = (3).to_bytes(2, "little")  # index 3 of 3
    with pytest.raises(MessageError, match="packet_index"):
        decode(bytes(bad))
    with pytest.raises(MessageError, match="packet"):
        encode(Message("7", "k", 5, np.eye(4), {}, packet=(0, 0)))


def _state() -> FusionState:
    points = [np.zeros((1, 4), np.float32)] * 2
    sample = Sample(points, np.stack([np.eye(4)] * 2), np.zeros((0, 7)), np.zeros(0, np.int64),
                    ["ego", "cav"], ["vehicle"] * 2, np.zeros(2), ("synthetic", "s0", "000001"))
    g = torch.Generator().manual_seed(0)
    features = torch.rand(2, CHANNELS, GRID.ny, GRID.nx, generator=g) + 0.5
    confidence = torch.zeros(2, 1, GRID.ny * GRID.nx)
    confidence[1, 0, SENT_CELLS] = 0.9  # the collaborator is confident on exactly these cells
    return FusionState(collate([sample]), features,  GRID,
                       {"confidence": confidence.view(2, 1, GRID.ny, GRID.nx)})


def _fused_with(state, method, cells: list[int]) -> torch.Tensor:
    """The ego's map fused with one unsplit message holding ``cells`` of the collaborator."""
    idx = torch.tensor(cells, dtype=torch.long)
    payload = {"features": state.features[1].flatten(1)[:, idx], "cells": idx.to(torch.int32)}
    return method.fuse(state, [Received(0, 1, payload, torch.eye(4))])[0]


@pytest.mark.parametrize("packet_loss", [0.0, 0.5, 1.0])
def test_packets_are_lost_one_by_one_and_the_ego_fuses_those_that_arrived(packet_loss):
    state = _state()
    method = Where2comm(threshold=0.5, cells_per_packet=3, clamp_features=False).eval()
    payloads = method.encode(state, [1])
    packets = payloads[0]
    assert [len(p["cells"]) for p in packets] == [3, 3, 3, 1]
    link = BatchChannel(Channel(1, LinkConfig(packet_loss=packet_loss)))
    received = link.transmit(method.wire(), state.batch, [1], payloads, state=state)

    # bytes: every packet went on air, each with its own header, whatever was lost after
    records = link.ledger.records
    assert [r.packet for r in records] == [0, 1, 2, 3]
    expected = [len(encode(Message("cav", "sparse_features", 0, np.eye(4),
                                   method.wire().codec("features").encode(p["features"])
                                   | method.wire().codec("cells").encode(p["cells"]),
                                   packet=(k, 4)))) for k, p in enumerate(packets)]
    assert [r.num_bytes for r in records] == expected
    assert link.ledger.bytes_per_frame() == [sum(expected)]

    arrived = [r.packet for r in records if r.status == "sent"]
    if packet_loss == 0.0:
        assert arrived == [0, 1, 2, 3]
    elif packet_loss == 1.0:
        assert arrived == [] and received == []
    else:
        assert 0 < len(arrived) < 4  # this seed loses some, not all
    fused = method.fuse(state, received)[0]
    ego = state.features[0]
    if not arrived:
        assert torch.equal(fused, ego)
        return
    (r,) = received
    assert r.packets == arrived and r.num_packets == 4 and len(r.payload) == len(arrived)
    cells = [c for k in arrived for c in SENT_CELLS[3 * k:3 * k + 3]]
    torch.testing.assert_close(fused, _fused_with(state, method, cells))
    if len(arrived) < 4:  # a lost packet's cells are missing from the fused map
        assert not torch.allclose(fused, _fused_with(state, method, SENT_CELLS))


def test_a_packet_that_fails_its_check_costs_only_itself():
    state = _state()
    method = Where2comm(threshold=0.5, cells_per_packet=3, clamp_features=False).eval()
    payloads = method.encode(state, [1])
    payloads[0][1]["cells"] = torch.tensor([0, 1, 999], dtype=torch.int32)  # off the grid
    link = BatchChannel(Channel(0))
    (r,) = link.transmit(method.wire(), state.batch, [1], payloads, state=state)
    assert r.packets == [0, 2, 3]
    assert link.ledger.rejected.as_dict() == {"index": 1}
