"""Geometry in full precision under mixed precision (``train.amp``).

Autocast lowers matmul, addmm, einsum and the convolutions to bfloat16 or float16, the networks'
business, but also every point, pose and anchor transformed with them: a bfloat16 coordinate 50 m
out is 0.25 m coarse, and writing it into a float32 array fails. :func:`full_precision` runs a
function with autocast off on every device where it is on; the function's float32 (or float64)
inputs stay so. Nothing changes without autocast.
"""
from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["full_precision", "autocast_off", "widen"]

_DEVICES = ("cpu", "cuda")


def autocast_off() -> contextlib.ExitStack:
    """A context with autocast off on each device where it is on now (nothing when none is)."""
    stack = contextlib.ExitStack()
    for device in _DEVICES:
        if torch.is_autocast_enabled(device):
            stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def full_precision(fn):
    """``fn`` run under :func:`autocast_off`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_off():
            return fn(*args, **kwargs)
    return wrapper


def widen(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor in float32 if it is a 16-bit float (autocast's outputs), else as it is."""
    return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)
