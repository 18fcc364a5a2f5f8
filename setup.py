"""v2xfuse installation.

Install torch first (``pip install torch==2.13.0`` takes the local CPU wheel; a bare ``torch``
requirement with nothing installed would pull a multi-GB CUDA build), then::

    pip install --no-build-isolation -e ".[test]"

``--no-build-isolation`` lets the build see the installed torch, which builds the ``v2xfuse._C``
extension from ``csrc/`` (CPU always; CUDA kernels too when torch has CUDA, or with FORCE_CUDA=1;
TORCH_CUDA_ARCH_LIST is honoured by torch's build helper). Set V2XFUSE_NO_EXT=1 to skip the
extension; the pure-PyTorch references are used then.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _cuda_spconv_requirement(cuda: str | None) -> str:
    """The spconv-cuXXX wheel for a CUDA version string such as "12.4" (default: 12.1)."""
    major, minor = (int(p) for p in (cuda or "12.1").split(".")[:2])
    # spconv publishes one wheel per CUDA minor line; take the newest that is not newer than torch's.
    for tag, (ma, mi) in (("cu126", (12, 6)), ("cu124", (12, 4)), ("cu121", (12, 1)),
                          ("cu120", (12, 0)), ("cu118", (11, 8))):
        if (major, minor) >= (ma, mi):
            return f"spconv-{tag}>=2.3.6"
    return "spconv>=2.3.6"


def _spconv_requirement() -> str:
    """The spconv wheel that matches the installed torch: ``spconv`` (CPU) or ``spconv-cuXXX``.

    ``spconv`` and ``spconv-cuXXX`` install the same module and must not be installed together.
    V2XFUSE_SPCONV overrides the choice (e.g. ``V2XFUSE_SPCONV=spconv-cu120``).
    """
    override = os.environ.get("V2XFUSE_SPCONV")
    if override:
        return override
    torch = _torch()
    cuda = getattr(getattr(torch, "version", None), "cuda", None) if torch else None
    return _cuda_spconv_requirement(cuda) if cuda else "spconv>=2.3.6"


def _extensions():
    if os.environ.get("V2XFUSE_NO_EXT") == "1":
        return [], {}
    torch = _torch()
    if torch is None:
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not sources:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = (torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1") and \
        torch.version.cuda is not None
    include_dirs = [os.path.join(HERE, "csrc")]
    # No -std: torch's build helper adds the standard its headers need (C++17 up to torch 2.9,
    # C++20 after); forcing one here breaks or warns on the other torch versions.
    cxx_flags = ["-O3"]
    # at::parallel_for is a header template: without OpenMP at compile time it runs every
    # loop on one thread (the ops did, whatever torch.set_num_threads said). With -fopenmp
    # the extension needs libgomp.so.1, and the loader hands it the one torch already loaded.
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
        ext = CUDAExtension(
            "v2xfuse._C", sources, include_dirs=include_dirs,
            define_macros=[("WITH_CUDA", None)],
            # No --use_fast_math: its sin/cos/division are approximate, which would move rotated
            # IoUs near an NMS threshold and make CUDA keep other boxes than CPU.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension("v2xfuse._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="v2xfuse",
    version="0.1.0",
    description="Cooperative V2X perception: LiDAR/camera BEV encoders, intermediate fusion, "
                "messages as bytes, bandwidth-vs-AP evaluation, on CPU and GPU.",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["v2xfuse", "v2xfuse.*"]),
    package_data={"v2xfuse": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        # images are decoded, resized and cropped with OpenCV; the headless build needs no X
        # libraries (servers without a display). Pillow stays for the synthetic data writers
        # and for reading an image's size from its header without decoding it.
        "opencv-python-headless>=4.8",
        "pillow>=9.0",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "tensorboard>=2.12",
        _spconv_requirement(),
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6.80", "shapely>=2.0"],
        "open3d": ["open3d>=0.17"],
        # The CUDA spconv wheel. Setup already picks it when the installed torch has CUDA (then
        # this extra names the same wheel); with a CPU torch use V2XFUSE_SPCONV instead, since
        # spconv and spconv-cuXXX cannot be installed side by side.
        "cuda": [_spconv_requirement() if "cu" in _spconv_requirement() else
                 _cuda_spconv_requirement(None)],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": []},
    zip_safe=False,
)
