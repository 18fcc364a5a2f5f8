"""spconv, imported once with its two CPU defects worked around.

1. Backward on a CPU-only torch: spconv's backward asks ``torch.cuda.current_stream()``
   unconditionally and fails. When CUDA is unavailable we make spconv's stream getter return the
   null stream (0). With CUDA nothing is changed.
2. Wrong forward results with more than one thread: spconv 2.3.8's CPU gather / scatter-add
   kernels (``SpconvOps.gather_cpu`` / ``scatter_add_cpu``) race under OpenMP. With torch's default
   2 threads here a 3x3x3 SparseConv3d gets a few output elements wrong by up to 20% in most runs
   (with ``torch.set_num_threads(1)`` never). For CPU tensors we therefore run the sparse
   convolution from spconv's rule book with torch ops, which are correct at any thread count:
   3D convs as a gather-GEMM-scatter loop over kernel offsets (``index_select``, ``mm``,
   ``index_add_``), 2D ones as an implicit GEMM (every output's neighbours gathered into one
   row, one ``mm``); CUDA tensors still go to spconv's kernels.

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


def _neighbours(indice_pairs, indice_pair_num, kv: int, num_in: int, num_out: int,
                inverse: bool, subm: bool) -> torch.Tensor:
    """(num_out, kv) int64: for every output row and kernel offset, the input row it reads, or
    ``num_in`` (a zero row appended to the features) where that input is inactive."""
    pair_in, pair_out = indice_pairs[int(inverse)], indice_pairs[int(not inverse)]
    table = torch.full((num_out, kv), num_in, dtype=torch.int64, device=pair_in.device)
    if subm:  # the centre is the identity: spconv stores no pairs for it
        table[:, kv // 2] = torch.arange(num_out, device=pair_in.device)
    for i, n in _kernel_offsets(indice_pair_num, kv, subm):
        table[pair_out[i, :n].long(), i] = pair_in[i, :n].long()
    return table


def _gather(features: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(num_out, kv * C): each output row's kv input rows side by side (zeros where inactive)."""
    padded = torch.cat([features, features.new_zeros((1, features.shape[1]))])
    return padded.index_select(0, table.reshape(-1)).view(len(table), -1)


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


def _implicit_gemm_conv_cpu(features, filters, indice_pairs, indice_pair_num,
                            num_activate_out, inverse=False, subm=False):
    """:func:`_indice_conv_cpu` as one GEMM per layer (an implicit GEMM: every output's kv
    neighbours gathered into one row of kv * in features) rather than one skinny GEMM, gather and scatter-add per kernel
    offset: a (V, 64) x (64, 64) product runs at a fifth of the speed of a (V, 576) x (576, 64)
    one on this CPU, and the per-offset gather and scatter cost as much again. It multiplies
    the zeros of inactive neighbours too: used for 2D convs (9 offsets, the sparse BEV
    backbone: 2.4x instead of 0.46x the dense backbone's speed on the synthetic world's
    clouds), not for 3D ones (27 offsets, mostly empty: SECOND's encoder took 1.48x as long)."""
    out_channels = filters.shape[0]
    weights = filters.reshape(out_channels, -1, filters.shape[-1])  # (out, kv, in)
    kv = weights.shape[1]
    num_out = int(num_activate_out) if not subm else len(features)
    table = _neighbours(indice_pairs, indice_pair_num, kv, len(features), num_out, inverse, subm)
    return _gather(features.contiguous(), table) @ weights.permute(1, 2, 0).reshape(-1, out_channels)


def _implicit_gemm_conv_backward_cpu(features, filters, out_bp, indice_pairs,
                                     indice_pair_num, inverse=False, subm=False):
    """Gradients of :func:`_implicit_gemm_conv_cpu` with respect to features and filters."""
    out_channels, in_channels = filters.shape[0], filters.shape[-1]
    weights = filters.reshape(out_channels, -1, in_channels)
    kv = weights.shape[1]
    out_bp = out_bp.contiguous()
    table = _neighbours(indice_pairs, indice_pair_num, kv, len(features), len(out_bp), inverse,
                        subm)
    gathered = _gather(features.contiguous(), table)  # (num_out, kv * in)
    d_weights = (gathered.T @ out_bp).view(kv, in_channels, out_channels).permute(2, 0, 1)
    d_gathered = out_bp @ weights.permute(1, 2, 0).reshape(-1, out_channels).T
    d_in = features.new_zeros((len(features) + 1, in_channels))
    d_in.index_add_(0, table.reshape(-1), d_gathered.view(-1, in_channels))
    return d_in[:-1], d_weights.reshape(filters.shape)


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
        # filters (out, kH, kW, in): a 2D conv
        conv = _implicit_gemm_conv_cpu if filters.dim() == 4 else _indice_conv_cpu
        return conv(features, filters, indice_pairs, indice_pair_num, num_activate_out, inverse,
                    subm)

    def indice_conv_backward(features, filters, out_bp, indice_pairs, indice_pair_num,
                             inverse=False, subm=False, *args, **kwargs):
        if features.is_cuda:
            return spconv_backward(features, filters, out_bp, indice_pairs, indice_pair_num,
                                   inverse, subm, *args, **kwargs)
        backward = (_implicit_gemm_conv_backward_cpu if filters.dim() == 4
                    else _indice_conv_backward_cpu)
        return backward(features, filters, out_bp, indice_pairs, indice_pair_num, inverse, subm)

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
