// The v2xfuse._C extension: registers the ops as torch.ops.v2xfuse.* with one kernel per device.
//
// The ops go through the dispatcher (TORCH_LIBRARY) rather than pybind11: the dispatcher picks
// the CPU or CUDA kernel from the tensors' device, the ops work with torch.compile and
// torch.library, and this file does not need the heavy <torch/extension.h>. Importing
// v2xfuse._C loads this shared library, whose static initialisers register the ops. The Python
// module holds `with_cuda`, `with_openmp` and the PCD decoders (`lzf_decompress`,
// `pcd_ascii_parse`), which work on bytes rather than tensors and so are plain Python C-API
// functions; they release the GIL.
#include <Python.h>
#include <torch/library.h>

#include "bev_pool/bev_pool.h"
#include "box_geometry.h"
#include "box_iou/box_iou.h"
#include "lzf/lzf.h"
#include "nms_rotated/nms_rotated.h"
#include "pcd_ascii/pcd_ascii.h"

#include <string>
#include <vector>

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
  // CPU only: the cell grouping computed once per call of v2xfuse.ops.bev_pool and shared by
  // its forward and backward passes (bev_pool.h).
  m.def("bev_pool_plan(Tensor coords, int batch_size, int ny, int nx) -> (Tensor, Tensor)");
  m.def("bev_pool_forward_planned(Tensor features, Tensor order, Tensor offsets, int batch_size, "
        "int ny, int nx) -> Tensor");
  m.def("bev_pool_backward_planned(Tensor grad_out, Tensor order, Tensor offsets) -> Tensor");
  // CPU only: lift and splat in one pass (v2xfuse.ops.bev_pool_weighted)
  m.def("bev_pool_weighted_forward(Tensor weights, Tensor values, Tensor rows, Tensor order, "
        "Tensor offsets, int batch_size, int ny, int nx) -> Tensor");
  m.def("bev_pool_weighted_backward(Tensor grad_out, Tensor weights, Tensor values, Tensor rows, "
        "Tensor order, Tensor offsets) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(v2xfuse, CPU, m) {
  m.impl("boxes_overlap_bev", &pairwise_cpu<kOverlapBev>);
  m.impl("boxes_iou_bev", &pairwise_cpu<kIouBev>);
  m.impl("boxes_iou_3d", &pairwise_cpu<kIou3d>);
  m.impl("nms_rotated", &nms_rotated_cpu);
  m.impl("bev_pool_forward", &bev_pool_forward_cpu);
  m.impl("bev_pool_backward", &bev_pool_backward_cpu);
  m.impl("bev_pool_plan", &bev_pool_plan_cpu);
  m.impl("bev_pool_forward_planned", &bev_pool_forward_planned_cpu);
  m.impl("bev_pool_backward_planned", &bev_pool_backward_planned_cpu);
  m.impl("bev_pool_weighted_forward", &bev_pool_weighted_forward_cpu);
  m.impl("bev_pool_weighted_backward", &bev_pool_weighted_backward_cpu);
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

// Whether at::parallel_for runs on torch's threads here: it is a header template, serial
// unless the extension itself was compiled with OpenMP (setup.py passes -fopenmp on Linux).
PyObject* with_openmp(PyObject*, PyObject*) {
#ifdef _OPENMP
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// lzf_decompress(data: bytes-like, out_size: int) -> bytearray; ValueError names the problem.
PyObject* lzf_decompress(PyObject*, PyObject* args) {
  Py_buffer in;
  Py_ssize_t out_size;
  if (!PyArg_ParseTuple(args, "y*n:lzf_decompress", &in, &out_size)) return nullptr;
  if (out_size < 0) {
    PyBuffer_Release(&in);
    PyErr_Format(PyExc_ValueError, "%zd compressed bytes cannot expand to %zd bytes", in.len,
                 out_size);
    return nullptr;
  }
  // Checked before allocating, so a hostile size cannot ask for more than 88x the input.
  std::string error;
  if (static_cast<size_t>(out_size) / 88 > static_cast<size_t>(in.len)) {
    v2xfuse::lzf_decode(static_cast<const uint8_t*>(in.buf), in.len, nullptr, out_size, &error);
    PyBuffer_Release(&in);
    PyErr_SetString(PyExc_ValueError, error.c_str());
    return nullptr;
  }
  PyObject* out = PyByteArray_FromStringAndSize(nullptr, out_size);
  if (out == nullptr) {
    PyBuffer_Release(&in);
    return nullptr;
  }
  bool ok;
  Py_BEGIN_ALLOW_THREADS
  ok = v2xfuse::lzf_decode(static_cast<const uint8_t*>(in.buf), in.len,
                           reinterpret_cast<uint8_t*>(PyByteArray_AS_STRING(out)), out_size,
                           &error);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&in);
  if (!ok) {
    Py_DECREF(out);
    PyErr_SetString(PyExc_ValueError, error.c_str());
    return nullptr;
  }
  return out;
}

// pcd_ascii_parse(body: bytes-like, points: int, columns: tuple of (kind: str, size: int,
// offset: int), row_bytes: int, out: writable buffer of points * row_bytes bytes)
//   -> (status, line, found) as AsciiResult in pcd_ascii/pcd_ascii.h.
PyObject* pcd_ascii_parse(PyObject*, PyObject* args) {
  Py_buffer body, out;
  Py_ssize_t points, row_bytes;
  PyObject* column_specs;
  if (!PyArg_ParseTuple(args, "y*nO!nw*:pcd_ascii_parse", &body, &points, &PyTuple_Type,
                        &column_specs, &row_bytes, &out)) {
    return nullptr;
  }
  auto release = [&]() {
    PyBuffer_Release(&body);
    PyBuffer_Release(&out);
  };
  std::vector<v2xfuse::AsciiColumn> columns;
  const Py_ssize_t width = PyTuple_GET_SIZE(column_specs);
  for (Py_ssize_t i = 0; i < width; ++i) {
    const char* kind;
    int size;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(PyTuple_GET_ITEM(column_specs, i), "sin", &kind, &size, &offset)) {
      release();
      return nullptr;
    }
    const bool valid = (kind[0] == 'f' && kind[1] == 0 && (size == 4 || size == 8)) ||
                       ((kind[0] == 'i' || kind[0] == 'u') && kind[1] == 0 &&
                        (size == 1 || size == 2 || size == 4 || size == 8));
    if (!valid || offset < 0 || offset + size > row_bytes) {
      release();
      PyErr_Format(PyExc_ValueError, "pcd_ascii_parse: column %zd (%s, %d bytes at %zd) does not "
                   "fit a record of %zd bytes", i, kind, size, offset, row_bytes);
      return nullptr;
    }
    columns.push_back({kind[0], size, offset});
  }
  if (width == 0 || points < 0 || row_bytes <= 0 || out.len / row_bytes < points) {
    release();
    PyErr_Format(PyExc_ValueError, "pcd_ascii_parse: %zd columns, output of %zd bytes for %zd "
                 "points of %zd bytes", width, out.len, points, row_bytes);
    return nullptr;
  }
  v2xfuse::AsciiResult result;
  Py_BEGIN_ALLOW_THREADS
  result = v2xfuse::pcd_ascii_parse(static_cast<const char*>(body.buf), body.len, points, columns,
                                    row_bytes, static_cast<uint8_t*>(out.buf));
  Py_END_ALLOW_THREADS
  release();
  return Py_BuildValue("(iLL)", result.status, static_cast<long long>(result.line),
                       static_cast<long long>(result.found));
}

PyMethodDef module_methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"with_openmp", with_openmp, METH_NOARGS,
     "Whether the CPU kernels' parallel loops use torch's threads (compiled with OpenMP)."},
    {"lzf_decompress", lzf_decompress, METH_VARARGS,
     "lzf_decompress(data, out_size) -> bytearray: an LZF stream that must expand to exactly "
     "out_size bytes; ValueError names what is corrupt."},
    {"pcd_ascii_parse", pcd_ascii_parse, METH_VARARGS,
     "pcd_ascii_parse(body, points, columns, row_bytes, out) -> (status, line, found): a PCD "
     "ascii body into packed records (see csrc/pcd_ascii/pcd_ascii.h)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C",
    "v2xfuse C++/CUDA ops, registered as torch.ops.v2xfuse.*", -1, module_methods,
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
