"""Writing PCD v0.7 files (:func:`write_pcd`) and the two dataset flavours.

Kept apart from :mod:`v2xfuse.io.pcd` (the strict reader, which re-exports these names) so that
neither file outgrows a reading.
"""
from __future__ import annotations

import os
import struct
from typing import BinaryIO, Mapping, Union

import numpy as np

from ._pcd_text import format_ascii_rows
from .lzf import lzf_compress
from .pcd import _DEFAULT_VIEWPOINT, _NUMPY_KIND, _PCD_TYPE, _TYPE_SIZES, DATA_ENCODINGS, PcdError

__all__ = ["write_pcd", "write_points_opv2v", "write_points_dair"]

def _as_records(fields: Mapping[str, np.ndarray] | np.ndarray, name: str) -> np.ndarray:
    """Fields -> (N,) packed little-endian structured array, one field per PCD field."""
    if isinstance(fields, np.ndarray):
        if fields.dtype.names is None or fields.ndim != 1:
            raise PcdError(f"{name}: a structured array must be 1-D with named fields")
        columns = {n: fields[n] for n in fields.dtype.names}
    else:
        columns = {n: np.asarray(v) for n, v in fields.items()}
    if not columns:
        raise PcdError(f"{name}: no fields to write")
    lengths = {n: len(v) for n, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise PcdError(f"{name}: fields have different lengths {lengths}")
    dtype = []
    for field, values in columns.items():
        if not field or any(c.isspace() for c in field):
            raise PcdError(f"{name}: field name {field!r} is empty or contains whitespace")
        if values.ndim not in (1, 2):
            raise PcdError(f"{name}: field {field!r} must be (N,) or (N, count), got "
                           f"{values.shape}")
        kind = _PCD_TYPE.get(values.dtype.kind)
        size = values.dtype.itemsize
        if kind is None or size not in _TYPE_SIZES[kind]:
            raise PcdError(f"{name}: field {field!r} has dtype {values.dtype}, which PCD "
                           f"cannot store")
        base = f"<{_NUMPY_KIND[kind]}{size}"
        dtype.append((field, base, values.shape[1:]) if values.ndim == 2 else (field, base))
    records = np.empty(next(iter(lengths.values())), dtype=dtype)
    for field, values in columns.items():
        records[field] = values
    return records


def _header_text(records: np.ndarray, data: str, height: int, viewpoint) -> str:
    names, sizes, types, counts = [], [], [], []
    for field in records.dtype.names:
        base, shape = records.dtype[field].base, records.dtype[field].shape
        names.append(field)
        sizes.append(str(base.itemsize))
        types.append(_PCD_TYPE[base.kind])
        counts.append(str(int(np.prod(shape))))
    n = len(records)
    view = " ".join(f"{v:.10g}" for v in viewpoint)
    return ("# .PCD v0.7 - Point Cloud Data file format\n"
            "VERSION 0.7\n"
            f"FIELDS {' '.join(names)}\n"
            f"SIZE {' '.join(sizes)}\n"
            f"TYPE {' '.join(types)}\n"
            f"COUNT {' '.join(counts)}\n"
            f"WIDTH {n // height}\n"
            f"HEIGHT {height}\n"
            f"VIEWPOINT {view}\n"
            f"POINTS {n}\n"
            f"DATA {data}\n")


def write_pcd(path: Union[str, os.PathLike, BinaryIO],
              fields: Mapping[str, np.ndarray] | np.ndarray, data: str = "binary", *,
              height: int = 1, viewpoint=_DEFAULT_VIEWPOINT) -> None:
    """Write a PCD v0.7 file.

    Args:
        path: file path or binary file object.
        fields: ``{name: (N,) or (N, count) array}`` in file order, or an (N,) structured
            array. Each field keeps its dtype (float16/32/64 -> F2/F4/F8, intN -> I, uintN and
            bool -> U); a second axis becomes COUNT.
        data: ``"ascii"``, ``"binary"`` or ``"binary_compressed"``. ascii prints float32 with
            ``%.10g`` (as Open3D; exact round trip), float64 with ``%.17g``, float16 with
            ``%.5g``, integers in full.
        height: HEIGHT of an organised cloud (N must be a multiple); WIDTH = N / height.
        viewpoint: (7,) ``tx ty tz qw qx qy qz``.
    """
    name = str(path) if isinstance(path, (str, os.PathLike)) else \
        str(getattr(path, "name", "<stream>"))
    if data not in DATA_ENCODINGS:
        raise PcdError(f"{name}: unknown DATA encoding {data!r}")
    records = _as_records(fields, name)
    if height < 1 or len(records) % height:
        raise PcdError(f"{name}: {len(records)} points do not fill HEIGHT {height} rows")
    if len(viewpoint) != 7:
        raise PcdError(f"{name}: VIEWPOINT needs 7 numbers, got {len(viewpoint)}")
    parts = [_header_text(records, data, height, viewpoint).encode("ascii")]
    if data == "ascii":
        parts.append(format_ascii_rows(records).encode("ascii"))
    elif data == "binary":
        parts.append(records.data)
    else:
        # PCL's layout: each field's values for all points, field after field.
        raw = b"".join(np.ascontiguousarray(records[f]).tobytes() for f in records.dtype.names)
        stream = lzf_compress(raw)
        parts += [struct.pack("<II", len(stream), len(raw)), stream]
    if hasattr(path, "write"):
        for part in parts:
            path.write(part)
        return
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)


def write_points_opv2v(path: Union[str, os.PathLike, BinaryIO], xyz: np.ndarray,
                       intensity: np.ndarray) -> None:
    """Write what OPV2V's dumper writes (Open3D ``write_point_cloud(write_ascii=True)`` of a
    cloud whose colours are ``[intensity, 0, 0]``), byte for byte with the Open3D of that time.

    Args:
        xyz: (N, 3) coordinates, stored as float32 (TYPE F SIZE 4).
        intensity: (N,) in [0, 1]; clipped, then ``R = round(intensity * 255)`` (halves away
            from zero, as ``std::round``; NaN -> 0) and stored as the float32 whose bits are
            ``R << 16`` (a subnormal for R < 128), printed with ``%.10g``.
    """
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must be (N, 3), got {xyz.shape}")
    scaled = np.clip(np.nan_to_num(np.asarray(intensity, dtype=np.float64), nan=0.0), 0, 1) * 255
    red = np.floor(scaled)
    red += (scaled - red) >= 0.5
    rgb = (red.astype(np.uint32) << 16).view(np.float32)
    write_pcd(path, {"x": xyz[:, 0].astype(np.float32), "y": xyz[:, 1].astype(np.float32),
                     "z": xyz[:, 2].astype(np.float32), "rgb": rgb}, data="ascii")


def write_points_dair(path: Union[str, os.PathLike, BinaryIO], xyz: np.ndarray,
                      intensity: np.ndarray) -> None:
    """Write a DAIR-V2X style cloud: ``x y z intensity``, all float32, ``DATA binary``.

    Args:
        xyz: (N, 3) coordinates.
        intensity: (N,) raw intensity as DAIR-V2X stores it (0..255).
    """
    xyz = np.asarray(xyz, dtype=np.float32)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"xyz must be (N, 3), got {xyz.shape}")
    write_pcd(path, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
                     "intensity": np.asarray(intensity, dtype=np.float32)}, data="binary")
