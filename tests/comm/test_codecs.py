"""Codecs: exact round trips, quantisation bounds, bit packing, sharing one message."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from v2xfuse.comm import Message, decode, encode
from v2xfuse.comm.codecs import (CODECS, CellsCodec, CodesCodec, Float16Codec, Float32Codec, Int8Codec,
                                 MaskCodec, RawCodec, SparseCodec, make_codec, pack_bits,
                                 unpack_bits)
from v2xfuse.comm.message import DTYPE_CODES


def wire(payload: dict) -> dict:
    """Through real bytes, as a receiver sees it."""
    return decode(encode(Message("s", "k", 0, np.eye(4), payload))).payload


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_bits_exact(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 7, 8, 9, 1001):
        v = rng.integers(0, 1 << bits, n)
        v[: min(n, 2)] = [0, (1 << bits) - 1][: min(n, 2)]
        packed = pack_bits(v, bits)
        assert packed.dtype == np.uint8 and packed.size == -(-n * bits // 8)
        out = unpack_bits(packed, bits, n)
        assert out.dtype == np.uint16
        np.testing.assert_array_equal(out, v)
        np.testing.assert_array_equal(unpack_bits(packed.tobytes(), bits, n), v)


def test_pack_bits_wide_and_errors():
    v = np.array([0, 1, (1 << 32) - 1, 123456789], np.int64)
    np.testing.assert_array_equal(unpack_bits(pack_bits(v, 32), 32, 4), v)
    with pytest.raises(ValueError):
        pack_bits([4], 2)
    with pytest.raises(ValueError):
        pack_bits([-1], 3)
    with pytest.raises(ValueError):
        pack_bits([1], 0)
    with pytest.raises(ValueError):
        pack_bits(np.array([0.5]), 3)


@pytest.mark.parametrize("dtype", sorted(DTYPE_CODES))
def test_raw_codec_every_dtype(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 5)) * 50).astype(dtype)
    c = RawCodec("r")
    out = c.decode(wire(c.encode(x)))
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out, x)


def test_float_codecs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 8)).astype(np.float64)
    np.testing.assert_array_equal(Float32Codec("f").decode(wire(Float32Codec("f").encode(x))),
                                  x.astype(np.float32))
    h = Float16Codec("h")
    y = h.decode(wire(h.encode(x)))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x, rtol=2 ** -11, atol=2 ** -24)
    big = h.decode(h.encode(np.array([1e6, -np.inf, np.nan])))
    assert big[0] == 65504 and big[1] == -65504 and np.isnan(big[2])


@pytest.mark.parametrize("axis", [0, 1, -1, None])
def test_int8_error_bounded_by_half_scale(axis):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 10, 12)).astype(np.float32) * rng.uniform(0.01, 100, (6, 1, 1))
    x[2] = 0.0  # an all-zero channel
    c = Int8Codec("q", axis=axis)
    p = wire(c.encode(torch.from_numpy(x)))
    assert p["q.q"].dtype == np.int8
    y = c.decode(p)
    scale = p["q.scale"]
    if axis is None:
        bound = np.full_like(x, scale / 2)
    else:
        other = tuple(i for i in range(3) if i != axis % 3)
        bound = np.broadcast_to(np.expand_dims(scale, other) / 2, x.shape)
    err = np.abs(y - x)
    assert (err <= bound * (1 + 1e-5) + 1e-30).all()
    if axis in (0, None):
        assert (y[2] == 0).all()
    with pytest.raises(ValueError):
        c.encode(np.array([np.nan, 1.0]))


def test_mask_codec_shapes():
    rng = np.random.default_rng(2)
    c = MaskCodec("m")
    for shape in [(), (0,), (1,), (7,), (8,), (9,), (3, 17, 5)]:
        m = rng.random(shape) < 0.3
        p = c.encode(m)
        assert p["m.bits"].size == -(-m.size // 8)
        np.testing.assert_array_equal(c.decode(wire(p)), m)


def test_codes_codec_codebook_bits():
    assert [CodesCodec.bits_for(k) for k in (1, 2, 3, 16, 17, 256, 1000)] == [1, 1, 2, 4, 5, 8, 10]
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 100, (2, 4, 6, 5))
    c = CodesCodec("code", bits=CodesCodec.bits_for(100))
    p = c.encode(codes)
    assert p["code.codes"].size == -(-codes.size * 7 // 8)
    np.testing.assert_array_equal(c.decode(wire(p)), codes)


@pytest.mark.parametrize("positions", ["auto", "idx", "mask"])
@pytest.mark.parametrize("values", ["float32", "float16", "int8", "raw"])
def test_sparse_codec(positions, values):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 20, 30)).astype(np.float32)
    sel = rng.random((20, 30)) < 0.1
    c = SparseCodec("s", values=values, positions=positions, dense_shape=(5, 20, 30))
    p = c.encode(x, sel)
    y = c.decode(wire(p))
    assert y.shape == x.shape and (y[:, ~sel] == 0).all()
    tol = {"float32": 0, "raw": 0, "float16": 1e-2, "int8": np.abs(x).max() / 127}[values]
    np.testing.assert_allclose(y[:, sel], x[:, sel], atol=tol)
    if positions == "auto":  # 10% of 600 cells: 60 uint16 indices cost more than a 75-byte mask
        assert "s.mask.bits" in p and "s.idx" not in p


def test_sparse_index_dtype_and_default_mask():
    x = np.zeros((2, 300, 300), np.float32)
    x[1, 299, 299] = 3.0
    x[0, 0, 5] = -1.0
    c = SparseCodec("s")
    p = c.encode(x)
    assert p["s.idx"].dtype == np.uint32 and p["s.idx"].tolist() == [5, 299 * 300 + 299]
    np.testing.assert_array_equal(c.decode(wire(p)), x)
    small = SparseCodec("t").encode(x[:, :200, :200])
    assert small["t.idx"].dtype == np.uint16
    hw = SparseCodec("u")
    np.testing.assert_array_equal(hw.decode(hw.encode(x[1])), x[1])


def test_cells_codec_picks_the_smaller_positions_and_checks_them():
    from v2xfuse.comm import MessageError

    c = CellsCodec("c")
    sparse = np.zeros((20, 30), bool)
    sparse[[0, 7, 19], [3, 0, 29]] = True  # 3 cells: 6 bytes of uint16 beat a 75-byte mask
    dense = np.random.default_rng(7).random((20, 30)) < 0.2
    for m, key in ((sparse, "c.idx"), (dense, "c.bits"), (np.zeros((4, 4), bool), "c.idx")):
        p = c.encode(m)
        assert key in p and sorted(p) == sorted([key, "c.shape"])
        np.testing.assert_array_equal(c.decode(wire(p)), m)
    assert c.encode(sparse)["c.idx"].tolist() == [3, 7 * 30, 19 * 30 + 29]
    assert c.encode(np.zeros((300, 300), bool))["c.idx"].dtype == np.uint32
    bad = c.encode(sparse)
    for k, v in (("c.idx", np.array([7, 3], np.uint16)), ("c.idx", np.array([600], np.uint16)),
                 ("c.shape", np.array([20, 30, 1], np.uint32))):
        with pytest.raises(MessageError, match=k):
            c.decode({**bad, k: v})
    with pytest.raises(MessageError, match="exceeds"):
        CellsCodec("c", max_cells=100).decode(bad)
    with pytest.raises(ValueError, match="bool"):
        c.encode(np.zeros((2, 2), np.uint8))


def test_codecs_share_one_message():
    rng = np.random.default_rng(6)
    feat = rng.standard_normal((4, 6, 6)).astype(np.float32)
    sel = rng.random((6, 6)) < 0.5
    codes = rng.integers(0, 16, (6, 6))
    codecs = [SparseCodec("feat", values="int8"), MaskCodec("req"), CodesCodec("cb", bits=4)]
    payload = {}
    for codec, x in zip(codecs, [feat, sel, codes]):
        entries = codec.encode(x)
        assert not set(entries) & set(payload) and all(k.startswith(codec.prefix + ".") for k in entries)
        payload.update(entries)
    rx = wire(payload)
    assert codecs[0].decode(rx).shape == feat.shape
    np.testing.assert_array_equal(codecs[1].decode(rx), sel)
    np.testing.assert_array_equal(codecs[2].decode(rx), codes)
    assert sorted(codecs[2].keys(rx)) == ["cb.codes", "cb.shape"]


def test_make_codec_by_name():
    assert sorted(CODECS) == ["cells", "codes", "float16", "float32", "int8", "mask", "raw",
                              "sparse"]
    assert isinstance(make_codec("int8", "f", axis=None), Int8Codec)
    assert make_codec("sparse", "s", values="float16").values.prefix == "s.v"
    with pytest.raises(KeyError, match="known"):
        make_codec("zip", "f")
