// The v2xfuse._C extension: registers the ops as torch.ops.v2xfuse.* with one kernel per device.
//
// The ops go through the dispatcher (TORCH_LIBRARY) rather than pybind11: the dispatcher picks
// the CPU or CUDA kernel from the tensors' device, the ops work with torch.compile and
// torch.library, and this file does not need the heavy <torch/extension.h>. Importing
// v2xfuse._C loads this shared library, whose static initialisers register the ops; the Python
// module itself is empty apart from `with_cuda`.
#include <Python.h>
#include <torch/library.h>

#include "bev_pool/bev_pool.h"
#include "box_geometry.h"
#include "box_iou/box_iou.h"
#include "nms_rotated/nms_rotated.h"

namespace v2xfuse {
namespace {

#ifdef WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

template <int Mode>
at::Tensor pairwise_cpu(const at::Tensor& a, const at::Tensor& b) {
  return boxes_pairwise_cpu(a, b, Mode);
}

#ifdef WITH_CUDA
template <int Mode>
at::Tensor pairwise_cuda(const at::Tensor& a, const at::Tensor& b) {
  return boxes_pairwise_cuda(a, b, Mode);
}
#else
[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, "v2xfuse::", op, " got CUDA tensors, but the v2xfuse._C extension was built "
              "without CUDA. Rebuild it where torch has CUDA (or with FORCE_CUDA=1): "
              "pip install --no-build-isolation -e .");
}
template <int Mode>
at::Tensor pairwise_cuda(const at::Tensor&, const at::Tensor&) {
  no_cuda(Mode == kOverlapBev ? "boxes_overlap_bev" : Mode == kIouBev ? "boxes_iou_bev"
                                                                       : "boxes_iou_3d");
}
at::Tensor nms_rotated_cuda(const at::Tensor&, const at::Tensor&, double) {
  no_cuda("nms_rotated");
}
at::Tensor bev_pool_forward_cuda(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t) {
  no_cuda("bev_pool_forward");
}
at::Tensor bev_pool_backward_cuda(const at::Tensor&, const at::Tensor&) {
  no_cuda("bev_pool_backward");
}
#endif

}  // namespace

TORCH_LIBRARY(v2xfuse, m) {
  m.def("boxes_overlap_bev(Tensor boxes_a, Tensor boxes_b) -> Tensor");
  m.def("boxes_iou_bev(Tensor boxes_a, Tensor boxes_b) -> Tensor");
  m.def("boxes_iou_3d(Tensor boxes_a, Tensor boxes_b) -> Tensor");
  m.def("nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("bev_pool_forward(Tensor features, Tensor coords, int batch_size, int ny, int nx) -> Tensor");
  m.def("bev_pool_backward(Tensor grad_out, Tensor coords) -> Tensor");
}

TORCH_LIBRARY_IMPL(v2xfuse, CPU, m) {
  m.impl("boxes_overlap_bev", &pairwise_cpu<kOverlapBev>);
  m.impl("boxes_iou_bev", &pairwise_cpu<kIouBev>);
  m.impl("boxes_iou_3d", &pairwise_cpu<kIou3d>);
  m.impl("nms_rotated", &nms_rotated_cpu);
  m.impl("bev_pool_forward", &bev_pool_forward_cpu);
  m.impl("bev_pool_backward", &bev_pool_backward_cpu);
}

// Registered in CPU-only builds too, so that CUDA tensors get the message above rather than
// the dispatcher's generic "could not run ... with arguments from the 'CUDA' backend".
TORCH_LIBRARY_IMPL(v2xfuse, CUDA, m) {
  m.impl("boxes_overlap_bev", &pairwise_cuda<kOverlapBev>);
  m.impl("boxes_iou_bev", &pairwise_cuda<kIouBev>);
  m.impl("boxes_iou_3d", &pairwise_cuda<kIou3d>);
  m.impl("nms_rotated", &nms_rotated_cuda);
  m.impl("bev_pool_forward", &bev_pool_forward_cuda);
  m.impl("bev_pool_backward", &bev_pool_backward_cuda);
}

}  // namespace v2xfuse

namespace {

PyObject* with_cuda(PyObject*, PyObject*) {
  if (v2xfuse::kWithCuda) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef module_methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C",
    "v2xfuse C++/CUDA ops, registered as torch.ops.v2xfuse.*", -1, module_methods,
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
