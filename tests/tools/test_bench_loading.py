"""tools/bench_loading.py's disk-cache rows on tiny data: what they measure, not how fast."""
import pytest

from v2xfuse.datasets import Opv2vAdapter
from v2xfuse.sim import SimConfig, generate_dataset


@pytest.fixture(scope="module")
def tiny_opv2v(tmp_path_factory):
    root = tmp_path_factory.mktemp("opv2v")
    cfg = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 128, "beams": 8},
                               "rsu_lidar": {"azimuth_steps": 128, "beams": 8},
                               "scene": {"n_cavs": 2, "n_rsus": 1}})
    cfg.cameras = False
    generate_dataset("opv2v", root, n_scenes=1, n_frames=2, seed=4, cfg=cfg,
                     splits={"train": 1.0}, progress=False)
    return root


def test_cache_rows_time_hits_only_and_leave_the_adapter_as_it_was(load_tool, tiny_opv2v, tmp_path):
    bench = load_tool("bench_loading")
    make = lambda **kw: Opv2vAdapter(tiny_opv2v, "train", max_agents=5, comm_range=1e3, **kw)  # noqa: E731
    plain = make()
    clouds = bench.frame_clouds(plain, 0)
    assert len(clouds) == len(plain.load(0).agents) and "get" not in vars(plain.points)
    rows = bench.cache_rows("tiny", make, tmp_path / "cache", reps=1)
    assert [r[2] for r in rows] == ["clouds: decode", "clouds: cache hit", "load: no cache",
                                    "load: cache hit"]
    assert all(r[1] > 0 and r[3] >= 0 for r in rows)
    assert rows[0][4] == rows[2][4] == 1.0  # the references
    assert len(list((tmp_path / "cache").rglob("*.pts"))) == sum(
        len(plain.load(i).agents) for i in range(len(plain)))
