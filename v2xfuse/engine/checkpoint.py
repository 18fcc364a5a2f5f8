"""Checkpoint files: durable atomic writes, the previous checkpoint kept, errors that name the file,
and the config comparison that guards ``--resume``.

A training run's folder holds ``last.pt`` and ``prev.pt`` (the checkpoint before it). A save
writes ``last.pt.tmp``, fsyncs it, makes the current ``last.pt`` the new ``prev.pt`` (a hard link,
so ``last.pt`` never stops existing), renames the temporary over ``last.pt`` and fsyncs the
folder. A kill at any point leaves ``last.pt`` whole (old or new); what it may leave behind is a
``*.tmp``, removed by :func:`remove_stale_temporaries` when the next run starts. Should
``last.pt`` still be unreadable (a disk error, a copy cut short), the error names it and points
at ``prev.pt``.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import torch

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "ResumeError",
    "LAST_NAME",
    "PREVIOUS_NAME",
    "save_checkpoint",
    "load_checkpoint",
    "load_detector",
    "detector_from_state",
    "checkpoint_config",
    "remove_stale_temporaries",
    "atomic_write_text",
    "config_changes",
    "format_changes",
]

LAST_NAME = "last.pt"
PREVIOUS_NAME = "prev.pt"
_REQUIRED_KEYS = ("model", "config")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, or is not a v2xfuse checkpoint."""


class ResumeError(ValueError):
    """``--resume`` asked for something the checkpoint contradicts (changed config keys)."""


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def save_checkpoint(path: str | os.PathLike, state: dict,
                    previous: str | os.PathLike | None = None) -> None:
    """Write ``state`` durably and atomically to ``path``.

    ``torch.save`` goes to ``path.tmp``, which is fsynced, then renamed over ``path``; the folder
    is fsynced so the rename survives a power cut. With ``previous``, the checkpoint ``path``
    held until now becomes ``previous`` first (``path`` itself stays in place throughout).
    """
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if previous is not None and path.is_file():
        _keep_as(path, Path(previous))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _keep_as(src: Path, dst: Path) -> None:
    """Make ``dst`` the file ``src`` is now, leaving ``src`` in place: a hard link (no copy of a
    file already on disk), or a copy on filesystems without links."""
    staged = _tmp(dst)
    staged.unlink(missing_ok=True)
    try:
        os.link(src, staged)
    except OSError:
        with open(src, "rb") as fin, open(staged, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
    os.replace(staged, dst)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; its renames are durable anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (results, a config) so that it is either old or new, never cut."""
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stale_temporaries(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Delete the ``.tmp`` files a killed save may have left next to ``paths``; returns them."""
    removed = []
    for path in paths:
        tmp = _tmp(Path(path))
        if tmp.exists():
            tmp.unlink()
            removed.append(tmp)
            log.warning("removed %s, left by a run killed while it wrote %s", tmp, tmp.stem)
    return removed


def _previous_hint(path: Path) -> str:
    if path.name != LAST_NAME:
        return ""
    prev = path.with_name(PREVIOUS_NAME)
    if prev.is_file():
        return (f" The checkpoint before it is kept as {prev}: to continue from there, copy it "
                f"over {path} (cp {prev} {path}) and resume.")
    return f" There is no previous checkpoint ({prev}) to fall back on."


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Checkpoints hold tensors, numbers, strings, lists and dicts only: ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, unreadable (truncated, empty, not a torch file)
            or lacks the ``model`` and ``config`` entries. The message names the file and, for
            ``last.pt``, the previous checkpoint ``prev.pt`` next to it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file.{_previous_hint(path)}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... by damage
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        size = path.stat().st_size
        raise CheckpointError(
            f"{path}: cannot read this checkpoint ({size} bytes; {type(exc).__name__}: {reason}); "
            f"it is damaged or not a torch checkpoint.{_previous_hint(path)}") from exc
    missing = [k for k in _REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        what = f"a {type(state).__name__}" if not isinstance(state, dict) else "a dict"
        raise CheckpointError(f"{path}: not a v2xfuse checkpoint ({what} without "
                              f"{', '.join(repr(k) for k in missing)}).{_previous_hint(path)}")
    return state


def checkpoint_config(state: dict, config: dict | None = None,
                      overrides: Sequence[str] = ()) -> dict:
    """The config to run a checkpoint with: ``config`` (default: the one saved in it) with the
    saved ``model`` section, since the weights fix the model, then ``overrides``
    (``key.path=value``, so ``--set model.fusion.threshold=0.1`` still changes the model)."""
    from ..config import apply_overrides

    cfg = dict(config if config is not None else state["config"])
    cfg["model"] = state["config"]["model"]
    return apply_overrides(cfg, list(overrides))


def detector_from_state(state: dict, cfg: dict, device="cpu", path=None):
    """The detector of ``cfg`` with the checkpoint's weights, on ``device``.

    Raises:
        CheckpointError: the weights do not fit the model ``cfg`` builds (naming ``path``)."""
    from ..builder import build_detector

    model = build_detector(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        where = f"{path}: " if path is not None else ""
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{where}the weights do not fit the model the config builds "
                              f"({detail})") from exc
    return model.to(device)


def load_detector(path: str | os.PathLike, config: dict | None = None,
                  overrides: Sequence[str] = (), device="cpu"):
    """What every tool that runs a trained detector does: read the checkpoint
    (:func:`load_checkpoint`), take its config (:func:`checkpoint_config`) and build the
    detector with its weights (:func:`detector_from_state`).

    Returns:
        (config, detector on ``device``, the checkpoint's state dict).
    """
    state = load_checkpoint(path, device)
    cfg = checkpoint_config(state, config, overrides)
    return cfg, detector_from_state(state, cfg, device, path), state


# --- the config a checkpoint was trained with ----------------------------------------------------

_ABSENT = object()


def config_changes(saved: dict, current: dict, sections: Sequence[str],
                   allowed: Sequence[str] = ()) -> list[tuple[str, object, object]]:
    """Keys under ``sections`` whose values differ between two configs.

    Returns:
        ``[(dotted key, saved value, current value), ...]`` in the saved config's key order,
        skipping keys in ``allowed``; a key missing on one side holds a sentinel there that
        :func:`format_changes` writes as "(absent)". Lists and tuples compare alike.
    """
    out: list[tuple[str, object, object]] = []
    for section in sections:
        _diff(saved.get(section, _ABSENT), current.get(section, _ABSENT), section, out)
    return [c for c in out if c[0] not in set(allowed)]


def _diff(a, b, key: str, out: list) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            _diff(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{key}.{k}", out)
    elif _plain(a) != _plain(b):
        out.append((key, a, b))


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def format_changes(changes: list[tuple[str, object, object]]) -> str:
    """One ``key: saved -> current`` line per change."""
    def show(v):
        return "(absent)" if v is _ABSENT else repr(v)
    return "\n".join(f"  {key}: {show(a)} (checkpoint) -> {show(b)} (now)" for key, a, b in changes)
