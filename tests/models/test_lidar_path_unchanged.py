"""The LiDAR-only detector computes what it computed before encoders took typed inputs and
sensors got their own encoders: same parameters under the same names, same BEV maps.

The reference numbers were printed by the code of commit 71b0e50 (``model.encoder(points, 3)``
and ``model.bev(points, 3)``) for the model and points below."""
from pathlib import Path

import numpy as np
import pytest
import torch

from v2xfuse.builder import build_detector
from v2xfuse.config import load_config
from v2xfuse.models.inputs import AgentInputs

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"

# per-channel sums over agents and cells: the encoder in training mode, the backbone in eval mode
ENCODER_TRAIN_SUMS = [
    12809.7255, 6427.8935, 15512.2366, 12054.2992, 6646.2158, 7551.8961, 13697.1381, 9087.571,
    6570.6336, 13320.6312, 832.2943, 7677.6718, 3934.1262, 10248.337, 5338.2434, 8503.3839,
    10160.3182, 14265.5326, 3885.5638, 278.6674, 7553.5901, 14522.5092, 7316.1672, 15918.3402,
    5872.7049, 13894.2987, 3240.2575, 4805.7063, 17673.3118, 7107.8914, 2798.0662, 6845.9341]
BEV_EVAL_SUMS = [
    38.8421, 30.9504, 227.5168, 38.3514, 74.2392, 57.6732, 59.243, 34.7006, 15.4349, 45.9269,
    2.2795, 3.6167, 15.6821, 30.6102, 138.4477, 19.542, 62.4182, 6.6774, 48.4063, 133.3794,
    26.8478, 37.0763, 2.619, 101.6265, 16.1041, 14.458, 87.7019, 0.2089, 5.3153, 78.7997,
    14.9016, 57.7736, 1.3193, 1.8732, 0.5697, 2.7651, 1.1603, 0.8528, 0.6053, 2.7352, 0.2857,
    1.0471, 0.6258, 1.1002, 1.8737, 1.1055, 1.4186, 0.9234, 0.8886, 1.6681, 1.4042, 1.0155,
    1.5861, 1.6748, 2.3608, 2.5174, 1.0391, 0.4119, 2.0167, 1.002, 1.7102, 1.0466, 0.9957,
    2.3286]
OLD_ENCODER_KEYS = ["encoder.pfn.linear.weight", "encoder.pfn.norm.weight",
                    "encoder.pfn.norm.bias", "encoder.pfn.norm.running_mean",
                    "encoder.pfn.norm.running_var", "encoder.pfn.norm.num_batches_tracked"]


def _points() -> torch.Tensor:
    rng = np.random.default_rng(7)
    pts = [np.c_[np.full(3000, a), rng.uniform(-38, 38, (3000, 2)), rng.uniform(-4.5, 2.5, (3000, 1)),
                 rng.uniform(0, 1, (3000, 1))] for a in range(3)]
    return torch.from_numpy(np.concatenate(pts).astype(np.float32))


def _model(cfg: dict):
    torch.manual_seed(0)
    return build_detector(cfg)


def _quickstart_as_encoders() -> dict:
    """quickstart.yaml with its ``model.encoder`` moved to ``model.encoders.lidar``."""
    cfg = load_config(QUICKSTART)
    cfg["model"]["encoders"] = {"lidar": cfg["model"].pop("encoder")}
    return cfg


@pytest.mark.parametrize("layout", ["encoder", "encoders"])
def test_quickstart_lidar_maps_are_the_ones_the_old_code_computed(layout):
    cfg = load_config(QUICKSTART) if layout == "encoder" else _quickstart_as_encoders()
    model = _model(cfg)
    inputs = AgentInputs(3, _points())
    with torch.no_grad():
        model.train()
        encoded = model.encoder(inputs)
        model.eval()
        bev = model.bev(inputs)
    assert encoded.shape == (3, 32, 96, 96) and bev.shape == (3, 64, 96, 96)
    # float32 batch-norm statistics and convolutions reduce in an order that depends on the
    # thread count: with one thread instead of two the sums moved by up to 7e-4 relative
    np.testing.assert_allclose(encoded.double().sum((0, 2, 3)).numpy(), ENCODER_TRAIN_SUMS,
                               rtol=2e-3, atol=1e-3)
    np.testing.assert_allclose(bev.double().sum((0, 2, 3)).numpy(), BEV_EVAL_SUMS,
                               rtol=2e-3, atol=1e-3)


def test_a_state_dict_of_the_old_layout_loads_into_both_config_layouts():
    old = _model(load_config(QUICKSTART))
    state = old.state_dict()
    assert [k for k in state if k.startswith("encoder.")] == OLD_ENCODER_KEYS
    new = _model(_quickstart_as_encoders())
    assert list(new.state_dict()) == list(state)  # no fuser layer for a single sensor
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)  # a load that skipped a tensor would leave it differing
    new.load_state_dict(state, strict=True)
    inputs = AgentInputs(3, _points())
    old.eval()
    new.eval()
    with torch.no_grad():
        assert torch.equal(old.bev(inputs), new.bev(inputs))
