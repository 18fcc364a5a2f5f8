"""Decoded point clouds on disk (``dataset.cache_dir``): decode a PCD once, memory-map it after.

Parsing a PCD (ascii above all) costs far more than reading the same points as a raw array.
:class:`DiskPointCache` writes each decoded cloud once, as a raw little-endian float32 array
behind a 64-byte header, and later epochs, DataLoader workers and runs map it read-only.

**Key.** An entry is named by a hash of what its points depend on: the source's real path,
its size and its mtime (ns), the adapter's ``variant`` (what the adapter does after parsing:
OPV2V flips y, DAIR-V2X divides intensity) and :data:`FORMAT_VERSION`. A rewritten or touched
source therefore has a new key and is decoded again; its older entries (same path and variant,
other size/mtime) are removed when the new one is written. A source rewritten within the same
mtime tick at the same size cannot be told apart (the cost of not hashing the source).

**Never trusted.** Every hit checks the header (magic, version, the key's digest, shape), that
the file size is exactly header + payload, and the payload's CRC-32. An entry failing any of
them is logged (naming the entry and the source), counted in ``stats["corrupt"]``, decoded
again and replaced.

**Atomic, lock-free.** A miss writes a uniquely named temporary file in the entry's folder and
renames it over the entry (``os.replace``, atomic on POSIX), so a reader sees a whole entry or
none, a killed run leaves at most a ``.tmp`` file (never read; removed by a later miss of the
same source once an hour old), and workers that miss the same cloud at once each write the
same bytes, the last rename winning. No fsync: a torn entry after a power cut fails the size or
CRC check and is decoded again. A failed write (disk full, read-only folder) is logged once,
counted in ``stats["write_errors"]``, and the decoded points are served anyway.

**Never inside the dataset.** The cache folder may neither lie inside a dataset root nor
contain one (:func:`check_outside`): a dataset folder stays exactly as released.

Layout: ``<cache_dir>/<2 hex>/<20 hex path key>-<16 hex version key>.pts``.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import mmap
import os
import secrets
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

__all__ = ["DiskPointCache", "FORMAT_VERSION", "HEADER", "check_outside"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the header or what an adapter decodes changes
MAGIC = b"v2xpts\n\x00"
# magic, version, columns, rows, payload crc32, reserved, key digest (16 bytes), padding to 64
HEADER = struct.Struct("<8sIIQII16s16x")
assert HEADER.size == 64  # keeps the float32 payload aligned
STALE_TMP_S = 3600.0


def check_outside(cache_dir: Path, roots: Iterable[Path], what: str = "dataset.cache_dir") -> Path:
    """``cache_dir`` made absolute (symlinks resolved); a ValueError naming both folders when it
    is a dataset root, lies inside one or contains one."""
    cache = Path(os.path.realpath(cache_dir))
    for root in roots:
        real = Path(os.path.realpath(root))
        if cache == real or real in cache.parents:
            raise ValueError(f"{what} {cache_dir} is inside the dataset root {root}: the cache "
                             f"never writes into a dataset; choose a folder outside it "
                             f"(e.g. work_dirs/cache/points)")
        if cache in real.parents:
            raise ValueError(f"{what} {cache_dir} contains the dataset root {root}: choose a "
                             f"folder that holds no dataset (e.g. work_dirs/cache/points)")
    return cache


class DiskPointCache:
    """Decoded (N, C) float32 point clouds, keyed by source path, size and mtime.

    Args:
        cache_dir: the cache folder (created if missing).
        roots: the dataset's root folder(s); ``cache_dir`` must lie outside them.
        variant: what the adapter does to the parsed points (part of the key), e.g.
            ``"opv2v:flip_y"``.

    ``stats`` counts, in this process: ``hits``, ``misses``, ``corrupt`` (entries found bad and
    replaced), ``write_errors`` and ``unstable`` (sources that changed while being decoded,
    served but not cached).
    """

    def __init__(self, cache_dir: str | os.PathLike, roots: Iterable[str | os.PathLike], variant: str):
        self.dir = check_outside(Path(cache_dir), [Path(r) for r in roots])
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"dataset.cache_dir {cache_dir}: cannot create it: {e.strerror or e}") from e
        self.variant = str(variant)
        self.stats: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"DiskPointCache({str(self.dir)!r}, variant={self.variant!r})"

    # ---- naming ---------------------------------------------------------------------------
    def entry_path(self, source: str | os.PathLike) -> tuple[Path, bytes] | None:
        """(entry file, 16-byte key digest) of ``source`` as it is now, or None when it cannot
        be stat'ed (the decoder then reports the problem in its own words)."""
        real = os.path.realpath(source)
        try:
            st = os.stat(real)
        except OSError:
            return None
        return self._entry(real, st)

    def _entry(self, real: str, st: os.stat_result) -> tuple[Path, bytes]:
        where = hashlib.sha256(f"{self.variant}\0{real}".encode("utf-8", "surrogatepass")).hexdigest()[:20]
        version = hashlib.sha256(f"{where}\0{st.st_size}\0{st.st_mtime_ns}\0{FORMAT_VERSION}".encode())
        return self.dir / where[:2] / f"{where}-{version.hexdigest()[:16]}.pts", version.digest()[:16]

    # ---- the one call adapters make -------------------------------------------------------
    def get(self, source: str | os.PathLike, decode: Callable[[], np.ndarray]) -> np.ndarray:
        """The points of ``source``: mapped read-only from a valid entry, else ``decode()``
        (which must return a 2-D float32 array and raises its own errors), written for next time.
        A read-only result must not be modified in place (nothing in the data path does)."""
        real = os.path.realpath(source)
        try:
            st = os.stat(real)
        except OSError:
            return decode()  # a missing/unreadable source: the decoder names it
        entry, digest = self._entry(real, st)
        points, problem = self._read(entry, digest)
        if points is not None:
            self.stats["hits"] += 1
            return points
        if problem is not None:
            self.stats["corrupt"] += 1
            log.warning("%s: corrupt point cache entry (%s); decoding %s again", entry, problem, source)
        self.stats["misses"] += 1
        points = decode()
        if points.ndim != 2 or points.dtype != np.float32:
            raise ValueError(f"{source}: decoded points must be a 2-D float32 array, got "
                             f"{points.dtype} {points.shape}")
        try:
            after = os.stat(real)
        except OSError:
            after = None
        if after is None or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            self.stats["unstable"] += 1  # changed while decoding: which version did we parse?
            return points
        self._write(entry, digest, points)
        return points

    # ---- reading --------------------------------------------------------------------------
    @staticmethod
    def _read(entry: Path, digest: bytes) -> tuple[np.ndarray | None, str | None]:
        """(points, None) for a valid entry, (None, None) when there is none, (None, problem)
        when it is bad."""
        try:
            with open(entry, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < HEADER.size:
                    return None, f"{size} bytes, shorter than its {HEADER.size}-byte header"
                head = f.read(HEADER.size)
                magic, version, cols, rows, crc, _, key = HEADER.unpack(head)
                if magic != MAGIC or version != FORMAT_VERSION:
                    return None, "not a v2xfuse point cache entry of this version"
                if key != digest:
                    return None, "its key digest does not match its name"
                if cols == 0 or size != HEADER.size + rows * cols * 4:
                    return None, (f"{size} bytes where a header and {rows} x {cols} float32 "
                                  f"need {HEADER.size + rows * cols * 4}")
                if rows == 0:
                    return np.zeros((0, cols), np.float32), None
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            return None, None
        except OSError as e:
            return None, f"unreadable: {e.strerror or e}"
        points = np.frombuffer(buf, dtype="<f4", count=rows * cols, offset=HEADER.size)
        if zlib.crc32(points) != crc:
            return None, "payload CRC-32 mismatch"
        return points.reshape(rows, cols), None

    # ---- writing --------------------------------------------------------------------------
    def _write(self, entry: Path, digest: bytes, points: np.ndarray) -> None:
        data = np.ascontiguousarray(points, dtype="<f4")
        head = HEADER.pack(MAGIC, FORMAT_VERSION, data.shape[1], data.shape[0], zlib.crc32(data), 0, digest)
        tmp = entry.with_name(f".{entry.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            entry.parent.mkdir(exist_ok=True)
            with open(tmp, "xb") as f:
                f.write(head)
                if data.size:  # a view with a zero in its shape cannot be cast to bytes
                    f.write(memoryview(data).cast("B"))
            os.replace(tmp, entry)
        except OSError as e:
            self.stats["write_errors"] += 1
            if self.stats["write_errors"] == 1:
                log.warning("%s: cannot write point cache entry (%s); serving decoded points "
                            "uncached", entry, e.strerror or e)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return
        self._remove_stale(entry)

    @staticmethod
    def _remove_stale(entry: Path) -> None:
        """Entries of the same source for another size/mtime, and temporary files of writers
        that died an hour ago or more."""
        where = entry.stem.split("-")[0]
        for old in glob.glob(os.path.join(entry.parent, f"{where}-*.pts")):
            if old != str(entry):
                with contextlib.suppress(OSError):
                    os.remove(old)
        now = time.time()
        for tmp in glob.glob(os.path.join(entry.parent, f".{where}-*.tmp")):
            with contextlib.suppress(OSError):
                if now - os.stat(tmp).st_mtime > STALE_TMP_S:
                    os.remove(tmp)

