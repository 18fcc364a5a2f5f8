// Pairwise rotated-box overlap / IoU: (N, 7) x (M, 7) -> (N, M), in the boxes' dtype.
#pragma once

#include <ATen/core/Tensor.h>

#include "common.h"

namespace v2xfuse {

// mode: a PairMode from box_geometry.h (BEV intersection area, BEV IoU or 3D IoU).
at::Tensor boxes_pairwise_cpu(const at::Tensor& boxes_a, const at::Tensor& boxes_b, int64_t mode);
#ifdef WITH_CUDA
at::Tensor boxes_pairwise_cuda(const at::Tensor& boxes_a, const at::Tensor& boxes_b, int64_t mode);
#endif

inline void check_box_pair(const at::Tensor& boxes_a, const at::Tensor& boxes_b, int64_t mode) {
  check_boxes(boxes_a, "boxes_a");
  check_boxes(boxes_b, "boxes_b");
  TORCH_CHECK(boxes_a.scalar_type() == boxes_b.scalar_type(),
              "boxes_a and boxes_b must have the same dtype, got ", boxes_a.scalar_type(), " and ",
              boxes_b.scalar_type());
  check_same_device(boxes_a, "boxes_a", boxes_b, "boxes_b");
  TORCH_CHECK(mode >= 0 && mode <= 2, "unknown pairwise mode ", mode);
}

}  // namespace v2xfuse
