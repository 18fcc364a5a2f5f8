"""Payload codecs: how an array becomes named payload entries of a :class:`Message`, and back.

Every codec is built with a ``prefix`` and writes only keys ``f"{prefix}.{part}"``, so several
codecs share one message::

    feat, mask = Int8Codec("feat"), MaskCodec("sel")
    payload = {**feat.encode(features), **mask.encode(selected)}
    features_rx = feat.decode(received.payload)

``encode`` takes a numpy array or a torch tensor and returns ``dict[str, np.ndarray]``;
``decode`` takes the (untrusted) payload and returns a numpy array, raising
:class:`MessageError` naming the key for a missing entry, a wrong dtype or an inconsistent shape.
A decode never allocates more than its input implies, except :class:`SparseCodec`, whose dense
output is bounded by ``max_elements``.

Codecs by name (``make_codec(name, prefix, **kwargs)``): ``raw``, ``float32``, ``float16``,
``int8``, ``mask``, ``codes``, ``sparse``, ``cells``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .message import MessageError, as_numpy

__all__ = ["Codec", "RawCodec", "Float32Codec", "Float16Codec", "Int8Codec", "MaskCodec",
           "CodesCodec", "SparseCodec", "CellsCodec", "pack_bits", "unpack_bits", "make_codec",
           "CODECS"]

Payload = Mapping[str, np.ndarray]
_F16_MAX = float(np.finfo(np.float16).max)


def pack_bits(values: Any, bits: int) -> np.ndarray:
    """Pack unsigned integers at ``bits`` bits each, least significant bit first.

    Args:
        values: (N,) (or any shape, flattened C order) integers in [0, 2**bits).
        bits: 1..32.
    Returns:
        (ceil(N * bits / 8),) uint8; the pad bits of the last byte are zero.
    """
    _check_bits(bits)
    v = as_numpy(values).ravel()
    if v.size and not np.issubdtype(v.dtype, np.integer):
        raise ValueError(f"pack_bits: integer values expected, got {v.dtype}")
    if v.size and (v.min() < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"pack_bits: values outside [0, 2**{bits})")
    shifts = np.arange(bits, dtype=np.uint64)
    bit_matrix = ((v.astype(np.uint64)[:, None] >> shifts) & 1).astype(np.uint8)  # (N, bits)
    return np.packbits(bit_matrix.ravel(), bitorder="little")


def unpack_bits(data: Any, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`.

    Args:
        data: bytes or (ceil(count * bits / 8),) uint8; exactly that length, zero pad bits.
        bits: 1..32.
        count: number of values.
    Returns:
        (count,) uint16 when ``bits <= 16``, else uint32.
    Raises:
        MessageError: a length mismatch or non-zero pad bits.
    """
    _check_bits(bits)
    buf = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray)) else as_numpy(data)
    if buf.dtype != np.uint8 or buf.ndim != 1:
        raise MessageError(f"packed codes: expected 1-D uint8, got {buf.dtype} {buf.shape}")
    if count < 0 or buf.size != -(-count * bits // 8):
        raise MessageError(f"packed codes: {buf.size} bytes for {count} values of {bits} bits, "
                           f"expected {-(-max(count, 0) * bits // 8)}")
    nbits = count * bits
    if nbits % 8 and buf[-1] >> (nbits % 8):
        raise MessageError("packed codes: non-zero pad bits")
    bit_matrix = np.unpackbits(buf, count=nbits, bitorder="little").reshape(count, bits)
    out_dtype = np.uint16 if bits <= 16 else np.uint32
    weights = (np.uint64(1) << np.arange(bits, dtype=np.uint64))
    return (bit_matrix @ weights).astype(out_dtype)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 32:
        raise ValueError(f"bits must be an integer in 1..32, got {bits!r}")


def _get(payload: Payload, key: str, dtype=None, ndim: int | None = None) -> np.ndarray:
    if key not in payload:
        raise MessageError(f"payload {key!r}: missing")
    a = payload[key]
    if not isinstance(a, np.ndarray):
        raise MessageError(f"payload {key!r}: not an array")
    if dtype is not None and a.dtype != np.dtype(dtype):
        raise MessageError(f"payload {key!r}: dtype {a.dtype}, expected {np.dtype(dtype)}")
    if ndim is not None and a.ndim != ndim:
        raise MessageError(f"payload {key!r}: ndim {a.ndim}, expected {ndim}")
    return a


def _shape_of(payload: Payload, key: str) -> tuple[int, ...]:
    s = _get(payload, key, np.uint32, 1)
    if s.size > 6:
        raise MessageError(f"payload {key!r}: {s.size} dims, at most 6")
    return tuple(int(d) for d in s)


class Codec:
    """Base: ``encode(x) -> {prefix.part: array}``, ``decode(payload) -> array``."""

    name = ""

    def __init__(self, prefix: str):
        if not prefix:
            raise ValueError("codec prefix must be non-empty")
        self.prefix = prefix

    def key(self, part: str) -> str:
        return f"{self.prefix}.{part}"

    def keys(self, payload: Payload) -> list[str]:
        """The entries of ``payload`` this codec owns."""
        return [k for k in payload if k.startswith(self.prefix + ".")]

    def encode(self, x: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, payload: Payload) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.prefix!r})"


class RawCodec(Codec):
    """The array as is (its dtype must be on the wire whitelist). Key ``prefix.data``."""

    name = "raw"

    def encode(self, x):
        return {self.key("data"): np.ascontiguousarray(as_numpy(x))}

    def decode(self, payload):
        return _get(payload, self.key("data"))


class Float32Codec(Codec):
    """Cast to float32. Key ``prefix.f32``: same shape as the input."""

    name = "float32"

    def encode(self, x):
        return {self.key("f32"): np.ascontiguousarray(as_numpy(x), dtype=np.float32)}

    def decode(self, payload):
        return _get(payload, self.key("f32"), np.float32)


class Float16Codec(Codec):
    """Cast to float16, saturating: values (infinities included) are clipped to +-65504, NaN
    stays NaN. Key ``prefix.f16``, same shape as the input. ``decode`` returns float32."""

    name = "float16"

    def encode(self, x):
        a = np.clip(as_numpy(x).astype(np.float32, copy=False), -_F16_MAX, _F16_MAX)
        return {self.key("f16"): a.astype(np.float16)}

    def decode(self, payload):
        return _get(payload, self.key("f16"), np.float16).astype(np.float32)


class Int8Codec(Codec):
    """Symmetric int8 quantisation, ``x ~ q * scale`` with ``q`` in [-127, 127].

    ``axis``: channel axis for per-channel scales (default 0, the C of a (C, H, W) map), or None
    for one scale per tensor. Keys: ``prefix.q`` int8 (same shape as x), ``prefix.scale``
    float32 (x.shape[axis],) or (). ``scale = max|x| / 127`` over the other axes, so the error is
    at most ``scale / 2`` per element. ``decode`` returns float32. Inputs must be finite.
    """

    name = "int8"

    def __init__(self, prefix: str, axis: int | None = 0):
        super().__init__(prefix)
        self.axis = axis

    def encode(self, x):
        a = as_numpy(x).astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise ValueError(f"{self}: non-finite input")
        if self.axis is None:
            amax = np.abs(a).max(initial=0.0)
            scale = np.float32(amax / 127.0)
            scale_b = scale
        else:
            ax = self.axis % a.ndim if a.ndim else None
            if ax is None:
                raise ValueError(f"{self}: per-channel scales need at least 1 dim")
            other = tuple(i for i in range(a.ndim) if i != ax)
            amax = np.abs(a).max(axis=other, initial=0.0) if other else np.abs(a)
            scale = (amax / 127.0).astype(np.float32)
            scale_b = np.expand_dims(scale, other) if other else scale
        safe = np.where(scale_b > 0, scale_b, np.float32(1)).astype(np.float64)
        q = np.clip(np.rint(a / safe), -127, 127).astype(np.int8)
        return {self.key("q"): q, self.key("scale"): np.asarray(scale, np.float32)}

    def decode(self, payload):
        q = _get(payload, self.key("q"), np.int8)
        scale = _get(payload, self.key("scale"), np.float32)
        if self.axis is None:
            if scale.shape != ():
                raise MessageError(f"payload {self.key('scale')!r}: shape {scale.shape}, expected ()")
            return q.astype(np.float32) * scale
        if q.ndim == 0:
            raise MessageError(f"payload {self.key('q')!r}: per-channel scale needs ndim >= 1")
        ax = self.axis % q.ndim
        if scale.shape != (q.shape[ax],):
            raise MessageError(f"payload {self.key('scale')!r}: shape {scale.shape}, "
                               f"expected ({q.shape[ax]},)")
        other = tuple(i for i in range(q.ndim) if i != ax)
        return q.astype(np.float32) * (np.expand_dims(scale, other) if other else scale)


class MaskCodec(Codec):
    """Boolean array, one bit per element (``np.packbits``, little bit order).

    Keys: ``prefix.bits`` uint8 (ceil(n / 8),), ``prefix.shape`` uint32 (ndim,). The element
    count is explicit in the shape; the packed length must match it and the pad bits be zero.
    """

    name = "mask"

    def encode(self, x):
        a = as_numpy(x)
        if a.dtype != np.bool_:
            raise ValueError(f"{self}: bool array expected, got {a.dtype}")
        return {self.key("bits"): np.packbits(a.ravel(), bitorder="little"),
                self.key("shape"): np.asarray(a.shape, np.uint32)}

    def decode(self, payload):
        shape = _shape_of(payload, self.key("shape"))
        packed = _get(payload, self.key("bits"), np.uint8, 1)
        n = math.prod(shape)
        if packed.size != -(-n // 8):
            raise MessageError(f"payload {self.key('bits')!r}: {packed.size} bytes for {n} bits")
        if n % 8 and packed[-1] >> (n % 8):
            raise MessageError(f"payload {self.key('bits')!r}: non-zero pad bits")
        return np.unpackbits(packed, count=n, bitorder="little").astype(bool).reshape(shape)


class CodesCodec(Codec):
    """Unsigned integer codes (e.g. codebook indices) at ``bits`` bits each (1..32); a codebook
    of k entries needs ``bits = ceil(log2 k)``. Keys: ``prefix.codes`` uint8 packed,
    ``prefix.shape`` uint32 (ndim,). ``decode`` returns uint16 (bits <= 16) or uint32."""

    name = "codes"

    def __init__(self, prefix: str, bits: int):
        super().__init__(prefix)
        _check_bits(bits)
        self.bits = int(bits)

    @staticmethod
    def bits_for(num_codes: int) -> int:
        """Bits per code for a codebook of ``num_codes`` entries (at least 1)."""
        return max(1, math.ceil(math.log2(num_codes)))

    def encode(self, x):
        a = as_numpy(x)
        return {self.key("codes"): pack_bits(a, self.bits),
                self.key("shape"): np.asarray(a.shape, np.uint32)}

    def decode(self, payload):
        shape = _shape_of(payload, self.key("shape"))
        packed = _get(payload, self.key("codes"), np.uint8, 1)
        n = math.prod(shape)
        if n * self.bits > 8 * packed.size:  # before unpack_bits allocates n values
            raise MessageError(f"payload {self.key('codes')!r}: {packed.size} bytes for {n} codes")
        return unpack_bits(packed, self.bits, n).reshape(shape)


class SparseCodec(Codec):
    """The selected cells of a BEV map.

    ``encode(x, mask=None)``: x (C, H, W) or (H, W); mask (H, W) bool, default: cells where any
    channel is non-zero. Keys:

    * ``prefix.shape`` uint32 (3,) [C, H, W] (C = 0 marks an (H, W) input);
    * positions, whichever is smaller (or as ``positions`` forces): ``prefix.idx`` (K,) flat
      indices ``h * W + w`` ascending, uint16 when H * W <= 65536 else uint32; or
      ``prefix.mask.bits`` packed bits, ceil(H * W / 8) bytes;
    * values (C, K) through the inner ``values`` codec under prefix ``prefix.v``.

    ``decode`` returns the dense float map with zeros off the mask. Its size comes from the
    payload, so it is bounded: ``C * H * W <= max_elements``, and equal to ``dense_shape`` when
    the receiver knows its grid.
    """

    name = "sparse"

    def __init__(self, prefix: str, values: Codec | str = "float32", positions: str = "auto",
                 dense_shape: tuple[int, ...] | None = None, max_elements: int = 1 << 26):
        super().__init__(prefix)
        if positions not in ("auto", "idx", "mask"):
            raise ValueError(f"positions must be auto, idx or mask, got {positions!r}")
        self.values = make_codec(values, self.key("v")) if isinstance(values, str) else values
        if self.values.prefix != self.key("v"):
            raise ValueError(f"inner codec prefix must be {self.key('v')!r}")
        self.positions, self.dense_shape, self.max_elements = positions, dense_shape, max_elements
        self._mask = MaskCodec(self.key("mask"))

    def encode(self, x, mask=None):
        a = as_numpy(x)
        chw = a[None] if a.ndim == 2 else a
        if chw.ndim != 3:
            raise ValueError(f"{self}: x must be (C, H, W) or (H, W), got {a.shape}")
        c, h, w = chw.shape
        m = (chw != 0).any(0) if mask is None else as_numpy(mask).astype(bool, copy=False)
        if m.shape != (h, w):
            raise ValueError(f"{self}: mask {m.shape} does not match map {(h, w)}")
        idx = np.flatnonzero(m)
        idx_dtype = np.uint16 if h * w <= 1 << 16 else np.uint32
        use_mask = (self.positions == "mask" or
                    (self.positions == "auto" and -(-h * w // 8) < idx.size * idx_dtype().itemsize))
        out = {self.key("shape"): np.array([c if a.ndim == 3 else 0, h, w], np.uint32)}
        if use_mask:
            out.update(self._mask.encode(m))
            del out[self._mask.key("shape")]  # the map's shape says it
        else:
            out[self.key("idx")] = idx.astype(idx_dtype)
        out.update(self.values.encode(chw.reshape(c, h * w)[:, idx]))
        return out

    def decode(self, payload):
        shape = _shape_of(payload, self.key("shape"))
        if len(shape) != 3:
            raise MessageError(f"payload {self.key('shape')!r}: {len(shape)} dims, expected 3")
        c0, h, w = shape
        c = max(c0, 1)
        dense = (c0, h, w) if c0 else (h, w)
        if self.dense_shape is not None and dense != tuple(self.dense_shape):
            raise MessageError(f"payload {self.key('shape')!r}: {dense}, expected {self.dense_shape}")
        if c * h * w > self.max_elements:
            raise MessageError(f"payload {self.key('shape')!r}: {dense} exceeds {self.max_elements} elements")
        if self.key("idx") in payload:
            idx = _flat_indices(payload, self.key("idx"), h * w)
        else:
            m = self._mask.decode({**payload, self._mask.key("shape"): np.array([h, w], np.uint32)})
            idx = np.flatnonzero(m)
        vals = self.values.decode(payload)
        if vals.shape != (c, idx.size):
            raise MessageError(f"payload {self.values.prefix!r}: values {vals.shape}, "
                               f"expected {(c, idx.size)}")
        out = np.zeros((c, h * w), np.result_type(vals.dtype, np.float32))
        out[:, idx] = vals
        return out.reshape(dense)



def _flat_indices(payload: Payload, key: str, n_cells: int) -> np.ndarray:
    """The (K,) int64 flat cell indices at ``key``: uint16/uint32, strictly ascending, each in
    [0, n_cells); anything else raises :class:`MessageError` naming the key."""
    idx = _get(payload, key, ndim=1)
    if idx.dtype not in (np.uint16, np.uint32):
        raise MessageError(f"payload {key!r}: dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    if idx.size and (idx[-1] >= n_cells or (np.diff(idx) <= 0).any()):
        raise MessageError(f"payload {key!r}: not ascending in [0, {n_cells})")
    return idx

class CellsCodec(Codec):
    """A selection of BEV cells, (H, W) bool, in whichever position format is smaller.

    Keys: ``prefix.shape`` uint32 (2,) [H, W], then either ``prefix.idx`` (K,) ascending flat
    indices ``h * W + w`` (uint16 when H * W <= 65536, else uint32) or ``prefix.bits``, the
    mask packed one bit per cell (ceil(H * W / 8) bytes, little bit order, zero pad bits). The
    mask is used when its data is strictly smaller: ``ceil(H * W / 8) < K * itemsize``.
    ``decode`` returns the (H, W) bool mask; ``H * W <= max_cells`` bounds what it allocates.
    """

    name = "cells"

    def __init__(self, prefix: str, max_cells: int = 1 << 24):
        super().__init__(prefix)
        self.max_cells = int(max_cells)

    def encode(self, x):
        m = as_numpy(x)
        if m.dtype != np.bool_ or m.ndim != 2:
            raise ValueError(f"{self}: (H, W) bool mask expected, got {m.dtype} {m.shape}")
        h, w = m.shape
        idx = np.flatnonzero(m)
        idx_dtype = np.uint16 if h * w <= 1 << 16 else np.uint32
        out = {self.key("shape"): np.array([h, w], np.uint32)}
        if -(-h * w // 8) < idx.size * np.dtype(idx_dtype).itemsize:
            out[self.key("bits")] = np.packbits(m.ravel(), bitorder="little")
        else:
            out[self.key("idx")] = idx.astype(idx_dtype)
        return out

    def decode(self, payload):
        shape = _shape_of(payload, self.key("shape"))
        if len(shape) != 2:
            raise MessageError(f"payload {self.key('shape')!r}: {len(shape)} dims, expected 2")
        h, w = shape
        if h * w > self.max_cells:
            raise MessageError(f"payload {self.key('shape')!r}: {shape} exceeds "
                               f"{self.max_cells} cells")
        if self.key("idx") in payload:
            idx = _flat_indices(payload, self.key("idx"), h * w)
            out = np.zeros(h * w, bool)
            out[idx] = True
            return out.reshape(h, w)
        return MaskCodec(self.prefix).decode({self.key("bits"): _get(payload, self.key("bits")),
                                              self.key("shape"): np.array(shape, np.uint32)})


CODECS: dict[str, type[Codec]] = {cls.name: cls for cls in (
    RawCodec, Float32Codec, Float16Codec, Int8Codec, MaskCodec, CodesCodec, SparseCodec,
    CellsCodec)}


def make_codec(name: str, prefix: str, **kwargs) -> Codec:
    """``make_codec("int8", "feat", axis=0)``; unknown names raise with the known ones listed."""
    try:
        cls = CODECS[name]
    except KeyError:
        raise KeyError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}") from None
    return cls(prefix, **kwargs)
