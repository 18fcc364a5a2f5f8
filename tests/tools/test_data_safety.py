"""No tool writes into a real dataset: the synthetic configs pointed at one stop with a clear
error, and the real-data configs read one without changing a byte.

The "real" datasets are small ones in each format (OPV2V, DAIR-V2X-C, V2X-Seq SPD) written by the
generator, with our manifest deleted: to the tools they look like users' downloads.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from v2xfuse.builder import build_dataset, build_detector
from v2xfuse.config import load_config
from v2xfuse.datasets import collate
from v2xfuse.sim import MANIFEST_NAME, SimConfig, generate_dataset

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"


def sha256_tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones too) -> sha256 of the file, "<dir>" for folders."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "<dir>"
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """{"base": folder holding the three datasets, format: the root a user would give}."""
    base = tmp_path_factory.mktemp("data")
    cfg = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 256, "beams": 8},
                               "rsu_lidar": {"azimuth_steps": 256, "beams": 8},
                               "scene": {"n_cavs": 2, "n_rsus": 1}})
    cfg.cameras = False
    roots = {}
    for fmt, folder, val, inner in (
            ("opv2v", "OPV2V", "validate", None),
            ("dair", "DAIR-V2X-C", "val", "cooperative-vehicle-infrastructure"),
            ("v2xseq", "V2X-Seq", "val", "V2X-Seq-SPD")):
        generate_dataset(fmt, base / folder, 3, 1, seed=2, cfg=cfg,
                         splits={"train": 1 / 3, val: 1 / 3, "test": 1 / 3}, progress=False,
                         workers=1)
        (base / folder / MANIFEST_NAME).unlink()  # now it is somebody's download
        roots[fmt] = base / folder / inner if inner else base / folder
    return {"base": base, **roots}


@pytest.fixture
def unchanged(real):
    """Fails the test if any file under the datasets' folder changed, appeared or vanished."""
    before = sha256_tree(real["base"])
    yield
    after = sha256_tree(real["base"])
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert (added, removed, changed) == ([], [], []), "the tools touched the real data"


def synthetic_configs(tmp_path: Path) -> dict[str, Path]:
    """The synthetic experiment configs: the two quickstarts and a V2X-Seq one built like them."""
    seq = tmp_path / "synthetic_v2xseq_experiment.yaml"
    seq.write_text(f"_base_: [{CONFIGS / 'quickstart_dair.yaml'}, "
                   f"{CONFIGS / 'datasets' / 'synthetic_v2xseq.yaml'}]\n")
    return {"quickstart": CONFIGS / "quickstart.yaml",
            "quickstart_dair": CONFIGS / "quickstart_dair.yaml", "v2xseq": seq}


def user_roots(real) -> list[Path]:
    """What users pass as dataset.root: each dataset folder, and for the pair formats also the
    folder above it (where the split file lives)."""
    return [real["opv2v"], real["dair"], real["dair"].parent, real["v2xseq"],
            real["v2xseq"].parent]


def test_train_tool_never_generates_into_a_real_dataset(load_tool, real, unchanged, tmp_path, capsys):
    train = load_tool("train")
    for name, config in synthetic_configs(tmp_path).items():
        for root in user_roots(real):
            work = tmp_path / "work" / f"{name}_{root.name}"
            assert train.main(["--config", str(config), "--set", f"dataset.root={root}",
                               "--set", "train.steps=1", "--work-dir", str(work),
                               "--no-tensorboard", "--quiet"]) == 2
            message = capsys.readouterr().err
            assert message.startswith("error: ")
            assert "looks like a real dataset" in message, (name, root)
            assert "Nothing was written" in message
            for real_config in ("configs/opv2v.yaml", "configs/dair_v2x.yaml",
                                "configs/v2x_seq.yaml"):
                assert real_config in message


def test_eval_tool_never_generates_into_a_real_dataset(load_tool, real, unchanged, tmp_path, capsys):
    evaluate = load_tool("eval")
    for name, config in synthetic_configs(tmp_path).items():
        cfg = load_config(config)
        checkpoint = tmp_path / f"{name}.pt"
        torch.save({"model": build_detector(cfg).state_dict(), "config": cfg, "step": 0},
                   checkpoint)
        for root in user_roots(real):
            assert evaluate.main(["--checkpoint", str(checkpoint),
                                  "--set", f"dataset.root={root}"]) == 2
            assert "looks like a real dataset" in capsys.readouterr().err
            assert evaluate.main(["--checkpoint", str(checkpoint), "--config", str(config),
                                  "--set", f"dataset.root={root}", "--split", "test"]) == 2
            assert "looks like a real dataset" in capsys.readouterr().err


def test_train_command_line_stops_with_the_message(real, unchanged, tmp_path):
    """The command from the bug report, as a user runs it."""
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), "--config",
         str(CONFIGS / "quickstart.yaml"), "--set", f"dataset.root={real['opv2v']}",
         "--set", "train.steps=1", "--work-dir", str(tmp_path / "work"), "--no-tensorboard",
         "--quiet"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 2 and res.stderr.startswith("error: ")
    assert "looks like a real dataset" in res.stderr
    assert f"--config configs/opv2v.yaml --set dataset.root={real['opv2v']}" in res.stderr


@pytest.mark.parametrize("name,fmt", [("opv2v", "opv2v"), ("dair_v2x", "dair"),
                                      ("v2x_seq", "v2xseq")])
def test_real_configs_read_a_real_dataset_without_changing_it(real, unchanged, name, fmt):
    cfg = load_config(CONFIGS / f"{name}.yaml", [f"dataset.root={real[fmt]}"])
    assert "synthetic" not in cfg["dataset"]
    for split in ("train", "val", "test"):
        data = build_dataset(cfg, split, train=split == "train")
        assert len(data) == 1, split
    if fmt == "v2xseq":  # DAIR-V2X-C's model and range: its forward pass is checked there
        return
    if fmt == "opv2v":  # one agent: each 704 x 200 map costs seconds on a CPU
        cfg = load_config(CONFIGS / f"{name}.yaml", [f"dataset.root={real[fmt]}",
                                                     "dataset.max_agents=1"])
        data = build_dataset(cfg, "test", train=False)
    model = build_detector(cfg).eval()
    with torch.no_grad():
        out = model(collate([data[0]]))
    # The grid divides by the backbone's strides: the head sees the whole range at stride 2.
    grid = model.encoder.grid
    assert tuple(out.head.cls.shape[-2:]) == (grid.ny // 2, grid.nx // 2)
