#!/usr/bin/env python
"""List missing or malformed files of an OPV2V/V2XSet, DAIR-V2X-C or V2X-Seq SPD copy.

    python tools/check_dataset.py --format opv2v  --root /data/OPV2V
    python tools/check_dataset.py --format dair   --root /data/cooperative-vehicle-infrastructure
    python tools/check_dataset.py --format v2xseq --root /data/V2X-Seq-SPD

Checks what the real releases are known to get wrong (shared/reference/dair-v2x.md section 7):
point clouds that are missing or whose header or data is truncated, JSON/YAML that does not
parse, calibration files that are missing or lack rotation/translation, index rows that point
at frames or files that are not there, NaN points. Every problem is printed as ``PATH: what``;
a summary by kind follows. Exit status 1 when any problem was found, 0 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from v2xfuse.formats import dair as dfmt
from v2xfuse.formats import opv2v as ofmt
from v2xfuse.io.pcd import PcdError, read_points


class Report:
    def __init__(self, quiet: bool = False):
        self.problems: list[tuple[str, str, str]] = []  # (kind, path, message)
        self.checked: Counter = Counter()
        self.quiet = quiet

    def add(self, kind: str, path, message: str) -> None:
        self.problems.append((kind, str(path), message))
        if not self.quiet:
            print(f"{path}: {message}")

    # ---- file checks, each returning the parsed content or None --------------------------
    def pcd(self, path: Path) -> None:
        self.checked["pcd"] += 1
        if not path.is_file():
            return self.add("missing pcd", path, "point cloud file is missing")
        try:
            pts = read_points(path)
        except PcdError as e:
            return self.add("malformed pcd", path, str(e).removeprefix(f"{path}: "))
        bad = int((~np.isfinite(pts[:, :3]).all(axis=1)).sum())
        if bad:
            self.add("nan points", path, f"{bad} of {len(pts)} points have NaN/inf coordinates")

    def json(self, path: Path, kind: str = "json"):
        self.checked[kind] += 1
        if not path.is_file():
            return self.add(f"missing {kind}", path, f"{kind} file is missing")
        try:
            return json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.add(f"malformed {kind}", path, f"malformed JSON ({e})")

    def calib(self, path: Path, nested: str | None = None):
        data = self.json(path, "calib")
        if data is None:
            return None
        try:
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a JSON object")
            if nested is not None:
                if not isinstance(data.get(nested), dict):
                    raise ValueError(f"{path}: missing field {nested!r}")
                data = data[nested]
            return dfmt.rt_to_matrix(data, str(path))
        except ValueError as e:
            self.add("malformed calib", path, str(e).removeprefix(f"{path}: "))

    def summary(self) -> str:
        kinds = Counter(k for k, _, _ in self.problems)
        checked = ", ".join(f"{n} {k}" for k, n in sorted(self.checked.items()))
        lines = [f"checked: {checked or 'nothing'}",
                 f"problems: {len(self.problems)}" + ("" if not kinds else " (" + ", ".join(
                     f"{k}: {n}" for k, n in sorted(kinds.items())) + ")")]
        return "\n".join(lines)


# ---- OPV2V / V2XSet -----------------------------------------------------------------------
def check_opv2v(root: Path, r: Report) -> None:
    splits = [d for d in sorted(root.iterdir()) if d.is_dir()] if root.is_dir() else []
    if not splits:
        return r.add("missing folder", root, "no split folders (train/validate/test)")
    for split in splits:
        for scen in sorted(p for p in split.iterdir() if p.is_dir()):
            agents = [a for a in sorted(scen.iterdir()) if a.is_dir() and a.name.lstrip("-").isdigit()]
            if not agents and any(p.suffix == ".yaml" for p in scen.rglob("*.yaml")):
                continue
            for adir in agents:
                yamls = {p.stem: p for p in adir.glob("*.yaml") if "additional" not in p.name}
                pcds = {p.stem: p for p in adir.glob("*.pcd")}
                for key, path in sorted(yamls.items()):
                    r.checked["yaml"] += 1
                    try:
                        meta = ofmt.load_yaml(path)
                        ofmt.world_from_lidar_rh(meta, str(path))
                        ofmt.vehicle_boxes(meta, np.eye(4), str(path))
                    except ValueError as e:
                        r.add("malformed yaml", path, str(e).removeprefix(f"{path}: "))
                    r.pcd(adir / f"{key}.pcd")
                for key in sorted(set(pcds) - set(yamls)):
                    r.add("missing yaml", adir / f"{key}.yaml", "point cloud has no yaml")


# ---- DAIR-V2X-C and V2X-Seq SPD -------------------------------------------------------------
SIDES = {"vehicle-side": (("calib_lidar_to_novatel_path", "lidar_to_novatel", "transform"),
                          ("calib_novatel_to_world_path", "novatel_to_world", None)),
         "infrastructure-side": (("calib_virtuallidar_to_world_path", "virtuallidar_to_world", None),)}


def _rows(r: Report, path: Path) -> list:
    rows = r.json(path, "data_info")
    if rows is None:
        return []
    if not isinstance(rows, list):
        r.add("malformed data_info", path, "expected a JSON array of rows")
        return []
    return rows


def check_side(root: Path, side: str, r: Report) -> dict[str, dict]:
    """Every row's point cloud, calibration and LiDAR label; returns rows by frame id."""
    d = root / side
    info = d / "data_info.json"
    out = {}
    for i, row in enumerate(_rows(r, info)):
        if not isinstance(row, dict) or not row.get("pointcloud_path"):
            r.add("malformed data_info", info, f"row {i}: no 'pointcloud_path'")
            continue
        fid = str(row.get("frame_id") or Path(row["pointcloud_path"]).stem)
        out[fid] = row
        r.pcd(d / row["pointcloud_path"])
        ts = str(row.get("pointcloud_timestamp", ""))
        if not ts.split(".")[0].isdigit():
            r.add("malformed data_info", info, f"row {i}.pointcloud_timestamp: expected integer "
                                               f"microseconds, got {row.get('pointcloud_timestamp')!r}")
        for key, folder, nested in SIDES[side]:
            r.calib(d / (row.get(key) or f"calib/{folder}/{fid}.json"), nested)
        label = row.get("label_lidar_std_path") or row.get("label_lidar_path")
        if label:
            r.json(d / label, "label")
        if row.get("image_path"):
            r.checked["image"] += 1
            if not (d / row["image_path"]).is_file():
                r.add("missing image", d / row["image_path"], "camera image is missing")
    return out


def _offset(r: Report, where: Path, i: int, row: dict) -> None:
    try:
        dfmt.parse_offset(row.get("system_error_offset", ""), f"row {i}.system_error_offset")
    except ValueError as e:
        r.add("malformed data_info", where, str(e))


def check_dair(root: Path, r: Report) -> None:
    if not (root / "cooperative").is_dir() and (root / "cooperative-vehicle-infrastructure").is_dir():
        root = root / "cooperative-vehicle-infrastructure"
    veh = check_side(root, "vehicle-side", r)
    inf = check_side(root, "infrastructure-side", r)
    info = root / "cooperative" / "data_info.json"
    for i, row in enumerate(_rows(r, info)):
        if not isinstance(row, dict):
            r.add("malformed data_info", info, f"row {i}: expected an object")
            continue
        for key, side in (("vehicle_pointcloud_path", veh), ("infrastructure_pointcloud_path", inf)):
            rel = row.get(key)
            if not rel:
                r.add("malformed data_info", info, f"row {i}: missing field {key!r}")
            elif Path(rel).stem not in side:
                r.add("missing frame", info, f"row {i}.{key}: frame {Path(rel).stem} is not in the "
                                             f"side's data_info.json")
                r.pcd(root / rel)
        _offset(r, info, i, row)
        label = row.get("cooperative_label_path")
        if label:
            labels = r.json(root / label, "label")
            for j, entry in enumerate(labels if isinstance(labels, list) else []):
                try:
                    dfmt.world_8_points_to_box(entry.get("world_8_points"), np.eye(4), f"[{j}]")
                except (ValueError, AttributeError) as e:
                    r.add("malformed label", root / label, str(e))
                    break


def check_v2xseq(root: Path, r: Report) -> None:
    if not (root / "cooperative").is_dir() and (root / "V2X-Seq-SPD").is_dir():
        root = root / "V2X-Seq-SPD"
    veh = check_side(root, "vehicle-side", r)
    inf = check_side(root, "infrastructure-side", r)
    info = root / "cooperative" / "data_info.json"
    for i, row in enumerate(_rows(r, info)):
        if not isinstance(row, dict):
            r.add("malformed data_info", info, f"row {i}: expected an object")
            continue
        for key, side in (("vehicle_frame", veh), ("infrastructure_frame", inf)):
            if key not in row:
                r.add("malformed data_info", info, f"row {i}: missing field {key!r}")
            elif str(row[key]) not in side:
                r.add("missing frame", info, f"row {i}.{key}: frame {row[key]} is not in the side's "
                                             f"data_info.json")
        _offset(r, info, i, row)
        if "vehicle_frame" in row:
            labels = r.json(root / "cooperative" / "label" / f"{row['vehicle_frame']}.json", "label")
            for j, entry in enumerate(labels if isinstance(labels, list) else []):
                try:
                    dfmt.side_label_box(entry, f"[{j}]")
                except (ValueError, AttributeError) as e:
                    r.add("malformed label", root / "cooperative" / "label" / f"{row['vehicle_frame']}.json",
                          str(e))
                    break


CHECKS = {"opv2v": check_opv2v, "dair": check_dair, "v2xseq": check_v2xseq}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=sorted(CHECKS), required=True)
    p.add_argument("--root", required=True, type=Path, help="dataset root")
    p.add_argument("--quiet", action="store_true", help="summary only")
    args = p.parse_args(argv)
    report = Report(args.quiet)
    if not args.root.is_dir():
        report.add("missing folder", args.root, "dataset root is missing")
    else:
        CHECKS[args.format](args.root, report)
    print(report.summary())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
