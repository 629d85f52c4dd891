"""sambayes: pip install . (or -e .). The package ``sambayes`` plus the Triton kernels
in ``kernels/``, installed as ``sambayes.kernels``, and the C++/CUDA extension
``sambayes._C`` built from ``csrc/``.

The extension is optional: its CPU kernels are built whenever PyTorch and a C++
compiler are there; its CUDA kernels only with a CUDA build of PyTorch and a CUDA
toolkit (``SAMBAYES_NO_CUDA=1`` skips them). A failed build prints why and installs
the package without it (``python -m sambayes info`` then says so). Build with
``pip install --no-build-isolation`` so that the installed PyTorch is used.
"""

import os
import pathlib

from setuptools import setup

CPU_SOURCES = ["csrc/bindings.cpp", "csrc/cpu_kernels.cpp"]
CUDA_SOURCES = ["csrc/cuda_kernels.cu"]
# at::parallel_for is OpenMP in PyTorch's builds; no errno from sqrt, so that the loops vectorize (as PyTorch's own flags)
# -Wno-maybe-uninitialized: gcc 12 flags _mm512_undefined_epi32 inside its own AVX-512 headers
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wno-maybe-uninitialized"]
NVCC_FLAGS = ["-O3"]
# codes for csrc/bindings.cpp's note on why the CUDA kernels are missing
CUDA_SKIPPED = {"env": 1, "cpu_torch": 2, "no_toolkit": 3, "failed": 4}


def _cuda_skip_reason(torch, cuda_home):
    if os.environ.get("SAMBAYES_NO_CUDA", "0") not in ("", "0"):
        return "env"
    if torch.version.cuda is None:
        return "cpu_torch"
    if cuda_home is None:
        return "no_toolkit"
    return None


def _extension_build():
    """(ext_modules, cmdclass) for sambayes._C, or ([], {}) when PyTorch cannot be imported."""
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except Exception as exc:  # noqa: BLE001 - any failure means: no extension, say why
        print(f"sambayes: not building the C++ extension sambayes._C: cannot import torch ({exc})")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Falls back to the CPU kernels when the CUDA ones fail, and to no extension at all
        when the CPU ones fail: pip install never breaks on the optional extension."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
                return
            except Exception as exc:  # noqa: BLE001
                print(f"sambayes: building {ext.name} failed: {exc}")
                if not any(src.endswith(".cu") for src in ext.sources):
                    print("sambayes: installing without the C++ extension (backends 'cpu' and 'cuda' unavailable)")
                    return
            # retry without the CUDA kernels
            ext.sources = [src for src in ext.sources if not src.endswith(".cu")]
            cxx = ext.extra_compile_args["cxx"]
            cxx[cxx.index("-DSAMBAYES_WITH_CUDA")] = f"-DSAMBAYES_CUDA_SKIPPED={CUDA_SKIPPED['failed']}"
            try:
                super().build_extension(ext)
                print("sambayes: built sambayes._C with its CPU kernels only (the CUDA build failed, see above)")
            except Exception as exc:  # noqa: BLE001
                print(f"sambayes: building {ext.name} without CUDA failed too ({exc}); installing without it")

    skip = _cuda_skip_reason(torch, CUDA_HOME)
    if skip is None:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            # no GPU to ask: build for A100 and H100, plus PTX for newer GPUs
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        ext = CUDAExtension(
            "sambayes._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": CXX_FLAGS + ["-DSAMBAYES_WITH_CUDA"], "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    else:
        print(f"sambayes: building sambayes._C without CUDA kernels ({skip})")
        ext = CppExtension(
            "sambayes._C",
            CPU_SOURCES,
            extra_compile_args={"cxx": CXX_FLAGS + [f"-DSAMBAYES_CUDA_SKIPPED={CUDA_SKIPPED[skip]}"]},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extension_build()

setup(
    name="sambayes",
    version="0.1.0",
    description="bSAM and SAM optimizers for PyTorch: exact, fused, with a Gaussian posterior",
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8") if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["sambayes", "sambayes.backends", "sambayes.demo", "sambayes.kernels"],
    package_dir={"sambayes": "sambayes", "sambayes.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.4", "tqdm>=4.60"],
    extras_require={
        "triton": ["triton>=3.4"],
        "demo": ["scikit-learn>=1.2", "matplotlib>=3.6"],
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "scikit-learn>=1.2",
            "matplotlib>=3.6",
            "pytorch-optimizer>=3.0",
            "ninja",
            "pybind11",
        ],
    },
    entry_points={"console_scripts": ["sambayes=sambayes.__main__:main"]},
)
