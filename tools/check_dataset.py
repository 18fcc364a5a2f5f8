#!/usr/bin/env python
"""List missing or malformed files of an OPV2V/V2XSet, DAIR-V2X-C or V2X-Seq SPD copy.

    python tools/check_dataset.py --format opv2v  --root /data/OPV2V
    python tools/check_dataset.py --format dair   --root /data/cooperative-vehicle-infrastructure
    python tools/check_dataset.py --format v2xseq --root /data/V2X-Seq-SPD
    python tools/check_dataset.py --format opv2v  --root /data/OPV2V --images   # decode every image

Every file is checked by the very code the dataset adapters load it with
(``v2xfuse.datasets.base.load_point_file``, ``v2xfuse.datasets.dair_side``,
``v2xfuse.datasets.opv2v.Opv2vMeta``, the ground-truth readers), so a file reported here is one
the loader rejects with the same message (and, with ``skip_bad_frames``, a frame it skips), and a
file passed here is one it reads. That covers what the real releases are known to get wrong
(shared/reference/dair-v2x.md section 7) and what users have met: missing files and paths that
are directories; PCD headers inconsistent with the data size, truncated or NaN points; JSON/YAML
that does not parse or has the wrong type (a label file that is an object, an intrinsic that is
not one); calibrations that are missing, not rigid (scaled, sheared, reflected, singular) or
have a bad ``relative_error``; labels without ``"type"``; non-finite ground truth or poses;
a non-numeric ``ego_speed``; index rows naming frames that are not there; with ``--images``,
camera images that are missing, truncated or not images, and OPV2V images whose camera the
yaml does not calibrate (decoding every image is slow, hence a flag). Every problem is
printed as ``PATH: what``; a summary by kind follows. Exit status 1 when any problem was found,
0 otherwise.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np

from v2xfuse.datasets import dair_side as side
from v2xfuse.datasets.base import load_point_file
from v2xfuse.datasets.dair import DairV2XCAdapter, read_ground_truth
from v2xfuse.datasets.images import read_image
from v2xfuse.datasets.opv2v import CAMERA_NAMES, Opv2vMeta
from v2xfuse.datasets.v2xseq import V2XSeqAdapter, read_track_labels
from v2xfuse.formats import dair as dfmt


class Report:
    def __init__(self, quiet: bool = False):
        self.problems: list[tuple[str, str, str]] = []  # (kind, path, message)
        self.checked: Counter = Counter()
        self.quiet = quiet

    def add(self, kind: str, path, message: str) -> None:
        """Record a problem found by this tool: printed as ``PATH: message``."""
        self._record(kind, path, f"{path}: {message}")

    def _record(self, kind: str, path, text: str) -> None:
        self.problems.append((kind, str(path), text))
        if not self.quiet:
            print(text)

    def check(self, kind: str, where, read):
        """Run ``read()`` (one of the loader's readers) and return its value, or report its error
        as ``missing <kind>`` / ``malformed <kind>`` and return None. The loaders' messages
        start with the file they are about, so they are printed as they are; ``where`` (the
        index file the check started from) is only kept with the problem."""
        self.checked[kind] += 1
        try:
            return read()
        except ValueError as e:  # DatasetError, and the format readers' ValueError it derives from
            text = str(e)
            self._record(("missing " if text.endswith(" is missing") else "malformed ") + kind, where, text)
            return None

    def summary(self) -> str:
        kinds = Counter(k for k, _, _ in self.problems)
        checked = ", ".join(f"{n} {k}" for k, n in sorted(self.checked.items()))
        lines = [f"checked: {checked or 'nothing'}",
                 f"problems: {len(self.problems)}" + ("" if not kinds else " (" + ", ".join(
                     f"{k}: {n}" for k, n in sorted(kinds.items())) + ")")]
        return "\n".join(lines)


# ---- OPV2V / V2XSet -----------------------------------------------------------------------
def check_opv2v(root: Path, r: Report, images: bool = False) -> None:
    splits = [d for d in sorted(root.iterdir()) if d.is_dir()] if root.is_dir() else []
    if not splits:
        return r.add("missing folder", root, "no split folders (train/validate/test)")
    for split in splits:
        for scen in sorted(p for p in split.iterdir() if p.is_dir()):
            agents = [a for a in sorted(scen.iterdir()) if a.is_dir() and a.name.lstrip("-").isdigit()]
            for adir in agents:
                yamls = {p.stem: p for p in adir.glob("*.yaml") if "additional" not in p.name}
                pcds = {p.stem: p for p in adir.glob("*.pcd")}
                for key, path in sorted(yamls.items()):
                    meta = r.check("yaml", path, partial(Opv2vMeta, path, CAMERA_NAMES))
                    if images and meta is not None:
                        r.check("camera", path, meta.check_calibrated)
                        for name in meta.cameras:
                            png = meta.image_path(name)
                            r.check("image", png, partial(read_image, png))
                    pcd = adir / f"{key}.pcd"
                    r.check("pcd", pcd, partial(load_point_file, pcd))
                for key in sorted(set(pcds) - set(yamls)):
                    r.add("missing yaml", adir / f"{key}.yaml", "point cloud has no yaml")


# ---- DAIR-V2X-C and V2X-Seq SPD -------------------------------------------------------------
SIDES = (("vehicle-side", side.VEHICLE), ("infrastructure-side", side.INFRA))


def _rows(r: Report, path: Path) -> list:
    def read():
        rows = side.read_json(path, "data_info")
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON array of rows")
        return rows
    return r.check("data_info", path, read) or []


def check_side(root: Path, folder: str, kind: str, r: Report,
               images: bool = False) -> dict[str, dict]:
    """Every row's point cloud, timestamp, calibrations, labels and camera (its image decoded
    with ``images``, else its header read); rows by frame id."""
    d = root / folder
    info = d / "data_info.json"
    out = {}
    for i, row in enumerate(_rows(r, info)):
        if not isinstance(row, dict) or not isinstance(row.get("pointcloud_path"), str):
            r.add("malformed data_info", info, f"row {i}: no 'pointcloud_path'")
            continue
        fid = str(row.get("frame_id") or Path(row["pointcloud_path"]).stem)
        out[fid] = row
        r.check("pcd", info, lambda: load_point_file(side.pointcloud_path(d, fid, row)))
        r.check("data_info", info, partial(side.timestamp_us, row, side.row_where(d, fid)))
        poses_ok = all([r.check("calib", info, partial(side.read_pose_file, d, row, fid, name)) is not None
                        for name in side.POSE_FILES[kind]])
        if kind == side.INFRA and poses_ok:  # the same file: report it once
            r.check("calib", info, partial(side.read_relative_error, d, fid, row))
        r.check("label", info, partial(side.read_side_labels, d, fid, row))
        r.check("camera", info, partial(side.read_cameras, d, kind, fid, row, images))
    return out


def check_pairs(root: Path, r: Report, adapter, read_labels, images: bool = False) -> None:
    """Both sides, then every cooperative row: its frames exist, its offset and its labels."""
    rows_of = {k: check_side(root, folder, k, r, images) for folder, k in SIDES}
    info = root / "cooperative" / "data_info.json"
    labels_seen = set()
    for i, row in enumerate(_rows(r, info)):
        where = f"{info}: row {i}"
        if not isinstance(row, dict):
            r.add("malformed data_info", info, f"row {i}: expected an object")
            continue
        ids = r.check("data_info", info, partial(adapter.row_ids, row, where))
        r.check("data_info", info, partial(dfmt.parse_offset, row.get("system_error_offset", ""),
                                           f"{where}.system_error_offset"))
        if ids is None:
            continue
        for (folder, k), fid in zip(SIDES, ids):
            if fid not in rows_of[k]:
                r.add("missing frame", info, f"row {i}: frame {fid} is not in {folder}/data_info.json")
        if (ids[0], row.get("cooperative_label_path")) not in labels_seen:
            labels_seen.add((ids[0], row.get("cooperative_label_path")))
            r.check("label", info, partial(read_labels, row, ids[0], where))


def check_dair(root: Path, r: Report, images: bool = False) -> None:
    if not (root / "cooperative").is_dir() and (root / "cooperative-vehicle-infrastructure").is_dir():
        root = root / "cooperative-vehicle-infrastructure"
    check_pairs(root, r, DairV2XCAdapter,
                lambda row, vid, where: read_ground_truth(root, row, vid, np.eye(4), where), images)


def check_v2xseq(root: Path, r: Report, images: bool = False) -> None:
    if not (root / "cooperative").is_dir() and (root / "V2X-Seq-SPD").is_dir():
        root = root / "V2X-Seq-SPD"
    check_pairs(root, r, V2XSeqAdapter, lambda row, vid, where: read_track_labels(root, vid),
                images)


CHECKS = {"opv2v": check_opv2v, "dair": check_dair, "v2xseq": check_v2xseq}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=sorted(CHECKS), required=True)
    p.add_argument("--root", required=True, type=Path, help="dataset root")
    p.add_argument("--quiet", action="store_true", help="summary only")
    p.add_argument("--images", action="store_true",
                   help="also decode every camera image (slow); without it, DAIR images' headers "
                        "are read and OPV2V images are not opened")
    args = p.parse_args(argv)
    report = Report(args.quiet)
    if not args.root.is_dir():
        report.add("missing folder", args.root, "dataset root is missing")
    else:
        CHECKS[args.format](args.root, report, args.images)
    print(report.summary())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
