"""A grouped, residual vector quantiser for per-cell BEV feature vectors (CodeFilling's message
representation, usable by any method that sends integer codes instead of features).

A feature vector ``x`` (C,) of one BEV cell is split into ``m`` groups of ``d = C / m``
channels (product quantisation); each group is quantised in ``r`` residual stages, stage ``s``
with its own codebook ``D[s, g]`` of ``k`` codewords (k, d)::

    res_0 = x_g
    c_s   = argmin_j || res_s - D[s, g, j] ||^2          s = 0 .. r-1
    res_{s+1} = res_s - D[s, g, c_s]
    x_hat_g = sum_s D[s, g, c_s]

so a cell costs ``m * r`` codes of ``ceil(log2 k)`` bits. The codebooks are shared by all
agents at setup (they are model parameters, like the encoder's weights) and never sent.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResidualCodebook"]


class ResidualCodebook(nn.Module):
    """Grouped residual codebook: (P, C) features <-> (P, r, m) integer codes.

    Training estimator: the nearest codeword (the same assignment as at inference), the
    straight-through estimator for the task gradient (the receiver's value is the dequantised
    vector, its gradient is passed to the sender's feature unchanged), and the VQ-VAE losses
    of :meth:`loss`: per stage ``|| sg(res_s) - q_s ||^2`` moves each codeword towards the
    mean of the residuals assigned to it (a k-means step in gradient form), and
    ``beta * || x - sg(x_hat) ||^2`` (commitment) keeps the encoder's features near what the
    codebook can represent. Chosen over the hard Gumbel-softmax of the reference code because
    training then uses exactly the codes that inference sends (no sampled assignments, no
    temperature to schedule) and every stage gets its own, deterministic, learning signal; the
    usual weakness of this estimator, unused ("dead") codewords, is reduced by initialising
    every stage from data (:meth:`fit`, k-means) before the first training step.

    Args:
        channels: C, divisible by ``groups``.
        groups: m.
        stages: r.
        codewords: k per stage and group.

    Attributes:
        codebooks: (r, m, k, C / m) parameter.
        initialised: bool buffer, set by :meth:`fit` (saved with the weights).
    """

    def __init__(self, channels: int, groups: int = 2, stages: int = 3, codewords: int = 64):
        super().__init__()
        if groups < 1 or channels % groups:
            raise ValueError(f"channels {channels} must be divisible by groups {groups}")
        if stages < 1 or codewords < 2:
            raise ValueError(f"need stages >= 1 and codewords >= 2, got {stages}, {codewords}")
        self.channels, self.groups = channels, groups
        self.stages, self.codewords = stages, codewords
        dim = channels // groups
        # the reference's "SmallInit", N(0, sqrt(2 / (5 d))); fit() replaces it with data
        self.codebooks = nn.Parameter(torch.randn(stages, groups, codewords, dim)
                                      * math.sqrt(2.0 / (5.0 * dim)))
        self.register_buffer("initialised", torch.tensor(False))

    @property
    def bits(self) -> int:
        """Bits per code, ``ceil(log2 k)``."""
        return max(1, math.ceil(math.log2(self.codewords)))

    @property
    def bits_per_cell(self) -> int:
        return self.groups * self.stages * self.bits

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.channels:
            raise ValueError(f"features must be (P, {self.channels}), got {tuple(x.shape)}")
        return x.reshape(len(x), self.groups, -1)

    def _nearest(self, residual: torch.Tensor, stage: int) -> torch.Tensor:
        """(P, m, d) residuals -> (P, m) index of the nearest codeword of ``stage``."""
        book = self.codebooks[stage].detach()  # (m, k, d)
        # ||r - c||^2 = ||r||^2 - 2 r.c + ||c||^2; ||r||^2 does not change the argmin
        score = (book * book).sum(-1)[None] - 2.0 * torch.einsum("pgd,gkd->pgk", residual, book)
        return score.argmin(-1)

    def _lookup(self, stage: int, codes: torch.Tensor) -> torch.Tensor:
        """(P, m) codes of ``stage`` -> (P, m, d) codewords (differentiable in the codebook)."""
        group = torch.arange(self.groups, device=codes.device)
        return self.codebooks[stage][group[None, :], codes]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(P, C) features -> (P, r, m) int64 codes in [0, k)."""
        residual = self._split(x.detach().to(self.codebooks.dtype))
        codes = []
        for s in range(self.stages):
            c = self._nearest(residual, s)
            residual = residual - self._lookup(s, c)
            codes.append(c)
        return torch.stack(codes, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(P, r, m) integer codes in [0, k) -> (P, C) dequantised features (differentiable in
        the codebook)."""
        codes = codes.long()
        if codes.ndim != 3 or codes.shape[1:] != (self.stages, self.groups):
            raise ValueError(f"codes must be (P, {self.stages}, {self.groups}), "
                             f"got {tuple(codes.shape)}")
        out = sum(self._lookup(s, codes[:, s]) for s in range(self.stages))
        return out.reshape(len(codes), self.channels)

    def quantise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, C) -> (codes (P, r, m), x_hat (P, C)), x_hat exactly what a receiver decodes."""
        codes = self.encode(x)
        return codes, self.decode(codes)

    def loss(self, x: torch.Tensor, beta: float = 0.25) -> torch.Tensor:
        """VQ-VAE loss on (P, C) features: per stage codebook terms plus ``beta`` times the
        commitment term (see the class docstring). Both are mean squared errors per element."""
        target = self._split(x.detach().to(self.codebooks.dtype))
        residual, total, x_hat = target, x.new_zeros(()), torch.zeros_like(target)
        for s in range(self.stages):
            q = self._lookup(s, self._nearest(residual, s))
            total = total + F.mse_loss(q, residual)
            residual = residual - q.detach()
            x_hat = x_hat + q.detach()
        commitment = F.mse_loss(x, x_hat.reshape(len(x), self.channels).to(x.dtype))
        return total + beta * commitment

    @torch.no_grad()
    def fit(self, x: torch.Tensor, iters: int = 10,
            generator: torch.Generator | None = None) -> None:
        """Initialise every stage by k-means on the residuals of (P, C) features: codewords
        start at distinct random samples (with replacement when P < k), then ``iters`` Lloyd
        iterations (a codeword nobody picks keeps its value). Sets ``initialised``."""
        residual = self._split(x.detach().to(self.codebooks.dtype))
        n = len(residual)
        if n == 0:
            return
        k, m, d = self.codewords, self.groups, self.channels // self.groups
        group = torch.arange(m, device=residual.device)
        for s in range(self.stages):
            pick = (torch.randperm(n, generator=generator)[:k] if n >= k
                    else torch.randint(0, n, (k,), generator=generator)).to(residual.device)
            self.codebooks.data[s] = residual[pick].transpose(0, 1)  # (m, k, d)
            for _ in range(iters):
                flat = (group[None, :] * k + self._nearest(residual, s)).reshape(-1)
                sums = residual.new_zeros(m * k, d).index_add_(0, flat, residual.reshape(-1, d))
                counts = torch.bincount(flat, minlength=m * k).to(sums.dtype)[:, None]
                old = self.codebooks.data[s].reshape(m * k, d)
                new = torch.where(counts > 0, sums / counts.clamp(min=1), old)
                self.codebooks.data[s] = new.reshape(m, k, d)
            residual = residual - self._lookup(s, self._nearest(residual, s)).detach()
        self.initialised.fill_(True)
