"""The compiled PCD decoders (csrc/lzf, csrc/pcd_ascii) against the pure-Python ones.

Both must give the same bytes on valid input and the same error on corrupt input; the
Python decoders are the reference and the fallback without the extension.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from v2xfuse.io import _pcd_text
from v2xfuse.io._ext import extension
from v2xfuse.io.lzf import LzfError, lzf_compress, lzf_decompress, lzf_decompress_python
from v2xfuse.io.pcd import PcdError, read_pcd, write_pcd

needs_ext = pytest.mark.skipif(extension() is None, reason="v2xfuse._C is not built")


def _outcome(fn, *args):
    try:
        return "ok", bytes(fn(*args))
    except LzfError as e:
        return "error", str(e)


def _streams(rng):
    """Valid LZF streams with literals, short, long and overlapping back-references."""
    periodic = np.tile(rng.integers(0, 256, 7, dtype=np.uint8), 900).tobytes()
    runs = np.repeat(rng.integers(0, 3, 300, dtype=np.uint8), rng.integers(1, 400, 300)).tobytes()
    floats = np.round(rng.normal(0, 20, 3000), 1).astype(np.float32).tobytes()
    noise = rng.integers(0, 256, 700, dtype=np.uint8).tobytes()
    for data in (periodic, runs, floats, noise, b"", b"ab", floats + periodic):
        yield data, lzf_compress(data)


@needs_ext
def test_compiled_lzf_agrees_with_python_on_valid_and_corrupt_streams():
    rng = np.random.default_rng(20)
    cases = 0
    for data, stream in _streams(rng):
        assert lzf_decompress(stream, len(data)) == data
        for _ in range(150):
            corrupt = bytearray(stream)
            kind = rng.integers(0, 4)
            if kind == 0 and corrupt:  # flip some bytes
                for i in rng.integers(0, len(corrupt), rng.integers(1, 4)):
                    corrupt[i] = int(rng.integers(0, 256))
            elif kind == 1:  # truncate
                corrupt = corrupt[:int(rng.integers(0, len(corrupt) + 1))]
            elif kind == 2:  # insert random bytes
                at = int(rng.integers(0, len(corrupt) + 1))
                corrupt[at:at] = rng.integers(0, 256, rng.integers(1, 5), dtype=np.uint8).tobytes()
            size = len(data) + int(rng.choice([0, 0, -1, 1, -100, 5000]))
            if size < 0:
                continue
            ours = _outcome(lzf_decompress, bytes(corrupt), size)
            assert ours == _outcome(lzf_decompress_python, bytes(corrupt), size)
            cases += 1
    assert cases > 900


@needs_ext
@pytest.mark.parametrize("stream, size, message", [
    (bytes([5, 1, 2]), 6, "literal run of 6 bytes at input offset 0 passes the end"),
    (bytes([0, 9, 0x20, 5]), 4, "back-reference 6 bytes back at output offset 1 points before"),
    (bytes([0, 9, 0xE0]), 12, "back-reference at input offset 2 is cut off"),
    (bytes([0, 9, 0xE0, 3]), 12, "back-reference at input offset 3 is cut off"),
    (bytes([0, 9, 0x20, 0]), 3, "output exceeds the expected 3 bytes"),
    (bytes([0, 9, 0x20, 0]), 5, "stream expands to 4 bytes, expected 5"),
    (bytes([0, 9]), 1000, "2 compressed bytes cannot expand to 1000 bytes"),
])
def test_compiled_lzf_names_the_corruption(stream, size, message):
    with pytest.raises(LzfError, match=message):
        lzf_decompress(stream, size)
    assert _outcome(lzf_decompress, stream, size) == _outcome(lzf_decompress_python, stream, size)


@needs_ext
def test_compiled_lzf_overlapping_reference_repeats_the_period():
    # 'ab', then a 7-byte back-reference 2 bytes back: byte-by-byte semantics give 'ababababa'.
    assert lzf_decompress(bytes([1, ord("a"), ord("b"), (5 << 5), 1]), 9) == b"ababababa"


def test_no_ext_environment_uses_the_python_decoders(tmp_path):
    path = tmp_path / "c.pcd"
    write_pcd(path, {"x": np.arange(50, dtype=np.float32)}, data="binary_compressed")
    code = ("import sys; from v2xfuse.io._ext import extension; from v2xfuse.io.pcd import read_pcd;"
            "assert extension() is None; assert 'torch' not in sys.modules;"
            f"assert read_pcd({str(path)!r})['x'].sum() == 1225")
    env = {**os.environ, "V2XFUSE_NO_EXT": "1"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


# ---- ascii ----------------------------------------------------------------------------------

HEADER = ("VERSION 0.7\nFIELDS x y i u h\nSIZE 4 8 2 1 4\nTYPE F F I U F\nCOUNT 1 1 1 1 2\n"
          "WIDTH {n}\nHEIGHT 1\nPOINTS {n}\nDATA ascii\n")


def _both(text: bytes):
    """(compiled outcome, python outcome): records as bytes, or the error message."""
    from v2xfuse.io.pcd import _parse_header
    buf = bytearray(text)
    header, offset = _parse_header(buf, "t.pcd")

    def err(problem):
        return PcdError(f"t.pcd: {problem}")

    out = []
    for parse in (_pcd_text.parse_ascii_rows, _pcd_text.parse_ascii_rows_python):
        try:
            out.append(("ok", parse(buf, offset, header, err).tobytes()))
        except PcdError as e:
            out.append(("error", str(e)))
    return out


def _rows(rng, n):
    spellings = ["nan", "-nan", "inf", "-Infinity", "+1.5", "-0", "0.0", "1e-40", "1E+05", ".5",
                 "5.", "1_000", "3.4028235e38", "1e400", "-1e-400", "2.2250738585072014e-308"]
    rows = []
    for _ in range(n):
        x = (str(rng.choice(spellings)) if rng.random() < 0.3 else
             repr(float(np.float32(rng.normal(0, 50)))))
        y = repr(float(rng.normal(0, 1e3))) if rng.random() < 0.8 else str(rng.choice(spellings))
        i = str(int(rng.integers(-32768, 32768))) if rng.random() < 0.9 else "+12"
        u = str(int(rng.integers(0, 256)))
        h = " ".join(f"{v:.9g}" for v in rng.normal(0, 1, 2))
        sep = str(rng.choice([" ", "\t", "  "]))
        rows.append(sep.join([x, y, i, u, h]))
    return rows


@needs_ext
def test_compiled_ascii_matches_python_to_the_bit():
    rng = np.random.default_rng(3)
    for trial in range(30):
        rows = _rows(rng, 200)
        end = "\r\n" if trial % 3 == 0 else "\n"
        body = end.join(rows) + (end if trial % 2 else "")
        if trial % 5 == 0:
            body = "\n  \n" + body.replace(end, end + "\t" + end, 3)  # blank lines are skipped
        text = (HEADER.format(n=len(rows)) + body).encode()
        compiled, python = _both(text)
        assert compiled[0] == "ok" and compiled == python


@needs_ext
def test_compiled_ascii_takes_the_common_spellings_itself():
    # The fast path must not quietly hand every file back to Python.
    rows = ["1.5 -2e3 7 200 nan -inf", "-0 +4 -32768 0 1e-40 .5"]
    text = (HEADER.format(n=2) + "\n".join(rows)).encode()
    from v2xfuse.io.pcd import _parse_header
    header, offset = _parse_header(bytearray(text), "t.pcd")
    assert _pcd_text._parse_compiled(extension(), bytearray(text), offset, header, PcdError) \
        is not None
    assert read_pcd(text)["h"][1].tobytes() == np.array([1e-40, 0.5], np.float32).tobytes()


@needs_ext
@pytest.mark.parametrize("rows, n, message", [
    # One row with a value too many and the next with one too few: the token and line counts
    # are both right, and the values would shift into the wrong fields.
    (["1 2 3 4 5 6 7", "1 2 3 4 5", "1 2 3 4 5 6"], 3, "data line 1 has 7 values, expected 6"),
    (["1 2 3 4 5 6", "1 2 3 4 5"], 2, "data line 2 has 5 values, expected 6"),
    (["1 2 3 4 5 6", "", "1 2 3 4 5 6"], 1, r"more rows than POINTS 1 \(extra row at data line 3"),
    (["1 2 3 4 5 6"], 2, "truncated ascii data: POINTS 2 but only 1 rows"),
    (["1 2 3 4 5 6", "1 zwei 3 4 5 6"], 2, "'y': value b'zwei' at data row 2 is not a number"),
    (["1 2 3 4 5 6", "1 2 40000 4 5 6"], 2, "'i': value b'40000' at data row 2 does not fit"),
    (["1 2 3 -4 5 6"], 1, "'u': value b'-4' at data row 1 does not fit"),
    (["1 2 3 4 5 nan(1)"], 1, "'h': value b'nan\\(1\\)' at data row 1 is not a number"),
])
def test_malformed_ascii_rows_give_the_same_named_error(rows, n, message):
    text = (HEADER.format(n=n) + "\n".join(rows) + "\n").encode()
    compiled, python = _both(text)
    assert compiled == python and compiled[0] == "error"
    assert compiled[1].startswith("t.pcd: ")
    assert __import__("re").search(message, compiled[1]), compiled[1]
