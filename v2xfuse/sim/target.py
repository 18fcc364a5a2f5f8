"""Where the generator may write: never into a folder that holds somebody's data.

The rule, for ``tools/make_synthetic.py --out``, ``generate_dataset`` and the configs'
``dataset.synthetic`` sections alike: a dataset is generated only into a folder that is

* missing or empty, or
* ours: it carries our manifest (:data:`MANIFEST_NAME`) and holds exactly the files the manifest
  lists (count, bytes and a digest of names and sizes; older manifests without that inventory
  are checked by their layout and point-cloud count).

Any other folder is treated as a real dataset and is never written, renamed or deleted
(:class:`ForeignDataError`). That includes a folder with our manifest that also holds other
files: an earlier v2xfuse wrote synthetic scenes *into* users' OPV2V/DAIR-V2X folders, manifest
included, and those mixtures must be neither reused nor replaced.

A dataset is written into a temporary sibling (``.<name>.v2xfuse-tmp-<pid>-<hex>``, marked by
:data:`STAGING_MARKER`) and renamed into place only when complete, so an interrupted run leaves
nothing half-made at the target. Staging folders left by a killed run are deleted on the next
run only when their marker names this host and a process that no longer exists.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MANIFEST_NAME", "STAGING_MARKER", "ForeignDataError", "FolderState", "folder_state",
           "check_target", "guess_format", "inventory", "read_manifest", "staging", "publish",
           "generated_tree", "REAL_DATA_CONFIGS"]

log = logging.getLogger(__name__)

MANIFEST_NAME = "v2xfuse_synthetic.json"
STAGING_MARKER = ".v2xfuse_staging.json"
_STAGING_TAG = ".v2xfuse-"   # .<name>.v2xfuse-tmp-<pid>-<hex> and .<name>.v2xfuse-old-<pid>-<hex>

# What each format writes at the top of its folder (besides the manifest), and the config that
# trains on the real dataset of that format.
_TOP_LEVEL = {"dair": ("cooperative-vehicle-infrastructure", "cooperative-split-data.json"),
              "v2xseq": ("V2X-Seq-SPD", "cooperative-split-data-spd.json")}
FORMAT_NAMES = {"opv2v": "OPV2V/V2XSet", "dair": "DAIR-V2X-C", "v2xseq": "V2X-Seq SPD"}
REAL_DATA_CONFIGS = {"opv2v": "configs/opv2v.yaml", "dair": "configs/dair_v2x.yaml",
                     "v2xseq": "configs/v2x_seq.yaml"}


class ForeignDataError(RuntimeError):
    """The folder asked for holds data the generator did not write; nothing was touched."""


def generated_tree(fmt: str, splits) -> set[str]:
    """Top-level names a dataset of ``fmt`` consists of (manifest included)."""
    names = set(_TOP_LEVEL[fmt]) if fmt in _TOP_LEVEL else set(splits or ())  # OPV2V: split folders
    return names | {MANIFEST_NAME}


def inventory(folder: Path) -> dict:
    """``{"files", "bytes", "sha256"}`` of every file under ``folder`` (digest of the sorted
    relative names and sizes), leaving out the manifest and the staging marker at the top."""
    folder = Path(folder)
    rows = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, folder)
        for name in filenames:
            if rel_dir == "." and name in (MANIFEST_NAME, STAGING_MARKER):
                continue
            size = os.lstat(os.path.join(dirpath, name)).st_size
            rows.append(f"{os.path.normpath(os.path.join(rel_dir, name))}\t{size}")
            total += size
    rows.sort()
    digest = hashlib.sha256("\n".join(rows).encode()).hexdigest()
    return {"files": len(rows), "bytes": total, "sha256": digest}


def read_manifest(folder: Path) -> dict | None:
    """The manifest as a dict, or None when there is none or it is not one of ours."""
    try:
        with open(Path(folder) / MANIFEST_NAME, "rb") as f:
            data = json.loads(f.read())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") not in FORMAT_NAMES:
        return None
    return data


@dataclass
class FolderState:
    """``kind``: "missing" | "empty" | "ours" | "modified" (our manifest, other contents) |
    "foreign"; ``detail`` says why for the last two; ``manifest`` when there is one of ours."""

    kind: str
    detail: str = ""
    manifest: dict | None = None


def folder_state(folder: Path) -> FolderState:
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return FolderState("missing")
    if not folder.is_dir():
        return FolderState("foreign", "it is not a folder")
    entries = sorted(os.listdir(folder))
    if not entries:
        return FolderState("empty")
    manifest = read_manifest(folder)
    if manifest is None:
        shown = ", ".join(e + ("/" if (folder / e).is_dir() else "") for e in entries[:6])
        more = f" and {len(entries) - 6} more" if len(entries) > 6 else ""
        return FolderState("foreign", f"it holds {shown}{more} and no {MANIFEST_NAME}")
    problem = _contents_problem(folder, manifest, entries)
    if problem:
        return FolderState("modified", problem, manifest)
    return FolderState("ours", "", manifest)


def _contents_problem(folder: Path, manifest: dict, entries: list[str]) -> str:
    """Why ``folder`` does not hold exactly what ``manifest`` says we wrote ("" if it does)."""
    expected = generated_tree(manifest["format"], manifest.get("splits"))
    extra = [e for e in entries if e not in expected]
    if extra:
        return f"it also holds {', '.join(extra[:6])} that the generator does not write"
    have = inventory(folder)
    want = manifest.get("inventory")
    if isinstance(want, dict):
        if (have["files"], have["bytes"], have["sha256"]) != \
                (want.get("files"), want.get("bytes"), want.get("sha256")):
            return (f"it holds {have['files']} files ({have['bytes']} bytes) where the generator "
                    f"wrote {want.get('files')} ({want.get('bytes')} bytes)")
        return ""
    # A manifest from before inventories: every agent-frame wrote exactly one point cloud.
    clouds = sum(1 for _ in folder.rglob("*.pcd"))
    written = (manifest.get("stats") or {}).get("agent_frames")
    if clouds != written:
        return f"it holds {clouds} point clouds where the generator wrote {written}"
    return ""


def guess_format(folder: Path) -> str | None:
    """Which dataset a folder looks like by its top-level names (for the error message only)."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return None
    if "cooperative-vehicle-infrastructure" in names:
        return "dair"
    if "V2X-Seq-SPD" in names:
        return "v2xseq"
    if names & {"cooperative", "vehicle-side", "infrastructure-side"}:
        return "v2xseq" if (Path(folder) / "cooperative" / "label").is_dir() else "dair"
    if names & {"train", "validate", "test", "test_culvercity"}:
        return "opv2v"
    return None


def check_target(out: Path, fmt: str) -> FolderState:
    """The state of ``out`` if the generator may write ``fmt`` there: missing, empty, or ours
    with the same format (a dataset of ours in another format is more likely a wrong path
    than something to replace). Otherwise :class:`ForeignDataError`; nothing is touched."""
    state = folder_state(out)
    if state.kind in ("missing", "empty"):
        return state
    name = FORMAT_NAMES.get(fmt, fmt)
    configs = ", ".join(f"{REAL_DATA_CONFIGS[f]} ({FORMAT_NAMES[f]})" for f in REAL_DATA_CONFIGS)
    if state.kind == "ours":
        theirs = state.manifest["format"]
        if theirs == fmt:
            return state
        raise ForeignDataError(
            f"refusing to generate synthetic {name} data into {out}: it holds a synthetic "
            f"{FORMAT_NAMES[theirs]} dataset that v2xfuse generated. Nothing was written or "
            f"deleted. Point dataset.root (tools/make_synthetic.py: --out) at a missing or empty "
            f"folder, or delete that one if it is no longer needed.")
    if state.kind == "modified":
        raise ForeignDataError(
            f"refusing to generate synthetic {name} data into {out}: it carries {MANIFEST_NAME} "
            f"but {state.detail}, so it may mix a real dataset with synthetic scenes (older "
            f"v2xfuse versions generated into real dataset folders). Nothing was written or "
            f"deleted. If it holds only synthetic data, delete the folder and run again; if it is "
            f"a real dataset, remove the synthetic scenes and {MANIFEST_NAME} by hand and train "
            f"with a real-data config: {configs}.")
    guess = guess_format(out)
    looks = f" ({FORMAT_NAMES[guess]}, by its layout)" if guess else ""
    raise ForeignDataError(
        f"refusing to generate synthetic {name} data into {out}: the folder is not empty "
        f"({state.detail}), so it looks like a real dataset{looks}. Nothing was written. To train "
        f"on it, use the real-data config of its format instead of a synthetic one, e.g.\n"
        f"    python tools/train.py --config {REAL_DATA_CONFIGS[guess or fmt]} "
        f"--set dataset.root={out}\n"
        f"(real-data configs: {configs}). To generate synthetic data, point dataset.root "
        f"(tools/make_synthetic.py: --out) at a missing or empty folder.")


# ---- staging ------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _write_marker(folder: Path, target: Path) -> None:
    with open(folder / STAGING_MARKER, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "target": str(target),
                   "started": time.time()}, f)


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}{_STAGING_TAG}{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete staging siblings of ``out`` that a killed run left: only folders named like ours,
    whose marker names this host, ``out`` and a process that has exited. Returns them."""
    removed = []
    prefix = f".{out.name}{_STAGING_TAG}"
    try:
        candidates = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
    except FileNotFoundError:
        return removed
    for path in candidates:
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            marker = json.loads((path / STAGING_MARKER).read_text())
            pid, host, target = int(marker["pid"]), marker["host"], marker["target"]
        except (OSError, ValueError, KeyError, TypeError):
            log.debug("leaving %s alone: no readable staging marker", path)
            continue
        if host != socket.gethostname() or Path(target) != out or _pid_alive(pid):
            continue
        log.warning("removing %s, left by an interrupted generation (pid %d)", path, pid)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def staging(out: Path):
    """A fresh marked staging folder beside ``out``; deleted on leaving unless :func:`publish`
    moved it into place (and on any exception, KeyboardInterrupt included)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()
    try:
        _write_marker(tmp, out)
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: Path, fmt: str) -> None:
    """Move the complete dataset ``tmp`` to ``out``, which must (still) be missing, empty or
    ours; an old dataset of ours there is replaced, and deleted only after the swap."""
    state = check_target(out, fmt)  # again: minutes may have passed since the first check
    (tmp / STAGING_MARKER).unlink(missing_ok=True)
    if state.kind == "empty":
        out.rmdir()
    if state.kind in ("missing", "empty"):
        os.rename(tmp, out)
        return
    old = _sibling(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _write_marker(old, out)  # if the delete below is interrupted, the next run finishes it
    shutil.rmtree(old, ignore_errors=True)
