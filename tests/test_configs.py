"""The committed experiment configs: each builds its detector; the real-data ones never carry a
synthetic section and say "not found" for an empty or missing root instead of generating."""
import math
from pathlib import Path

import pytest
import torch

from v2xfuse.builder import build_dataset, build_detector
from v2xfuse.config import load_config
from v2xfuse.datasets import DatasetError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Experiment configs: the top level, methods/ and experimental/ (datasets/ and recipes/ hold
# sections only).
EXPERIMENTS = sorted([*CONFIGS.glob("*.yaml"), *(CONFIGS / "methods").glob("*.yaml"),
                      *(CONFIGS / "experimental").glob("*.yaml")])
REAL = {"opv2v": "opv2v", "dair_v2x": "dair_v2x_c", "v2x_seq": "v2x_seq_spd"}


def test_the_expected_configs_exist():
    names = {p.stem for p in EXPERIMENTS}
    assert {"quickstart", "quickstart_dair", *REAL} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_config_builds_its_detector(path):
    cfg = load_config(path)
    model = build_detector(cfg)
    grid = model.encoder.grid
    stride = math.prod(cfg["model"]["backbone"]["layer_strides"])
    # Every stage's map must upsample back to one size: the grid divides by the total stride.
    assert grid.nx % stride == 0 and grid.ny % stride == 0, (grid.nx, grid.ny, stride)
    assert abs(grid.nx * grid.cell - (grid.x_max - grid.x_min)) < 1e-6


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_config_switches_heads_with_one_override(path):
    """Each head's options sit under its name: --set model.head.type=center leaves the anchor
    options behind instead of failing on them."""
    from v2xfuse.models.heads.center_head import CenterHead
    from v2xfuse import fusion  # noqa: F401  (registers the methods)
    from v2xfuse.registry import FUSION

    cfg = load_config(path, ["model.head.type=center"])
    fusion_cls = FUSION.get(cfg["model"]["fusion"]["type"])
    if any(p.startswith("decoder:") for p in fusion_cls.contract.fuses_at):  # a query head only
        with pytest.raises(ValueError, match="fuses object queries"):
            build_detector(cfg)
        return
    if fusion_cls.contract.uncertainty:
        # a method that needs the head's uncertainty (CoDynTrust) says the center head has none
        with pytest.raises(KeyError, match="does not predict it"):
            build_detector(cfg)
        return
    model = build_detector(cfg)
    assert isinstance(model.head, CenterHead)


@pytest.mark.parametrize("name, sizes", [
    ("opv2v", [[-1.0, 3.9, 1.6, 1.56]]), ("dair_v2x", [[-1.0, 4.5, 2.0, 1.56]]),
    ("quickstart", [[-1.1, 4.5, 1.9, 1.6], [-0.25, 9.0, 2.5, 3.3]])])  # a car's and a truck's
def test_the_anchors_of_each_config(name, sizes):
    head = build_detector(load_config(CONFIGS / f"{name}.yaml")).head
    assert head.anchors[:, 2:6].unique(dim=0).tolist() == torch.tensor(sizes).tolist()
    assert head.anchors[:, 6].unique().tolist() == torch.tensor([0.0, math.pi / 2]).tolist()
    assert (head.pos_iou, head.neg_iou) == (0.6, 0.45)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_configs_have_no_synthetic_section(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg["dataset"]["type"] == REAL[name]
    assert not {"synthetic", "generate_dir"} & set(cfg["dataset"])


def test_v2x_seq_keeps_only_its_own_dataset_keys():
    """v2x_seq.yaml inherits DAIR-V2X-C's experiment: no DAIR-only dataset key may leak in."""
    assert load_config(CONFIGS / "v2x_seq.yaml")["dataset"] == \
        load_config(CONFIGS / "datasets" / "v2x_seq.yaml")["dataset"]


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_configs_on_an_empty_or_missing_folder_say_not_found(name, tmp_path):
    (tmp_path / "empty").mkdir()
    for root, what in ((tmp_path / "empty", "is empty"), (tmp_path / "missing", "does not exist")):
        cfg = load_config(CONFIGS / f"{name}.yaml", [f"dataset.root={root}"])
        with pytest.raises(DatasetError, match=f"dataset not found: dataset.root {root} {what}"):
            build_dataset(cfg, "train", train=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert list((tmp_path / "empty").iterdir()) == []


def test_quickstart_dair_is_the_synthetic_dair_twin():
    cfg = load_config(CONFIGS / "quickstart_dair.yaml")
    quick = load_config(CONFIGS / "quickstart.yaml")
    assert cfg["dataset"]["type"] == "dair_v2x_c" and cfg["dataset"]["synthetic"]
    assert cfg["eval"]["mode"] == "dair"
    assert cfg["model"] == quick["model"] and cfg["train"] == quick["train"]
    assert cfg["channel"] == quick["channel"]
    x0, y0, _, x1, y1, _ = cfg["pipeline"]["lidar_range"]
    assert x0 <= 0 and x1 >= 100 and y0 <= -39.68 and y1 >= 39.68  # DAIR's evaluated region
