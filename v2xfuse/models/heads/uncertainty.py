"""Aleatoric uncertainty losses of a detection head: what a head learns about its own noise.

A head with uncertainty predicts, next to each regression target, the log-variance ``s`` of
its error, and next to each classification logit the log-variance of that logit. The losses
are negative log-likelihoods whose minimum over ``s`` sits at the error actually made, so
``exp(s)`` learns how large the error tends to be where the head predicts it:

* x, y (:func:`attenuated_l2`): Gaussian, ``0.5 * (exp(-s) * d^2 + s)`` (Kendall & Gal,
  NeurIPS 2017, eq. 8), minimal at ``s = log d^2``;
* yaw (:func:`von_mises_nll`): von Mises with concentration ``kappa = exp(-s)``,
  ``log I0(kappa) - kappa * |cos d|`` (``|cos|``: the head's yaw is defined modulo pi, its
  direction bin settles the rest), plus ``lambda_v * elu(s - s0)``, which keeps ``s`` from
  running off to a uniform distribution on boxes whose heading is hopeless (CoAlign's and
  CoDynTrust's KL loss, shared/reference/fusion-methods.md section 6.3);
* classification (:func:`sampled_logit_bce`): the logit is corrupted with Gaussian noise of
  that variance (the re-parameterisation trick) and the binary cross-entropy of the mean
  probability over the samples is minimised (Kendall & Gal, eq. 12): a logit that is confidently
  wrong lowers its loss by admitting a large variance.

The residuals and logits are detached in all three terms: they teach the variances only, the
boxes and scores keep their own losses. The reference lets the x, y term attenuate the
regression too; there its gradient on the residual is ``d * exp(-s)``, about ``1 / d`` once
``s`` has learned ``log d^2``: twenty times the smooth-L1 gradient for a 5 cm error. Here one
head also decodes the fused map, so its regression keeps the loss every other method trains.
The terms are negative log-likelihoods: negative once the head is precise (the total loss can
be below zero).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...utils.precision import full_precision, widen

__all__ = ["attenuated_l2", "von_mises_nll", "sampled_logit_bce"]


@full_precision
def attenuated_l2(diff: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Elementwise ``0.5 * (exp(-s) * diff^2 + s)``; diff (detached), log_var: same shape.
    These losses run with autocast off, 16-bit inputs widened (exp(-s) of a float16 s)."""
    diff, log_var = widen(diff, log_var)
    return 0.5 * (torch.exp(-log_var) * diff.detach() ** 2 + log_var)


@full_precision
def von_mises_nll(diff: torch.Tensor, log_var: torch.Tensor, lambda_v: float = 0.1,
                  s0: float = 1.0) -> torch.Tensor:
    """Elementwise negative log-likelihood of angle errors ``diff`` (rad) under a von Mises of
    concentration ``exp(-log_var)``, up to a constant, plus the ``elu`` regulariser (module
    docstring). ``log I0(k) = log(i0e(k)) + k`` keeps it finite for large ``k``."""
    diff, log_var = widen(diff, log_var)
    kappa = torch.exp(-log_var)
    cos = torch.cos(diff.detach()).abs()
    return (torch.log(torch.special.i0e(kappa)) + kappa * (1.0 - cos)
            + lambda_v * F.elu(log_var - s0))


@full_precision
def sampled_logit_bce(logits: torch.Tensor, log_var: torch.Tensor, targets: torch.Tensor,
                      samples: int = 10) -> torch.Tensor:
    """Elementwise BCE of ``mean_t sigmoid(logit + exp(s / 2) * eps_t)`` against ``targets``
    (0 or 1), ``eps_t ~ N(0, 1)``, ``samples`` draws; the logit is detached. Autocast refuses
    ``binary_cross_entropy`` (it is unsafe in float16), so this runs in float32 with it off."""
    logits, log_var, targets = widen(logits, log_var, targets)
    noise = torch.randn((samples, *logits.shape), device=logits.device, dtype=logits.dtype)
    prob = torch.sigmoid(logits.detach() + torch.exp(0.5 * log_var) * noise).mean(0)
    return F.binary_cross_entropy(prob.clamp(1e-6, 1 - 1e-6), targets, reduction="none")
