"""The anchor head's aleatoric uncertainty (log-variances of x, y, yaw and of the logit, their
losses) and Monte Carlo dropout passes that leave the dropout off afterwards."""
import math

import pytest
import torch

from v2xfuse.builder import build_head
from v2xfuse.models.heads.anchor_head import AnchorHead
from v2xfuse.models.heads.uncertainty import attenuated_l2, sampled_logit_bce, von_mises_nll
from v2xfuse.structures.bev import BevGrid

GRID = BevGrid(-12.8, -12.8, 12.8, 12.8, 0.8)
CAR = torch.tensor([[3.0, 1.0, -1.0, 4.5, 1.9, 1.6, 0.3]])


def _argmin(loss_of_s):
    s = torch.linspace(-8, 4, 12001)
    return float(s[loss_of_s(s).argmin()])


def test_each_loss_is_minimal_at_the_variance_of_the_error():
    # Gaussian: minimal at s = log d^2
    assert _argmin(lambda s: attenuated_l2(torch.full_like(s, 0.5), s)) == pytest.approx(
        math.log(0.25), abs=1e-3)
    # von Mises (no regulariser): minimal where I1(k) / I0(k) = |cos d|, k = exp(-s)
    d = 0.3
    s_star = _argmin(lambda s: von_mises_nll(torch.full_like(s, d), s, lambda_v=0.0))
    kappa = torch.tensor(math.exp(-s_star), dtype=torch.float64)
    ratio = float(torch.special.i1e(kappa) / torch.special.i0e(kappa))
    assert ratio == pytest.approx(math.cos(d), abs=1e-3)
    # modulo pi: a box pointing backwards is as good as one pointing forwards
    s = torch.tensor([0.0])
    torch.testing.assert_close(von_mises_nll(torch.tensor([d + math.pi]), s),
                               von_mises_nll(torch.tensor([d]), s))


def test_a_confidently_wrong_logit_is_cheaper_with_a_large_variance():
    torch.manual_seed(0)
    logit = torch.full((20000,), 4.0)
    small, large = torch.full_like(logit, -4.0), torch.full_like(logit, 3.0)
    wrong, right = torch.zeros_like(logit), torch.ones_like(logit)
    assert sampled_logit_bce(logit, large, wrong).mean() < sampled_logit_bce(logit, small, wrong).mean()
    assert sampled_logit_bce(logit, small, right).mean() < sampled_logit_bce(logit, large, right).mean()


def test_the_head_learns_its_variances_and_decodes_them_in_metres():
    torch.manual_seed(0)
    head = build_head({"type": "anchor", "anchor": {"dropout": 0.1}}, 8, GRID, uncertainty=True)
    assert isinstance(head, AnchorHead) and head.uncertainty
    x = torch.randn(1, 8, GRID.ny, GRID.nx)
    losses = head.loss(head(x), [CAR])
    assert {"loss_unc_reg", "loss_unc_cls"} <= set(losses)
    losses["loss"].backward()
    for conv in (head.log_var, head.log_var_cls):
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    head.eval()
    with torch.no_grad():
        head.log_var.bias.copy_(torch.tensor([0.5, -1.0, 0.2] * head.num_anchors))
        head.log_var_cls.bias.fill_(-2.0)
        head.cls.bias.fill_(0.0)  # every anchor scores about 0.5
        dets = head.decode(head(x), 0, score_threshold=0.0)
    anchors = head.anchors[dets.extras["anchor"]]
    diag2 = anchors[:, 3] ** 2 + anchors[:, 4] ** 2
    want = torch.stack([math.exp(0.5) * diag2, math.exp(-1.0) * diag2,
                        torch.full_like(diag2, math.exp(0.2)), torch.full_like(diag2, math.exp(-2.0))], 1)
    # the weights add a little to the biases: variances within a few percent
    torch.testing.assert_close(dets.extras["aleatoric"], want, rtol=0.05, atol=0.0)


def test_monte_carlo_passes_leave_the_dropout_off():
    torch.manual_seed(0)
    head = AnchorHead(8, GRID, uncertainty=True, dropout=0.2).eval()
    x = torch.rand(1, 8, GRID.ny, GRID.nx)
    with torch.no_grad():
        plain = head(x).cls
        first, second = head(x, mc=True).cls, head(x, mc=True).cls
        again = head(x).cls
    assert not head.training
    assert not torch.equal(first, second)       # each pass drops other channels
    assert torch.equal(plain, again)            # and none of it stays on
    dets = head.decode(head(x), 0, 0.0)
    scores, boxes = head.decode_at(head(x), 0, dets.extras["anchor"])
    torch.testing.assert_close(scores, dets.scores)
    torch.testing.assert_close(boxes, dets.boxes)


def test_a_head_without_uncertainty_is_refused_when_the_method_needs_it():
    with pytest.raises(KeyError, match="does not predict it"):
        build_head({"type": "center"}, 8, GRID, uncertainty=True)
    with pytest.raises(KeyError, match="uncertainty: false"):
        build_head({"type": "anchor", "uncertainty": False}, 8, GRID, uncertainty=True)


def test_the_variances_do_not_change_the_box_or_score_gradients():
    x = torch.randn(1, 8, GRID.ny, GRID.nx)
    grads = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        head = AnchorHead(8, GRID, uncertainty=True, unc_weight=weight)
        head.loss(head(x), [CAR])["loss"].backward()
        grads.append([head.reg.weight.grad.clone(), head.cls.weight.grad.clone()])
    for without, with_ in zip(*grads):
        torch.testing.assert_close(with_, without)


def test_detached_variances_train_their_convs_but_never_the_input_features():
    torch.manual_seed(0)
    x = torch.randn(1, 8, GRID.ny, GRID.nx)

    def run(detach, weight):
        torch.manual_seed(0)
        head = AnchorHead(8, GRID, uncertainty=True, unc_weight=weight, detach_uncertainty=detach)
        feats = x.clone().requires_grad_(True)
        out = head(feats)
        head.loss(out, [CAR])["loss"].backward()
        return out, feats.grad, head.log_var.weight.grad, head.log_var_cls.weight.grad

    attached, detached, without = run(False, 1.0), run(True, 1.0), run(False, 0.0)
    for a, b in zip(attached[0].__dict__.values(), detached[0].__dict__.values()):
        torch.testing.assert_close(a, b)  # the same maps either way
    # detached, the features get exactly the gradients of the losses without the variances ...
    torch.testing.assert_close(detached[1], without[1])
    assert not torch.allclose(attached[1], without[1])  # ... which attached they do not
    # ... and the log-variance convs learn exactly as before
    torch.testing.assert_close(detached[2], attached[2])
    torch.testing.assert_close(detached[3], attached[3])
    assert detached[2].abs().sum() > 0 and detached[3].abs().sum() > 0
