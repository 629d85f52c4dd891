"""sambayes: pip install . (or -e .). The package ``sambayes`` plus the Triton kernels
in ``kernels/``, installed as ``sambayes.kernels``, the C++/CUDA sources in ``csrc/``,
installed as ``sambayes/csrc``, and the extension ``sambayes._C`` built from them.

The extension is built here when PyTorch is importable (``pip install --no-build-isolation``):
its CPU kernels whenever a C++ compiler is there, its CUDA kernels only with a CUDA build of
PyTorch and a CUDA toolkit (``SAMBAYES_NO_CUDA=1`` skips them). A plain ``pip install .``
builds without PyTorch; the extension then compiles on first use (``sambayes/_build.py``),
with the same recipe. A failed build prints why and installs the package without it.
"""

import importlib.util
import pathlib
import re

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).parent

# the build recipe shared with the first-use build: loaded by path, sambayes itself needs PyTorch
_spec = importlib.util.spec_from_file_location(
    "sambayes_build", pathlib.Path(__file__).parent / "sambayes" / "_build.py"
)
recipe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipe)
CPU_SOURCES = [f"csrc/{name}" for name in recipe.CPU_SOURCES]
CUDA_SOURCES = [f"csrc/{name}" for name in recipe.CUDA_SOURCES]


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
        print(f"sambayes: the C++ extension will compile on first use (PyTorch is not importable here: {exc})")
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
            cxx[cxx.index("-DSAMBAYES_WITH_CUDA")] = f"-DSAMBAYES_CUDA_SKIPPED={recipe.CUDA_SKIPPED['failed']}"
            try:
                super().build_extension(ext)
                print("sambayes: built sambayes._C with its CPU kernels only (the CUDA build failed, see above)")
            except Exception as exc:  # noqa: BLE001
                print(f"sambayes: building {ext.name} without CUDA failed too ({exc}); installing without it")

    skip = recipe.cuda_skip_reason(torch, CUDA_HOME)
    if skip is None:
        recipe.default_cuda_arch_list(torch)
        ext = CUDAExtension(
            "sambayes._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": recipe.CXX_FLAGS + ["-DSAMBAYES_WITH_CUDA"], "nvcc": recipe.NVCC_FLAGS},
            extra_link_args=recipe.LINK_FLAGS,
        )
    else:
        print(f"sambayes: building sambayes._C without CUDA kernels ({skip})")
        ext = CppExtension(
            "sambayes._C",
            CPU_SOURCES,
            extra_compile_args={"cxx": recipe.CXX_FLAGS + [f"-DSAMBAYES_CUDA_SKIPPED={recipe.CUDA_SKIPPED[skip]}"]},
            extra_link_args=recipe.LINK_FLAGS,
        )
    return [ext], {"build_ext": OptionalBuildExtension}


class BuildPyWithSpecification(build_py):
    """Also copies the specification, ALGORITHM.md, into the package: ``sambayes/ALGORITHM.md``
    (``python -m sambayes info`` says where it is)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install imports the source tree, where ALGORITHM.md lies beside the package
        package = pathlib.Path(self.build_lib) / "sambayes"
        self.mkpath(str(package))
        self.copy_file(str(HERE / "ALGORITHM.md"), str(package / "ALGORITHM.md"))


#: a markdown link or image whose target is a path in the repository (no scheme, not an anchor)
_RELATIVE = re.compile(r"(!?)\[([^\]]*)\]\((?![a-z][a-z0-9+.-]*:|#)([^)\s]+)\)")


def long_description(readme: str) -> str:
    """README.md as the package index shows it. The repository has no public address, so a relative
    link cannot be made absolute: a link keeps its text and names the file in the source distribution
    in backticks; an image is dropped (README.md has none)."""
    return _RELATIVE.sub(lambda m: "" if m.group(1) else f"{m.group(2)} (`{m.group(3)}` in the sources)", readme)


ext_modules, cmdclass = _extension_build()
cmdclass = {**cmdclass, "build_py": BuildPyWithSpecification}

setup(
    name="sambayes",
    version="0.1.0",
    description="bSAM and SAM optimizers for PyTorch: exact, fused, with a Gaussian posterior",
    long_description=long_description((HERE / "README.md").read_text(encoding="utf-8")),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    classifiers=[
        "License :: OSI Approved :: BSD License",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    # 3.10: zip(strict=...) in the kernels; PyTorch 2.13, the release CI tests, has no wheel for 3.9
    python_requires=">=3.10",
    packages=[
        "sambayes",
        "sambayes.backends",
        "sambayes.cli",
        "sambayes.cli.demo",
        "sambayes.kernels",
        "sambayes.csrc",
    ],
    package_dir={"sambayes": "sambayes", "sambayes.kernels": "kernels", "sambayes.csrc": "csrc"},
    package_data={"sambayes.csrc": ["*.cpp", "*.cu", "*.cuh", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # ninja: the first-use build of the extension
    install_requires=["torch>=2.4", "tqdm>=4.60", "ninja"],
    extras_require={
        # Triton's wheels are for Linux; its kernels run on NVIDIA GPUs (on a CPU only in its interpreter, for tests)
        "triton": [
            'triton>=3.4; sys_platform == "linux" and (platform_machine == "x86_64" or platform_machine == "aarch64")'
        ],
        "demo": ["scikit-learn>=1.2", "matplotlib>=3.6", "ivon-opt>=0.1.3"],
        # CPU-only: everything the tests need but Triton (its tests skip, saying why, without it)
        "test": [
            "pytest>=7",
            "pytest-xdist>=3",  # the suite on every core (pytest -n auto)
            "hypothesis>=6",
            "scikit-learn>=1.2",
            "matplotlib>=3.6",
            "ivon-opt>=0.1.3",
            "pytorch-optimizer>=3.0",
            "lightning>=2.2",
            "accelerate>=0.30",
            "build>=1",  # the sdist test
        ],
        "docs": ["mkdocs>=1.6", "mkdocstrings[python]>=0.26", "pymdown-extensions>=10"],
    },
    entry_points={"console_scripts": ["sambayes=sambayes.cli:main"]},
)
