#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU or a CUDA build of torch: nvcc -c each csrc/**/*.cu
# to an object (not linked, not loaded) with the flags torch's build helper would pass.
#
#   tools/nvcc_check.sh [PYTHON] [ARCH]     e.g. tools/nvcc_check.sh .venv/bin/python 90
#
# A CPU torch wheel ships the ATen/c10 CUDA headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h (it only defines C10_CUDA_BUILD_SHARED_LIBS, which matters on
# Windows), so C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips that include. NVCC, STD (default c++20, as
# torch >= 2.10 builds extensions) and OUT (default a temporary folder) can be set.
set -u
cd "$(dirname "$0")/.."
PYTHON=${1:-python}
ARCH=${2:-90}
NVCC=${NVCC:-nvcc}
STD=${STD:-c++20}
OUT=${OUT:-$(mktemp -d)}
TI=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
status=0
for f in $(find csrc -name '*.cu' | sort); do
  o="$OUT/$(basename "$f" .cu).o"
  if "$NVCC" -c -std="$STD" -O3 -Xcompiler -fPIC -DWITH_CUDA -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
      -gencode "arch=compute_$ARCH,code=sm_$ARCH" \
      -I"$TI" -I"$TI/torch/csrc/api/include" -Icsrc "$f" -o "$o"; then
    echo "ok    $f -> $o"
  else
    echo "FAIL  $f"
    status=1
  fi
done
exit $status
