"""A message one agent sends in one frame, and its versioned binary wire format.

A message from another agent is untrusted input, so the format is plain fixed-width fields
(no pickle) and :func:`decode` checks every field and every claimed length against the bytes
that remain *before* it allocates anything. Communication volume is ``len(encode(msg))``.

Wire format, all integers little-endian (version 1: a whole message; version 2: one packet of a
message split into packets, the same fields plus the packet's place after the pose)::

    offset size  field
    0      4     magic            b"V2XM"
    4      1     version          1
    5      1     n_arrays         0..MAX_ARRAYS
    6      1     sender_len       1..MAX_ID_BYTES   (utf-8 bytes)
    7      1     kind_len         1..MAX_ID_BYTES
    8      8     timestamp_us     int64
    16     96    world_from_lidar rows 0..2 of the 4x4 pose, 12 x float64 (row 3 is [0, 0, 0, 1])
    version 2 only:
    112    2     packet_index     uint16, < packet_count
    114    2     packet_count     uint16, 1..MAX_PACKETS
    112|116 ...  sender (utf-8), kind (utf-8)
    then n_arrays times:
           1     name_len         1..MAX_NAME_BYTES
           1     dtype code       see DTYPE_CODES
           1     ndim             0..MAX_NDIM
           4*nd  shape            uint32 each
           ...   name (utf-8)
           ...   data             prod(shape) * itemsize raw little-endian bytes, C order

Fixed overhead: ``HEADER_BYTES + len(sender) + len(kind)`` per message (plus
``PACKET_HEADER_BYTES`` per packet of a split message: every packet carries the whole header, so
the receiver can use each one that arrives on its own) and
``3 + 4 * ndim + len(name)`` per array (see :func:`overhead_bytes`). No padding, no checksum
(link layers carry their own).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

__all__ = ["Message", "MessageError", "encode", "decode", "as_numpy", "overhead_bytes",
           "MAGIC", "VERSION", "HEADER_BYTES", "DTYPE_CODES", "MAX_ARRAYS", "MAX_NDIM",
           "MAX_NAME_BYTES", "MAX_ID_BYTES", "MAX_PACKETS", "PACKET_HEADER_BYTES"]

MAGIC = b"V2XM"
VERSION = 1           # a whole message
PACKET_VERSION = 2    # one packet of a split message
MAX_PACKETS = 65535
MAX_ARRAYS = 64
MAX_NDIM = 6
MAX_NAME_BYTES = 64
MAX_ID_BYTES = 64

# code -> little-endian dtype. Codes are part of the wire format: never renumber, only append.
_CODE_TO_DTYPE: dict[int, np.dtype] = {
    1: np.dtype("?"), 2: np.dtype("u1"), 3: np.dtype("i1"), 4: np.dtype("<i2"),
    5: np.dtype("<u2"), 6: np.dtype("<i4"), 7: np.dtype("<i8"), 8: np.dtype("<f2"),
    9: np.dtype("<f4"), 10: np.dtype("<f8"), 11: np.dtype("<u4"),
}
DTYPE_CODES: dict[str, int] = {dt.name: code for code, dt in _CODE_TO_DTYPE.items()}

_HEAD = struct.Struct("<4sBBBBq12d")
_ARRAY_HEAD = struct.Struct("<BBB")
HEADER_BYTES = _HEAD.size  # 112
_PACKET = struct.Struct("<HH")
PACKET_HEADER_BYTES = _PACKET.size  # 4
_LAST_ROW = np.array([0.0, 0.0, 0.0, 1.0])


class MessageError(ValueError):
    """Bytes that are not a valid message, or a message that cannot be encoded.

    The text names the field (``"payload 'feat.q': shape ..."``)."""


def as_numpy(x: Any) -> np.ndarray:
    """numpy array from a numpy array, a torch tensor (detached, moved to CPU; bfloat16 becomes
    float32) or anything ``np.asarray`` takes. torch is not imported here."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


@dataclass(eq=False)
class Message:
    """What one agent sends in one frame.

    Attributes:
        sender: agent id, 1..MAX_ID_BYTES utf-8 bytes.
        kind: what the payload is (``"bev_features"``, ``"boxes"``, ``"points"``, ``"codes"``...).
        timestamp_us: int64 time of the sender's observation, microseconds.
        world_from_lidar: (4, 4) float64 sender pose, a rigid transform (last row [0, 0, 0, 1]).
        payload: name -> array; names are 1..MAX_NAME_BYTES utf-8 bytes, dtypes from
            ``DTYPE_CODES``, at most MAX_NDIM dims. Torch tensors are converted on construction.
        packet: ``(index, count)`` when this is one packet of a message split into ``count``
            (sent as format version 2), else None.
    """

    sender: str
    kind: str
    timestamp_us: int
    world_from_lidar: np.ndarray
    payload: dict[str, np.ndarray] = field(default_factory=dict)
    packet: tuple[int, int] | None = None

    def __post_init__(self):
        self.timestamp_us = int(self.timestamp_us)
        if self.packet is not None:
            self.packet = (int(self.packet[0]), int(self.packet[1]))
        self.world_from_lidar = np.asarray(as_numpy(self.world_from_lidar), dtype=np.float64)
        self.payload = {k: as_numpy(v) for k, v in self.payload.items()}

    @classmethod
    def from_tensors(cls, sender: str, kind: str, timestamp_us: int, world_from_lidar: Any,
                     payload: Mapping[str, Any]) -> "Message":
        """Same fields, with torch tensors (any device, grad or not) for pose and payload."""
        return cls(sender, kind, timestamp_us, as_numpy(world_from_lidar), dict(payload))

    def to_tensors(self, device=None) -> dict:
        """payload as torch tensors (``torch.from_numpy``, then ``.to(device)`` if given)."""
        import torch

        out = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.payload.items()}
        return out if device is None else {k: v.to(device) for k, v in out.items()}

    def num_bytes(self) -> int:
        """Exact size on the wire: ``len(encode(self))``."""
        return len(encode(self))


def overhead_bytes(msg: Message) -> int:
    """Bytes of ``encode(msg)`` that are not array data: header, ids, per-array headers."""
    n = HEADER_BYTES + len(msg.sender.encode()) + len(msg.kind.encode())
    if msg.packet is not None:
        n += PACKET_HEADER_BYTES
    for name, arr in msg.payload.items():
        n += _ARRAY_HEAD.size + 4 * np.ndim(arr) + len(name.encode())
    return n


def _id_bytes(value: str, what: str, limit: int) -> bytes:
    if not isinstance(value, str):
        raise MessageError(f"{what}: expected str, got {type(value).__name__}")
    b = value.encode("utf-8")
    if not 1 <= len(b) <= limit:
        raise MessageError(f"{what}: {len(b)} utf-8 bytes, allowed 1..{limit}")
    return b


def encode(msg: Message) -> bytes:
    """Serialise ``msg`` (format in the module docstring). Raises MessageError for a field the
    format cannot carry (dtype outside the whitelist, too many dims, a non-rigid pose row...)."""
    sender = _id_bytes(msg.sender, "sender", MAX_ID_BYTES)
    kind = _id_bytes(msg.kind, "kind", MAX_ID_BYTES)
    pose = np.asarray(msg.world_from_lidar, dtype=np.float64)
    if pose.shape != (4, 4):
        raise MessageError(f"world_from_lidar: shape {pose.shape}, expected (4, 4)")
    if not np.isfinite(pose).all() or not np.array_equal(pose[3], _LAST_ROW):
        raise MessageError("world_from_lidar: must be finite with last row [0, 0, 0, 1]")
    if not -(1 << 63) <= msg.timestamp_us < (1 << 63):
        raise MessageError(f"timestamp_us: {msg.timestamp_us} does not fit int64")
    if len(msg.payload) > MAX_ARRAYS:
        raise MessageError(f"payload: {len(msg.payload)} arrays, at most {MAX_ARRAYS}")
    version = VERSION if msg.packet is None else PACKET_VERSION
    parts = [_HEAD.pack(MAGIC, version, len(msg.payload), len(sender), len(kind),
                        msg.timestamp_us, *pose[:3].ravel())]
    if msg.packet is not None:
        index, count = msg.packet
        if not (1 <= count <= MAX_PACKETS and 0 <= index < count):
            raise MessageError(f"packet: ({index}, {count}), need 0 <= index < count <= "
                               f"{MAX_PACKETS}")
        parts.append(_PACKET.pack(index, count))
    parts += [sender, kind]
    for name, arr in msg.payload.items():
        nb = _id_bytes(name, "payload name", MAX_NAME_BYTES)
        arr = as_numpy(arr)
        code = DTYPE_CODES.get(arr.dtype.name)
        if code is None:
            raise MessageError(f"payload {name!r}: dtype {arr.dtype} not in {sorted(DTYPE_CODES)}")
        if arr.ndim > MAX_NDIM:
            raise MessageError(f"payload {name!r}: ndim {arr.ndim} > {MAX_NDIM}")
        if any(d >= 1 << 32 for d in arr.shape):
            raise MessageError(f"payload {name!r}: dimension of shape {arr.shape} exceeds uint32")
        data = np.ascontiguousarray(arr, dtype=_CODE_TO_DTYPE[code])
        parts += [_ARRAY_HEAD.pack(len(nb), code, arr.ndim),
                  struct.pack(f"<{arr.ndim}I", *arr.shape), nb, data.tobytes()]
    return b"".join(parts)


class _Reader:
    """Cursor over untrusted bytes: every read checks the remaining length first."""

    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.remaining():
            raise MessageError(f"{what}: needs {n} bytes, {self.remaining()} left "
                               f"(at offset {self.pos} of {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def text(self, n: int, what: str) -> str:
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError(f"{what}: not valid utf-8") from None


def _check_len(n: int, lo: int, hi: int, what: str) -> int:
    if not lo <= n <= hi:
        raise MessageError(f"{what}: {n}, allowed {lo}..{hi}")
    return n


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse bytes made by :func:`encode`. Raises MessageError, naming the field, for a wrong
    magic or version, a length or shape that claims more bytes than remain (checked before any
    allocation), an unknown dtype code, a bool byte other than 0/1, a duplicate name, a
    non-finite or non-rigid pose row, or trailing bytes. Arrays are fresh writable copies."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode expects bytes, got {type(data).__name__}")
    r = _Reader(memoryview(data).cast("B"))
    head = r.take(_HEAD.size, "header")
    magic, version, n_arrays, sender_len, kind_len, ts, *pose12 = _HEAD.unpack(head)
    if magic != MAGIC:
        raise MessageError(f"magic: {magic!r}, expected {MAGIC!r}")
    if version not in (VERSION, PACKET_VERSION):
        raise MessageError(f"version: {version}, this reader knows {VERSION} and "
                           f"{PACKET_VERSION}")
    _check_len(n_arrays, 0, MAX_ARRAYS, "n_arrays")
    _check_len(sender_len, 1, MAX_ID_BYTES, "sender_len")
    _check_len(kind_len, 1, MAX_ID_BYTES, "kind_len")
    if not all(math.isfinite(v) for v in pose12):
        raise MessageError("world_from_lidar: non-finite value")
    pose = np.eye(4)
    pose[:3] = np.array(pose12).reshape(3, 4)
    packet = None
    if version == PACKET_VERSION:
        index, count = _PACKET.unpack(r.take(_PACKET.size, "packet header"))
        _check_len(count, 1, MAX_PACKETS, "packet_count")
        _check_len(index, 0, count - 1, "packet_index")
        packet = (index, count)
    sender = r.text(sender_len, "sender")
    kind = r.text(kind_len, "kind")
    payload: dict[str, np.ndarray] = {}
    for i in range(n_arrays):
        where = f"payload array {i}"
        name_len, code, ndim = _ARRAY_HEAD.unpack(r.take(_ARRAY_HEAD.size, f"{where} header"))
        _check_len(name_len, 1, MAX_NAME_BYTES, f"{where} name_len")
        dtype = _CODE_TO_DTYPE.get(code)
        if dtype is None:
            raise MessageError(f"{where} dtype code: {code} not in {sorted(_CODE_TO_DTYPE)}")
        _check_len(ndim, 0, MAX_NDIM, f"{where} ndim")
        shape = struct.unpack(f"<{ndim}I", r.take(4 * ndim, f"{where} shape"))
        name = r.text(name_len, f"{where} name")
        where = f"payload {name!r}"
        if name in payload:
            raise MessageError(f"{where}: duplicate name")
        count = math.prod(shape)  # Python int: no overflow, compared before allocating
        if math.prod(max(d, 1) for d in shape) * dtype.itemsize >= 1 << 62:
            raise MessageError(f"{where}: shape {shape} too large even when empty")
        raw = r.take(count * dtype.itemsize, f"{where} data of shape {shape} {dtype.name}")
        if dtype.kind == "b" and count and np.frombuffer(raw, np.uint8).max() > 1:
            raise MessageError(f"{where}: bool byte other than 0/1")
        payload[name] = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()
    if r.remaining():
        raise MessageError(f"trailing bytes: {r.remaining()} after the last array")
    return Message(sender, kind, ts, pose, payload, packet)
