"""Where the generator may write: missing, empty or its own folders only, through a staging
sibling, so that an interrupted run leaves nothing half-made; and how scenes fill the splits."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import v2xfuse.sim as sim
from v2xfuse.builder import ensure_synthetic, synthetic_target
from v2xfuse.sim import (MANIFEST_NAME, ForeignDataError, SimConfig, default_splits,
                         ensure_dataset, generate_dataset, split_of_scenes)
from v2xfuse.sim.target import STAGING_MARKER, folder_state

REPO = Path(__file__).resolve().parents[2]


def tiny_sim() -> SimConfig:
    cfg = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 128, "beams": 4},
                               "rsu_lidar": {"azimuth_steps": 128, "beams": 4},
                               "scene": {"n_cavs": 1, "n_rsus": 1}})
    cfg.cameras = False
    return cfg


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (and "<dir>/" entries for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def make(fmt: str, out: Path, scenes: int = 2, seed: int = 0, **kw):
    splits = kw.pop("splits", {"train": 0.5, ("val" if fmt != "opv2v" else "validate"): 0.5})
    kw.setdefault("workers", 1)
    return ensure_dataset(fmt, out, scenes, 1, seed, tiny_sim(), splits=splits, progress=False,
                          **kw)


# ---- splits --------------------------------------------------------------------------------
def test_every_split_with_a_share_gets_a_scene():
    assert split_of_scenes(3, {"train": 0.7, "validate": 0.15, "test": 0.15}) == \
        ["train", "validate", "test"]
    for n in range(3, 25):
        got = split_of_scenes(n, {"train": 0.7, "val": 0.2, "test": 0.1})
        assert len(got) == n and {"train", "val", "test"} <= set(got), n
    assert split_of_scenes(4, {"train": 0.7, "val": 0.3, "test": 0.0}).count("test") == 0
    # The committed configs' assignments are the ones their data was generated (and measured) with.
    quick = split_of_scenes(50, {"train": 0.7, "validate": 0.2, "test": 0.1})
    assert [quick.count(s) for s in ("train", "validate", "test")] == [35, 10, 5]
    seq = split_of_scenes(10, {"train": 0.7, "val": 0.2, "test": 0.1})
    assert [seq.count(s) for s in ("train", "val", "test")] == [7, 2, 1]
    assert split_of_scenes(20, {"train": 0.7, "val": 0.15, "test": 0.15}).count("test") == 3
    with pytest.raises(ValueError, match="cannot give each"):
        split_of_scenes(2, {"train": 0.8, "val": 0.1, "test": 0.1})


def test_default_splits_fit_few_scenes():
    assert default_splits("opv2v") == {"train": 0.7, "validate": 0.15, "test": 0.15}
    assert default_splits("dair", 2) == {"train": 0.5, "val": 0.5}
    assert default_splits("v2xseq", 1) == {"train": 1.0}


def test_cli_with_few_scenes_fills_val_and_refuses_impossible_splits(load_tool, tmp_path, capsys):
    tool = load_tool("make_synthetic")
    (tmp_path / "sim.yaml").write_text(json.dumps({"vehicle_lidar": {"azimuth_steps": 64,
                                                                     "beams": 4},
                                                   "rsu_lidar": {"azimuth_steps": 64, "beams": 4}}))
    args = ["--format", "dair", "--frames", "1", "--no-cameras", "--quiet",
            "--config", str(tmp_path / "sim.yaml")]
    assert tool.main(args + ["--out", str(tmp_path / "d"), "--scenes", "3"]) == 0
    split = json.loads((tmp_path / "d" / "cooperative-split-data.json").read_text())
    assert all(split["cooperative_split"][s] for s in ("train", "val", "test"))
    assert tool.main(args + ["--out", str(tmp_path / "d"), "--scenes", "3"]) == 0
    assert "kept it" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        tool.main(args + ["--out", str(tmp_path / "e"), "--scenes", "2",
                          "--splits", "train=0.8,val=0.1,test=0.1"])
    assert e.value.code == 2 and "cannot give each" in capsys.readouterr().err
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "data_info.json").write_text("[]")
    assert tool.main(args + ["--out", str(tmp_path / "real"), "--scenes", "3"]) == 2
    assert "looks like a real dataset" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "real", "sim.yaml"]
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["data_info.json"]


# ---- the target rule -----------------------------------------------------------------------
def test_missing_and_empty_folders_are_filled(tmp_path):
    _, what = make("opv2v", tmp_path / "new" / "opv2v")
    assert what == "generated" and folder_state(tmp_path / "new" / "opv2v").kind == "ours"
    (tmp_path / "empty").mkdir()
    _, what = make("dair", tmp_path / "empty")
    assert what == "generated"
    assert (tmp_path / "empty" / "cooperative-vehicle-infrastructure").is_dir()
    assert (tmp_path / "empty" / "cooperative-split-data.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]  # no staging left


def test_our_folder_is_reused_for_the_same_request_and_replaced_for_another(tmp_path):
    out = tmp_path / "syn"
    make("v2xseq", out)
    before = snapshot(out)
    _, what = make("v2xseq", out)
    assert what == "reused" and snapshot(out) == before
    _, what = make("v2xseq", out, seed=1)
    assert what == "replaced" and snapshot(out) != before
    assert json.loads((out / MANIFEST_NAME).read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


@pytest.mark.parametrize("fmt", ["opv2v", "dair", "v2xseq"])
def test_a_foreign_folder_is_never_written(tmp_path, fmt):
    real = tmp_path / "real"
    (real / "train").mkdir(parents=True)
    (real / "train" / "notes.txt").write_text("somebody's data")
    before = snapshot(tmp_path)
    with pytest.raises(ForeignDataError, match="looks like a real dataset") as e:
        make(fmt, real)
    assert "configs/opv2v.yaml" in str(e.value) and "configs/dair_v2x.yaml" in str(e.value)
    with pytest.raises(ForeignDataError):
        generate_dataset(fmt, real, 2, 1, 0, tiny_sim(), progress=False)
    assert snapshot(tmp_path) == before


def test_our_dataset_of_another_format_is_not_replaced(tmp_path):
    out = tmp_path / "syn"
    make("dair", out)
    before = snapshot(tmp_path)
    with pytest.raises(ForeignDataError, match="holds a synthetic DAIR-V2X-C dataset"):
        make("opv2v", out)
    assert snapshot(tmp_path) == before


def test_the_message_names_the_config_of_the_folders_format(tmp_path):
    dair = tmp_path / "dair"
    (dair / "cooperative-vehicle-infrastructure" / "cooperative").mkdir(parents=True)
    with pytest.raises(ForeignDataError, match=r"DAIR-V2X-C, by its layout\).*\n.*"
                                               r"--config configs/dair_v2x.yaml"):
        make("opv2v", dair)
    seq = tmp_path / "V2X-Seq-SPD"
    (seq / "cooperative" / "label").mkdir(parents=True)
    with pytest.raises(ForeignDataError, match="--config configs/v2x_seq.yaml"):
        make("dair", seq)


def test_our_manifest_in_a_mixed_folder_is_neither_reused_nor_replaced(tmp_path):
    out = tmp_path / "mixed"
    make("opv2v", out)
    scenario = next((out / "train").iterdir())
    (out / "train" / "2021_08_22_21_41_24").mkdir()   # a real scenario beside ours
    (out / "train" / "2021_08_22_21_41_24" / "000068.pcd").write_bytes(b"real")
    before = snapshot(tmp_path)
    for seed in (0, 1):  # the same request, another request
        with pytest.raises(ForeignDataError, match="may mix a real dataset"):
            make("opv2v", out, seed=seed)
    assert snapshot(tmp_path) == before and scenario.is_dir()


def test_a_manifest_without_inventory_is_checked_by_its_point_clouds(tmp_path):
    out = tmp_path / "old"
    make("dair", out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["inventory"]  # as written before inventories existed
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert make("dair", out)[1] == "reused"
    velodyne = out / "cooperative-vehicle-infrastructure" / "vehicle-side" / "velodyne"
    (velodyne / "015376.pcd").write_bytes(b"a real frame")
    with pytest.raises(ForeignDataError, match="point clouds"):
        make("dair", out, seed=3)
    assert (velodyne / "015376.pcd").read_bytes() == b"a real frame"


# ---- staging -------------------------------------------------------------------------------
def test_an_interrupted_generation_leaves_nothing_at_the_target(tmp_path, monkeypatch):
    real_scene = sim._generate_scene
    calls = {"n": 0}

    def dying_scene(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("Ctrl-C")
        return real_scene(*args, **kwargs)

    monkeypatch.setattr(sim, "_generate_scene", dying_scene)
    for fmt in ("opv2v", "dair"):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            make(fmt, tmp_path / fmt, scenes=3)
        assert not (tmp_path / fmt).exists()
    (tmp_path / "empty").mkdir()
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        make("v2xseq", tmp_path / "empty", scenes=3)
    assert list((tmp_path / "empty").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]

    # Replacing our own dataset: the old one stays whole until the new one is complete.
    monkeypatch.setattr(sim, "_generate_scene", real_scene)
    make("opv2v", tmp_path / "ours")
    before = snapshot(tmp_path / "ours")
    monkeypatch.setattr(sim, "_generate_scene", dying_scene)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        make("opv2v", tmp_path / "ours", seed=5)
    assert snapshot(tmp_path / "ours") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "ours"]


def test_a_dataset_published_meanwhile_by_another_run_is_kept(tmp_path, monkeypatch):
    """Two runs generating the same dataset at once: the second to finish keeps the first's
    files in place (the first may be reading them) and drops its own."""
    out = tmp_path / "syn"
    real_generate = sim._generate_into
    published = {}

    def racing_generate(*args, **kwargs):
        result = real_generate(*args, **kwargs)
        monkeypatch.setattr(sim, "_generate_into", real_generate)
        make("opv2v", out)  # the other run, finishing first
        published["files"] = snapshot(out)
        published["inode"] = (out / MANIFEST_NAME).stat().st_ino
        return result

    monkeypatch.setattr(sim, "_generate_into", racing_generate)
    make("opv2v", out)
    assert snapshot(out) == published["files"]
    assert (out / MANIFEST_NAME).stat().st_ino == published["inode"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


def _staging_dir(parent: Path, target: str, kind: str, pid: int, host=None) -> Path:
    import socket

    d = parent / f".{target}.v2xfuse-{kind}-{pid}-{len(list(parent.iterdir())):08x}"
    (d / "train").mkdir(parents=True)
    (d / STAGING_MARKER).write_text(json.dumps({
        "pid": pid, "host": host or socket.gethostname(),
        "target": str((parent / target).resolve()), "started": 0}))
    return d


def test_only_our_stale_staging_folders_are_cleaned_up(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = _staging_dir(tmp_path, "syn", "tmp", int(dead))
    stale_old = _staging_dir(tmp_path, "syn", "old", int(dead))
    running = _staging_dir(tmp_path, "syn", "tmp", os.getpid())          # a live generation
    elsewhere = _staging_dir(tmp_path, "syn", "tmp", int(dead), host="another-host")
    unmarked = tmp_path / ".syn.v2xfuse-tmp-1-ffff0000"                  # no marker: not ours
    (unmarked / "data").mkdir(parents=True)
    other_target = _staging_dir(tmp_path, "other", "tmp", int(dead))
    make("opv2v", tmp_path / "syn")
    assert not stale.exists() and not stale_old.exists()
    for kept in (running, elsewhere, unmarked, other_target):
        assert kept.is_dir(), kept


# ---- configs ---------------------------------------------------------------------------------
def test_pair_formats_generate_the_tree_around_their_root(tmp_path):
    cvi = tmp_path / "dair" / "cooperative-vehicle-infrastructure"
    assert synthetic_target({"type": "dair_v2x_c", "root": str(cvi)}) == ("dair", cvi.parent)
    spd = tmp_path / "seq" / "V2X-Seq-SPD"
    assert synthetic_target({"type": "v2x_seq_spd", "root": str(spd)}) == ("v2xseq", spd.parent)
    assert synthetic_target({"type": "opv2v", "root": str(tmp_path / "o")}) == \
        ("opv2v", tmp_path / "o")
    spec = {"scenes": 2, "frames": 1, "seed": 0, "splits": {"train": 0.5, "val": 0.5},
            "sim": {"vehicle_lidar": {"azimuth_steps": 64, "beams": 4},
                    "rsu_lidar": {"azimuth_steps": 64, "beams": 4}}}
    ensure_synthetic({"type": "v2x_seq_spd", "root": str(spd), "synthetic": spec})
    assert (spd / "cooperative" / "data_info.json").is_file()
    assert (spd.parent / "cooperative-split-data-spd.json").is_file()
    assert (spd.parent / MANIFEST_NAME).is_file()
