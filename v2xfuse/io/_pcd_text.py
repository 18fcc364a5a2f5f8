"""The ``DATA ascii`` body of a PCD file: parsing with exact diagnostics, and formatting.

Kept apart from :mod:`v2xfuse.io.pcd` because it is the only part that works row by row.
The fast path splits the whole body into tokens once and lets numpy convert each field's
column; only when the token or row count disagrees with the header does it walk the rows to
say which row is wrong.
"""
from __future__ import annotations

import numpy as np

__all__ = ["parse_ascii_rows", "format_ascii_rows"]

# printf formats that round-trip each float width exactly (Open3D prints float32 with %.10g).
_FLOAT_FORMAT = {2: "%.5g", 4: "%.10g", 8: "%.17g"}


def _columns(header):
    """(name, first token column, count, numpy dtype) per field."""
    out, col = [], 0
    for name in header.names:
        field = header.dtype[name]
        out.append((name, col, int(np.prod(field.shape)) if field.shape else 1, field.base))
        col += out[-1][2]
    return out, col


def _diagnose_rows(body: bytes, header, width: int, err) -> Exception:
    """Walk the rows to find the first one that breaks the header's promise."""
    rows = 0
    for line_no, line in enumerate(body.split(b"\n"), start=1):
        values = line.split()
        if not values:
            continue
        rows += 1
        if rows > header.points:
            return err(f"ascii data has more rows than POINTS {header.points} (extra row at "
                       f"data line {line_no})")
        if len(values) != width:
            return err(f"ascii data line {line_no} has {len(values)} values, expected {width} "
                       f"(fields {' '.join(header.fields)})")
    return err(f"truncated ascii data: POINTS {header.points} but only {rows} rows")


def _convert(tokens: list, dtype: np.dtype, name: str, rows_of, err) -> np.ndarray:
    """``rows_of(i)`` maps a token's index in ``tokens`` to its 0-based data row."""
    try:
        if dtype.kind == "f":
            return np.array(tokens, dtype=np.float64).astype(dtype)
        wide = np.array(tokens, dtype=np.uint64 if dtype.kind == "u" else np.int64)
    except (ValueError, OverflowError):
        for i, token in enumerate(tokens):
            try:
                (float if dtype.kind == "f" else int)(token)
            except ValueError:
                raise err(f"field {name!r}: value {token[:32]!r} at data row {rows_of(i) + 1} is "
                          f"not a number") from None
        raise err(f"field {name!r}: a value does not fit {dtype}") from None
    info = np.iinfo(dtype)
    bad = np.flatnonzero((wide < info.min) | (wide > info.max)) if wide.size else []
    if len(bad):
        raise err(f"field {name!r}: value {tokens[bad[0]]!r} at data row {rows_of(bad[0]) + 1} "
                  f"does not fit {dtype}")
    return wide.astype(dtype)


def parse_ascii_rows(buf: bytearray, offset: int, header, err) -> np.ndarray:
    """Parse the ascii body starting at ``buf[offset]`` into a (POINTS,) structured array.

    Args:
        buf: the whole file.
        offset: first byte after the DATA line.
        header: the parsed :class:`~v2xfuse.io.pcd.PcdHeader`.
        err: ``err(problem) -> PcdError`` naming the file.

    Raises:
        PcdError (via ``err``): fewer or more rows than POINTS, a row with the wrong number of
            values, a non-numeric value, an integer out of its type's range.
    """
    body = bytes(buf[offset:])
    fields, width = _columns(header)
    tokens = body.split()
    # A row with an extra value and another with one missing would keep the token count right,
    # so also count the non-blank lines. Only walk the rows when something is off.
    lines = body.count(b"\n") + (0 if body.endswith(b"\n") or not body else 1)
    if len(tokens) != header.points * width or (lines != header.points and sum(
            1 for line in body.split(b"\n") if line.strip()) != header.points):
        raise _diagnose_rows(body, header, width, err)
    out = np.empty(header.points, dtype=header.dtype)
    if header.points == 0:
        return out
    for name, col, count, base in fields:
        parts = [_convert(tokens[col + c::width], base, name, lambda row: row, err)
                 for c in range(count)]
        out[name] = parts[0] if count == 1 else np.stack(parts, axis=1)
    return out


def format_ascii_rows(records: np.ndarray) -> str:
    """One line per record, values separated by spaces, each field's COUNT values in order.

    float32 is printed with ``%.10g`` (Open3D's choice; parsing it back gives the same float32,
    subnormals included), float64 with ``%.17g``, float16 with ``%.5g``, integers in full.
    """
    n = len(records)
    if n == 0:
        return ""
    columns, formats = [], []
    for name in records.dtype.names:
        field = records.dtype[name]
        values = np.asarray(records[name]).reshape(n, -1)
        fmt = _FLOAT_FORMAT[field.base.itemsize] if field.base.kind == "f" else "%d"
        for c in range(values.shape[1]):
            columns.append(values[:, c].astype(np.float64 if field.base.kind == "f" else object))
            formats.append(fmt)
    # One %-format over the whole body: the per-value work stays in C (a join of per-row
    # strings spent a third of its time in Python).
    grid = np.empty((n, len(columns)), dtype=object)
    for c, column in enumerate(columns):
        grid[:, c] = column
    return ((" ".join(formats) + "\n") * n) % tuple(grid.ravel().tolist())
