"""Install tritonmerge. Pure Python always works; the CUDA extension (csrc/) is built only where
nvcc and a CUDA build of torch are present (see ``_extension_modules``)."""

from setuptools import find_packages, setup


def _extension_modules():
    """The optional CUDA extension ``tritonmerge._C`` (sources: every csrc/*.cu and csrc/*.cpp).

    Built only when torch is importable here, nvcc is found and torch is a CUDA build, or when
    TRITONMERGE_FORCE_CUDA=1; TRITONMERGE_SKIP_CUDA_BUILD=1 never builds it. Otherwise: an empty
    list and a one-line notice. pip builds in an isolated environment without torch by default,
    so build the extension with ``pip install -e . --no-build-isolation``. Architectures:
    TORCH_CUDA_ARCH_LIST or TRITONMERGE_CUDA_ARCHS (e.g. "8.0;9.0")."""
    import glob
    import os
    import sys

    def skip(reason):
        print(f"tritonmerge: not building the CUDA extension ({reason}); installing pure Python", file=sys.stderr)
        return [], {}

    if os.environ.get("TRITONMERGE_SKIP_CUDA_BUILD") == "1":
        return skip("TRITONMERGE_SKIP_CUDA_BUILD=1")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # pip's isolated build environment has no torch
        return skip(f"torch is not importable at build time: {exc}; use pip install --no-build-isolation")
    force = os.environ.get("TRITONMERGE_FORCE_CUDA") == "1"
    if not force:
        if torch.version.cuda is None:
            return skip(f"torch {torch.__version__} is not a CUDA build")
        if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
            return skip("nvcc not found (set CUDA_HOME)")
    archs = os.environ.get("TRITONMERGE_CUDA_ARCHS")
    if archs and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    ext = CUDAExtension(
        name="tritonmerge._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension_modules()

setup(
    name="tritonmerge",
    version="0.1.0",
    description="Kernel-accelerated model merging: WUDI, TADrop, LwPTV, TIES, DARE and more",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tritonmerge", "tritonmerge.*"]) + ["hydra_plugins.tritonmerge_fusion_bench"],
    package_data={"tritonmerge": ["backends/cpu/*.c", "integrations/fusion_bench_config/method/tritonmerge/*.yaml"]},
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
        "test": ["pytest>=7", "pytest-benchmark>=4", "pybind11>=2.10", "xxhash>=3"],
        "triton": ["triton>=3.0"],
        "mergekit": ["mergekit>=0.1.5,<0.2"],
        "peft": ["peft>=0.21,<0.22"],
        "fusion-bench": ["fusion-bench>=0.2.33,<0.3", "transformers>=5.23,<5.25"],
    },
    entry_points={"console_scripts": ["tritonmerge = tritonmerge.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
