"""tools/check_dataset.py finds the defects real releases have, on tiny generated copies."""
import json

import pytest

from v2xfuse.sim import SimConfig, generate_dataset



@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    cfg = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 128, "beams": 4},
                               "rsu_lidar": {"azimuth_steps": 128, "beams": 4},
                               "scene": {"n_cavs": 2}})
    cfg.cameras = False
    out = {}
    for fmt in ("opv2v", "dair", "v2xseq"):
        root = tmp_path_factory.mktemp(fmt)
        generate_dataset(fmt, root, n_scenes=1, n_frames=2, seed=1, cfg=cfg, splits={"train": 1.0},
                         progress=False)
        out[fmt] = root
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("fmt", ["opv2v", "dair", "v2xseq"])
def test_clean_data_passes(load_tool, datasets, fmt, capsys):
    assert load_tool("check_dataset").main(["--format", fmt, "--root", str(datasets[fmt])]) == 0
    assert "problems: 0" in capsys.readouterr().out


def test_dair_defects_are_listed(load_tool, datasets, tmp_path, capsys):
    root = _copy(datasets["dair"], tmp_path / "d") / "cooperative-vehicle-infrastructure"
    infra = root / "infrastructure-side"
    pcds = sorted((infra / "velodyne").glob("*.pcd"))
    pcds[0].unlink()                                                   # missing pcd
    pcds[1].write_bytes(pcds[1].read_bytes()[:40])                     # truncated header
    calib = sorted((root / "vehicle-side" / "calib" / "novatel_to_world").glob("*.json"))[0]
    calib.unlink()                                                     # missing calib
    label = sorted((root / "cooperative" / "label_world").glob("*.json"))[0]
    label.write_text("[{")                                             # malformed JSON
    assert load_tool("check_dataset").main(["--format", "dair", "--root", str(root.parent)]) == 1
    out = capsys.readouterr().out
    assert f"{pcds[0]}: point cloud file is missing" in out
    assert str(pcds[1]) in out and "malformed pcd: 1" in out
    assert f"{calib}: calibration file (calib_novatel_to_world_path) is missing" in out
    assert f"{label}: malformed JSON" in out
    assert "problems: 4" in out


def test_opv2v_and_v2xseq_defects_are_listed(load_tool, datasets, tmp_path, capsys):
    root = _copy(datasets["opv2v"], tmp_path / "o")
    yaml = sorted(root.rglob("*.yaml"))
    yaml = [p for p in yaml if p.parent.name.lstrip("-").isdigit()]
    yaml[0].write_text("lidar_pose: [1, 2\n")
    assert load_tool("check_dataset").main(["--format", "opv2v", "--root", str(root)]) == 1
    assert "malformed yaml: 1" in capsys.readouterr().out
    spd = _copy(datasets["v2xseq"], tmp_path / "s") / "V2X-Seq-SPD"
    info = spd / "cooperative" / "data_info.json"
    rows = json.loads(info.read_text())
    rows[0]["infrastructure_frame"] = "999999"
    info.write_text(json.dumps(rows))
    assert load_tool("check_dataset").main(["--format", "v2xseq", "--root", str(spd), "--quiet"]) == 1
    assert "missing frame: 1" in capsys.readouterr().out
