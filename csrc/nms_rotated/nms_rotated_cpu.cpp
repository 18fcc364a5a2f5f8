#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>

#include <vector>

#include "box_geometry.h"
#include "nms_rotated/nms_rotated.h"

namespace v2xfuse {

at::Tensor nms_rotated_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                           double iou_threshold) {
  check_nms_args(boxes, scores);
  TORCH_CHECK(boxes.device().is_cpu(), "nms_rotated_cpu expects CPU tensors");
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));

  // Stable descending sort: equal scores keep index order, as the reference does.
  const at::Tensor order =
      std::get<1>(at::sort(scores.contiguous(), /*stable=*/true, /*dim=*/0, /*descending=*/true))
          .contiguous();
  const int64_t* order_ptr = order.data_ptr<int64_t>();
  const at::Tensor rows = boxes.contiguous();
  std::vector<int64_t> keep;

  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "nms_rotated_cpu", [&] {
    const scalar_t* src = rows.data_ptr<scalar_t>();
    std::vector<RotBox<scalar_t>> sorted(n);
    for (int64_t k = 0; k < n; ++k) sorted[k] = make_rot_box(src + order_ptr[k] * 7);
    const scalar_t threshold = static_cast<scalar_t>(iou_threshold);
    std::vector<uint8_t> suppressed(n, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (suppressed[i]) continue;
      keep.push_back(order_ptr[i]);
      const RotBox<scalar_t> kept = sorted[i];
      // Each task owns a disjoint range of j, so the writes do not race.
      at::parallel_for(i + 1, n, 2048, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          if (!suppressed[j] && iou_bev(kept, sorted[j]) > threshold) suppressed[j] = 1;
        }
      });
    }
  });

  at::Tensor out = at::empty({static_cast<int64_t>(keep.size())}, order.options());
  std::copy(keep.begin(), keep.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace v2xfuse
