"""Message wire format: round trips, header size, encode-side checks."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from v2xfuse.comm import HEADER_BYTES, Message, MessageError, decode, encode, overhead_bytes
from v2xfuse.comm.message import DTYPE_CODES, MAX_NDIM


def pose(yaw=0.3, t=(12.5, -3.25, 1.9)):
    c, s = np.cos(yaw), np.sin(yaw)
    p = np.eye(4)
    p[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    p[:3, 3] = t
    return p


def random_array(rng, dtype, shape):
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.random(shape) < 0.5
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    return rng.standard_normal(shape).astype(dt)


def assert_same(a: Message, b: Message):
    assert (a.sender, a.kind, a.timestamp_us) == (b.sender, b.kind, b.timestamp_us)
    np.testing.assert_array_equal(a.world_from_lidar, b.world_from_lidar)
    assert list(a.payload) == list(b.payload)
    for k in a.payload:
        x, y = np.asarray(a.payload[k]), b.payload[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", sorted(DTYPE_CODES))
def test_round_trip_every_dtype(dtype):
    rng = np.random.default_rng(1)
    shapes = [(), (0,), (5,), (3, 4), (2, 0, 3), (1, 2, 1, 2, 1, 2)]
    payload = {f"a{i}": random_array(rng, dtype, s) for i, s in enumerate(shapes)}
    msg = Message("cav_7", "bev_features", -(1 << 62), pose(), payload)
    data = encode(msg)
    out = decode(data)
    assert_same(msg, out)
    assert all(v.flags.writeable and v.flags.owndata for v in out.payload.values())
    assert len(data) == overhead_bytes(msg) + sum(v.nbytes for v in payload.values())


def test_header_size_and_overhead():
    assert HEADER_BYTES == 112
    msg = Message("a", "b", 0, np.eye(4), {})
    assert len(encode(msg)) == 114
    msg = Message("cav1", "boxes", 5, np.eye(4), {"boxes": np.zeros((3, 7), np.float32)})
    # header + ids + (3 + 2 dims * 4 + 5 name) + data
    assert len(encode(msg)) == 112 + 4 + 5 + 3 + 8 + 5 + 3 * 7 * 4


def test_unicode_ids_and_num_bytes():
    msg = Message("véhicule_1", "codes", 1, pose(), {"名前": np.arange(3, dtype=np.uint16)})
    assert_same(msg, decode(encode(msg)))
    assert msg.num_bytes() == len(encode(msg))


def test_big_endian_input_is_written_little_endian():
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    out = decode(encode(Message("s", "k", 0, np.eye(4), {"a": a})))
    np.testing.assert_array_equal(out.payload["a"], a)
    assert out.payload["a"].dtype == np.dtype("<f4")


def test_torch_tensors_convert():
    x = torch.randn(2, 3, requires_grad=True)
    msg = Message.from_tensors("s", "bev_features", 3, torch.eye(4), {
        "x": x * 2, "m": torch.tensor([True, False]), "h": torch.ones(2, dtype=torch.bfloat16)})
    out = decode(encode(msg))
    np.testing.assert_allclose(out.payload["x"], (x * 2).detach().numpy())
    assert out.payload["m"].dtype == np.bool_ and out.payload["h"].dtype == np.float32
    t = out.to_tensors()
    assert t["x"].dtype == torch.float32 and torch.equal(t["m"], torch.tensor([True, False]))


@pytest.mark.parametrize("bad, field", [
    (dict(sender=""), "sender"),
    (dict(sender="x" * 65), "sender"),
    (dict(kind=""), "kind"),
    (dict(payload={"a": np.zeros(2, np.complex64)}), "dtype"),
    (dict(payload={"a": np.zeros(2, np.uint64)}), "dtype"),
    (dict(payload={"a": np.zeros((1,) * (MAX_NDIM + 1))}), "ndim"),
    (dict(payload={"": np.zeros(2)}), "payload name"),
    (dict(payload={"n" * 65: np.zeros(2)}), "payload name"),
    (dict(payload={"a": np.array(["x"])}), "dtype"),
    (dict(world_from_lidar=np.full((4, 4), np.nan)), "world_from_lidar"),
    (dict(world_from_lidar=np.ones((4, 4))), "world_from_lidar"),
    (dict(world_from_lidar=np.eye(3)), "world_from_lidar"),
    (dict(timestamp_us=1 << 63), "timestamp_us"),
])
def test_encode_rejects(bad, field):
    kw = dict(sender="s", kind="k", timestamp_us=0, world_from_lidar=np.eye(4), payload={})
    kw.update(bad)
    with pytest.raises(MessageError, match=field):
        encode(Message(**kw))


def test_decode_rejects_named_fields():
    good = encode(Message("s", "k", 0, np.eye(4), {"a": np.zeros(2, np.float32),
                                                  "z": np.array([True, False])}))
    assert good.count(b"z") == 1
    cases = {
        "magic": b"XXXX" + good[4:],
        "version": good[:4] + b"\x03" + good[5:],
        "trailing": good + b"\x00",
        "header": good[:50],
        "bool": good[:-1] + b"\x02",
        "duplicate": good.replace(b"z", b"a"),
    }
    for field, data in cases.items():
        with pytest.raises(MessageError, match=field):
            decode(data)
    nan_pose = bytearray(good)
    nan_pose[16:24] = struct.pack("<d", float("nan"))
    with pytest.raises(MessageError, match="world_from_lidar"):
        decode(bytes(nan_pose))
    with pytest.raises(TypeError):
        decode("not bytes")
