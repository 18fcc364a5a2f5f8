#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/unique_consecutive.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "bev_pool/bev_pool.h"

namespace v2xfuse {

void check_bev_pool_forward_args(const at::Tensor& features, const at::Tensor& coords,
                                 int64_t batch_size, int64_t ny, int64_t nx) {
  TORCH_CHECK(features.dim() == 2, "features must be (P, C), got shape ", features.sizes());
  TORCH_CHECK(at::isFloatingType(features.scalar_type()), "features must be floating point, got ",
              features.scalar_type());
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 3 && coords.size(0) == features.size(0),
              "coords must be (P, 3) [batch, y, x] with P = features.size(0) = ", features.size(0),
              ", got shape ", coords.sizes());
  TORCH_CHECK(batch_size >= 0 && ny > 0 && nx > 0,
              "need batch_size >= 0, ny > 0 and nx > 0, got ", batch_size, ", ", ny, ", ", nx);
  check_same_device(features, "features", coords, "coords");
}

void check_bev_pool_backward_args(const at::Tensor& grad_out, const at::Tensor& coords) {
  TORCH_CHECK(grad_out.dim() == 4, "grad_out must be (B, C, ny, nx), got shape ", grad_out.sizes());
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()), "grad_out must be floating point, got ",
              grad_out.scalar_type());
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 3,
              "coords must be (P, 3) [batch, y, x], got shape ", coords.sizes());
  check_same_device(grad_out, "grad_out", coords, "coords");
}

at::Tensor bev_pool_cells(const at::Tensor& coords, int64_t batch_size, int64_t ny, int64_t nx) {
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 3,
              "coords must be (P, 3) [batch, y, x], got shape ", coords.sizes());
  TORCH_CHECK(at::isIntegralType(coords.scalar_type(), /*includeBool=*/false),
              "coords must be an integer tensor, got ", coords.scalar_type());
  const at::Tensor c = coords.to(at::kLong);
  const at::Tensor b = c.select(1, 0), y = c.select(1, 1), x = c.select(1, 2);
  // One reduction (and one device sync on CUDA) instead of out-of-bounds writes in a kernel.
  const at::Tensor bad = b.lt(0).logical_or_(b.ge(batch_size)).logical_or_(y.lt(0))
                             .logical_or_(y.ge(ny)).logical_or_(x.lt(0)).logical_or_(x.ge(nx));
  if (bad.any().item<bool>()) {
    const int64_t row = bad.nonzero().select(1, 0)[0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "bev_pool: coords[", row, "] = [", b[row].item<int64_t>(), ", ",
                      y[row].item<int64_t>(), ", ", x[row].item<int64_t>(),
                      "] is outside the grid; need 0 <= batch < ", batch_size, ", 0 <= y < ", ny,
                      ", 0 <= x < ", nx);
  }
  return b.mul(ny).add_(y).mul_(nx).add_(x);
}

BevPoolSegments bev_pool_segments(const at::Tensor& cells) {
  BevPoolSegments seg;
  at::Tensor sorted_cells;
  std::tie(sorted_cells, seg.order) = at::sort(cells, /*stable=*/true, /*dim=*/0,
                                               /*descending=*/false);
  at::Tensor inverse;
  std::tie(seg.cells, inverse, seg.lengths) =
      at::unique_consecutive(sorted_cells, /*return_inverse=*/false, /*return_counts=*/true);
  seg.starts = at::cumsum(seg.lengths, 0).sub_(seg.lengths);
  seg.order = seg.order.contiguous();
  seg.cells = seg.cells.contiguous();
  seg.lengths = seg.lengths.contiguous();
  return seg;
}

at::Tensor bev_pool_forward_cpu(const at::Tensor& features, const at::Tensor& coords,
                                int64_t batch_size, int64_t ny, int64_t nx) {
  check_bev_pool_forward_args(features, coords, batch_size, ny, nx);
  TORCH_CHECK(features.device().is_cpu(), "bev_pool_forward_cpu expects CPU tensors");
  const int64_t channels = features.size(1);
  at::Tensor out = at::zeros({batch_size, channels, ny, nx}, features.options());
  const at::Tensor cells = bev_pool_cells(coords, batch_size, ny, nx);
  if (features.size(0) == 0 || channels == 0) return out;
  const BevPoolSegments seg = bev_pool_segments(cells);
  const at::Tensor feats = features.contiguous();
  const int64_t n_seg = seg.cells.size(0), plane = ny * nx;
  const int64_t* order = seg.order.data_ptr<int64_t>();
  const int64_t* seg_cells = seg.cells.data_ptr<int64_t>();
  const int64_t* starts = seg.starts.data_ptr<int64_t>();
  const int64_t* lengths = seg.lengths.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "bev_pool_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = feats.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n_seg, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(channels);
      for (int64_t s = begin; s < end; ++s) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k = starts[s]; k < starts[s] + lengths[s]; ++k) {
          const scalar_t* row = src + order[k] * channels;
          for (int64_t c = 0; c < channels; ++c) acc[c] += static_cast<acc_t>(row[c]);
        }
        const int64_t b = seg_cells[s] / plane, yx = seg_cells[s] % plane;
        scalar_t* cell_out = dst + b * channels * plane + yx;
        for (int64_t c = 0; c < channels; ++c) cell_out[c * plane] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return out;
}

at::Tensor bev_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& coords) {
  check_bev_pool_backward_args(grad_out, coords);
  TORCH_CHECK(grad_out.device().is_cpu(), "bev_pool_backward_cpu expects CPU tensors");
  const int64_t batch_size = grad_out.size(0), channels = grad_out.size(1);
  const int64_t ny = grad_out.size(2), nx = grad_out.size(3);
  const int64_t n_points = coords.size(0);
  at::Tensor grad_features = at::empty({n_points, channels}, grad_out.options());
  const at::Tensor cells = bev_pool_cells(coords, batch_size, ny, nx).contiguous();
  if (n_points == 0 || channels == 0) return grad_features;
  // Channels last (B, ny, nx, C): each point then copies one contiguous row of C gradients,
  // instead of C values a plane apart (a cache miss each on a lift-splat sized grid).
  const at::Tensor go = grad_out.permute({0, 2, 3, 1}).contiguous();
  const int64_t* cell_ptr = cells.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(),
                                  "bev_pool_backward_cpu", [&] {
    const scalar_t* src = go.data_ptr<scalar_t>();
    scalar_t* dst = grad_features.data_ptr<scalar_t>();
    at::parallel_for(0, n_points, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const scalar_t* cell_grad = src + cell_ptr[p] * channels;
        std::copy(cell_grad, cell_grad + channels, dst + p * channels);
      }
    });
  });
  return grad_features;
}

}  // namespace v2xfuse
