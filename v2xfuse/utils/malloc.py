"""glibc allocator tuning for large tensors.

glibc's malloc serves every block above its mmap threshold (dynamic, at most 32 MB by default)
with a fresh ``mmap`` and gives it back with ``munmap`` on free, so a BEV map of 32 MB or more
faults in every page again each time it is allocated: 174k page faults per frame at 256^2 cells
x 4 agents, and latency growing faster than the cell count. :func:`tune_malloc` raises the mmap
threshold to 1 GB so that such blocks are reused from the heap, and turns off trimming: glibc
gives the heap's free top back to the system once it exceeds the trim threshold, so a training
step that frees more than that at its end faulted it all in again in the next one (555k minor
page faults, 14 % of a step at the OPV2V grid with a 1 GB threshold; none now). The process
keeps the memory of its peak, as caching allocators do.

It runs when :mod:`v2xfuse.models` is imported; ``V2XFUSE_TUNE_MALLOC=0`` in the environment
turns it off. Where the process runs with tcmalloc (``LD_PRELOAD=libtcmalloc_minimal.so.4``,
Debian package ``libtcmalloc-minimal4``), which reuses large blocks on its own, nothing is
changed. On a libc without ``mallopt`` (musl, macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["tune_malloc", "TUNED_BYTES"]

#: the mmap threshold set (bytes); trimming is turned off (M_TRIM_THRESHOLD -1)
TUNED_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_state: dict[str, object] = {}


def _tcmalloc_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" in f.read()
    except OSError:
        return False


def tune_malloc() -> str:
    """Apply the thresholds once per process; returns what was done: ``"tuned"``,
    ``"disabled"`` (``V2XFUSE_TUNE_MALLOC=0``), ``"tcmalloc"`` or ``"unavailable"``."""
    if "result" in _state:
        return _state["result"]
    if os.environ.get("V2XFUSE_TUNE_MALLOC", "1").strip() == "0":
        result = "disabled"
    elif _tcmalloc_loaded():
        result = "tcmalloc"
    else:
        result = "unavailable"
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            mallopt = getattr(libc, "mallopt", None) if libc is not None else None
        except OSError:
            mallopt = None
        if mallopt is not None and os.uname().sysname == "Linux":
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            if mallopt(_M_MMAP_THRESHOLD, TUNED_BYTES) and mallopt(_M_TRIM_THRESHOLD, -1):
                result = "tuned"
    _state["result"] = result
    return result
