"""The shipped configs on a GPU: each trains two steps and evaluates through the channel on
CUDA with the real builder, trainer and evaluation, and a detector gives the same boxes on CUDA
as on the CPU (skipped without a GPU)."""
import json

import pytest
import torch

from v2xfuse.engine.trainer import Trainer, load_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# (config, cameras, overrides of model.*): every encoder, backbone and fusion family
CASES = {
    "max": ("quickstart", False, {}),
    "where2comm": ("quickstart", False, {"fusion": {"type": "where2comm"}}),
    "codefilling": ("methods/codefilling", False, {}),
    "second": ("quickstart", False, {"encoder": {"_replace_": True, "type": "second",
                                                 "voxel_size": [0.8, 0.8, 0.5]}}),
    "sparse_backbone": ("quickstart", False, {"backbone": {"type": "sparse"}}),
    "camera": ("camera", True, {}),
    "lidar_camera": ("experimental/lidar_camera", True, {}),
    "query": ("experimental/query", False, {}),
    "quest": ("experimental/quest", False, {"fusion": {"score_threshold": 0.0, "top_k": 4}}),
    "acco": ("experimental/acco", False, {"fusion": {"score_threshold": 0.0, "top_k": 4}}),
    "codyntrust": ("experimental/codyntrust", False, {"fusion": {"passes": 2}}),
}


def _merge(base: dict, over: dict) -> None:
    """``over`` into ``base`` key by key; a mapping with ``_replace_`` replaces its base."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and not v.get("_replace_"):
            _merge(base[k], v)
        else:
            base[k] = {a: b for a, b in v.items() if a != "_replace_"} \
                if isinstance(v, dict) else v


def _fit_on_cuda(case: str, tiny_experiment, tmp_path_factory, **train) -> tuple[dict, dict]:
    """CASES[case] trained 2 steps on CUDA (``train`` keys added) and evaluated on 2 frames ->
    (results, checkpoint); one dataset per kind, generated once."""
    name, cameras, model = CASES[case]
    data = tmp_path_factory.getbasetemp() / ("cuda_cam" if cameras else "cuda_lidar")
    cfg = tiny_experiment(name, data, cameras=cameras)
    if cameras:
        cfg["pipeline"].setdefault("cameras", {})["image_size"] = [32, 64]
    _merge(cfg["model"], model)
    cfg["train"].update(steps=2, val_frames=2, **train)
    work = tmp_path_factory.mktemp("work_" + "_".join([case, *map(str, train.values())]))
    Trainer(cfg, work, device="cuda", tensorboard=False, progress=False).fit()
    results = json.loads((work / "results_val.json").read_text())
    assert results["frames"] == 2 and results["ap_50"] == results["ap_50"]  # not NaN
    return results, load_checkpoint(work / "last.pt")


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_config_trains_and_evaluates_on_cuda(case, tiny_experiment, tmp_path_factory):
    _, state = _fit_on_cuda(case, tiny_experiment, tmp_path_factory)
    assert state["step"] == 2
    for key, value in state["model"].items():
        assert value.device.type == "cpu", key  # checkpoints load anywhere
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


def test_the_same_detector_gives_the_same_boxes_on_cuda_as_on_cpu(tiny_detector_cfg,
                                                                   random_points_batch):
    from v2xfuse.builder import build_detector

    torch.manual_seed(0)
    eye = torch.eye(4).numpy()
    moved = eye.copy()
    moved[0, 3] = 4.0
    batch = random_points_batch([eye, moved], seed=3)
    model = build_detector(tiny_detector_cfg("max")).eval()
    with torch.no_grad():
        cpu = model.predict(model(batch))
        model.to("cuda")
        gpu = model.predict(model(batch.to("cuda")))
    assert len(cpu) == len(gpu) == 1
    a, b = cpu[0], gpu[0]
    assert b.boxes.device.type == "cuda"
    top = min(len(a.boxes), len(b.boxes), 20)
    assert top > 0
    torch.testing.assert_close(b.scores[:top].cpu(), a.scores[:top], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.boxes[:top].cpu(), a.boxes[:top], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("case", ["max", "camera", "codyntrust", "second"])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_config_trains_with_mixed_precision_on_cuda(case, amp, tiny_experiment,
                                                      tmp_path_factory):
    _, state = _fit_on_cuda(case, tiny_experiment, tmp_path_factory, amp=amp)
    for key, value in state["model"].items():  # the weights stay float32
        if value.is_floating_point():
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
