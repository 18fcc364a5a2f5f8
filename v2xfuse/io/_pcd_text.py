"""The ``DATA ascii`` body of a PCD file: parsing with exact diagnostics, and formatting.

Kept apart from :mod:`v2xfuse.io.pcd` because it is the only part that works row by row.
With the extension built, the C++ parser of ``v2xfuse._C`` (``csrc/pcd_ascii/``) reads the
body into the records in one pass; it takes a strict subset of the spellings Python's
``float()``/``int()`` take and hands anything else (a non-number, an out-of-range value, an
unusual spelling such as ``1_000``) back to the Python parser, which then decides and says
what is wrong. The Python parser splits the whole body into tokens once and lets numpy
convert each field's column; only when the token count or a row's value count disagrees with
the header does it walk the rows to say which row is wrong. Both give the same values to the
bit and the same errors.
"""
from __future__ import annotations

import numpy as np

from ._ext import extension

__all__ = ["parse_ascii_rows", "parse_ascii_rows_python", "format_ascii_rows"]

# bytes.split() separators (Py_ISSPACE): space \t \n \v \f \r.
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D]] = True
_NEWLINE = 0x0A

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


def _extra_row(header, line_no: int, err) -> Exception:
    return err(f"ascii data has more rows than POINTS {header.points} (extra row at data line "
               f"{line_no})")


def _wrong_width(header, line_no: int, found: int, width: int, err) -> Exception:
    return err(f"ascii data line {line_no} has {found} values, expected {width} (fields "
               f"{' '.join(header.fields)})")


def _truncated(header, rows: int, err) -> Exception:
    return err(f"truncated ascii data: POINTS {header.points} but only {rows} rows")


def _diagnose_rows(body: bytes, header, width: int, err) -> Exception:
    """Walk the rows to find the first one that breaks the header's promise."""
    rows = 0
    for line_no, line in enumerate(body.split(b"\n"), start=1):
        values = line.split()
        if not values:
            continue
        rows += 1
        if rows > header.points:
            return _extra_row(header, line_no, err)
        if len(values) != width:
            return _wrong_width(header, line_no, len(values), width, err)
    return _truncated(header, rows, err)


def _rows_have_width(body: bytes, width: int, points: int) -> bool:
    """Whether exactly ``points`` lines hold values and each holds ``width`` of them.

    Counting all tokens is not enough: a row with one value too many and another with one
    too few keep the total right and would shift every value in between to another field.
    """
    if not body:
        return points == 0
    b = np.frombuffer(body, dtype=np.uint8)
    space = _SPACE[b]
    starts = ~space
    starts[1:] &= space[:-1]
    line_of = np.cumsum(b == _NEWLINE, dtype=np.int64)
    per_line = np.bincount(line_of[starts])
    per_line = per_line[per_line > 0]
    return len(per_line) == points and bool(np.all(per_line == width))


def _convert(tokens: list, dtype: np.dtype, name: str, rows_of, err) -> np.ndarray:
    """``rows_of(i)`` maps a token's index in ``tokens`` to its 0-based data row."""
    try:
        if dtype.kind == "f":
            return np.array(tokens, dtype=np.float64).astype(dtype)
        wide = np.array(tokens, dtype=np.uint64 if dtype.kind == "u" else np.int64)
    except (ValueError, OverflowError):
        info = np.finfo(dtype) if dtype.kind == "f" else np.iinfo(dtype)
        for i, token in enumerate(tokens):
            try:
                value = (float if dtype.kind == "f" else int)(token)
            except ValueError:
                raise err(f"field {name!r}: value {token[:32]!r} at data row {rows_of(i) + 1} is "
                          f"not a number") from None
            if dtype.kind != "f" and not info.min <= value <= info.max:
                raise err(f"field {name!r}: value {token[:32]!r} at data row {rows_of(i) + 1} "
                          f"does not fit {dtype}") from None
        raise err(f"field {name!r}: a value does not fit {dtype}") from None
    info = np.iinfo(dtype)
    bad = np.flatnonzero((wide < info.min) | (wide > info.max)) if wide.size else []
    if len(bad):
        raise err(f"field {name!r}: value {tokens[bad[0]]!r} at data row {rows_of(bad[0]) + 1} "
                  f"does not fit {dtype}")
    return wide.astype(dtype)


def _parse_compiled(ext, buf: bytearray, offset: int, header, err):
    """The C++ parse into a new (POINTS,) structured array, or None to let Python decide."""
    fields, width = _columns(header)
    columns = []
    for name, _, count, base in fields:
        if base.kind == "f" and base.itemsize == 2:
            return None  # float64 -> float16 rounding is left to numpy
        start = header.dtype.fields[name][1]
        columns += [(base.kind, base.itemsize, start + c * base.itemsize) for c in range(count)]
    out = np.empty(header.points, dtype=header.dtype)
    status, line_no, found = ext.pcd_ascii_parse(
        memoryview(buf)[offset:], header.points, tuple(columns), header.row_bytes,
        out.view(np.uint8) if header.points else bytearray(header.row_bytes))
    if status == 0:
        return out
    if status == 1:
        raise _wrong_width(header, line_no, found, width, err)
    if status == 2:
        raise _extra_row(header, line_no, err)
    if status == 3:
        raise _truncated(header, found, err)
    return None


def parse_ascii_rows(buf: bytearray, offset: int, header, err) -> np.ndarray:
    """Parse the ascii body starting at ``buf[offset]`` into a (POINTS,) structured array.

    The C++ parser when the extension is built, else (or when it leaves a value to Python)
    :func:`parse_ascii_rows_python`; arguments, result and errors as there.
    """
    ext = extension()
    if ext is not None:
        out = _parse_compiled(ext, buf, offset, header, err)
        if out is not None:
            return out
    return parse_ascii_rows_python(buf, offset, header, err)


def parse_ascii_rows_python(buf: bytearray, offset: int, header, err) -> np.ndarray:
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
    # Only walk the rows (slow) when something is off.
    if len(tokens) != header.points * width or not _rows_have_width(body, width, header.points):
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
