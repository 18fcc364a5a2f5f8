"""PCD v0.7 point-cloud files (PCL's format): strict reader, writer, and the two dataset flavours.

A PCD file is a text header, one ``KEY value...`` per line (``#`` lines are comments), ending
with the ``DATA`` line; the point data follows::

    # .PCD v0.7 - Point Cloud Data file format      (optional comment)
    VERSION 0.7                                      (optional, default "0.7")
    FIELDS x y z intensity                           one name per field
    SIZE 4 4 4 4                                     bytes per value
    TYPE F F F F                                     F float, I signed, U unsigned int
    COUNT 1 1 1 1                                    values per field (optional, default 1s)
    WIDTH 30000
    HEIGHT 1                                         WIDTH * HEIGHT must equal POINTS
    VIEWPOINT 0 0 0 1 0 0 0                          (optional) tx ty tz qw qx qy qz
    POINTS 30000
    DATA binary                                      ascii | binary | binary_compressed

- ``ascii``: one point per line, the values of all fields (COUNT of each) separated by spaces.
- ``binary``: POINTS packed little-endian records (no padding), row-major, and nothing after
  the last record.
- ``binary_compressed``: ``uint32 compressed_size, uint32 uncompressed_size`` then an LZF stream
  (:mod:`v2xfuse.io.lzf`) of exactly ``compressed_size`` bytes, ending the file. The uncompressed
  buffer is column-major: all POINTS values of field 1, then all of field 2, and so on.

The reader is strict: anything that disagrees with the header raises :class:`PcdError` (see
:func:`read_pcd`), and every header number is checked against the bytes in the file before
anything is allocated from it. In particular the data must be exactly as long as the header
says, in every encoding: a header whose POINTS is smaller than the data would otherwise load
a prefix of the cloud without a word (PCL, Open3D and pypcd all write files that end with the
last record, so a longer file is a damaged or mis-edited one, never a writer's habit).

The datasets (see ``shared/reference``): OPV2V writes ``x y z rgb`` ascii files through Open3D,
intensity packed in the red channel of ``rgb`` (:func:`write_points_opv2v`); DAIR-V2X ships
``x y z intensity`` float32 files with intensity 0..255 (:func:`write_points_dair`).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Union

import numpy as np

from ._pcd_text import parse_ascii_rows
from .lzf import MAX_EXPANSION, LzfError, lzf_decompress

__all__ = ["PcdError", "PcdHeader", "PcdData", "read_pcd", "read_points", "write_pcd",
           "write_points_opv2v", "write_points_dair"]

Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

DATA_ENCODINGS = ("ascii", "binary", "binary_compressed")
_TYPE_SIZES = {"F": (2, 4, 8), "I": (1, 2, 4, 8), "U": (1, 2, 4, 8)}
_NUMPY_KIND = {"F": "f", "I": "i", "U": "u"}
_PCD_TYPE = {"f": "F", "i": "I", "u": "U", "b": "U"}
_KEYS = ("VERSION", "FIELDS", "SIZE", "TYPE", "COUNT", "WIDTH", "HEIGHT", "VIEWPOINT", "POINTS",
         "DATA")
_REQUIRED = ("FIELDS", "SIZE", "TYPE", "WIDTH", "HEIGHT", "POINTS", "DATA")
_DEFAULT_VIEWPOINT = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0)
# No real record comes near this; it stops a hostile COUNT from building an absurd dtype.
_MAX_ROW_BYTES = 1 << 20


class PcdError(ValueError):
    """A PCD file that cannot be read or written; the message names the file and the problem."""


@dataclass(frozen=True)
class PcdHeader:
    """The parsed header. Per-field tuples all have one entry per field, in file order.

    Attributes:
        version: the VERSION value as written (``"0.7"``).
        fields: field names as written (PCL's padding fields are all called ``_``).
        sizes: bytes per value, per field.
        types: ``"F"``, ``"I"`` or ``"U"`` per field.
        counts: values per point, per field (``COUNT``; > 1 for e.g. a 33-bin histogram).
        width, height: the cloud's organisation (``height == 1`` for unorganised clouds).
        viewpoint: (7,) ``tx ty tz qw qx qy qz`` sensor pose.
        points: number of points, ``width * height``.
        data: ``"ascii"``, ``"binary"`` or ``"binary_compressed"``.
    """

    version: str
    fields: tuple[str, ...]
    sizes: tuple[int, ...]
    types: tuple[str, ...]
    counts: tuple[int, ...]
    width: int
    height: int
    viewpoint: tuple[float, ...]
    points: int
    data: str

    @property
    def names(self) -> tuple[str, ...]:
        """Field names of the structured array: as in the file, except that padding fields
        named ``_`` become ``_0``, ``_1``... (numpy needs unique names)."""
        out, pads = [], 0
        for name in self.fields:
            if name == "_":
                name, pads = f"_{pads}", pads + 1
            out.append(name)
        return tuple(out)

    @property
    def dtype(self) -> np.dtype:
        """Packed little-endian structured dtype of one record; COUNT > 1 fields are (count,)."""
        return np.dtype([(name, f"<{_NUMPY_KIND[t]}{s}", (c,)) if c > 1 else
                         (name, f"<{_NUMPY_KIND[t]}{s}")
                         for name, t, s, c in zip(self.names, self.types, self.sizes,
                                                  self.counts)])

    @property
    def row_bytes(self) -> int:
        return sum(s * c for s, c in zip(self.sizes, self.counts))


@dataclass
class PcdData:
    """A read PCD file.

    Attributes:
        header: the parsed header.
        points: (POINTS,) structured array, one named field per PCD field (names as in
            ``header.names``); a COUNT > 1 field is a (POINTS, count) sub-array. For organised
            clouds the row-major point order is kept flat: reshape to (height, width) if needed.
    """

    header: PcdHeader
    points: np.ndarray

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.points[name]


# ---------------------------------------------------------------------------------------------
# Reading

def _load(source: Source) -> tuple[bytearray, str]:
    """The whole file as a writable buffer (so arrays viewing it are writable) and its name."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytearray(source), "<bytes>"
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<stream>"))
        return bytearray(source.read()), name
    name = os.fspath(source)
    with open(name, "rb") as f:
        buf = bytearray(os.fstat(f.fileno()).st_size)
        got = f.readinto(buf)
    return (buf if got == len(buf) else buf[:got]), str(name)


def _parse_int(err, key: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise err(f"{key} value {text!r} is not a non-negative integer")
    return value


def _parse_header(buf: bytearray, name: str) -> tuple[PcdHeader, int]:
    """Parse the header; returns it and the offset of the first data byte."""
    def err(problem: str) -> PcdError:
        return PcdError(f"{name}: {problem}")

    values: dict[str, list[str]] = {}
    pos = line_no = 0
    while "DATA" not in values:
        if pos >= len(buf):
            raise err("header has no DATA line" if buf else "file is empty")
        end = buf.find(b"\n", pos)
        end = len(buf) if end < 0 else end
        raw, pos = bytes(buf[pos:end]), end + 1
        line_no += 1
        try:
            line = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise err(f"header line {line_no} is not ASCII text (no DATA line before the "
                      f"data?)") from None
        if not line or line.startswith("#"):
            continue
        key, *rest = line.split()
        if key not in _KEYS:
            raise err(f"unknown header key {key!r} on line {line_no}")
        if key in values:
            raise err(f"header key {key} appears twice (line {line_no})")
        values[key] = rest
    pos = min(pos, len(buf))

    missing = [k for k in _REQUIRED if k not in values]
    if missing:
        raise err(f"header lacks {' '.join(missing)}")
    fields = tuple(values["FIELDS"])
    if not fields:
        raise err("FIELDS names no field")
    dupes = sorted({f for f in fields if f != "_" and fields.count(f) > 1})
    if dupes:
        raise err(f"FIELDS names {', '.join(dupes)} more than once")
    counts_text = values.get("COUNT", ["1"] * len(fields))
    for key, entries in (("SIZE", values["SIZE"]), ("TYPE", values["TYPE"]),
                         ("COUNT", counts_text)):
        if len(entries) != len(fields):
            raise err(f"{key} has {len(entries)} entries but FIELDS names {len(fields)} fields")
    sizes = tuple(_parse_int(err, "SIZE", s) for s in values["SIZE"])
    counts = tuple(_parse_int(err, "COUNT", c) for c in counts_text)
    types = tuple(values["TYPE"])
    for field, t, s, c in zip(fields, types, sizes, counts):
        if s not in _TYPE_SIZES.get(t, ()):
            raise err(f"field {field!r}: TYPE {t} with SIZE {s} is not supported (F: 2/4/8 "
                      f"bytes, I and U: 1/2/4/8)")
        if c < 1:
            raise err(f"field {field!r}: COUNT must be at least 1, got {c}")

    def single(key: str) -> str:
        if len(values[key]) != 1:
            raise err(f"{key} needs one value, got {len(values[key])}")
        return values[key][0]

    width = _parse_int(err, "WIDTH", single("WIDTH"))
    height = _parse_int(err, "HEIGHT", single("HEIGHT"))
    points = _parse_int(err, "POINTS", single("POINTS"))
    if width * height != points:
        raise err(f"WIDTH {width} * HEIGHT {height} != POINTS {points}")
    data = single("DATA").lower()
    if data not in DATA_ENCODINGS:
        raise err(f"unknown DATA encoding {data!r} (expected one of {', '.join(DATA_ENCODINGS)})")
    viewpoint = _DEFAULT_VIEWPOINT
    if "VIEWPOINT" in values:
        try:
            viewpoint = tuple(float(v) for v in values["VIEWPOINT"])
        except ValueError:
            viewpoint = ()
        if len(viewpoint) != 7:
            raise err(f"VIEWPOINT needs 7 numbers, got {' '.join(values['VIEWPOINT'])!r}")
    version = values.get("VERSION", ["0.7"])
    header = PcdHeader(version=" ".join(version), fields=fields, sizes=sizes, types=types,
                       counts=counts, width=width, height=height, viewpoint=viewpoint,
                       points=points, data=data)
    if header.row_bytes > _MAX_ROW_BYTES:
        raise err(f"a point of {header.row_bytes} bytes is implausibly large")
    return header, pos


def _read_binary(buf: bytearray, offset: int, header: PcdHeader, err) -> np.ndarray:
    need = header.points * header.row_bytes
    have = len(buf) - offset
    if have < need:
        raise err(f"truncated binary data: {header.points} points of {header.row_bytes} bytes "
                  f"need {need} bytes, found {have}")
    if have > need:
        extra = have - need
        raise err(f"header inconsistent with the data size: POINTS {header.points} of "
                  f"{header.row_bytes} bytes need {need} bytes, the file holds {have} ("
                  + (f"{extra // header.row_bytes} more points" if header.row_bytes and
                     extra % header.row_bytes == 0 else f"{extra} bytes too many") + ")")
    # A view of the file buffer: no copy.
    return np.frombuffer(buf, dtype=header.dtype, count=header.points, offset=offset)


def _read_compressed(buf: bytearray, offset: int, header: PcdHeader, err) -> np.ndarray:
    have = len(buf) - offset
    if header.points == 0 and have == 0:  # an empty cloud may omit the two sizes
        return np.zeros(0, dtype=header.dtype)
    if have < 8:
        raise err(f"truncated binary_compressed data: need 8 bytes of sizes, found {have}")
    compressed_size, uncompressed_size = struct.unpack_from("<II", buf, offset)
    need = header.points * header.row_bytes
    if uncompressed_size != need:
        raise err(f"binary_compressed uncompressed size {uncompressed_size} != {need} bytes "
                  f"for {header.points} points of {header.row_bytes} bytes")
    if compressed_size > have - 8:
        raise err(f"truncated binary_compressed data: compressed size says {compressed_size} "
                  f"bytes, found {have - 8}")
    if compressed_size < have - 8:
        raise err(f"header inconsistent with the data size: binary_compressed stream of "
                  f"{compressed_size} bytes is followed by {have - 8 - compressed_size} more")
    if uncompressed_size > MAX_EXPANSION * compressed_size:
        raise err(f"binary_compressed sizes inconsistent: {compressed_size} compressed bytes "
                  f"cannot expand to {uncompressed_size}")
    start = offset + 8
    try:
        raw = lzf_decompress(memoryview(buf)[start:start + compressed_size], uncompressed_size)
    except LzfError as e:
        raise err(f"corrupt binary_compressed data: {e}") from None
    out = np.empty(header.points, dtype=header.dtype)
    column_start = 0
    for name in header.names:
        field_dtype = header.dtype[name]
        out[name] = np.frombuffer(raw, dtype=field_dtype, count=header.points,
                                  offset=column_start)
        column_start += header.points * field_dtype.itemsize
    return out


def read_pcd(source: Source) -> PcdData:
    """Read a PCD file (``DATA ascii``, ``binary`` or ``binary_compressed``).

    Args:
        source: a path, the file's bytes, or a binary file object (read to its end).

    Returns:
        :class:`PcdData`: the header and a (POINTS,) structured array, one field per PCD field
        with the file's type (F4 -> float32, U1 -> uint8, ...). For ``binary`` files the
        array is a view of the file buffer (no copy). Nothing is filtered: NaN points stay.

    Raises:
        PcdError: the message names the file and the problem: a missing, unknown or repeated
            header key; FIELDS/SIZE/TYPE/COUNT of different lengths; an unsupported TYPE/SIZE;
            WIDTH * HEIGHT != POINTS; fewer or more data bytes (binary), rows or values
            (ascii) than the header promises, with the counts expected and found; ascii rows
            with the wrong number of values, non-numeric values, or integers out of their
            type's range; compressed sizes that disagree with the header or the file (bytes
            after the stream included); a corrupt LZF stream.
    """
    buf, name = _load(source)

    def err(problem: str) -> PcdError:
        return PcdError(f"{name}: {problem}")

    header, offset = _parse_header(buf, name)
    if header.data == "binary":
        points = _read_binary(buf, offset, header, err)
    elif header.data == "binary_compressed":
        points = _read_compressed(buf, offset, header, err)
    else:
        points = parse_ascii_rows(buf, offset, header, err)
    return PcdData(header=header, points=points)


# Red channel of a packed rgb value -> intensity, computed in float64 like Open3D's
# colors[:, 0] = R / 255.0 and then rounded once to float32.
_RED_TO_INTENSITY = (np.arange(256) / 255.0).astype(np.float32)


def _packed_red(values: np.ndarray) -> np.ndarray:
    """R = (bits >> 16) & 0xFF of a 4-byte packed colour, whatever TYPE it is stored as."""
    bits = np.ascontiguousarray(values).view(np.uint32)
    return ((bits >> 16) & 0xFF).astype(np.intp)


def read_points(source: Source, intensity: str = "auto") -> np.ndarray:
    """Read x, y, z and an intensity as one (N, 4) float32 array [x, y, z, intensity].

    Args:
        source: as for :func:`read_pcd`.
        intensity: where the 4th column comes from:

            - ``"field"``: the ``intensity`` field as stored, cast to float32 (raw values:
              0..255 in DAIR-V2X; scaling is the dataset adapter's job). Missing -> PcdError.
            - ``"rgb"``: the red channel of the packed ``rgb`` (or ``rgba``) field, as
              Open3D / OPV2V write it: the field's 4 bytes as uint32 ``u`` (whether TYPE F, U or
              I), ``R = (u >> 16) & 0xFF``, intensity ``float32(R / 255)`` in [0, 1] - exactly
              ``float32(open3d colors[:, 0])``. Missing -> PcdError.
            - ``"auto"``: ``"field"`` if there is an ``intensity`` field, else ``"rgb"`` if
              there is an ``rgb``/``rgba`` field, else zeros.
            - ``"zero"``: zeros.

    Returns:
        (N, 4) float32 [x, y, z, intensity], N = POINTS, file order; NaN points are kept.
    """
    pcd = read_pcd(source)
    name = str(source) if isinstance(source, (str, os.PathLike)) else "<input>"
    fields = dict(zip(pcd.header.fields, pcd.header.counts))
    for axis in ("x", "y", "z"):
        if fields.get(axis) != 1:
            raise PcdError(f"{name}: needs a single-valued field {axis!r}, fields are "
                           f"{' '.join(pcd.header.fields)}")
    colour = "rgb" if "rgb" in fields else "rgba" if "rgba" in fields else None
    if intensity == "auto":
        intensity = "field" if "intensity" in fields else "rgb" if colour else "zero"
    out = np.empty((len(pcd), 4), dtype=np.float32)
    for i, axis in enumerate("xyz"):
        out[:, i] = pcd.points[axis]
    if intensity == "field":
        if fields.get("intensity") != 1:
            raise PcdError(f"{name}: no single-valued 'intensity' field")
        out[:, 3] = pcd.points["intensity"]
    elif intensity == "rgb":
        index = pcd.header.fields.index(colour) if colour else -1
        if colour is None or fields[colour] != 1 or pcd.header.sizes[index] != 4:
            raise PcdError(f"{name}: no single-valued 4-byte 'rgb' or 'rgba' field")
        out[:, 3] = _RED_TO_INTENSITY[_packed_red(pcd.points[colour])]
    elif intensity == "zero":
        out[:, 3] = 0.0
    else:
        raise ValueError(f"intensity must be 'auto', 'field', 'rgb' or 'zero', got {intensity!r}")
    return out


# The writer lives in its own module; importing it last lets it reuse the constants above.
from ._pcd_write import write_pcd, write_points_dair, write_points_opv2v  # noqa: E402
