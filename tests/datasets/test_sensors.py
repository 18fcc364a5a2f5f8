"""``dataset.sensors``: agents lose the data of the sensors they do not carry when the adapter
reads them (their files are not even read), and nothing else changes; a config naming an
unknown kind or sensor is an error naming the key."""
import shutil

import numpy as np
import pytest

from v2xfuse.builder import build_adapter
from v2xfuse.datasets import (CoopSampler, DairV2XCAdapter, DatasetError, Opv2vAdapter,
                              PipelineConfig)
from v2xfuse.datasets.sensors import AgentSensors

HETERO = {"ego": ["lidar"], "vehicle": ["lidar"], "infrastructure": ["camera"]}


def _opv2v(root, **kw):
    return Opv2vAdapter(root, "train", max_agents=8, comm_range=1e3, load_images=True, **kw)


def _same_camera(a, b):
    assert a.name == b.name and np.array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.intrinsic, b.intrinsic)
    np.testing.assert_array_equal(a.lidar_from_camera, b.lidar_from_camera)


def test_opv2v_agents_keep_only_the_sensors_they_carry(tiny_camera_data):
    root = tiny_camera_data("opv2v")
    plain = _opv2v(root, history_frames=1)
    mixed = _opv2v(root, history_frames=1,
                   sensors={"ego": ["lidar", "camera"], "vehicle": ["lidar"],
                            "infrastructure": ["camera"]})
    for idx in range(len(plain)):
        full, frame = plain.load(idx), mixed.load(idx)
        np.testing.assert_array_equal(frame.gt_boxes, full.gt_boxes)
        np.testing.assert_array_equal(frame.gt_ids, full.gt_ids)
        kinds = [a.kind for a in frame.agents]
        assert kinds == [a.kind for a in full.agents] and "infrastructure" in kinds
        assert sum(k == "vehicle" for k in kinds) == 2  # the ego and a CAV
        for i, (a, b) in enumerate(zip(frame.agents, full.agents)):
            np.testing.assert_array_equal(a.world_from_lidar, b.world_from_lidar)
            assert a.timestamp_us == b.timestamp_us and len(a.history) == len(b.history)
            lidar = a.kind == "vehicle"
            camera = i == 0 or a.kind == "infrastructure"
            for obs, ref in zip([a, *a.history], [b, *b.history]):
                if lidar:
                    np.testing.assert_array_equal(obs.points, ref.points)
                    assert len(ref.points) > 0
                else:
                    assert obs.points.shape == (0, 4) and obs.points.dtype == np.float32
                assert len(obs.cameras) == (len(ref.cameras) if camera else 0)
                for c, r in zip(obs.cameras, ref.cameras):
                    _same_camera(c, r)
        assert len(frame.agents[0].cameras) == 4


def test_the_files_of_sensors_an_agent_lacks_are_not_read(tiny_camera_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_camera_data("opv2v"), root)
    scenario = next((root / "train").iterdir())
    for agent in (p for p in scenario.iterdir() if p.is_dir()):
        doomed = "*.pcd" if int(agent.name) < 0 else "*_camera*.png"
        for path in agent.glob(doomed):
            path.unlink()
    with pytest.raises(DatasetError, match="is missing"):
        _opv2v(root).load(0)
    frame = _opv2v(root, sensors=HETERO).load(0)
    assert [len(a.points) > 0 for a in frame.agents] == [a.kind == "vehicle" for a in frame.agents]
    assert [len(a.cameras) for a in frame.agents] == [int(a.kind == "infrastructure")
                                                      for a in frame.agents]


def test_the_ego_falls_back_to_its_kind_and_unlisted_kinds_keep_everything():
    sensors = AgentSensors.from_config({"vehicle": ["camera"]})
    assert sensors.of("vehicle", ego=True) == {"camera"} == sensors.of("vehicle", ego=False)
    assert sensors.of("infrastructure", ego=False) == {"lidar", "camera"}
    both = AgentSensors.from_config({"ego": ["lidar", "camera"], "vehicle": ["lidar"]})
    assert both.of("vehicle", ego=True) == {"lidar", "camera"}
    assert both.of("vehicle", ego=False) == {"lidar"}
    assert AgentSensors.from_config(None).of("vehicle", ego=True) == {"lidar", "camera"}


def test_dair_camera_only_roadside_unit_and_lidar_only_vehicle(tiny_camera_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_camera_data("dair"), root)
    inner = root / "cooperative-vehicle-infrastructure"
    plain = DairV2XCAdapter(root, "train", load_images=True).load(1)
    for path in (inner / "vehicle-side" / "image").iterdir():  # never read
        path.unlink()
    for path in (inner / "infrastructure-side" / "velodyne").iterdir():
        path.unlink()
    frame = DairV2XCAdapter(root, "train", load_images=True,
                            sensors={"vehicle": ["lidar"], "infrastructure": ["camera"]}).load(1)
    vehicle, infra = frame.agents
    np.testing.assert_array_equal(vehicle.points, plain.agents[0].points)
    assert vehicle.cameras == [] and infra.points.shape == (0, 4)
    _same_camera(infra.cameras[0], plain.agents[1].cameras[0])
    np.testing.assert_array_equal(frame.gt_boxes, plain.gt_boxes)
    np.testing.assert_array_equal(infra.world_from_lidar, plain.agents[1].world_from_lidar)


def test_a_camera_only_agent_goes_through_the_pipeline(tiny_camera_data):
    adapter = _opv2v(tiny_camera_data("opv2v"), sensors=HETERO)
    pipeline = PipelineConfig.from_dict({"flip_prob": 1.0, "rotate_deg": 20.0,
                                         "cameras": {"image_size": [24, 40]}})
    sample = CoopSampler(adapter, pipeline, train=True, seed=3)[1]
    kinds = sample.agent_kinds
    assert [len(p) == 0 for p in sample.points] == [k == "infrastructure" for k in kinds]
    assert [len(c) for c in sample.cameras] == [0 if k == "vehicle" else 1 for k in kinds]
    assert sample.cameras[kinds.index("infrastructure")][0].image.shape == (24, 40, 3)


@pytest.mark.parametrize("section,error,text", [
    ({"rsu": ["camera"]}, KeyError, "dataset.sensors.rsu: unknown agent kind 'rsu' (known: ego, "
                                    "vehicle, infrastructure)"),
    ({"vehicle": ["lidar", "radar"]}, KeyError, "dataset.sensors.vehicle: unknown sensor 'radar'"),
    ({"infrastructure": []}, ValueError, "dataset.sensors.infrastructure: an agent needs at least"),
    ({"ego": "lidar"}, TypeError, "dataset.sensors.ego: expected a list of sensors"),
    (["lidar"], TypeError, "dataset.sensors: expected a mapping"),
])
def test_an_unknown_kind_or_sensor_is_an_error_naming_the_key(tiny_camera_data, section, error,
                                                              text):
    with pytest.raises(error) as err:
        build_adapter({"type": "opv2v", "root": str(tiny_camera_data("opv2v")),
                       "sensors": section}, "train")
    assert text in str(err.value)
