#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "bev_pool/bev_pool.h"

namespace v2xfuse {

namespace {

constexpr int kThreads = 256;

inline unsigned int grid_size(int64_t work) {
  return static_cast<unsigned int>(std::min<int64_t>(ceil_div(work, kThreads), int64_t(1) << 16));
}

// One thread per (segment, channel): consecutive threads read consecutive channels of a point.
// Each cell sums its points in increasing point index, as the CPU kernel does.
template <typename scalar_t>
__global__ void bev_pool_forward_kernel(const scalar_t* __restrict__ features,
                                        const int64_t* __restrict__ order,
                                        const int64_t* __restrict__ seg_cells,
                                        const int64_t* __restrict__ starts,
                                        const int64_t* __restrict__ lengths, int64_t n_seg,
                                        int64_t channels, int64_t plane,
                                        scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = n_seg * channels;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t s = k / channels, c = k - s * channels;
    acc_t acc = acc_t(0);
    const int64_t end = starts[s] + lengths[s];
    for (int64_t i = starts[s]; i < end; ++i) {
      acc += static_cast<acc_t>(features[order[i] * channels + c]);
    }
    const int64_t b = seg_cells[s] / plane, yx = seg_cells[s] - b * plane;
    out[(b * channels + c) * plane + yx] = static_cast<scalar_t>(acc);
  }
}

// One thread per (point, channel): each point's gradient is its cell's output gradient.
template <typename scalar_t>
__global__ void bev_pool_backward_kernel(const scalar_t* __restrict__ grad_out,
                                         const int64_t* __restrict__ cells, int64_t n_points,
                                         int64_t channels, int64_t plane,
                                         scalar_t* __restrict__ grad_features) {
  const int64_t total = n_points * channels;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t p = k / channels, c = k - p * channels;
    const int64_t b = cells[p] / plane, yx = cells[p] - b * plane;
    grad_features[k] = grad_out[(b * channels + c) * plane + yx];
  }
}

}  // namespace

at::Tensor bev_pool_forward_cuda(const at::Tensor& features, const at::Tensor& coords,
                                 int64_t batch_size, int64_t ny, int64_t nx) {
  check_bev_pool_forward_args(features, coords, batch_size, ny, nx);
  TORCH_CHECK(features.is_cuda(), "bev_pool_forward_cuda expects CUDA tensors");
  const c10::cuda::CUDAGuard device_guard(features.device());
  const int64_t channels = features.size(1);
  at::Tensor out = at::zeros({batch_size, channels, ny, nx}, features.options());
  const at::Tensor cells = bev_pool_cells(coords, batch_size, ny, nx);
  if (features.size(0) == 0 || channels == 0) return out;
  const BevPoolSegments seg = bev_pool_segments(cells);
  const at::Tensor feats = features.contiguous();
  const int64_t n_seg = seg.cells.size(0);

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "bev_pool_forward_cuda", [&] {
    bev_pool_forward_kernel<scalar_t><<<grid_size(n_seg * channels), kThreads, 0, stream>>>(
        feats.data_ptr<scalar_t>(), seg.order.data_ptr<int64_t>(), seg.cells.data_ptr<int64_t>(),
        seg.starts.data_ptr<int64_t>(), seg.lengths.data_ptr<int64_t>(), n_seg, channels,
        ny * nx, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor bev_pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& coords) {
  check_bev_pool_backward_args(grad_out, coords);
  TORCH_CHECK(grad_out.is_cuda(), "bev_pool_backward_cuda expects CUDA tensors");
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const int64_t batch_size = grad_out.size(0), channels = grad_out.size(1);
  const int64_t ny = grad_out.size(2), nx = grad_out.size(3);
  const int64_t n_points = coords.size(0);
  at::Tensor grad_features = at::empty({n_points, channels}, grad_out.options());
  const at::Tensor cells = bev_pool_cells(coords, batch_size, ny, nx).contiguous();
  if (n_points == 0 || channels == 0) return grad_features;
  const at::Tensor go = grad_out.contiguous();

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(),
                                  "bev_pool_backward_cuda", [&] {
    bev_pool_backward_kernel<scalar_t><<<grid_size(n_points * channels), kThreads, 0, stream>>>(
        go.data_ptr<scalar_t>(), cells.data_ptr<int64_t>(), n_points, channels, ny * nx,
        grad_features.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_features;
}

}  // namespace v2xfuse
