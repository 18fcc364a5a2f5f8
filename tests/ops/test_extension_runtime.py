"""The compiled extension raises its errors instead of crashing the process.

A toolchain that links a private libstdc++ into ``v2xfuse._C`` (seen on a GPU machine whose
default g++ was a wrapper adding a static libstdc++) builds an extension that works until it
formats a number into an error message: then its ostream meets the process's locale and the
process dies with a segmentation fault. This runs such an error in a child process, so that a
broken build fails one test with a diagnosis instead of taking the test run down."""
import subprocess
import sys

import pytest

from v2xfuse import ops

pytestmark = pytest.mark.skipif(not ops.extension_available(), reason="v2xfuse._C not built")

CHILD = """
import torch
from v2xfuse import ops  # loads v2xfuse._C
coords = torch.tensor([[2, 0, 0]], dtype=torch.int32)  # batch 2 of a batch of 2: outside
try:
    torch.ops.v2xfuse.bev_pool_plan(coords, 2, 3, 3)
except ValueError as e:
    print("raised:", e)
"""


def test_an_error_message_with_numbers_is_raised_not_a_crash():
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "coords[0] = [2, 0, 0] is outside the grid" in run.stdout, (
        f"the extension crashed formatting an error (exit code {run.returncode}): rebuild it "
        f"with the distribution's compiler (CC=gcc CXX=g++, a libstdc++ shared with torch's), "
        f"not one that links libstdc++ statically\n{run.stderr[-2000:]}")


CHILD_OPENMP = """
import torch
from v2xfuse import ops
print("openmp", ops.extension_with_openmp())
print("gomp", sorted({line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setup.py adds -fopenmp on Linux")
def test_the_cpu_kernels_run_on_torch_s_threads_with_torch_s_openmp():
    """at::parallel_for is a header template: without -fopenmp every op ran on one thread
    whatever torch.set_num_threads said. Built with it, the extension must share torch's
    OpenMP runtime (one libgomp in the process: two would each keep a thread pool)."""
    run = subprocess.run([sys.executable, "-c", CHILD_OPENMP], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "openmp True" in run.stdout, (
        "v2xfuse._C was compiled without OpenMP: rebuild it (pip install --no-build-isolation "
        f"-e .)\n{run.stdout}")
    gomp = eval(run.stdout.split("gomp", 1)[1].strip().splitlines()[0])
    assert len(gomp) <= 1, f"two OpenMP runtimes loaded: {gomp}"
