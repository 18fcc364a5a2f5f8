"""Batched OPV2V box extraction against the per-vehicle loop it replaced: same bits, same errors."""
import math

import numpy as np
import pytest
import yaml

from v2xfuse.formats import opv2v as fmt


def _yaml_frame(rng, n):
    """A frame's yaml text: tilted and level actors, yaw on the axes, zero and non-zero centres."""
    vehicles = {}
    for _ in range(n):
        angle = rng.uniform(-180, 180, 3)
        if rng.random() < 0.5:
            angle[0] = angle[2] = 0.0
        if rng.random() < 0.2:
            angle[1] = float(rng.choice([0, 90, -90, 180]))
        vehicles[int(rng.integers(0, 10**6))] = {
            "location": rng.uniform(-300, 300, 3).tolist(),
            "angle": angle.tolist(),
            "center": (rng.uniform(-1, 1, 3) * (rng.random() < 0.7)).tolist(),
            "extent": rng.uniform(0, 3, 3).tolist(),
            "speed": float(rng.uniform(0, 50)),
        }
    return yaml.safe_dump({"lidar_pose": rng.uniform(-100, 100, 6).tolist(),
                           "vehicles": vehicles})


def test_batched_boxes_are_bit_identical_to_the_loop():
    rng = np.random.default_rng(7)
    for trial in range(60):
        meta = yaml.load(_yaml_frame(rng, int(rng.integers(1, 50))), Loader=fmt.YamlLoader)
        world_from_lidar = fmt.world_from_lidar_rh(meta, "f.yaml")
        ids, boxes = fmt.vehicle_boxes(meta, world_from_lidar, "f.yaml")
        ref_ids, ref_boxes = fmt._vehicle_boxes_per_entry(meta, world_from_lidar, "f.yaml")
        np.testing.assert_array_equal(ids, ref_ids)
        assert boxes.dtype == ref_boxes.dtype and boxes.shape == ref_boxes.shape
        assert boxes.tobytes() == ref_boxes.tobytes(), f"trial {trial}"


def test_no_vehicles_gives_empty_arrays():
    ids, boxes = fmt.vehicle_boxes({"vehicles": {}}, np.eye(4), "f.yaml")
    assert ids.shape == (0,) and boxes.shape == (0, 7)


GOOD = {"location": [1, 2, 0], "angle": [0, 30, 0], "center": [0, 0, 0.7], "extent": [2, 1, 0.7]}


@pytest.mark.parametrize("vehicles", [
    {1: GOOD, 2: {**GOOD, "extent": [1, -1, 1]}, 3: {**GOOD, "angle": [0, math.nan, 0]}},
    {1: GOOD, "x": GOOD, 3: {"location": [0, 0, 0]}},
    {1: GOOD, 2: {"location": [0, 0, 0]}, "x": GOOD},
    {1: GOOD, 2: [1, 2, 3]},
    {1: GOOD, 2: {**GOOD, "location": [1e308, 0, 0], "center": [1e308, 0, 0]}, "x": GOOD},
    {1: GOOD, "x": {**GOOD, "location": [1e308, 0, 0], "center": [1e308, 0, 0]}},
])
def test_errors_name_the_first_bad_vehicle_as_the_loop_did(vehicles):
    meta = {"vehicles": vehicles}
    with pytest.raises(ValueError) as ref:
        fmt._vehicle_boxes_per_entry(meta, np.eye(4), "f.yaml")
    with pytest.raises(ValueError) as got:
        fmt.vehicle_boxes(meta, np.eye(4), "f.yaml")
    assert str(got.value) == str(ref.value)
    assert str(got.value).startswith("f.yaml: vehicles[")
