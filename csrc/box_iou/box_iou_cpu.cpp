#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "box_geometry.h"
#include "box_iou/box_iou.h"

namespace v2xfuse {

namespace {

template <typename T>
std::vector<RotBox<T>> prepare_boxes(const T* rows, int64_t n) {
  std::vector<RotBox<T>> boxes(n);
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) boxes[i] = make_rot_box(rows + i * 7);
  });
  return boxes;
}

}  // namespace

at::Tensor boxes_pairwise_cpu(const at::Tensor& boxes_a, const at::Tensor& boxes_b, int64_t mode) {
  check_box_pair(boxes_a, boxes_b, mode);
  TORCH_CHECK(boxes_a.device().is_cpu(), "boxes_pairwise_cpu expects CPU tensors");
  const at::Tensor a = boxes_a.contiguous(), b = boxes_b.contiguous();
  const int64_t n = a.size(0), m = b.size(0);
  at::Tensor out = at::empty({n, m}, a.options());
  if (n == 0 || m == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "boxes_pairwise_cpu", [&] {
    const std::vector<RotBox<scalar_t>> ra = prepare_boxes(a.data_ptr<scalar_t>(), n);
    const std::vector<RotBox<scalar_t>> rb = prepare_boxes(b.data_ptr<scalar_t>(), m);
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int pair_mode = static_cast<int>(mode);
    // Rows of A per task: about 16k pairs each, so small problems stay on one thread.
    const int64_t grain = std::max<int64_t>(1, 16384 / m);
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < m; ++j) dst[i * m + j] = pair_value(ra[i], rb[j], pair_mode);
      }
    });
  });
  return out;
}

}  // namespace v2xfuse
