"""dataset.cache_dir: decoded point clouds on disk (v2xfuse/datasets/point_cache.py)."""
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from v2xfuse.datasets import DairV2XCAdapter, Opv2vAdapter
from v2xfuse.datasets.base import DatasetError, load_point_file
from v2xfuse.datasets.point_cache import HEADER, DiskPointCache
from v2xfuse.sim import SimConfig, generate_dataset


def write_ascii_pcd(path: Path, points: np.ndarray) -> None:
    head = ("# .PCD v0.7\nVERSION 0.7\nFIELDS x y z intensity\nSIZE 4 4 4 4\nTYPE F F F F\n"
            f"COUNT 1 1 1 1\nWIDTH {len(points)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
            f"POINTS {len(points)}\nDATA ascii\n")
    path.write_text(head + "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in points))


class Decoder:
    """load_point_file on ``path``, counting its calls."""

    def __init__(self, path: Path):
        self.path, self.calls = path, 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return load_point_file(self.path)


@pytest.fixture
def source(tmp_path):
    data = tmp_path / "dataset"
    data.mkdir()
    path = data / "000068.pcd"
    pts = np.random.default_rng(0).uniform(-50, 50, (300, 4)).astype(np.float32)
    write_ascii_pcd(path, pts)
    return path, load_point_file(path)


def entries(cache: DiskPointCache) -> list[Path]:
    return sorted(cache.dir.rglob("*.pts"))


def test_miss_then_hit_serves_the_same_points_read_only(source, tmp_path):
    path, expected = source
    cache = DiskPointCache(tmp_path / "cache", [path.parent], "test")
    decode = Decoder(path)
    first = cache.get(path, decode)
    second = cache.get(path, decode)
    assert decode.calls == 1 and dict(cache.stats) == {"misses": 1, "hits": 1}
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected)
    assert second.dtype == np.float32 and not second.flags.writeable  # mapped, never modified
    # a new process / run: a new cache object on the same folder hits without decoding
    again = DiskPointCache(tmp_path / "cache", [path.parent], "test")
    np.testing.assert_array_equal(again.get(path, decode), expected)
    assert decode.calls == 1 and again.stats["hits"] == 1
    (entry,) = entries(cache)
    assert entry.stat().st_size == HEADER.size + expected.nbytes
    # another decoding of the same file (another adapter's variant) is another entry
    other = DiskPointCache(tmp_path / "cache", [path.parent], "other")
    other.get(path, decode)
    assert decode.calls == 2 and len(entries(cache)) == 2


def test_empty_cloud_round_trips(tmp_path):
    path = tmp_path / "data" / "empty.pcd"
    path.parent.mkdir()
    write_ascii_pcd(path, np.zeros((0, 4), np.float32))
    cache = DiskPointCache(tmp_path / "cache", [path.parent], "test")
    decode = Decoder(path)
    assert cache.get(path, decode).shape == (0, 4)
    assert cache.get(path, decode).shape == (0, 4) and decode.calls == 1


def test_changed_or_touched_source_is_decoded_again_and_old_entry_removed(source, tmp_path):
    path, expected = source
    cache = DiskPointCache(tmp_path / "cache", [path.parent], "test")
    decode = Decoder(path)
    cache.get(path, decode)
    (old,) = entries(cache)
    # touched: same bytes, newer mtime
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    np.testing.assert_array_equal(cache.get(path, decode), expected)
    assert decode.calls == 2
    (touched,) = entries(cache)
    assert touched != old and not old.exists()
    # rewritten with other points (other size)
    changed = expected[:100] * 2
    write_ascii_pcd(path, changed)
    np.testing.assert_array_equal(cache.get(path, decode), load_point_file(path))
    np.testing.assert_array_equal(cache.get(path, decode), load_point_file(path))
    assert decode.calls == 3 and len(entries(cache)) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "header", "empty", "foreign"])
def test_corrupt_entry_is_reported_decoded_again_and_replaced(source, tmp_path, caplog, damage):
    path, expected = source
    cache = DiskPointCache(tmp_path / "cache", [path.parent], "test")
    decode = Decoder(path)
    cache.get(path, decode)
    (entry,) = entries(cache)
    raw = bytearray(entry.read_bytes())
    if damage == "truncate":
        raw = raw[:-7]
    elif damage == "flip_payload":
        raw[HEADER.size + 123] ^= 0x40
    elif damage == "header":
        raw[:8] = b"garbage!"
    elif damage == "empty":
        raw = bytearray()
    else:  # a valid entry of another file copied under this name
        other = path.with_name("other.pcd")
        write_ascii_pcd(other, expected[:10])
        cache.get(other, Decoder(other))
        raw = bytearray(next(e for e in entries(cache) if e != entry).read_bytes())
    entry.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="v2xfuse.datasets.point_cache"):
        got = cache.get(path, decode)
    np.testing.assert_array_equal(got, expected)
    assert decode.calls == 2 and cache.stats["corrupt"] == 1
    assert str(entry) in caplog.text and "corrupt point cache entry" in caplog.text
    # replaced by a good entry: the next read hits
    np.testing.assert_array_equal(cache.get(path, decode), expected)
    assert decode.calls == 2


def test_refuses_a_cache_inside_or_around_the_dataset_root(tmp_path):
    root = tmp_path / "OPV2V"
    root.mkdir()
    for inside in (root, root / "cache", root / "train" / "cache"):
        with pytest.raises(ValueError, match="dataset.cache_dir .* is inside the dataset root"):
            DiskPointCache(inside, [root], "test")
    with pytest.raises(ValueError, match="contains the dataset root"):
        DiskPointCache(tmp_path, [root], "test")
    (tmp_path / "link").symlink_to(root)
    with pytest.raises(ValueError, match="is inside the dataset root"):
        DiskPointCache(tmp_path / "link" / "cache", [root], "test")
    assert sorted(p.name for p in root.rglob("*")) == []  # nothing was created inside
    DiskPointCache(tmp_path / "cache", [root], "test")  # beside it is fine


def test_source_changing_while_decoded_is_served_but_not_cached(source, tmp_path):
    path, expected = source
    cache = DiskPointCache(tmp_path / "cache", [path.parent], "test")

    def decode_while_rewritten():
        pts = load_point_file(path)
        write_ascii_pcd(path, expected[:5])
        return pts

    np.testing.assert_array_equal(cache.get(path, decode_while_rewritten), expected)
    assert cache.stats["unstable"] == 1 and entries(cache) == []


def test_missing_source_is_the_decoders_error(tmp_path):
    cache = DiskPointCache(tmp_path / "cache", [tmp_path / "data"], "test")
    missing = tmp_path / "data" / "000001.pcd"
    with pytest.raises(DatasetError, match="000001.pcd: point cloud file is missing"):
        cache.get(missing, Decoder(missing))


def test_unwritable_cache_serves_decoded_points(source, tmp_path, monkeypatch):
    path, expected = source
    cache = DiskPointCache(tmp_path / "cache", [path.parent], "test")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    decode = Decoder(path)
    np.testing.assert_array_equal(cache.get(path, decode), expected)
    np.testing.assert_array_equal(cache.get(path, decode), expected)
    assert decode.calls == 2 and cache.stats["write_errors"] == 2
    assert not [p for p in cache.dir.rglob("*") if p.is_file()]  # no entry, no tmp left


# ---- several processes ----------------------------------------------------------------------
def _hammer(cache_dir, sources, barrier, rounds, out):
    """Every round, rewrite each source's entry (what a miss does) and read it back; report the
    stats and whether every read matched the decoded points."""
    cache = DiskPointCache(cache_dir, [Path(sources[0]).parent], "test")
    expected = [load_point_file(Path(s)) for s in sources]
    barrier.wait()
    ok = True
    for _ in range(rounds):
        for s, pts in zip(sources, expected):
            got = cache.get(s, lambda s=s: load_point_file(Path(s)))  # a miss unless the other wrote it
            ok &= bool(np.array_equal(got, pts))
            entry, digest = cache.entry_path(s)
            cache._write(entry, digest, pts)  # the other process reads while this renames
    out.put((ok, dict(cache.stats)))


def test_two_processes_writing_the_same_entries(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    sources = []
    for i in range(4):
        write_ascii_pcd(data / f"{i:06d}.pcd", rng.normal(0, 20, (2000, 4)).astype(np.float32))
        sources.append(str(data / f"{i:06d}.pcd"))
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(tmp_path / "cache", sources, barrier, 40, out))
             for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for ok, stats in results:
        # a process can find every entry already written by the other and never miss
        assert ok and stats.get("corrupt", 0) == 0
        assert stats.get("hits", 0) + stats.get("misses", 0) == 160
    cache = DiskPointCache(tmp_path / "cache", [data], "test")
    assert len(list(cache.dir.rglob("*.pts"))) == 4 and not list(cache.dir.rglob("*.tmp"))
    for s in sources:
        np.testing.assert_array_equal(cache.get(s, lambda: pytest.fail("should hit")),
                                      load_point_file(Path(s)))


# ---- through the adapters -------------------------------------------------------------------
@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    base = tmp_path_factory.mktemp("gen")
    cfg = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 256, "beams": 8},
                               "rsu_lidar": {"azimuth_steps": 256, "beams": 8},
                               "scene": {"n_cavs": 2, "n_rsus": 1}})
    cfg.cameras = False
    for fmt in ("opv2v", "dair"):
        generate_dataset(fmt, base / fmt, n_scenes=1, n_frames=2, seed=3, cfg=cfg,
                         splits={"train": 1.0}, progress=False)
    return base


@pytest.mark.parametrize("fmt", ["opv2v", "dair"])
def test_adapters_serve_identical_points_from_cache_and_source(generated, tmp_path, fmt):
    root = generated / fmt
    make = ((lambda **kw: Opv2vAdapter(root, "train", max_agents=8, comm_range=1e3, **kw))
            if fmt == "opv2v" else (lambda **kw: DairV2XCAdapter(root, "train", **kw)))
    plain = make()
    first, second = make(cache_dir=tmp_path / "cache"), make(cache_dir=tmp_path / "cache")
    n_agents = 0
    for idx in range(len(plain)):
        truth = plain.load(idx)
        for adapter in (first, second, second):
            frame = adapter.load(idx)
            assert [a.agent_id for a in frame.agents] == [a.agent_id for a in truth.agents]
            for got, want in zip(frame.agents, truth.agents):
                assert got.points.dtype == np.float32
                np.testing.assert_array_equal(got.points, want.points)
        n_agents += len(truth.agents)
    assert first.points.disk.stats["misses"] == n_agents and first.points.disk.stats["hits"] == 0
    assert second.points.disk.stats["hits"] == 2 * n_agents and second.points.disk.stats["misses"] == 0


def test_adapters_refuse_a_cache_in_the_dataset(generated):
    opv2v = generated / "opv2v"
    with pytest.raises(ValueError, match=f"is inside the dataset root {opv2v}"):
        Opv2vAdapter(opv2v, "train", cache_dir=opv2v / "train" / "cache")
    dair = generated / "dair"  # the folder above the dataset folder counts as its root too
    for inside in (dair / "cache", dair / "cooperative-vehicle-infrastructure" / "cache"):
        with pytest.raises(ValueError, match="is inside the dataset root"):
            DairV2XCAdapter(dair, "train", cache_dir=inside)
    assert not list(generated.rglob("cache"))
