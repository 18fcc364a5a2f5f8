"""What every dataset adapter provides, and the error it raises on bad files."""
from __future__ import annotations

import abc
import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..io.pcd import PcdError, read_points
from ..structures.coop import CoopFrame

__all__ = ["DatasetError", "CoopAdapter", "PointCache", "load_point_file"]

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file is missing or malformed. The message names the file and the field."""


def load_point_file(path: Path, intensity_scale: float = 1.0) -> np.ndarray:
    """(N, 4) float32 [x, y, z, intensity] from a PCD, intensity divided by ``intensity_scale``.

    Rows with a NaN or inf coordinate are an error: the real datasets store none, so they mean a
    corrupt file rather than "no return".
    """
    try:
        pts = read_points(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: point cloud file is missing") from None
    except PcdError as e:
        raise DatasetError(str(e)) from None
    if intensity_scale != 1.0:
        pts[:, 3] /= intensity_scale
    bad = ~np.isfinite(pts).all(axis=1)
    if bad.any():
        raise DatasetError(f"{path}: {int(bad.sum())} of {len(pts)} points have NaN/inf values "
                           f"(first at row {int(np.argmax(bad))})")
    return pts


class PointCache:
    """A size-bounded LRU of decoded point clouds (decoding ascii PCD dominates load time)."""

    def __init__(self, max_mb: float):
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.items: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, key: str, load):
        if self.max_bytes <= 0:
            return load()
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = load()
        self.items[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes and self.items:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.nbytes
        return value


class CoopAdapter(abc.ABC):
    """A dataset in its released format, presented as :class:`CoopFrame` samples.

    Subclasses implement ``__len__`` and ``_load``. ``load(idx, delays)`` returns the sample
    with each non-ego agent's observation taken ``delays[agent_id]`` samples earlier (its
    pose, points and timestamp then are those of the older sample; the ground truth stays at
    the ego's time). With ``skip_bad_frames`` a broken sample is logged and the next index is
    served instead, so one bad file costs one frame, not the run.
    """

    name: str = "dataset"
    frame_period_us: int = 100_000

    def __init__(self, skip_bad_frames: bool = False):
        self.skip_bad_frames = skip_bad_frames
        self.bad_frames: dict[int, str] = {}

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _load(self, idx: int, delays: Mapping[str, int] | None) -> CoopFrame: ...

    def agent_ids(self, idx: int) -> list[str]:
        """Ids of the agents sample ``idx`` would contain, ego first (cheap: no point clouds)."""
        return [a.agent_id for a in self._load(idx, None).agents]

    def load(self, idx: int, delays: Mapping[str, int] | None = None) -> CoopFrame:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"{self.name}: index {idx} out of range for {n} samples")
        idx %= n
        if not self.skip_bad_frames:
            return self._load(idx, delays)
        for attempt in range(n):
            j = (idx + attempt) % n
            if j in self.bad_frames:
                continue
            try:
                return self._load(j, delays)
            except DatasetError as e:
                self.bad_frames[j] = str(e)
                log.warning("%s: skipping sample %d: %s", self.name, j, e)
        raise DatasetError(f"{self.name}: every sample is broken (first: {next(iter(self.bad_frames.values()))})")

    def __getitem__(self, idx: int) -> CoopFrame:
        return self.load(idx)
