"""LZF (liblzf) compression in pure Python, as used by PCD ``DATA binary_compressed``.

Stream format (liblzf ``lzf_d.c`` semantics), a sequence of tokens each led by a control byte:

- ``ctrl < 32``: literal run; the next ``ctrl + 1`` bytes are copied to the output.
- ``ctrl >= 32``: back-reference. ``length = (ctrl >> 5) + 2``; when ``ctrl >> 5 == 7`` one more
  byte follows and is added to the length (so 3..264 bytes). Then one byte ``low`` follows and
  the copy starts ``((ctrl & 0x1f) << 8 | low) + 1`` bytes back from the current output end
  (1..8192). Source and destination may overlap: the copy is byte by byte, so an offset of 1
  repeats the last byte ``length`` times.

The stream carries no length of its own; the container (the PCD header) states the
uncompressed size and the decoder checks that the stream produces exactly that many bytes.

:func:`lzf_decompress` runs the C++ decoder of ``v2xfuse._C`` (``csrc/lzf/``) when it is built,
and this module's Python decoder (:func:`lzf_decompress_python`) otherwise or with
``V2XFUSE_NO_EXT=1``. Both make the same checks and raise the same messages.
"""
from __future__ import annotations

import numpy as np

from ._ext import extension

__all__ = ["LzfError", "lzf_compress", "lzf_decompress", "lzf_decompress_python", "MAX_EXPANSION"]

_MAX_OFFSET = 1 << 13        # back-references reach at most 8192 bytes back
_MAX_REF_LEN = 7 + 255 + 2   # 264: longest back-reference
_MAX_LITERAL = 32

# The most output one input byte can produce: a 3-byte long back-reference yields 264 bytes.
# A container claiming more than this times its compressed size is corrupt, which lets a reader
# reject a hostile size before allocating it.
MAX_EXPANSION = _MAX_REF_LEN // 3


class LzfError(ValueError):
    """A corrupt or inconsistent LZF stream."""


def lzf_decompress(data: bytes | bytearray | memoryview, out_size: int) -> bytearray:
    """Decompress an LZF stream that must expand to exactly ``out_size`` bytes.

    Same contract as :func:`lzf_decompress_python`, in C++ when the extension is built.
    """
    ext = extension()
    if ext is None or out_size < 0:  # the C++ side takes a size_t
        return lzf_decompress_python(data, out_size)
    try:
        return ext.lzf_decompress(data, out_size)
    except ValueError as e:
        raise LzfError(str(e)) from None


def lzf_decompress_python(data: bytes | bytearray | memoryview, out_size: int) -> bytearray:
    """Decompress an LZF stream that must expand to exactly ``out_size`` bytes (pure Python).

    Args:
        data: the compressed stream.
        out_size: the uncompressed size the container promises.

    Returns:
        ``out_size`` bytes (a bytearray, so numpy views of it are writable).

    Raises:
        LzfError: a run or its operands past the end of the input, a back-reference before the
            start of the output, or an output of any other length than ``out_size``.
    """
    src = bytes(data)  # indexing bytes is the fastest per-byte access Python offers
    n = len(src)
    if out_size < 0 or out_size > MAX_EXPANSION * n:
        raise LzfError(f"{n} compressed bytes cannot expand to {out_size} bytes")
    out = bytearray(out_size)
    ip = op = 0
    while ip < n:
        ctrl = src[ip]
        ip += 1
        if ctrl < 32:
            run = ctrl + 1
            if ip + run > n:
                raise LzfError(f"literal run of {run} bytes at input offset {ip - 1} passes the "
                               f"end of the input ({n} bytes)")
            if op + run > out_size:
                raise LzfError(f"output exceeds the expected {out_size} bytes")
            out[op:op + run] = src[ip:ip + run]
            ip += run
            op += run
            continue
        length = ctrl >> 5
        if length == 7:
            if ip >= n:
                raise LzfError(f"back-reference at input offset {ip - 1} is cut off by the end "
                               f"of the input")
            length += src[ip]
            ip += 1
        length += 2
        if ip >= n:
            raise LzfError(f"back-reference at input offset {ip - 1} is cut off by the end of "
                           f"the input")
        distance = ((ctrl & 0x1F) << 8 | src[ip]) + 1
        ip += 1
        ref = op - distance
        if ref < 0:
            raise LzfError(f"back-reference {distance} bytes back at output offset {op} points "
                           f"before the start of the output")
        if op + length > out_size:
            raise LzfError(f"output exceeds the expected {out_size} bytes")
        if distance >= length:
            out[op:op + length] = out[ref:ref + length]
        else:
            # Overlapping copy: the byte-by-byte semantics repeat the last `distance` bytes.
            period = out[ref:op]
            out[op:op + length] = (period * (length // distance + 1))[:length]
        op += length
    if op != out_size:
        raise LzfError(f"stream expands to {op} bytes, expected {out_size}")
    return out


def _emit_literals(out: bytearray, src: bytes, start: int, stop: int) -> None:
    for i in range(start, stop, _MAX_LITERAL):
        chunk = src[i:min(i + _MAX_LITERAL, stop)]
        out.append(len(chunk) - 1)
        out += chunk


def lzf_compress(data: bytes | bytearray | memoryview) -> bytes:
    """Compress with a greedy single-probe hash table (the liblzf strategy, without its tricks).

    Any valid stream is fine for PCD (readers only decompress), so this favours simplicity; it
    is pure Python and runs at roughly 1-2 MB/s.

    Returns:
        the LZF stream; ``lzf_decompress(result, len(data)) == data``. Empty input gives b"".
    """
    src = bytes(data)
    n = len(src)
    out = bytearray()
    if n < 3:
        _emit_literals(out, src, 0, n)
        return bytes(out)
    u = np.frombuffer(src, dtype=np.uint8).astype(np.int32)
    keys = ((u[:-2] << 16) | (u[1:-1] << 8) | u[2:]).tolist()  # the 3 bytes starting at each i
    last_seen: dict[int, int] = {}
    literal_start = 0
    i = 0
    limit = n - 2
    while i < limit:
        key = keys[i]
        ref = last_seen.get(key)
        last_seen[key] = i
        if ref is None or i - ref > _MAX_OFFSET:
            i += 1
            continue
        # The key guarantees 3 equal bytes; extend 8 bytes at a time, then byte by byte.
        max_len = min(_MAX_REF_LEN, n - i)
        length = 3
        while length + 8 <= max_len and src[ref + length:ref + length + 8] == \
                src[i + length:i + length + 8]:
            length += 8
        while length < max_len and src[ref + length] == src[i + length]:
            length += 1
        _emit_literals(out, src, literal_start, i)
        distance = i - ref - 1
        code = length - 2
        if code < 7:
            out.append((code << 5) | (distance >> 8))
        else:
            out.append((7 << 5) | (distance >> 8))
            out.append(code - 7)
        out.append(distance & 0xFF)
        # Index the match's last position too, so runs keep finding nearby references.
        end = i + length
        if end - 1 < limit:
            last_seen[keys[end - 1]] = end - 1
        i = end
        literal_start = i
    _emit_literals(out, src, literal_start, n)
    return bytes(out)
