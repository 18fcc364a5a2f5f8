"""Untrusted bytes: decode either returns a Message or raises MessageError, quickly, and never
allocates much more than the input it was given."""
from __future__ import annotations

import struct
import time
import tracemalloc

import numpy as np
import pytest

from v2xfuse.comm import Message, MessageError, decode, encode
from v2xfuse.comm.codecs import CodesCodec, Int8Codec, MaskCodec, SparseCodec
from v2xfuse.comm.message import DTYPE_CODES, MAGIC, VERSION

SLACK = 64 * 1024  # Python objects of one decode (dicts, the Message, small arrays)


def sample_message() -> bytes:
    rng = np.random.default_rng(3)
    payload = {"feat": rng.standard_normal((2, 3, 4)).astype(np.float32),
               "mask": rng.random(7) < 0.5, "codes": rng.integers(0, 9, 5).astype(np.uint16),
               "scalar": np.array(3, np.int64), "empty": np.zeros((0, 7), np.float16)}
    return encode(Message("cav_1", "bev_features", 1234, np.eye(4), payload))


def header(n_arrays=1, sender=b"s", kind=b"k") -> bytes:
    pose = np.eye(4)[:3].ravel()
    return struct.pack("<4sBBBBq12d", MAGIC, VERSION, n_arrays, len(sender), len(kind), 0,
                       *pose) + sender + kind


def array_header(shape, code=DTYPE_CODES["float64"], name=b"x") -> bytes:
    return struct.pack(f"<BBB{len(shape)}I", len(name), code, len(shape), *shape) + name


def check(data: bytes) -> None:
    """decode returns or raises MessageError; peak allocation bounded by the input size."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        decode(data)
    except MessageError:
        pass
    peak = tracemalloc.get_traced_memory()[1] - base
    assert peak <= 3 * len(data) + SLACK, (peak, len(data))


@pytest.fixture
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def test_every_truncation(traced):
    good = sample_message()
    decode(good)
    for n in range(len(good)):
        with pytest.raises(MessageError):
            decode(good[:n])
        if n % 7 == 0:
            check(good[:n])


def test_random_byte_flips(traced):
    good = sample_message()
    rng = np.random.default_rng(0)
    for i in range(1500):
        data = bytearray(good)
        for pos in rng.integers(0, len(data), rng.integers(1, 4)):
            data[pos] = rng.integers(0, 256)
        if i % 3 == 0:
            check(bytes(data))
        else:
            try:
                decode(bytes(data))
            except MessageError:
                pass


def test_random_garbage_and_valid_prefix(traced):
    rng = np.random.default_rng(1)
    head = header(n_arrays=3)
    for i in range(800):
        tail = rng.integers(0, 256, rng.integers(0, 300), dtype=np.uint8).tobytes()
        check(tail if i % 2 else head + tail)


@pytest.mark.parametrize("shape", [(1 << 20, 1 << 20), (1 << 32) - 1, (65536,) * 6,
                                   (0, (1 << 32) - 1, (1 << 32) - 1, (1 << 32) - 1),
                                   ((1 << 32) - 1, 0)])
def test_hostile_shapes_fail_fast(traced, shape):
    shape = shape if isinstance(shape, tuple) else (shape,)
    data = header() + array_header(shape) + b"\x00" * 64
    t0 = time.perf_counter()
    with pytest.raises(MessageError):
        decode(data)
    assert time.perf_counter() - t0 < 0.1
    check(data)


def test_hostile_counts_and_lengths(traced):
    for data in [header(n_arrays=255), header(n_arrays=64) + array_header((1,)) * 3,
                 header()[:6] + b"\xff\xff" + header()[8:],
                 header() + struct.pack("<BBB", 255, 9, 1) + b"\xff" * 8,
                 header() + struct.pack("<BBB", 1, 200, 0) + b"x",
                 header() + struct.pack("<BBB", 1, 9, 200) + b"\xff" * 100]:
        with pytest.raises(MessageError):
            decode(data)
        check(data)


def test_codec_decoders_reject_inconsistent_payloads():
    """Decoded messages are untrusted too: codec decoders check what they read."""
    bad = [
        (MaskCodec("m"), {"m.bits": np.zeros(1, np.uint8), "m.shape": np.array([1 << 20], np.uint32)}),
        (MaskCodec("m"), {"m.bits": np.full(1, 255, np.uint8), "m.shape": np.array([3], np.uint32)}),
        (CodesCodec("c", 5), {"c.codes": np.zeros(2, np.uint8), "c.shape": np.array([1 << 30], np.uint32)}),
        (CodesCodec("c", 5), {"c.shape": np.array([1], np.uint32)}),
        (Int8Codec("q"), {"q.q": np.zeros((2, 3), np.int8), "q.scale": np.zeros(3, np.float32)}),
        (Int8Codec("q"), {"q.q": np.zeros((2, 3), np.float32), "q.scale": np.zeros(2, np.float32)}),
        (SparseCodec("s"), {"s.shape": np.array([64, 1 << 16, 1 << 16], np.uint32),
                            "s.idx": np.zeros(0, np.uint32), "s.v.f32": np.zeros((64, 0), np.float32)}),
        (SparseCodec("s"), {"s.shape": np.array([1, 4, 4], np.uint32),
                            "s.idx": np.array([3, 3], np.uint16), "s.v.f32": np.zeros((1, 2), np.float32)}),
        (SparseCodec("s"), {"s.shape": np.array([1, 4, 4], np.uint32),
                            "s.idx": np.array([16], np.uint16), "s.v.f32": np.zeros((1, 1), np.float32)}),
        (SparseCodec("s"), {"s.shape": np.array([2, 4, 4], np.uint32),
                            "s.idx": np.array([1], np.uint16), "s.v.f32": np.zeros((1, 1), np.float32)}),
        (SparseCodec("s", dense_shape=(2, 4, 4)), {"s.shape": np.array([2, 4, 5], np.uint32),
                                                  "s.idx": np.zeros(0, np.uint16),
                                                  "s.v.f32": np.zeros((2, 0), np.float32)}),
    ]
    for codec, payload in bad:
        with pytest.raises(MessageError):
            codec.decode(payload)


def test_tracemalloc_sees_numpy_buffers(traced):
    """Positive control for ``check``: a valid 1 MB message shows up as ~1 MB peak, at most ~2x."""
    data = encode(Message("s", "k", 0, np.eye(4), {"x": np.zeros(1 << 18, np.float32)}))
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    decode(data)
    peak = tracemalloc.get_traced_memory()[1] - base
    assert len(data) * 0.9 < peak <= 2 * len(data) + SLACK
