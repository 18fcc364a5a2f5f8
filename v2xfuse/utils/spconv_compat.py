"""spconv, imported once with the CPU backward fix applied.

spconv's CPU wheel runs forward on CPU, but its backward asks ``torch.cuda.current_stream()``
unconditionally and fails on a CPU-only torch. When CUDA is unavailable we make spconv's stream
getter return the null stream (0); gradients then match a dense convolution to ~1e-7
(tests/models/test_second.py checks this). With CUDA nothing is changed.
"""
from __future__ import annotations

import torch

__all__ = ["spconv_pytorch", "spconv_utils", "CPU_BACKWARD_FIX_APPLIED"]

CPU_BACKWARD_FIX_APPLIED = False


def _import():
    global CPU_BACKWARD_FIX_APPLIED
    import spconv.pytorch as sp
    import spconv.pytorch.ops as ops

    if not torch.cuda.is_available() and not CPU_BACKWARD_FIX_APPLIED:
        ops.get_current_stream = lambda: 0
        CPU_BACKWARD_FIX_APPLIED = True
    return sp


_SP = None


def spconv_pytorch():
    """The ``spconv.pytorch`` module (fix applied)."""
    global _SP
    if _SP is None:
        _SP = _import()
    return _SP


def spconv_utils():
    """``spconv.pytorch.utils`` (for ``PointToVoxel``)."""
    spconv_pytorch()
    import spconv.pytorch.utils as utils

    return utils
