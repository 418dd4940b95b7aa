"""Build script for mla_ext.

A CPU-only extension is built when torch has no CUDA or nvcc is missing; a CUDA
extension otherwise. MLA_EXT_CUDA=0/1 forces either way. TORCH_CUDA_ARCH_LIST picks the
GPU architectures (default: sm_80, sm_86, sm_89, sm_90). MAX_JOBS caps ninja's jobs.
"""
import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def want_cuda() -> bool:
    flag = os.environ.get("MLA_EXT_CUDA")
    has_toolkit = torch.version.cuda is not None and (CUDA_HOME is not None or shutil.which("nvcc") is not None)
    if flag == "0":
        return False
    if flag == "1":
        if not has_toolkit:
            raise RuntimeError("MLA_EXT_CUDA=1 but torch has no CUDA or nvcc was not found")
        return True
    return has_toolkit


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def extension():
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-DPy_LIMITED_API=0x030A0000"]
    srcs = sources("csrc/api/checks.cpp") + sources("csrc/api/registration.cpp") + sources("csrc/api/cpu_ops.cpp")
    srcs += sources("csrc/cpu/**/*.cpp")
    common = dict(name="mla_ext._C", extra_link_args=["-fopenmp"], py_limited_api=True)
    if not want_cuda():
        return CppExtension(sources=srcs, extra_compile_args={"cxx": cxx_flags}, **common)

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    srcs += sources("csrc/api/cuda_ops.cpp") + sources("csrc/cuda/**/*.cu")
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "--use_fast_math", "-Xptxas=-v,-warn-spills",
                  "--expt-relaxed-constexpr"]
    return CUDAExtension(sources=srcs, extra_compile_args={"cxx": cxx_flags + ["-DMLA_EXT_WITH_CUDA"],
                                                           "nvcc": nvcc_flags}, **common)


setup(
    name="mla_ext",
    version="0.1.0",
    description="Fast DeepSeek Multi-head Latent Attention (MLA) decode and paged latent-cache append for PyTorch",
    packages=find_packages(include=["mla_ext", "mla_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    python_requires=">=3.10",
)
