// Rotated NMS on CUDA: a kernel fills a suppression bit mask for every pair (i < j) of the
// score-sorted boxes, 64 columns per word; the greedy pass over the mask then runs on the host,
// which is sequential by nature and cheap next to the N^2 / 2 IoUs.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "box_geometry.h"
#include "nms_rotated/nms_rotated.h"

namespace v2xfuse {

namespace {

constexpr int kBlockBoxes = 64;  // one bit per column box in an unsigned long long

// Block (col_block, row_block) compares up to 64 row boxes with up to 64 column boxes and writes
// mask[i, col_block] with bit t set when IoU(box i, box col_block * 64 + t) > threshold, only for
// columns after i. Blocks below the diagonal have nothing to do (their words are never read).
template <typename T>
__global__ void nms_mask_kernel(const T* __restrict__ sorted_boxes, int64_t n, T threshold,
                                int64_t col_blocks, unsigned long long* __restrict__ mask) {
  const int64_t row_block = blockIdx.y, col_block = blockIdx.x;
  if (row_block > col_block) return;
  const int64_t row_start = row_block * kBlockBoxes, col_start = col_block * kBlockBoxes;
  const int rows = static_cast<int>(min_(n - row_start, static_cast<int64_t>(kBlockBoxes)));
  const int cols = static_cast<int>(min_(n - col_start, static_cast<int64_t>(kBlockBoxes)));

  __shared__ RotBox<T> col_boxes[kBlockBoxes];
  if (static_cast<int>(threadIdx.x) < cols) {
    col_boxes[threadIdx.x] = make_rot_box(sorted_boxes + (col_start + threadIdx.x) * 7);
  }
  __syncthreads();

  if (static_cast<int>(threadIdx.x) < rows) {
    const int64_t i = row_start + threadIdx.x;
    const RotBox<T> box = make_rot_box(sorted_boxes + i * 7);
    unsigned long long bits = 0;
    const int first = row_block == col_block ? static_cast<int>(threadIdx.x) + 1 : 0;
    for (int t = first; t < cols; ++t) {
      if (iou_bev(box, col_boxes[t]) > threshold) bits |= 1ULL << t;
    }
    mask[i * col_blocks + col_block] = bits;
  }
}

}  // namespace

at::Tensor nms_rotated_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                            double iou_threshold) {
  check_nms_args(boxes, scores);
  TORCH_CHECK(boxes.is_cuda(), "nms_rotated_cuda expects CUDA tensors");
  const c10::cuda::CUDAGuard device_guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  TORCH_CHECK(ceil_div(n, kBlockBoxes) <= 65535, "nms_rotated_cuda supports at most ",
              65535 * kBlockBoxes, " boxes, got ", n, "; use pre_max_size");

  // Stable descending sort: equal scores keep index order, as on the CPU.
  const at::Tensor order =
      std::get<1>(at::sort(scores.contiguous(), /*stable=*/true, /*dim=*/0, /*descending=*/true));
  const at::Tensor sorted_boxes = boxes.index_select(0, order).contiguous();
  const int64_t col_blocks = ceil_div(n, kBlockBoxes);
  at::Tensor mask = at::empty({n, col_blocks}, boxes.options().dtype(at::kLong));

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(col_blocks), static_cast<unsigned int>(col_blocks));
  AT_DISPATCH_FLOATING_TYPES(sorted_boxes.scalar_type(), "nms_rotated_cuda", [&] {
    nms_mask_kernel<scalar_t><<<grid, kBlockBoxes, 0, stream>>>(
        sorted_boxes.data_ptr<scalar_t>(), n, static_cast<scalar_t>(iou_threshold), col_blocks,
        reinterpret_cast<unsigned long long*>(mask.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // .cpu() waits for the kernel on the current stream.
  const at::Tensor mask_cpu = mask.cpu();
  const unsigned long long* mask_ptr =
      reinterpret_cast<const unsigned long long*>(mask_cpu.data_ptr<int64_t>());
  std::vector<unsigned long long> removed(col_blocks, 0);
  std::vector<int64_t> keep;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t word = i / kBlockBoxes, bit = i % kBlockBoxes;
    if (removed[word] & (1ULL << bit)) continue;
    keep.push_back(i);
    const unsigned long long* row = mask_ptr + i * col_blocks;
    for (int64_t w = word; w < col_blocks; ++w) removed[w] |= row[w];
  }
  const at::Tensor keep_cpu =
      at::from_blob(keep.data(), {static_cast<int64_t>(keep.size())}, at::kLong).clone();
  return order.index_select(0, keep_cpu.to(order.device(), /*non_blocking=*/false));
}

}  // namespace v2xfuse
