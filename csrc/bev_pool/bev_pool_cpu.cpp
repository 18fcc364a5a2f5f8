#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/unique_consecutive.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <climits>
#include <tuple>
#include <vector>

#include "bev_pool/bev_pool.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

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

namespace {

// Cells per tile: a tile's channel-last sums (kTile x C in the accumulation type, 8 KB at C = 32
// float) stay in L1 while they are written out one channel plane at a time.
constexpr int64_t kTile = 64;

// Points looked ahead in the cell-ordered walk. Consecutive points of a cell sit far apart in the
// frustum (a depth bin apart), so the hardware prefetcher cannot follow the rows; asking for the
// row kAhead points on hides most of the memory latency (16 / 32 / 64 measured at the camera.yaml
// shapes: 2.6 / 2.2 / 2.1 ms forward, 2.6 / 2.5 / 2.4 ms backward, one thread, load ~6).
constexpr int64_t kAhead = 32;

inline void prefetch_row(const void* row, int64_t bytes, bool write) {
  const char* p = static_cast<const char*>(row);
  for (int64_t k = 0; k < bytes; k += 64) {
    if (write) {
      __builtin_prefetch(p + k, 1);
    } else {
      __builtin_prefetch(p + k, 0);
    }
  }
}

// The weighted passes read, per point in plan order, its weight and row index (scattered over
// (P,) arrays) and then its row of values (an (R, C) table in L3): the first two are asked for
// kAhead points on, the row (whose index has arrived by then) kAhead / 2 points on.
template <typename scalar_t>
inline void prefetch_point(const int32_t* ord, int64_t i, int64_t n_points, const scalar_t* wt,
                           const int64_t* row_of, const scalar_t* values, int64_t channels) {
  if (i + kAhead < n_points) {
    const int64_t p = ord[i + kAhead];
    __builtin_prefetch(wt + p, 0);
    __builtin_prefetch(row_of + p, 0);
  }
  if (i + kAhead / 2 < n_points) {
    prefetch_row(values + row_of[ord[i + kAhead / 2]] * channels,
                 channels * static_cast<int64_t>(sizeof(scalar_t)), false);
  }
}

// The weighted passes' inputs: values (R, C) floating, weights (P,) of its dtype, rows (P,)
// int64, all on the CPU (checked by both passes).
void check_weighted_args(const at::Tensor& weights, const at::Tensor& values,
                         const at::Tensor& rows) {
  TORCH_CHECK(values.dim() == 2 && at::isFloatingType(values.scalar_type()) &&
              values.device().is_cpu(), "values must be a (R, C) floating CPU tensor, got ",
              values.sizes(), " ", values.scalar_type());
  TORCH_CHECK(weights.dim() == 1 && weights.scalar_type() == values.scalar_type() &&
              weights.device().is_cpu(), "weights must be a (P,) CPU tensor of the values' dtype");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.size(0) == weights.size(0),
              "rows must be a (P,) int64 tensor, P = ", weights.size(0));
}

template <typename index_t>
void plan_cells(const index_t* coords, int64_t n_points, int64_t batch_size, int64_t ny,
                int64_t nx, int32_t* cell_of, int32_t* counts) {
  for (int64_t p = 0; p < n_points; ++p) {
    const int64_t b = coords[3 * p], y = coords[3 * p + 1], x = coords[3 * p + 2];
    if (b < 0 || b >= batch_size || y < 0 || y >= ny || x < 0 || x >= nx) {
      TORCH_CHECK_VALUE(false, "bev_pool: coords[", p, "] = [", b, ", ", y, ", ", x,
                        "] is outside the grid; need 0 <= batch < ", batch_size, ", 0 <= y < ",
                        ny, ", 0 <= x < ", nx);
    }
    const int32_t cell = static_cast<int32_t>((b * ny + y) * nx + x);
    cell_of[p] = cell;
    ++counts[cell + 1];
  }
}

// Visits the tiles of kTile consecutive cells of every batch plane, split over threads (tiles
// never straddle two planes, so a tile's cells are contiguous in every channel plane).
template <typename F>
void for_each_tile(int64_t batch_size, int64_t plane, int64_t grain, const F& fn) {
  const int64_t per_plane = ceil_div(plane, kTile);
  at::parallel_for(0, batch_size * per_plane, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / per_plane, yx0 = (t - b * per_plane) * kTile;
      fn(b, yx0, std::min(kTile, plane - yx0));
    }
  });
}

// The planned forward pass over the tiles of ``out`` (B, C, ny, nx): each cell's points, in
// plan order, summed channel-last by ``add(sums_of_the_cell, plan_position)`` (a vectorised loop
// over C), then each channel's sums of the tile written out as one contiguous run; a tile without
// a point is written with zeros.
template <typename scalar_t, typename Add>
void pool_tiles(const int32_t* off, int64_t batch_size, int64_t plane, int64_t channels,
                scalar_t* dst, const Add& add) {
  using acc_t = at::opmath_type<scalar_t>;
  for_each_tile(batch_size, plane, /*grain=*/16, [&](int64_t b, int64_t yx0, int64_t n) {
    const int32_t* o = off + b * plane + yx0;
    scalar_t* tile_out = dst + b * channels * plane + yx0;
    if (o[0] == o[n]) {  // no point in the whole tile
      for (int64_t c = 0; c < channels; ++c) {
        std::fill_n(tile_out + c * plane, n, scalar_t(0));
      }
      return;
    }
    thread_local std::vector<acc_t> sums;
    sums.assign(n * channels, acc_t(0));
    for (int64_t t = 0; t < n; ++t) {
      acc_t* cell = sums.data() + t * channels;
      for (int32_t i = o[t]; i < o[t + 1]; ++i) add(cell, i);
    }
    for (int64_t c = 0; c < channels; ++c) {
      scalar_t* run = tile_out + c * plane;
      for (int64_t t = 0; t < n; ++t) run[t] = static_cast<scalar_t>(sums[t * channels + c]);
    }
  });
}

// Shapes and dtypes only: order and offsets are trusted to come from bev_pool_plan_cpu (checking
// every entry would cost as much as the pooling itself).
void check_plan(const at::Tensor& order, const at::Tensor& offsets, int64_t n_cells) {
  TORCH_CHECK(order.dim() == 1 && order.scalar_type() == at::kInt && order.is_contiguous() &&
              order.device().is_cpu(), "order must be a contiguous (P,) int32 CPU tensor");
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kInt &&
              offsets.is_contiguous() && offsets.device().is_cpu() &&
              offsets.size(0) == n_cells + 1,
              "offsets must be a contiguous (B * ny * nx + 1,) int32 CPU tensor, B * ny * nx = ",
              n_cells, ", got shape ", offsets.sizes());
  TORCH_CHECK(offsets.data_ptr<int32_t>()[n_cells] == order.size(0),
              "offsets[-1] must equal the number of points ", order.size(0));
}

// A planned pass's grid, the plan of its B * ny * nx cells, and one plan entry per point.
void check_planned_pool(const at::Tensor& order, const at::Tensor& offsets, int64_t n_points,
                        int64_t batch_size, int64_t ny, int64_t nx) {
  TORCH_CHECK(batch_size >= 0 && ny > 0 && nx > 0,
              "need batch_size >= 0, ny > 0 and nx > 0, got ", batch_size, ", ", ny, ", ", nx);
  check_plan(order, offsets, batch_size * ny * nx);
  TORCH_CHECK(order.size(0) == n_points, "order must have one entry per point (", n_points,
              "), got ", order.size(0));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bev_pool_plan_cpu(const at::Tensor& coords,
                                                     int64_t batch_size, int64_t ny, int64_t nx) {
  TORCH_CHECK(coords.dim() == 2 && coords.size(1) == 3,
              "coords must be (P, 3) [batch, y, x], got shape ", coords.sizes());
  TORCH_CHECK(at::isIntegralType(coords.scalar_type(), /*includeBool=*/false),
              "coords must be an integer tensor, got ", coords.scalar_type());
  TORCH_CHECK(coords.device().is_cpu(), "bev_pool_plan_cpu expects CPU tensors");
  TORCH_CHECK(batch_size >= 0 && ny > 0 && nx > 0,
              "need batch_size >= 0, ny > 0 and nx > 0, got ", batch_size, ", ", ny, ", ", nx);
  const int64_t n_points = coords.size(0), n_cells = batch_size * ny * nx;
  TORCH_CHECK(n_points < INT32_MAX && n_cells < INT32_MAX,
              "bev_pool on CPU takes fewer than 2^31 points and cells, got ", n_points, " and ",
              n_cells);
  const at::Tensor c = (coords.scalar_type() == at::kInt || coords.scalar_type() == at::kLong)
                           ? coords.contiguous() : coords.to(at::kLong).contiguous();
  at::Tensor offsets = at::zeros({n_cells + 1}, coords.options().dtype(at::kInt));
  at::Tensor order = at::empty({n_points}, coords.options().dtype(at::kInt));
  std::vector<int32_t> cell_of(n_points);
  int32_t* off = offsets.data_ptr<int32_t>();
  // A counting sort: one pass counts the points of every cell (checking the coords on the way),
  // a prefix sum turns the counts into offsets, and a second pass in point order places each
  // point, so every cell lists its points in increasing index. O(P + cells), no comparison sort.
  if (c.scalar_type() == at::kInt) {
    plan_cells(c.data_ptr<int32_t>(), n_points, batch_size, ny, nx, cell_of.data(), off);
  } else {
    plan_cells(c.data_ptr<int64_t>(), n_points, batch_size, ny, nx, cell_of.data(), off);
  }
  for (int64_t k = 0; k < n_cells; ++k) off[k + 1] += off[k];
  std::vector<int32_t> next(off, off + n_cells);
  int32_t* ord = order.data_ptr<int32_t>();
  for (int64_t p = 0; p < n_points; ++p) ord[next[cell_of[p]]++] = static_cast<int32_t>(p);
  return {order, offsets};
}

at::Tensor bev_pool_forward_planned_cpu(const at::Tensor& features, const at::Tensor& order,
                                        const at::Tensor& offsets, int64_t batch_size, int64_t ny,
                                        int64_t nx) {
  TORCH_CHECK(features.dim() == 2 && at::isFloatingType(features.scalar_type()) &&
              features.device().is_cpu(), "features must be a (P, C) floating CPU tensor, got ",
              features.sizes(), " ", features.scalar_type());
  check_planned_pool(order, offsets, features.size(0), batch_size, ny, nx);
  const int64_t plane = ny * nx;
  const int64_t channels = features.size(1);
  // Every element is written below (empty cells get their zeros there), so no zero fill here.
  at::Tensor out = at::empty({batch_size, channels, ny, nx}, features.options());
  if (channels == 0 || batch_size == 0) return out;
  const at::Tensor feats = features.contiguous();
  const int32_t* ord = order.data_ptr<int32_t>();
  const int32_t* off = offsets.data_ptr<int32_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "bev_pool_forward_planned_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = feats.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t n_points = feats.size(0);
    const int64_t row_bytes = channels * static_cast<int64_t>(sizeof(scalar_t));
    pool_tiles(off, batch_size, plane, channels, dst, [&](acc_t* cell, int32_t i) {
      if (i + kAhead < n_points) {
        prefetch_row(src + static_cast<int64_t>(ord[i + kAhead]) * channels, row_bytes, false);
      }
      const scalar_t* row = src + static_cast<int64_t>(ord[i]) * channels;
      for (int64_t c = 0; c < channels; ++c) cell[c] += static_cast<acc_t>(row[c]);
    });
  });
  return out;
}

at::Tensor bev_pool_backward_planned_cpu(const at::Tensor& grad_out, const at::Tensor& order,
                                         const at::Tensor& offsets) {
  TORCH_CHECK(grad_out.dim() == 4 && at::isFloatingType(grad_out.scalar_type()) &&
              grad_out.device().is_cpu(), "grad_out must be a (B, C, ny, nx) floating CPU "
              "tensor, got ", grad_out.sizes(), " ", grad_out.scalar_type());
  const int64_t batch_size = grad_out.size(0), channels = grad_out.size(1);
  const int64_t plane = grad_out.size(2) * grad_out.size(3);
  check_plan(order, offsets, batch_size * plane);
  const int64_t n_points = order.size(0);
  // Every point lies in exactly one cell, so every row is written below: no zero fill.
  at::Tensor grad_features = at::empty({n_points, channels}, grad_out.options());
  if (channels == 0 || n_points == 0) return grad_features;
  const at::Tensor go = grad_out.contiguous();
  const int32_t* ord = order.data_ptr<int32_t>();
  const int32_t* off = offsets.data_ptr<int32_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(),
                                  "bev_pool_backward_planned_cpu", [&] {
    const scalar_t* src = go.data_ptr<scalar_t>();
    scalar_t* dst = grad_features.data_ptr<scalar_t>();
    const int64_t row_bytes = channels * static_cast<int64_t>(sizeof(scalar_t));
    // Whole cache lines per row (C = 32 float: two): streaming stores write them without first
    // reading the lines they replace, which the scattered rows would otherwise all cost.
    const bool stream = row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0;
    (void)stream;
    for_each_tile(batch_size, plane, /*grain=*/16, [&](int64_t b, int64_t yx0, int64_t n) {
      const int32_t* o = off + b * plane + yx0;
      if (o[0] == o[n]) return;
      // The tile's gradients turned channel-last (each channel's n values read as one run),
      // then every point of a cell copies its cell's row of C.
      thread_local std::vector<scalar_t> rows;
      rows.resize(n * channels);
      const scalar_t* tile_in = src + b * channels * plane + yx0;
      for (int64_t c = 0; c < channels; ++c) {
        const scalar_t* run = tile_in + c * plane;
        for (int64_t t = 0; t < n; ++t) rows[t * channels + c] = run[t];
      }
#if defined(__SSE2__)
      if (stream) {
        for (int64_t t = 0; t < n; ++t) {
          const char* cell = reinterpret_cast<const char*>(rows.data() + t * channels);
          for (int32_t i = o[t]; i < o[t + 1]; ++i) {
            char* to = reinterpret_cast<char*>(dst + static_cast<int64_t>(ord[i]) * channels);
            for (int64_t k = 0; k < row_bytes; k += 16) {
              _mm_stream_si128(reinterpret_cast<__m128i*>(to + k),
                               _mm_loadu_si128(reinterpret_cast<const __m128i*>(cell + k)));
            }
          }
        }
        _mm_sfence();
        return;
      }
#endif
      for (int64_t t = 0; t < n; ++t) {
        const scalar_t* cell = rows.data() + t * channels;
        for (int32_t i = o[t]; i < o[t + 1]; ++i) {
          if (i + kAhead < n_points) {
            prefetch_row(dst + static_cast<int64_t>(ord[i + kAhead]) * channels, row_bytes, true);
          }
          std::copy_n(cell, channels, dst + static_cast<int64_t>(ord[i]) * channels);
        }
      }
    });
  });
  return grad_features;
}

at::Tensor bev_pool_forward_cpu(const at::Tensor& features, const at::Tensor& coords,
                                int64_t batch_size, int64_t ny, int64_t nx) {
  check_bev_pool_forward_args(features, coords, batch_size, ny, nx);
  TORCH_CHECK(features.device().is_cpu(), "bev_pool_forward_cpu expects CPU tensors");
  const auto [order, offsets] = bev_pool_plan_cpu(coords, batch_size, ny, nx);
  return bev_pool_forward_planned_cpu(features, order, offsets, batch_size, ny, nx);
}

at::Tensor bev_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& coords) {
  check_bev_pool_backward_args(grad_out, coords);
  TORCH_CHECK(grad_out.device().is_cpu(), "bev_pool_backward_cpu expects CPU tensors");
  const auto [order, offsets] = bev_pool_plan_cpu(coords, grad_out.size(0), grad_out.size(2),
                                                  grad_out.size(3));
  return bev_pool_backward_planned_cpu(grad_out, order, offsets);
}

// Lift and splat in one pass (bev_pool.h): the point rows are weights[p] * values[rows[p]],
// never stored. Rows and weights are trusted to match the plan (their shapes are checked);
// v2xfuse.ops.bev_pool_weighted checks rows against values before it plans.
at::Tensor bev_pool_weighted_forward_cpu(const at::Tensor& weights, const at::Tensor& values,
                                         const at::Tensor& rows, const at::Tensor& order,
                                         const at::Tensor& offsets, int64_t batch_size,
                                         int64_t ny, int64_t nx) {
  check_weighted_args(weights, values, rows);
  check_planned_pool(order, offsets, weights.size(0), batch_size, ny, nx);
  const int64_t plane = ny * nx;
  const int64_t channels = values.size(1);
  at::Tensor out = at::empty({batch_size, channels, ny, nx}, values.options());
  if (channels == 0 || batch_size == 0) return out;
  const at::Tensor vals = values.contiguous(), w = weights.contiguous(), r = rows.contiguous();
  const int32_t* ord = order.data_ptr<int32_t>();
  const int32_t* off = offsets.data_ptr<int32_t>();
  const int64_t* row_of = r.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(),
                                  "bev_pool_weighted_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = vals.data_ptr<scalar_t>();
    const scalar_t* wt = w.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t n_points = w.size(0);
    pool_tiles(off, batch_size, plane, channels, dst, [&](acc_t* cell, int32_t i) {
      prefetch_point(ord, i, n_points, wt, row_of, src, channels);
      const int64_t p = ord[i];
      const scalar_t weight = wt[p];
      const scalar_t* row = src + row_of[p] * channels;
      // the product rounded to scalar_t first, as the lifted features (weights * values) were
      for (int64_t c = 0; c < channels; ++c) {
        cell[c] += static_cast<acc_t>(static_cast<scalar_t>(weight * row[c]));
      }
    });
  });
  return out;
}

// One walk over the cells of every batch plane in plan order (the forward's), a tile of kTile
// cells at a time: the tile's output gradients turned channel-last (g, in L1), then for every
// point p of a cell, grad_weights[p] = <values[rows[p]], g[cell]> and
// grad_values[rows[p]] += weights[p] * g[cell]. No (B * ny * nx, C) copy of the gradient and no
// pass per row: values and grad_values are the small (R, C) tables (the image pixels) and stay in
// cache. Each row of grad_values sums its points in walk order (planes, then cells, then point
// index): deterministic, and the same on any number of threads, since the planes run in parallel
// only when no row has points in two planes (LSS: a camera belongs to one sample), where a row's
// order is its plane's walk; otherwise the planes run one after the other.
std::tuple<at::Tensor, at::Tensor> bev_pool_weighted_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& weights, const at::Tensor& values,
    const at::Tensor& rows, const at::Tensor& order, const at::Tensor& offsets) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.scalar_type() == values.scalar_type() &&
              grad_out.device().is_cpu(), "grad_out must be a (B, C, ny, nx) CPU tensor of the "
              "values' dtype");
  check_weighted_args(weights, values, rows);
  const int64_t n_points = weights.size(0), n_rows = values.size(0), channels = values.size(1);
  const int64_t batch_size = grad_out.size(0), plane = grad_out.size(2) * grad_out.size(3);
  TORCH_CHECK(grad_out.size(1) == channels, "grad_out has ", grad_out.size(1),
              " channels, values ", channels);
  check_planned_pool(order, offsets, n_points, batch_size, grad_out.size(2), grad_out.size(3));
  const at::Tensor go = grad_out.contiguous();
  const at::Tensor vals = values.contiguous(), w = weights.contiguous(), r = rows.contiguous();
  at::Tensor grad_weights = at::empty({n_points}, weights.options());
  // Summed in the accumulation type (float for half and bfloat16), rounded once at the end.
  const at::ScalarType acc_type = at::toOpMathType(values.scalar_type());
  at::Tensor grad_values_acc = at::zeros({n_rows, channels}, values.options().dtype(acc_type));
  if (channels == 0 || n_points == 0) {
    grad_weights.zero_();
    return {grad_weights, grad_values_acc.to(values.scalar_type())};
  }
  const int32_t* ord = order.data_ptr<int32_t>();
  const int32_t* off = offsets.data_ptr<int32_t>();
  const int64_t* row_of = r.data_ptr<int64_t>();

  // The planes in parallel only when every row's points lie in one plane.
  bool planes_apart = at::get_num_threads() > 1 && batch_size > 1;
  if (planes_apart) {
    std::vector<int64_t> plane_of_row(n_rows, -1);
    for (int64_t b = 0; b < batch_size && planes_apart; ++b) {
      for (int32_t i = off[b * plane]; i < off[(b + 1) * plane]; ++i) {
        int64_t& owner = plane_of_row[row_of[ord[i]]];
        if (owner != b && owner != -1) {
          planes_apart = false;
          break;
        }
        owner = b;
      }
    }
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, vals.scalar_type(),
                                  "bev_pool_weighted_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = go.data_ptr<scalar_t>();
    const scalar_t* val = vals.data_ptr<scalar_t>();
    const scalar_t* wt = w.data_ptr<scalar_t>();
    scalar_t* gw = grad_weights.data_ptr<scalar_t>();
    acc_t* gv = grad_values_acc.data_ptr<acc_t>();
    auto walk_plane = [&](int64_t b) {
      std::vector<acc_t> g(kTile * channels);
      for (int64_t yx0 = 0; yx0 < plane; yx0 += kTile) {
        const int64_t n = std::min(kTile, plane - yx0);
        const int32_t* o = off + b * plane + yx0;
        if (o[0] == o[n]) continue;
        const scalar_t* tile_in = src + b * channels * plane + yx0;
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* run = tile_in + c * plane;
          for (int64_t t = 0; t < n; ++t) g[t * channels + c] = static_cast<acc_t>(run[t]);
        }
        for (int64_t t = 0; t < n; ++t) {
          const acc_t* cell = g.data() + t * channels;
          for (int32_t i = o[t]; i < o[t + 1]; ++i) {
            prefetch_point(ord, i, n_points, wt, row_of, val, channels);
            const int64_t p = ord[i], row = row_of[p];
            const scalar_t* v = val + row * channels;
            acc_t* acc = gv + row * channels;
            const acc_t weight = static_cast<acc_t>(wt[p]);
            acc_t dot = acc_t(0);
            for (int64_t c = 0; c < channels; ++c) {
              dot += static_cast<acc_t>(v[c]) * cell[c];
              acc[c] += weight * cell[c];
            }
            gw[p] = static_cast<scalar_t>(dot);
          }
        }
      }
    };
    if (planes_apart) {
      at::parallel_for(0, batch_size, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) walk_plane(b);
      });
    } else {
      for (int64_t b = 0; b < batch_size; ++b) walk_plane(b);
    }
  });
  return {grad_weights, grad_values_acc.to(values.scalar_type())};  // no copy for float
}

}  // namespace v2xfuse
