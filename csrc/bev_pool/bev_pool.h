// BEV pooling (lift-splat): features (P, C) with coords (P, 3) int [batch, y, x] summed per cell
// into (B, C, ny, nx). Deterministic on both devices, and the same order on both: every cell
// sums its points in ascending point index (both devices group the points by cell with a stable
// order and run one segmented sum per cell: CPU by a counting sort, CUDA by a stable sort). The
// backward pass gathers the output gradient of each point's cell.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "common.h"

namespace v2xfuse {

at::Tensor bev_pool_forward_cpu(const at::Tensor& features, const at::Tensor& coords,
                                int64_t batch_size, int64_t ny, int64_t nx);
at::Tensor bev_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& coords);
#ifdef WITH_CUDA
at::Tensor bev_pool_forward_cuda(const at::Tensor& features, const at::Tensor& coords,
                                 int64_t batch_size, int64_t ny, int64_t nx);
at::Tensor bev_pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& coords);
#endif

// Device-agnostic helpers (ATen ops only), defined in bev_pool_cpu.cpp.

// Checks coords (P, 3) [batch, y, x] against the grid and returns the flat cell index
// (batch * ny + y) * nx + x of each point, (P,) int64. Out-of-range rows raise a ValueError.
at::Tensor bev_pool_cells(const at::Tensor& coords, int64_t batch_size, int64_t ny, int64_t nx);

// The occupied cells, in increasing order, and the points in each: the points of segment s are
// order[starts[s] : starts[s] + lengths[s]], in increasing point index. All (S,) or (P,) int64.
struct BevPoolSegments {
  at::Tensor order, cells, starts, lengths;
};
BevPoolSegments bev_pool_segments(const at::Tensor& cells);

// CPU plan (bev_pool_cpu.cpp): the points grouped by cell with a counting sort, computed once
// and shared by the forward and backward passes. offsets (B * ny * nx + 1,) int32: the points of
// flat cell k = (batch * ny + y) * nx + x are order[offsets[k] : offsets[k + 1]], (P,) int32, in
// increasing point index. Out-of-range coords raise a ValueError naming the first bad row.
std::tuple<at::Tensor, at::Tensor> bev_pool_plan_cpu(const at::Tensor& coords,
                                                     int64_t batch_size, int64_t ny, int64_t nx);
at::Tensor bev_pool_forward_planned_cpu(const at::Tensor& features, const at::Tensor& order,
                                        const at::Tensor& offsets, int64_t batch_size, int64_t ny,
                                        int64_t nx);
at::Tensor bev_pool_backward_planned_cpu(const at::Tensor& grad_out, const at::Tensor& order,
                                         const at::Tensor& offsets);

// Lift and splat in one pass: out[cell] = sum over the cell's points (the plan of coords, in
// increasing index) of weights[p] * values[rows[p]], weights (P,), values (R, C), rows (P,)
// int64; the same products and order as bev_pool_forward_planned on the lifted rows. Backward:
// (grad_weights (P,), grad_values (R, C)) from the same plan, in one walk over the cells.
at::Tensor bev_pool_weighted_forward_cpu(const at::Tensor& weights, const at::Tensor& values,
                                         const at::Tensor& rows, const at::Tensor& order,
                                         const at::Tensor& offsets, int64_t batch_size,
                                         int64_t ny, int64_t nx);
std::tuple<at::Tensor, at::Tensor> bev_pool_weighted_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& weights, const at::Tensor& values,
    const at::Tensor& rows, const at::Tensor& order, const at::Tensor& offsets);

void check_bev_pool_forward_args(const at::Tensor& features, const at::Tensor& coords,
                                 int64_t batch_size, int64_t ny, int64_t nx);
void check_bev_pool_backward_args(const at::Tensor& grad_out, const at::Tensor& coords);

}  // namespace v2xfuse
