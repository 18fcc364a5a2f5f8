// Greedy rotated NMS in BEV: boxes (N, 7), scores (N,) -> kept indices (K,) int64, by
// descending score (ties: lower index first); a box is dropped when its BEV IoU with a kept
// box is > iou_threshold.
#pragma once

#include <ATen/core/Tensor.h>

#include "common.h"

namespace v2xfuse {

at::Tensor nms_rotated_cpu(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold);
#ifdef WITH_CUDA
at::Tensor nms_rotated_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                            double iou_threshold);
#endif

inline void check_nms_args(const at::Tensor& boxes, const at::Tensor& scores) {
  check_boxes(boxes, "boxes");
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "scores must be (N,) with N = boxes.size(0) = ", boxes.size(0), ", got shape ",
              scores.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), "scores must be floating point, got ",
              scores.scalar_type());
  check_same_device(boxes, "boxes", scores, "scores");
}

}  // namespace v2xfuse
