"""sambayes: pip install . (or -e .). The package ``sambayes`` plus the Triton kernels
in ``kernels/``, installed as ``sambayes.kernels``."""

from setuptools import setup

setup(
    name="sambayes",
    version="0.1.0",
    description="bSAM and SAM optimizers for PyTorch: exact, fused, with a Gaussian posterior",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["sambayes", "sambayes.kernels"],
    package_dir={"sambayes": "sambayes", "sambayes.kernels": "kernels"},
    install_requires=["torch>=2.4", "tqdm>=4.60"],
    extras_require={
        "triton": ["triton>=3.0"],
        "demo": ["scikit-learn>=1.2", "matplotlib>=3.6"],
        "test": ["pytest>=7", "hypothesis>=6", "scikit-learn>=1.2", "matplotlib>=3.6", "pytorch-optimizer>=3.0", "ninja", "pybind11"],
    },
    entry_points={"console_scripts": ["sambayes=sambayes.__main__:main"]},
)
