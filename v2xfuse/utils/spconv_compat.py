"""spconv, imported once with its two CPU defects worked around.

1. Backward on a CPU-only torch: spconv's backward asks ``torch.cuda.current_stream()``
   unconditionally and fails. When CUDA is unavailable we make spconv's stream getter return the
   null stream (0). With CUDA nothing is changed.
2. Wrong forward results with more than one thread: spconv 2.3.8's CPU gather / scatter-add
   kernels (``SpconvOps.gather_cpu`` / ``scatter_add_cpu``) race under OpenMP. With torch's default
   2 threads here a 3x3x3 SparseConv3d gets a few output elements wrong by up to 20% in most runs
   (with ``torch.set_num_threads(1)`` never). For CPU tensors we therefore run the sparse
   convolution's gather-GEMM-scatter rule-book loop with torch ops (``index_select``, ``mm``,
   ``index_add_``), which are correct at any thread count; CUDA tensors still go to spconv's kernels.

tests/models/test_encoders.py checks forward and gradients against a dense ``Conv3d``.
"""
from __future__ import annotations

import torch

__all__ = ["spconv_pytorch", "spconv_utils", "CPU_BACKWARD_FIX_APPLIED", "CPU_CONV_FIX_APPLIED"]

CPU_BACKWARD_FIX_APPLIED = False
CPU_CONV_FIX_APPLIED = False


def _kernel_offsets(indice_pair_num: torch.Tensor, kv: int, subm: bool):
    """(offset, number of pairs) for every kernel offset that has pairs.

    For submanifold convolutions spconv skips the centre (an identity map, handled by one GEMM) and
    stores the pair counts of the first half only; offset ``i`` past the centre mirrors ``kv-1-i``.
    """
    counts = indice_pair_num.tolist()
    center = kv // 2
    for i in range(kv):
        if subm and i == center:
            continue
        n = counts[kv - i - 1] if subm and i > center else counts[i]
        if n > 0:
            yield i, n


def _indice_conv_cpu(features, filters, indice_pairs, indice_pair_num, num_activate_out,
                     inverse=False, subm=False):
    """Sparse convolution forward with spconv's rule book; filters are (out, *kernel, in)."""
    out_channels = filters.shape[0]
    weights = filters.reshape(out_channels, -1, filters.shape[-1])  # (out, kv, in)
    kv = weights.shape[1]
    features = features.contiguous()
    if subm:
        out = features @ weights[:, kv // 2].T
    else:
        out = features.new_zeros(num_activate_out, out_channels)
    pair_in, pair_out = indice_pairs[int(inverse)], indice_pairs[int(not inverse)]
    for i, n in _kernel_offsets(indice_pair_num, kv, subm):
        src, dst = pair_in[i, :n].long(), pair_out[i, :n].long()
        out.index_add_(0, dst, features.index_select(0, src) @ weights[:, i].T)
    return out


def _indice_conv_backward_cpu(features, filters, out_bp, indice_pairs, indice_pair_num,
                              inverse=False, subm=False):
    """Gradients of :func:`_indice_conv_cpu` with respect to features and filters."""
    out_channels = filters.shape[0]
    weights = filters.reshape(out_channels, -1, filters.shape[-1])
    kv = weights.shape[1]
    features, out_bp = features.contiguous(), out_bp.contiguous()
    d_weights = torch.zeros_like(weights)
    if subm:
        d_weights[:, kv // 2] = out_bp.T @ features
        d_in = out_bp @ weights[:, kv // 2]
    else:
        d_in = torch.zeros_like(features)
    pair_in, pair_out = indice_pairs[int(inverse)], indice_pairs[int(not inverse)]
    for i, n in _kernel_offsets(indice_pair_num, kv, subm):
        src, dst = pair_in[i, :n].long(), pair_out[i, :n].long()
        grad_out = out_bp.index_select(0, dst)
        d_weights[:, i] = grad_out.T @ features.index_select(0, src)
        d_in.index_add_(0, src, grad_out @ weights[:, i])
    return d_in, d_weights.reshape(filters.shape)


def _patch_cpu_conv(ops) -> None:
    global CPU_CONV_FIX_APPLIED
    if CPU_CONV_FIX_APPLIED:
        return
    if not ops.ALL_WEIGHT_IS_KRSC:  # the layout spconv 2.x uses: (out, *kernel, in)
        raise RuntimeError("spconv_compat: unsupported spconv filter layout (expected KRSC); "
                           "this spconv version is not one v2xfuse was tested with")
    spconv_conv, spconv_backward = ops.indice_conv, ops.indice_conv_backward
    no_act = ops.tv.gemm.Activation.None_

    def indice_conv(features, filters, indice_pairs, indice_pair_num, num_activate_out,
                    inverse=False, subm=False, *args, **kwargs):
        if features.is_cuda:
            return spconv_conv(features, filters, indice_pairs, indice_pair_num, num_activate_out,
                               inverse, subm, *args, **kwargs)
        if kwargs.get("bias") is not None or kwargs.get("act_type", no_act) != no_act:
            raise NotImplementedError("spconv on CPU: fused bias/activation is CUDA-only")
        return _indice_conv_cpu(features, filters, indice_pairs, indice_pair_num,
                                num_activate_out, inverse, subm)

    def indice_conv_backward(features, filters, out_bp, indice_pairs, indice_pair_num,
                             inverse=False, subm=False, *args, **kwargs):
        if features.is_cuda:
            return spconv_backward(features, filters, out_bp, indice_pairs, indice_pair_num,
                                   inverse, subm, *args, **kwargs)
        return _indice_conv_backward_cpu(features, filters, out_bp, indice_pairs,
                                         indice_pair_num, inverse, subm)

    ops.indice_conv, ops.indice_conv_backward = indice_conv, indice_conv_backward
    CPU_CONV_FIX_APPLIED = True


def _import():
    global CPU_BACKWARD_FIX_APPLIED
    import spconv.pytorch as sp
    import spconv.pytorch.ops as ops

    if not torch.cuda.is_available() and not CPU_BACKWARD_FIX_APPLIED:
        ops.get_current_stream = lambda: 0
        CPU_BACKWARD_FIX_APPLIED = True
    _patch_cpu_conv(ops)
    return sp


_SP = None


def spconv_pytorch():
    """The ``spconv.pytorch`` module (fixes applied)."""
    global _SP
    if _SP is None:
        _SP = _import()
    return _SP


def spconv_utils():
    """``spconv.pytorch.utils`` (for ``PointToVoxel``)."""
    spconv_pytorch()
    import spconv.pytorch.utils as utils

    return utils
