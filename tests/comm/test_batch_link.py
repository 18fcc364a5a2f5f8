"""BatchChannel: the detector's transmit interface over real bytes."""
from __future__ import annotations

import numpy as np
import torch

from v2xfuse.comm import Channel, LinkConfig, Message, encode
from v2xfuse.comm.batch_link import BatchChannel
from v2xfuse.datasets.batch import CoopBatch, FrameRecord
from v2xfuse.fusion.base import FusionMethod


class Toy(FusionMethod):
    message_kind = "bev_features"
    codecs = {"features": "int8", "sel": "mask"}


def toy_batch() -> CoopBatch:
    n = 5
    poses = torch.eye(4).repeat(n, 1, 1)
    poses[:, 0, 3] = torch.arange(n, dtype=torch.float32)
    return CoopBatch(points=torch.zeros((0, 5)), record_len=torch.tensor([3, 2]),
                     ego_from_agent=poses, agent_kind=torch.zeros(n, dtype=torch.int64),
                     delay_us=torch.tensor([0, 100_000, 200_000, 0, 300_000]), gt_boxes=[],
                     gt_ids=[], frames=[FrameRecord("opv2v", "s0", "000068", ("641", "650", "659")),
                                        FrameRecord("opv2v", "s1", "000070", ("a", "b"))])


def test_batch_channel_round_trip_and_bytes():
    batch, fusion = toy_batch(), Toy()
    senders = fusion.senders(batch)
    assert senders == [1, 2, 4]
    g = torch.Generator().manual_seed(0)
    payloads = [{"features": torch.randn(4, 6, 6, generator=g), "sel": torch.rand(6, 6, generator=g) < 0.5}
                for _ in senders]
    link = BatchChannel(Channel(np.random.default_rng(0)))
    rx = link.transmit(fusion.wire(), batch, senders, payloads)
    assert [(r.sample, r.sender) for r in rx] == [(0, 1), (0, 2), (1, 4)]
    for r, p in zip(rx, payloads):
        scale = p["features"].abs().amax((1, 2), keepdim=True) / 127
        assert ((r.payload["features"] - p["features"]).abs() <= scale / 2 + 1e-6).all()
        assert torch.equal(r.payload["sel"], p["sel"])
        torch.testing.assert_close(r.ego_from_sender, batch.ego_from_agent[r.sender])
        assert r.delay_us == int(batch.delay_us[r.sender])
    led = link.ledger
    assert led.frames == [("opv2v", "s0", "000068"), ("opv2v", "s1", "000070")]
    assert set(led.per_link()) == {("650", "641"), ("659", "641"), ("b", "a")}
    assert led.per_method() == {"Toy": sum(led.bytes_per_frame())}
    # the counted bytes are those of the message built from the codecs
    sent = {"features.q": np.zeros((4, 6, 6), np.int8), "features.scale": np.zeros(4, np.float32),
            "sel.bits": np.zeros(5, np.uint8), "sel.shape": np.zeros(2, np.uint32)}
    assert led.records[0].num_bytes == len(encode(Message("650", "bev_features", -100000,
                                                          np.eye(4), sent)))


def test_batch_channel_loss():
    batch, fusion = toy_batch(), Toy()
    link = BatchChannel(Channel(0, LinkConfig(loss=1.0)))
    payloads = [{"features": torch.ones(1, 2, 2), "sel": torch.ones(2, 2, dtype=torch.bool)}] * 3
    assert link.transmit(fusion.wire(), batch, [1, 2, 4], payloads) == []
    assert link.ledger.count("lost") == 3


class Negotiating(FusionMethod):
    message_kind = "codes"
    codecs = {"codes": "codes", "ask": "cells"}
    codec_kwargs = {"codes": {"bits": 3}}


def test_batch_channel_requests_none_payloads_and_per_payload_codec_options():
    batch, fusion = toy_batch(), Negotiating()
    # the channel-wide default (8 bits) is overridden by the method's per-payload option (3 bits)
    link = BatchChannel(Channel(0), codec_options={"codes": {"bits": 8}})
    ask = torch.zeros(6, 6, dtype=torch.bool)
    ask[1, 2] = True
    got = link.request(fusion.wire("request"), batch, [1, 2, 4], [{"ask": ask}, None, {"ask": ask}])
    assert sorted(got) == [1, 4] and torch.equal(got[1]["ask"], ask)
    rec = link.ledger.records
    assert [(r.sender, r.receiver, r.kind) for r in rec] == [("641", "650", "request"),
                                                            ("a", "b", "request")]
    sent = {"ask.shape": np.array([6, 6], np.uint32), "ask.idx": np.array([8], np.uint16)}
    assert rec[0].num_bytes == len(encode(Message("641", "request", 0, np.eye(4), sent)))
    codes = torch.arange(7) % 8
    rx = link.transmit(fusion.wire(), batch, [1, 2, 4], [None, {"codes": codes}, None])
    assert [(r.sample, r.sender) for r in rx] == [(0, 2)]
    assert torch.equal(rx[0].payload["codes"].long(), codes)
    assert rec[-1].kind == "codes" and len(rec) == 3
    packed = {"codes.codes": np.zeros(3, np.uint8), "codes.shape": np.array([7], np.uint32)}
    assert rec[-1].num_bytes == len(encode(Message("659", "codes", -200000, np.eye(4), packed)))
    assert link.transmit(fusion.wire("report"), batch, [4], [{"codes": codes}])[0].sender == 4
    assert rec[-1].kind == "report"


def test_a_payload_array_without_a_codec_is_an_error_and_an_unknown_one_is_refused():
    batch, fusion = toy_batch(), Toy()
    link = BatchChannel(Channel(0))
    extra = {"features": torch.ones(1, 2, 2), "sel": torch.ones(2, 2, dtype=torch.bool),
             "secret": torch.ones(3)}
    try:
        link.transmit(fusion.wire(), batch, [1], [extra])
    except ValueError as err:
        assert "'secret'" in str(err) and "no codec" in str(err)
    else:
        raise AssertionError("an array without a codec was sent")
    assert link.ledger.records == []  # nothing went on air
    # a receiver whose wire format does not name an array refuses the message
    narrow = Toy().wire()
    narrow = type(narrow)(narrow.method, narrow.kind, {"features": "int8"})
    ok = {"features": torch.ones(1, 2, 2), "sel": torch.ones(2, 2, dtype=torch.bool)}
    sent = BatchChannel(Channel(0))
    rx = sent.transmit(fusion.wire(), batch, [1], [ok])
    assert len(rx) == 1
    blob = encode(Message("650", "bev_features", -100000, np.eye(4),
                          {"features.q": np.zeros((1, 2, 2), np.int8),
                           "features.scale": np.ones(1, np.float32),
                           "sel.bits": np.zeros(1, np.uint8), "sel.shape": np.array([2, 2], np.uint32)}))
    from v2xfuse.comm.message import decode
    assert sent._accepted(narrow, decode(blob), None, 0, "cpu") is None
    assert sent.ledger.rejected.as_dict() == {"shape": 1}
