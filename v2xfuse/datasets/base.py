"""What every dataset adapter provides, the one error it raises on bad files, and how a bad
frame is skipped.

**One error.** Whatever goes wrong while reading a frame (a missing or unreadable file, a path
that is a directory, malformed JSON/YAML/PCD, a wrong type, a missing key, a singular or
non-rigid pose, NaN ground truth...) reaches the caller as :class:`DatasetError`, whose message
starts with the file and names the field. Readers raise it where they know the file
(:func:`reading` turns the ``OSError``/``ValueError``/``TypeError``/``KeyError``/``LinAlgError``/
YAML errors of a block into it); :meth:`CoopAdapter.load` is the net for anything that still
escapes, naming the sample.

**Skipping without double counting.** With ``skip_bad_frames`` a bad frame is *dropped*, never
replaced: serving the next sample in its place (what this module used to do) made that sample
count twice in an epoch and twice in an evaluation. The drop happens where the frame is read,
which may be a DataLoader worker process, so no index list can shrink consistently; instead
:class:`~v2xfuse.datasets.pipeline.CoopSampler` returns a :class:`SkippedSample` marker for that
index and :func:`~v2xfuse.datasets.batch.collate` leaves it out of the batch and lists it in
``CoopBatch.skipped``. A batch is then smaller, every good frame still appears exactly once per
pass, and the skips travel back to the main process with the batches that lost them.
``CoopAdapter.bad_frames`` keeps the skips seen by the process it lives in (all of them only
when loading in the main process). A batch may be empty (``batch_size == 0``: batch size 1, as
in evaluation, or every sample bad); a consumer must skip it, since the detector cannot run on
no sample (the loops in :mod:`v2xfuse.engine` do not skip it yet).

Problems found while building the index (a DAIR row naming no point cloud) are different: the
index is built once, before any worker exists, so under ``skip_bad_frames`` such rows are left
out of it there and then (``DairV2XCAdapter.dropped_rows``).

**History** (``history_frames`` = k > 0): every agent of a loaded frame carries in
``AgentObs.history`` its k observations before the one served, newest first, from the same
sequence (OPV2V scenario, DAIR-V2X batch segment, V2X-Seq sequence). A collaborator served
``d`` samples late has history from ``d + 1`` samples back. Where the sequence starts later
the history is shorter, never padded with repeats; the sample says how long each one is. A
history frame the index lists but whose files are bad makes the whole sample bad (a
:class:`DatasetError` naming the file, skipped like any bad frame under ``skip_bad_frames``):
a silently shorter history would look like a sequence start to a temporal model.
"""
from __future__ import annotations

import abc
import contextlib
import functools
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..io.pcd import read_points
from ..structures.coop import AgentObs, CoopFrame
from .point_cache import DiskPointCache
from .sensors import AgentSensors

__all__ = ["DatasetError", "SkippedSample", "CoopAdapter", "PointCache", "disk_point_cache", "load_point_file",
           "reading", "opening", "error_message", "READ_ERRORS"]

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file is missing or malformed. The message names the file and the field."""


# What reading a frame can raise besides DatasetError. A list rather than ``Exception`` so that
# a programming error of another kind (NameError, RuntimeError...) still surfaces as itself.
READ_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError,
               UnicodeDecodeError, np.linalg.LinAlgError, json.JSONDecodeError, yaml.YAMLError)


def error_message(where, e: BaseException, what: str = "") -> str:
    """``"<where>: [<what>: ]<problem>"`` for a read error; a message that already starts with
    ``where`` (the format readers name their file themselves) is kept as it is."""
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror  # the file name in str(e) would be repeated
    elif isinstance(e, KeyError):
        text = f"missing field {e.args[0]!r}" if e.args else "missing field"
    elif isinstance(e, ValueError):
        text = str(e)
    else:
        text = f"{type(e).__name__}: {e}"
    where = str(where)
    return text if text.startswith(where) else f"{where}: {what + ': ' if what else ''}{text}"


@contextlib.contextmanager
def reading(where, what: str = ""):
    """Re-raise any :data:`READ_ERRORS` of the block as :class:`DatasetError` naming ``where``
    (the file, and the field when known; ``what`` says what the file is). A
    ``DatasetError`` passes through untouched."""
    try:
        yield
    except DatasetError:
        raise
    except READ_ERRORS as e:
        raise DatasetError(error_message(where, e, what)) from e


@contextlib.contextmanager
def opening(path, what: str, missing: str | None = None):
    """Like :func:`reading`, around opening and reading the file ``path`` itself: a missing file
    is ``"<path>: <missing>"`` (default ``"<what> is missing"``), a directory ``"<path>: <what>
    path is a directory, not a file"``, any other of :data:`READ_ERRORS` names ``what``."""
    try:
        yield
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{path}: {missing or what + ' is missing'}") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: {what} path is a directory, not a file") from None
    except READ_ERRORS as e:
        raise DatasetError(error_message(path, e, what)) from e


@dataclass(frozen=True)
class SkippedSample:
    """Stands in for a sample whose files are bad when ``skip_bad_frames`` is on; collate drops it.

    Attributes:
        dataset: the adapter's name.
        index: the sample index that was skipped (the adapter's numbering).
        reason: the :class:`DatasetError` message (file and field).
    """

    dataset: str
    index: int
    reason: str


def load_point_file(path: Path, intensity_scale: float = 1.0) -> np.ndarray:
    """(N, 4) float32 [x, y, z, intensity] from a PCD, intensity divided by ``intensity_scale``.

    Rows with a NaN or inf coordinate are an error: the real datasets store none, so they mean a
    corrupt file rather than "no return". So is a header inconsistent with the data size
    (:func:`~v2xfuse.io.pcd.read_pcd` is strict), a directory or an unreadable file.
    """
    with opening(path, "point cloud", "point cloud file is missing"):
        pts = read_points(path)
    if intensity_scale != 1.0:
        pts[:, 3] /= intensity_scale
    bad = ~np.isfinite(pts).all(axis=1)
    if bad.any():
        raise DatasetError(f"{path}: {int(bad.sum())} of {len(pts)} points have NaN/inf values "
                           f"(first at row {int(np.argmax(bad))})")
    return pts


class PointCache:
    """Decoded point clouds: a size-bounded in-memory LRU (``cache_points_mb``; 0 = off) in
    front of an optional :class:`~v2xfuse.datasets.point_cache.DiskPointCache`
    (``dataset.cache_dir``), which outlives the process: DataLoader workers and later runs
    map what an earlier one decoded (decoding ascii PCD dominates load time)."""

    def __init__(self, max_mb: float, disk: DiskPointCache | None = None):
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.disk = disk

    def get(self, key: str, load):
        """The points of the file ``key`` (its path), ``load()`` decoding them on a miss."""
        if self.disk is not None:
            load = functools.partial(self.disk.get, key, load)
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


def disk_point_cache(cache_dir, roots, variant: str) -> DiskPointCache | None:
    """The disk cache of ``dataset.cache_dir`` (None when unset), refused inside ``roots``."""
    if cache_dir is None or str(cache_dir) == "":
        return None
    return DiskPointCache(cache_dir, roots, variant)


class CoopAdapter(abc.ABC):
    """A dataset in its released format, presented as :class:`CoopFrame` samples.

    Subclasses implement ``__len__`` and ``_load``. ``load(idx, delays)`` returns the sample
    with each non-ego agent's observation taken ``delays[agent_id]`` samples earlier (its
    pose, points and timestamp then are those of the older sample; the ground truth stays at
    the ego's time), or raises :class:`DatasetError`.

    ``skip_bad_frames`` does not change what ``load`` returns: it tells the sampler to turn a
    bad sample into a :class:`SkippedSample` (see :meth:`skip` and the module docstring), so
    one bad file costs that frame only, and no other frame is counted twice.

    ``history_frames`` (k): each agent's older observations in ``AgentObs.history`` (module
    docstring); adapters that serve history implement :meth:`_past`.

    ``sensors`` (``dataset.sensors``): which sensors each kind of agent carries
    (:mod:`v2xfuse.datasets.sensors`); ``load`` removes the data of the others, and adapters
    ask ``self.sensors.of(kind, ego)`` so as not to read those files at all.
    """

    name: str = "dataset"
    frame_period_us: int = 100_000

    def __init__(self, skip_bad_frames: bool = False, history_frames: int = 0,
                 sensors: Mapping | None = None):
        if int(history_frames) < 0:
            raise ValueError(f"history_frames must be >= 0, got {history_frames}")
        self.skip_bad_frames = skip_bad_frames
        self.history_frames = int(history_frames)
        self.sensors = AgentSensors.from_config(sensors)
        self.bad_frames: dict[int, str] = {}

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _load(self, idx: int, delays: Mapping[str, int] | None) -> CoopFrame: ...

    def _past(self, idx: int, agent_id: str, steps: int) -> AgentObs | None:
        """Agent ``agent_id``'s observation ``steps`` (>= 1) samples before sample ``idx``'s
        time, from the same sequence, or None where the sequence starts later. The samples are
        those a delay counts: ``_load(idx, {agent_id: steps})`` would serve the same one."""
        raise NotImplementedError(f"{self.name}: this adapter serves no history (history_frames)")

    def agent_ids(self, idx: int) -> list[str]:
        """Ids of the agents sample ``idx`` would contain, ego first (cheap: no point clouds)."""
        return [a.agent_id for a in self._load(idx, None).agents]

    def describe(self, idx: int) -> str:
        """Where sample ``idx`` comes from, for messages that cannot name a single file."""
        return f"sample {idx}"

    def load(self, idx: int, delays: Mapping[str, int] | None = None) -> CoopFrame:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"{self.name}: index {idx} out of range for {n} samples")
        idx %= n
        with self.sample_errors(idx):
            frame = self._load(idx, delays)
            if self.history_frames:
                self._attach_history(idx, frame, delays)
        for i, agent in enumerate(frame.agents):
            self.sensors.drop_absent(agent, ego=i == 0)
        return frame

    def _attach_history(self, idx: int, frame: CoopFrame, delays: Mapping[str, int] | None) -> None:
        """Fill each agent's ``history``: ``history_frames`` observations before the one served
        (the ego's from 1 sample back, a collaborator late by ``d`` from ``d + 1``), fewer where
        the sequence starts."""
        for i, agent in enumerate(frame.agents):
            delay = 0 if i == 0 or not delays else int(delays.get(agent.agent_id, 0))
            agent.history = []
            for steps in range(delay + 1, delay + 1 + self.history_frames):
                past = self._past(idx, agent.agent_id, steps)
                if past is None:
                    break
                agent.history.append(past)

    @contextlib.contextmanager
    def sample_errors(self, idx: int):
        """The last net: a read error no reader named a file for becomes a :class:`DatasetError`
        naming the sample (its index file and row, or its folder)."""
        try:
            yield
        except DatasetError:
            raise
        except READ_ERRORS as e:
            raise DatasetError(f"{self.describe(idx)}: {type(e).__name__}: {e}") from e

    def skip(self, idx: int, error: DatasetError) -> SkippedSample:
        """Record that sample ``idx`` is bad (logged once per process) and return its marker."""
        if idx not in self.bad_frames:
            log.warning("%s: skipping sample %d: %s", self.name, idx, error)
        self.bad_frames[idx] = str(error)
        return SkippedSample(self.name, idx, str(error))

    def __getitem__(self, idx: int) -> CoopFrame:
        return self.load(idx)
