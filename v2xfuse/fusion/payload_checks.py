"""Checks a fusion method applies to a decoded payload before it fuses it.

The channel has already checked the message as a whole (:mod:`v2xfuse.comm.checks`); what is
left is what only the receiving method knows: which arrays it expects, their shapes on its grid
and codebook, the range of its indices, and the values its own training saw. Each helper raises
:class:`~v2xfuse.comm.checks.Rejected` with a reason and the field's name.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..comm.checks import Rejected, largest_magnitude

__all__ = ["expect", "expect_finite", "expect_within", "expect_indices", "expect_magnitude",
           "largest_magnitude", "FeatureRange"]


def expect(payload: dict[str, torch.Tensor], name: str, shape: tuple, kind: str = "float"
           ) -> torch.Tensor:
    """``payload[name]``, checked to exist, be of ``kind`` ("float", "int" or "bool") and have
    ``shape`` (ints, or None for any size on that axis)."""
    t = payload.get(name)
    if t is None:
        raise Rejected("shape", f"payload {name!r} missing (has {sorted(payload)})")
    ok_kind = {"float": t.is_floating_point(), "bool": t.dtype == torch.bool,
               "int": not t.is_floating_point() and t.dtype != torch.bool
               and not t.is_complex()}[kind]
    if not ok_kind:
        raise Rejected("shape", f"payload {name!r}: dtype {t.dtype}, expected {kind}")
    if t.dim() != len(shape) or any(s is not None and d != s for d, s in zip(t.shape, shape)):
        want = tuple("*" if s is None else s for s in shape)
        raise Rejected("shape", f"payload {name!r}: shape {tuple(t.shape)}, expected {want}")
    return t


def expect_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not math.isfinite(largest_magnitude(t)):
        raise Rejected("nonfinite", f"payload {name!r}: NaN or infinite values")


def expect_within(name: str, t: torch.Tensor, lo: float, hi: float) -> None:
    """Every value of ``t`` in ``[lo, hi]`` (NaN fails too)."""
    if t.numel() and not bool(((t >= lo) & (t <= hi)).all()):
        raise Rejected("bounds", f"payload {name!r}: values outside [{lo}, {hi}]")


def expect_indices(name: str, t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as int64 indices, each in ``[0, n)``."""
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise Rejected("index", f"payload {name!r}: indices outside [0, {n})")
    return t


def expect_magnitude(name: str, received: torch.Tensor, ego_map: torch.Tensor, ratio: float
                     ) -> None:
    """Refuse a message whose features are on average more than ``ratio`` times as strong as
    the receiver's own strongest cells.

    Clamping each value to the trained range does not stop a sender that pushes *every* cell to
    the top of that range (measured: a collaborator scaling its map by 100 took max fusion from
    AP@0.5 0.85 to 0.02 with clamping). Both maps come from the same encoder on the same scene,
    so like is compared with like: the mean |x| of the K cells received against the mean |x| of
    the ego's K most active cells.

    Args:
        received: (C, K) the cells received (K = H * W for a whole map).
        ego_map: (C, H, W) the receiver's own map.
    """
    k = received.shape[-1]
    if k == 0 or ego_map.numel() == 0:
        return
    cell = ego_map.detach().abs().mean(0).flatten()
    reference = float(cell.mean() if k >= cell.numel() else cell.topk(k).values.mean())
    strength = float(received.detach().abs().mean())
    if strength > ratio * max(reference, 1e-3):
        raise Rejected("bounds", f"payload {name!r}: mean |x| {strength:.3g} is more than "
                                 f"{ratio:g} times the receiver's own ({reference:.3g})")


class FeatureRange(nn.Module):
    """Per-channel range of the features a method's senders produced in training, kept as
    buffers (saved with the weights), so a receiver can tell what a trained sender can send.

    ``observe(x)`` (training only) widens ``lo``/``hi`` to cover ``x``. ``sanitise(name, x)``
    on the receiver rejects values beyond ``reject_factor`` spans outside the range (no trained
    sender makes them: an attack or a fault) and clamps the rest to the range, so that no
    sender can dominate a max or an attention by magnitude alone. Until something was observed
    (an untrained model, a checkpoint older than this) the range is unknown: nothing is
    clamped and only the channel's absolute bound applies.

    Args:
        channels: C.
        reject_factor: how many spans ``hi - lo`` beyond the range a value may lie before the
            whole message is rejected rather than clamped.
        clamp: clamp accepted values to the range (False: only the rejection, to measure what
            the clamping buys).
    """

    def __init__(self, channels: int, reject_factor: float = 100.0, clamp: bool = True):
        super().__init__()
        self.reject_factor, self.clamp = float(reject_factor), bool(clamp)
        self.register_buffer("lo", torch.full((channels,), float("inf")))
        self.register_buffer("hi", torch.full((channels,), float("-inf")))

    @property
    def known(self) -> bool:
        return bool((self.hi >= self.lo).all())

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """x: (C, ...) features a sender sent."""
        if x.numel() == 0:
            return
        flat = x.detach().reshape(x.shape[0], -1).to(self.lo.dtype)
        self.lo.copy_(torch.minimum(self.lo, flat.amin(1)))
        self.hi.copy_(torch.maximum(self.hi, flat.amax(1)))

    @torch.no_grad()
    def merge_over_ranks(self) -> None:
        """Widen the range to cover what every rank of a torch.distributed run observed
        (the trainer calls it on every rank after each step: each rank sees only its own
        samples, and DDP copies rank 0's buffers to the others at every forward)."""
        torch.distributed.all_reduce(self.lo, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(self.hi, op=torch.distributed.ReduceOp.MAX)

    def observe_payloads(self, payloads: list[dict[str, torch.Tensor] | None],
                         name: str = "features") -> None:
        """``observe`` the ``name`` entry of every payload sent (None: nothing sent; a list:
        every packet of a split message)."""
        for p in payloads:
            for packet in ([] if p is None else p if isinstance(p, list) else [p]):
                self.observe(packet[name])

    def sanitise(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x: (C, ...) received features -> the same, clamped per channel to the range."""
        if x.shape[0] != self.lo.shape[0]:
            raise Rejected("shape", f"payload {name!r}: {x.shape[0]} channels, expected "
                                    f"{self.lo.shape[0]}")
        if not self.known or x.numel() == 0:
            return x
        lo, hi = self.lo.to(x), self.hi.to(x)
        slack = self.reject_factor * (hi - lo).clamp_min(1e-6)
        flat = x.reshape(x.shape[0], -1)  # per-channel extremes: two reductions, not a mask
        if bool((flat.amin(1) < lo - slack).any() or (flat.amax(1) > hi + slack).any()):
            raise Rejected("bounds", f"payload {name!r}: values more than {self.reject_factor:g} "
                                     "spans outside the range seen in training")
        if not self.clamp:
            return x
        view = (-1,) + (1,) * (x.dim() - 1)
        return torch.clamp(x, min=lo.view(view), max=hi.view(view))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints written before ranges were recorded load with the range unknown.
        absent = [k for k in ("lo", "hi") if prefix + k not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for k in absent:
            if prefix + k in missing_keys:
                missing_keys.remove(prefix + k)
