"""PCD codec: round trips in every encoding, Open3D's packed intensity, LZF, and bad input."""
import io
import struct

import numpy as np
import pytest

from v2xfuse.io.lzf import LzfError, lzf_compress, lzf_decompress
from v2xfuse.io.pcd import (PcdError, read_pcd, read_points, write_pcd, write_points_dair,
                            write_points_opv2v)

ENCODINGS = ("ascii", "binary", "binary_compressed")


def _fields(rng, n):
    return {
        "x": rng.normal(0, 50, n).astype(np.float32),
        "y": rng.normal(0, 50, n).astype(np.float32),
        "z": rng.normal(0, 2, n).astype(np.float32),
        "intensity": rng.uniform(0, 255, n).astype(np.float32),
        "ring": rng.integers(0, 64, n).astype(np.uint16),
        "t": rng.normal(0, 1, n).astype(np.float64),
        "label": rng.integers(-5, 5, n).astype(np.int8),
        "hist": rng.normal(0, 1, (n, 3)).astype(np.float32),
    }


@pytest.mark.parametrize("data", ENCODINGS)
def test_round_trip_every_encoding_is_exact(tmp_path, data):
    fields = _fields(np.random.default_rng(0), 500)
    path = tmp_path / f"cloud_{data}.pcd"
    write_pcd(path, fields, data=data)
    got = read_pcd(path)
    assert got.header.data == data and got.header.points == 500
    assert got.header.counts == (1, 1, 1, 1, 1, 1, 1, 3)
    for name, values in fields.items():
        assert got[name].dtype == values.dtype, name
        np.testing.assert_array_equal(got[name], values, err_msg=name)


def test_organised_cloud_and_empty_cloud(tmp_path):
    xyz = np.arange(12, dtype=np.float32)
    write_pcd(tmp_path / "org.pcd", {"x": xyz, "y": xyz, "z": xyz}, height=3)
    header = read_pcd(tmp_path / "org.pcd").header
    assert (header.width, header.height, header.points) == (4, 3, 12)
    for data in ENCODINGS:
        write_pcd(tmp_path / "empty.pcd", {"x": xyz[:0], "y": xyz[:0], "z": xyz[:0]}, data=data)
        assert read_points(tmp_path / "empty.pcd").shape == (0, 4)


def test_opv2v_packed_intensity_keeps_subnormals(tmp_path):
    # Every red value 0..255: below 128 the packed float is subnormal and must survive.
    red = np.arange(256)
    xyz = np.stack([red * 0.5, -red * 0.25, red * 0.0 + 1.5], 1).astype(np.float32)
    write_points_opv2v(tmp_path / "a.pcd", xyz, red / 255.0)
    text = (tmp_path / "a.pcd").read_text()
    assert "FIELDS x y z rgb" in text and "DATA ascii" in text
    raw = read_pcd(tmp_path / "a.pcd")["rgb"]
    bits = raw.view(np.uint32)
    np.testing.assert_array_equal(bits, red.astype(np.uint32) << 16)
    assert np.count_nonzero(raw[1:128]) == 127, "subnormal packed colours were flushed to zero"
    pts = read_points(tmp_path / "a.pcd")
    np.testing.assert_array_equal(pts[:, :3], xyz)
    np.testing.assert_array_equal(pts[:, 3], (red / 255.0).astype(np.float32))


def test_packed_rgb_read_from_binary_uint_field(tmp_path):
    packed = (np.array([0, 7, 200, 255], np.uint32) << 16) | np.uint32(0xFF00FFFF)
    zeros = np.zeros(4, np.float32)
    write_pcd(tmp_path / "u.pcd", {"x": zeros, "y": zeros, "z": zeros, "rgb": packed})
    np.testing.assert_array_equal(read_points(tmp_path / "u.pcd", intensity="rgb")[:, 3],
                                  (np.array([0, 7, 200, 255]) / 255.0).astype(np.float32))


def test_dair_intensity_is_the_raw_field(tmp_path):
    xyz = np.ones((3, 3), np.float32)
    write_points_dair(tmp_path / "d.pcd", xyz, np.array([0.0, 17.0, 255.0]))
    assert b"DATA binary" in (tmp_path / "d.pcd").read_bytes()
    np.testing.assert_array_equal(read_points(tmp_path / "d.pcd")[:, 3], [0, 17, 255])


def test_lzf_known_stream_with_overlapping_reference():
    # literal "abc" (ctrl 2), then a 7-byte reference 3 back (ctrl (7-2)<<5, low 2): overlapping.
    stream = bytes([2]) + b"abc" + bytes([5 << 5, 2])
    assert bytes(lzf_decompress(stream, 10)) == b"abcabcabca"
    # long form: ctrl 7<<5 plus an extra length byte; 20-byte run of the previous byte
    stream = bytes([0]) + b"z" + bytes([7 << 5, 20 - 2 - 7, 0])
    assert bytes(lzf_decompress(stream, 21)) == b"z" * 21


@pytest.mark.parametrize("payload", [b"", b"ab", b"abcabcabcabc" * 50,
                                     np.random.default_rng(1).bytes(5000),
                                     np.arange(4000, dtype=np.float32).tobytes()])
def test_lzf_round_trip(payload):
    stream = lzf_compress(payload)
    assert bytes(lzf_decompress(stream, len(payload))) == payload


@pytest.mark.parametrize("stream,size,problem", [
    (bytes([5]) + b"ab", 6, "passes the end"),
    (bytes([0]) + b"a" + bytes([1 << 5, 9]), 4, "before the start"),
    (bytes([0]) + b"a", 5, "expands to 1"),
    (bytes([0]) + b"a" + bytes([7 << 5]), 20, "cut off"),
])
def test_lzf_rejects_corrupt_streams(stream, size, problem):
    with pytest.raises(LzfError, match=problem):
        lzf_decompress(stream, size)


def _header(**over):
    keys = {"VERSION": "0.7", "FIELDS": "x y z", "SIZE": "4 4 4", "TYPE": "F F F",
            "COUNT": "1 1 1", "WIDTH": "2", "HEIGHT": "1", "VIEWPOINT": "0 0 0 1 0 0 0",
            "POINTS": "2", "DATA": "binary"}
    keys.update(over)
    return "".join(f"{k} {v}\n" for k, v in keys.items() if v is not None).encode()


TWO_POINTS = np.arange(6, dtype=np.float32).tobytes()


@pytest.mark.parametrize("blob,problem", [
    (b"", "file is empty"),
    (_header(DATA=None) + TWO_POINTS, "no DATA line|not ASCII"),
    (_header(POINTS=None), "lacks POINTS"),
    (_header(SIZE="4 4"), "SIZE has 2 entries"),
    (_header(TYPE="F F Q"), "TYPE Q"),
    (_header(WIDTH="3"), r"WIDTH 3 \* HEIGHT 1 != POINTS 2"),
    (_header(POINTS="-1", WIDTH="-1"), "not a non-negative integer"),
    (_header(DATA="zip"), "unknown DATA encoding"),
    (_header(FIELDS="x x z"), "more than once"),
    (_header(COUNT="1 1 99999999"), "implausibly large"),
    (_header(VIEWPOINT="0 0 0"), "VIEWPOINT needs 7"),
    (b"FOO 1\n" + _header(), "unknown header key 'FOO'"),
    (_header() + TWO_POINTS[:-3], "truncated binary data: 2 points of 12 bytes need 24 bytes, "
                                  "found 21"),
    # A hostile header promising 4 billion points must fail on the size check, not allocate.
    (_header(WIDTH="4000000000", POINTS="4000000000") + TWO_POINTS, "truncated binary data"),
    (_header(DATA="ascii") + b"1 2 3\n", "only 1 rows"),
    (_header(DATA="ascii") + b"1 2 3\n4 5\n", "line 2 has 2 values"),
    (_header(DATA="ascii") + b"1 2 3\n4 5 6\n7 8 9\n", "more rows than POINTS"),
    (_header(DATA="ascii") + b"1 2 3\n4 five 6\n", "field 'y': value b'five' at data row 2"),
    (_header(DATA="ascii", TYPE="F F U", SIZE="4 4 1") + b"1 2 3\n4 5 300\n", "does not fit"),
    # The header says fewer points than the file holds: an error, never a silent prefix.
    (_header(POINTS="1", WIDTH="1") + TWO_POINTS, "header inconsistent with the data size: "
                                                  "POINTS 1 of 12 bytes need 12 bytes, the file "
                                                  r"holds 24 \(1 more points\)"),
    (_header() + TWO_POINTS + b"\n", r"holds 25 \(1 bytes too many\)"),
    (_header(DATA="ascii", POINTS="1", WIDTH="1") + b"1 2 3\n4 5 6\n", "more rows than POINTS 1"),
    (_header(DATA="ascii", POINTS="3", WIDTH="3") + b"1 2 3\n4 5 6\n", "POINTS 3 but only 2 rows"),
    (_header(DATA="binary_compressed", POINTS="0", WIDTH="0") + b"abc", "need 8 bytes of sizes"),
    (_header(DATA="binary_compressed") + struct.pack("<II", 10, 24), "truncated binary_compr"),
    (_header(DATA="binary_compressed") + struct.pack("<II", 4, 25) + b"abcd",
     "uncompressed size 25 != 24"),
    (_header(DATA="binary_compressed") + struct.pack("<II", 0, 24),
     "cannot expand"),
    (_header(DATA="binary_compressed") + struct.pack("<II", 3, 24) + bytes([5, 1, 2]),
     "corrupt binary_compressed"),
])
def test_bad_files_raise_pcd_error_naming_the_file(tmp_path, blob, problem):
    path = tmp_path / "bad.pcd"
    path.write_bytes(blob)
    with pytest.raises(PcdError, match=problem) as info:
        read_pcd(path)
    assert str(path) in str(info.value)


def test_fuzzed_files_only_raise_pcd_error():
    rng = np.random.default_rng(7)
    fields = _fields(rng, 40)
    blobs = []
    for data in ENCODINGS:
        buf = io.BytesIO()
        write_pcd(buf, fields, data=data)
        blobs.append(buf.getvalue())
    for trial in range(1500):
        blob = bytearray(blobs[trial % 3])
        action = rng.integers(3)
        if action == 0:
            del blob[rng.integers(len(blob)):]
        elif action == 1:
            for at in rng.integers(0, len(blob), rng.integers(1, 8)):
                blob[at] = rng.integers(256)
        else:
            at = rng.integers(len(blob))
            blob[at:at] = rng.bytes(int(rng.integers(1, 16)))
        try:
            read_pcd(bytes(blob))
        except PcdError:
            pass


def test_read_points_requires_xyz(tmp_path):
    write_pcd(tmp_path / "a.pcd", {"x": np.zeros(2, np.float32), "y": np.zeros(2, np.float32)})
    with pytest.raises(PcdError, match="field 'z'"):
        read_points(tmp_path / "a.pcd")


@pytest.mark.parametrize("ascii_", [True, False])
def test_matches_open3d_written_files(tmp_path, ascii_):
    o3d = pytest.importorskip("open3d")
    rng = np.random.default_rng(3)
    xyz = rng.normal(0, 30, (2000, 3))
    red = rng.integers(0, 256, 2000)
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
    colours = np.zeros((2000, 3))
    colours[:, 0] = red / 255.0
    cloud.colors = o3d.utility.Vector3dVector(colours)
    path = str(tmp_path / "o3d.pcd")
    assert o3d.io.write_point_cloud(path, cloud, write_ascii=ascii_)
    ours = read_points(path)
    theirs = o3d.io.read_point_cloud(path)
    np.testing.assert_array_equal(ours[:, :3], np.asarray(theirs.points).astype(np.float32))
    np.testing.assert_array_equal(ours[:, 3],
                                  np.asarray(theirs.colors)[:, 0].astype(np.float32))
    np.testing.assert_array_equal(ours[:, 3], (red / 255.0).astype(np.float32))


def test_compressed_stream_followed_by_more_bytes_is_an_error(tmp_path):
    xyz = np.arange(12, dtype=np.float32).reshape(4, 3)
    buf = io.BytesIO()
    write_pcd(buf, {"x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2]}, data="binary_compressed")
    assert len(read_pcd(buf.getvalue())) == 4
    with pytest.raises(PcdError, match="header inconsistent with the data size: binary_compressed "
                                       "stream of .* bytes is followed by 5 more"):
        read_pcd(buf.getvalue() + b"extra")
