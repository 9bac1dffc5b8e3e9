"""Build script: metadata lives in pyproject.toml.

The install is pure Python unless ACN_KERNELS_BUILD_CUDA=1 asks for the CUDA extension
`acn_kernels._C` (sources in csrc/) and a CUDA compiler is found; torch must then be importable at
build time (pip install --no-build-isolation). Flags (docs/ops.md's table has every flag of the package):

    ACN_KERNELS_BUILD_CUDA=1            build the extension
    ACN_KERNELS_CUDA_ARCHS="80;90"      SM architectures to compile for
    ACN_KERNELS_BUILD_JOBS=2            parallel compile jobs
"""
import os
import warnings

from setuptools import setup

SOURCES = ["csrc/accumulate_norm.cu", "csrc/hybrid_accumulate_norm.cu", "csrc/linear_act_accumulate.cu",
           "csrc/probe_norm.cu", "csrc/depth_cross_entropy.cu", "csrc/bindings.cpp"]


def cuda_extension_args() -> dict:
    if os.environ.get("ACN_KERNELS_BUILD_CUDA") != "1":
        return {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if CUDA_HOME is None:
        warnings.warn("ACN_KERNELS_BUILD_CUDA=1 but no CUDA compiler was found (set CUDA_HOME): "
                      "installing without the CUDA extension")
        return {}
    archs = os.environ.get("ACN_KERNELS_CUDA_ARCHS", "80;90")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs.split(";"))
    os.environ["MAX_JOBS"] = os.environ.get("ACN_KERNELS_BUILD_JOBS", "2")
    extension = CUDAExtension(
        "acn_kernels._C", SOURCES, include_dirs=[os.path.abspath("csrc")],
        define_macros=[("ACN_CUDA_ARCHS", '"' + archs.replace(";", ",") + '"')],
        # ptxas's registers and spills in the build's output: `cuda-report --build-log` reads them there
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-Xptxas=-v"]})
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension_args())
