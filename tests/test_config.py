import os

import pytest

from v2xfuse.config import ConfigError, apply_overrides, dump_config, load_config
from v2xfuse.registry import Registry


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_resolved_relative_to_including_file(tmp_path, monkeypatch):
    write(tmp_path / "configs" / "base" / "model.yaml",
          "model:\n  channels: 64\n  layers: [1, 2]\n  head: {kind: anchor, nms: 0.15}\n"
          "dataset:\n  root: ../../data/x\n")
    child = write(tmp_path / "configs" / "exp.yaml",
                  "_base_: base/model.yaml\nmodel:\n  layers: [3]\n  head: {nms: 0.2}\n")
    monkeypatch.chdir(tmp_path.parent)  # the working directory must not matter
    cfg = load_config(child)
    assert cfg["model"]["channels"] == 64
    assert cfg["model"]["layers"] == [3]  # lists replace
    assert cfg["model"]["head"] == {"kind": "anchor", "nms": 0.2}  # mappings merge
    # Paths resolve relative to the file that set them.
    assert cfg["dataset"]["root"] == str((tmp_path / "data" / "x").resolve())


def test_multiple_bases_and_replace(tmp_path):
    write(tmp_path / "a.yaml", "x: {p: 1, q: 2}\ny: 1\n")
    write(tmp_path / "b.yaml", "y: 2\n")
    c = write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\nx: {_replace_: true, r: 3}\n")
    cfg = load_config(c)
    assert cfg == {"x": {"r": 3}, "y": 2}


def test_overrides_parse_yaml_and_reject_typos(tmp_path):
    c = write(tmp_path / "c.yaml", "train: {lr: 0.001, steps: 10}\nfusion: {method: max}\n")
    cfg = load_config(c, ["train.lr=2e-3", "train.steps=20", "fusion.method=where2comm",
                          "fusion.args={threshold: 0.1}"])
    assert cfg["train"] == {"lr": 2e-3, "steps": 20}
    assert cfg["fusion"]["args"] == {"threshold": 0.1}
    with pytest.raises(ConfigError, match="trian"):
        apply_overrides(cfg, ["trian.lr=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides(cfg, ["train.lr"])


def test_cycles_missing_and_malformed(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "m.yaml", "_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "m.yaml")
    write(tmp_path / "bad.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(tmp_path / "bad.yaml")


def test_dump_round_trip(tmp_path):
    c = write(tmp_path / "c.yaml", "a: {b: [1, 2], c: null}\n")
    cfg = load_config(c)
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
    assert not os.path.exists(tmp_path / "out.yaml.tmp")


def test_registry_rejects_duplicates_and_names_known():
    reg = Registry("widget")

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A and "a" in reg
    with pytest.raises(KeyError, match="already registered"):
        reg.register("a")(object)
    with pytest.raises(KeyError, match="known: a"):
        reg.get("b")


def test_set_may_create_the_optional_channel_attack_and_checks_sections_only():
    from v2xfuse.config import ConfigError, apply_overrides

    cfg = {"model": {"fusion": {"type": "max"}}}
    out = apply_overrides(cfg, ["channel.attack.type=nan", "channel.checks.max_range_m=150"])
    assert out["channel"] == {"attack": {"type": "nan"}, "checks": {"max_range_m": 150}}
    assert "channel" not in cfg
    with pytest.raises(ConfigError, match="model.fusoin"):
        apply_overrides(cfg, ["model.fusoin.type=max"])
