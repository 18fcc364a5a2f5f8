"""Mixed precision (``train.amp``) leaves geometry in full precision: points, poses, anchors and
sampling grids are transformed in float32 (or float64) whatever autocast does to the networks.
Autocast on the CPU lowers the same ops (matmul, addmm, einsum, conv) to bfloat16 as on CUDA, so
these run here; tests/engine/test_cuda_configs.py trains with it on a GPU."""
import math

import numpy as np
import pytest
import torch

from v2xfuse.builder import build_detector
from v2xfuse.models.detector import ego_aligned_frames


def _pose(x, y, yaw):
    c, s = math.cos(yaw), math.sin(yaw)
    t = np.eye(4)
    t[:2, :2] = [[c, -s], [s, c]]
    t[:2, 3] = [x, y]
    return t


POSES = [np.eye(4), _pose(9.3, -4.1, 0.7), _pose(-6.2, 3.3, -2.1)]


def test_senders_points_move_into_the_ego_axes_in_full_precision(random_points_batch):
    batch = random_points_batch(POSES, seed=1)
    exact = ego_aligned_frames(batch, [1, 2], 0.8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ego_aligned_frames(batch, [1, 2], 0.8)
    assert mixed.points.dtype == torch.float32
    torch.testing.assert_close(mixed.points, exact.points, atol=0, rtol=0)
    torch.testing.assert_close(mixed.ego_from_agent, exact.ego_from_agent, atol=0, rtol=0)


@pytest.mark.parametrize("fusion,model", [("max", {"sender_frame": "ego_aligned"}),
                                          ("max", {}), ("early", {}), ("where2comm", {}),
                                          ("codefilling", {})])
def test_a_detector_trains_a_step_under_bf16_autocast(fusion, model, tiny_detector_cfg,
                                                      random_points_batch):
    torch.manual_seed(0)
    detector = build_detector(tiny_detector_cfg(fusion, **model)).train()
    batch = random_points_batch(POSES, seed=2)
    batch = type(batch)(**{**batch.__dict__})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = detector(batch)
        losses = detector.loss(out, batch)
    assert torch.isfinite(losses["loss"]).all()
    losses["loss"].float().backward()
    grads = [p.grad for p in detector.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_the_uncertainty_losses_run_in_float32_under_autocast():
    from v2xfuse.models.heads.uncertainty import attenuated_l2, sampled_logit_bce, von_mises_nll

    g = torch.Generator().manual_seed(0)
    diff, log_var, logits = (torch.randn(50, generator=g) for _ in range(3))
    targets = (torch.rand(50, generator=g) > 0.5).float()
    for fn, args in ((attenuated_l2, (diff, log_var)), (von_mises_nll, (diff, log_var)),
                     (sampled_logit_bce, (logits, log_var, targets))):
        torch.manual_seed(1)
        exact = fn(*args)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # as autocast's networks would hand them over: bfloat16
            mixed = fn(*(a.bfloat16() for a in args))
        assert mixed.dtype == torch.float32, fn.__name__
        widened = [a.bfloat16().float() for a in args]
        torch.manual_seed(1)
        torch.testing.assert_close(mixed, fn(*widened), atol=0, rtol=0)
        torch.testing.assert_close(mixed, exact, atol=0.05, rtol=0.05)
