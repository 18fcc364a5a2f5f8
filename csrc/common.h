// Argument checks shared by the ops' CPU and CUDA entry points (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace v2xfuse {

// boxes: (N, 7) [x, y, z, dx, dy, dz, yaw], float32 or float64.
inline void check_boxes(const at::Tensor& boxes, const char* name) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 7, name,
              " must be (N, 7) [x, y, z, dx, dy, dz, yaw], got shape ", boxes.sizes());
  TORCH_CHECK(boxes.scalar_type() == at::kFloat || boxes.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", boxes.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* name_a, const at::Tensor& b,
                              const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), name_a, " and ", name_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace v2xfuse
