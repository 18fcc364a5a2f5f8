"""V2X-Seq SPD adapter against the synthetic generator's truth, plus a real-row fixture check."""
import json

import numpy as np
import pytest

from v2xfuse.datasets import V2XSeqAdapter
from v2xfuse.datasets.base import DatasetError
from v2xfuse.registry import DATASETS
from v2xfuse.sim import SimConfig, generate_dataset
from v2xfuse.sim.write_dair import WORLD_SHIFT
from v2xfuse.structures import invert_transform, transform_boxes, wrap_angle

TOL = 1e-3


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("spd")
    cfg = SimConfig.from_dict({"vehicle_lidar": {"azimuth_steps": 256, "beams": 8},
                               "rsu_lidar": {"azimuth_steps": 256, "beams": 8}})
    cfg.cameras = False
    _, kept = generate_dataset("v2xseq", out, n_scenes=2, n_frames=3, seed=7, cfg=cfg,
                               splits={"train": 0.5, "val": 0.5}, progress=False, keep_frames=True)
    return out, kept


def test_ground_truth_track_ids_and_poses_match_the_generator(generated):
    out, kept = generated
    assert DATASETS.get("v2x_seq_spd") is V2XSeqAdapter
    nonzero = 0
    for split, (_, frames, _) in zip(("train", "val"), kept):
        adapter = V2XSeqAdapter(out, split)
        assert len(adapter) == len(frames)
        for idx, (sim, info) in enumerate(frames):
            frame = adapter.load(idx)
            veh, inf = sim.agents
            assert (frame.sequence_id, frame.frame_id) == (info["sequence_id"], info["vehicle_id"])
            np.testing.assert_allclose(frame.ego.world_from_lidar, WORLD_SHIFT @ veh.world_from_lidar, atol=1e-6)
            np.testing.assert_allclose(frame.ego_from_agent("infrastructure"),
                                       invert_transform(veh.world_from_lidar) @ inf.world_from_lidar, atol=1e-6)
            np.testing.assert_allclose(frame.agents[1].points[:, :3], inf.points[:, :3], atol=1e-4)
            seen = veh.seen_ids() | inf.seen_ids()
            rows = [r for r, i in enumerate(veh.object_ids) if int(i) in seen]
            assert frame.gt_ids.tolist() == veh.object_ids[rows].tolist()  # track ids = actor ids
            truth = transform_boxes(invert_transform(veh.world_from_lidar), veh.object_boxes[rows])
            np.testing.assert_allclose(frame.gt_boxes[:, :6], truth[:, :6], atol=TOL)
            np.testing.assert_allclose(wrap_angle(frame.gt_boxes[:, 6] - truth[:, 6]), 0, atol=TOL)
            off = info["system_error_offset"]
            if (off["delta_x"], off["delta_y"]) != (0, 0):
                nonzero += 1
                raw = V2XSeqAdapter(out, split, offset_source="none").load(idx)
                # SPD adds the offset in the vehicle frame, not the world frame
                np.testing.assert_allclose(frame.ego_from_agent("infrastructure")[:3, 3]
                                           - raw.ego_from_agent("infrastructure")[:3, 3],
                                           [off["delta_x"], off["delta_y"], 0.0], atol=1e-9)
    assert nonzero > 0


def test_track_ids_persist_across_a_sequence_and_async(generated):
    out, kept = generated
    adapter = V2XSeqAdapter(out, "train")
    a, b = adapter.load(0), adapter.load(1)
    assert set(a.gt_ids.tolist()) & set(b.gt_ids.tolist())
    late = adapter.load(2, {"infrastructure": 2})
    assert late.agents[1].timestamp_us == kept[0][1][0][0].agents[1].timestamp_us
    with pytest.raises(ValueError, match="relative_error"):
        V2XSeqAdapter(out, "train", offset_source="calib")


def test_real_row_spellings_and_bad_track_id(generated, tmp_path):
    import shutil
    out, kept = generated
    root = tmp_path / "V2X-Seq-SPD"
    shutil.copytree(out / "V2X-Seq-SPD", root)
    shutil.copy(out / "cooperative-split-data-spd.json", tmp_path)
    # the real cooperative row mixes "" offsets and string numbers in other fields
    info = root / "cooperative" / "data_info.json"
    rows = json.loads(info.read_text())
    rows[0]["system_error_offset"] = ""
    info.write_text(json.dumps(rows))
    label = root / "cooperative" / "label" / f"{rows[0]['vehicle_frame']}.json"
    labels = json.loads(label.read_text())
    labels[0]["3d_location"]["x"] = str(labels[0]["3d_location"]["x"])
    label.write_text(json.dumps(labels))
    frame = V2XSeqAdapter(tmp_path, "train").load(0)
    assert frame.gt_boxes[0, 0] == pytest.approx(float(labels[0]["3d_location"]["x"]))
    labels[0]["track_id"] = "x1"
    label.write_text(json.dumps(labels))
    with pytest.raises(DatasetError, match=r"track_id"):
        V2XSeqAdapter(tmp_path, "train").load(0)
    del rows[1]["vehicle_frame"]
    info.write_text(json.dumps(rows))
    with pytest.raises(DatasetError, match="data_info.json: row 1: missing field 'vehicle_frame'"):
        V2XSeqAdapter(tmp_path, "train")
