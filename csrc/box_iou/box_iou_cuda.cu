#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "box_geometry.h"
#include "box_iou/box_iou.h"

namespace v2xfuse {

namespace {

constexpr int kThreads = 256;

// One thread per (i, j) pair, grid-stride so any N x M fits the grid.
template <typename T>
__global__ void boxes_pairwise_kernel(const T* __restrict__ boxes_a, const T* __restrict__ boxes_b,
                                      int64_t n, int64_t m, int mode, T* __restrict__ out) {
  const int64_t total = n * m;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t i = k / m, j = k - i * m;
    const RotBox<T> a = make_rot_box(boxes_a + i * 7);
    const RotBox<T> b = make_rot_box(boxes_b + j * 7);
    out[k] = pair_value(a, b, mode);
  }
}

}  // namespace

at::Tensor boxes_pairwise_cuda(const at::Tensor& boxes_a, const at::Tensor& boxes_b,
                               int64_t mode) {
  check_box_pair(boxes_a, boxes_b, mode);
  TORCH_CHECK(boxes_a.is_cuda(), "boxes_pairwise_cuda expects CUDA tensors");
  const c10::cuda::CUDAGuard device_guard(boxes_a.device());
  const at::Tensor a = boxes_a.contiguous(), b = boxes_b.contiguous();
  const int64_t n = a.size(0), m = b.size(0);
  at::Tensor out = at::empty({n, m}, a.options());
  if (n == 0 || m == 0) return out;

  const int64_t blocks = std::min<int64_t>(ceil_div(n * m, kThreads), int64_t(1) << 16);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "boxes_pairwise_cuda", [&] {
    boxes_pairwise_kernel<scalar_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), n, m, static_cast<int>(mode),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace v2xfuse
