"""Device hygiene of the library, checked without a GPU: no hard-coded ``.cuda()`` (a rank of a
multi-GPU run must stay on its own ``cuda:LOCAL_RANK``; ``tensor.cuda()`` goes to the current
device whatever the data's), no kernels compiled at run time (every rank of a run would compile
its own copy), and tensors made from nothing on the device of the data they meet."""
import re
from pathlib import Path

import torch

from v2xfuse.models.inputs import AgentInputs

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = [ROOT / "v2xfuse", ROOT / "tools"]
# .cuda() / .cuda(i), and the legacy typed constructors that allocate on the current device
HARD_CODED_CUDA = re.compile(r"\.cuda\(|torch\.cuda\.\w*Tensor\b")
RUNTIME_BUILD = re.compile(r"cpp_extension|load_inline")


def _sources():
    for folder in LIBRARY:
        yield from sorted(folder.rglob("*.py"))


def _hits(pattern: re.Pattern) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for path in _sources()
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line.split("#")[0])]


def test_no_hard_coded_cuda_in_library_code():
    assert list(_sources()), "no sources found: the test is looking in the wrong place"
    assert _hits(HARD_CODED_CUDA) == [], "thread a device (tensor.to(device)) instead"


def test_no_kernel_is_compiled_at_run_time():
    assert _hits(RUNTIME_BUILD) == [], "the kernels are built once, by setup.py, into v2xfuse._C"


def test_a_missing_sensor_is_masked_on_the_device_of_the_present_one():
    # "meta" stands in for a CUDA device: a mask left on the CPU would meet cuda tensors in the
    # fusion state (torch.stack of a cuda and a cpu mask fails).
    inputs = AgentInputs(3, torch.zeros(4, 5, device="meta"), None)
    assert inputs.device.type == "meta"
    assert inputs.present("camera").device.type == "meta"
    assert AgentInputs(2).present("lidar").device.type == "cpu"
