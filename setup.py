"""Build script for mla_ext.

A CPU-only extension is built when torch has no CUDA or nvcc is missing; a CUDA
extension otherwise. MLA_EXT_CUDA=0/1 forces either way. TORCH_CUDA_ARCH_LIST picks the
GPU architectures (default: sm_80, sm_86, sm_89, sm_90a). MAX_JOBS caps ninja's jobs.
"""
import glob
import os
import shutil


def _fix_cuda_home() -> None:
    """torch derives CUDA_HOME from `which nvcc`; a wrapper script such as /usr/local/bin/nvcc
    then yields a directory without the toolkit's headers. Point it at the real toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            if home != os.path.dirname(os.path.dirname(nvcc)):
                os.environ["CUDA_HOME"] = home
            return


_fix_cuda_home()

import torch  # noqa: E402  (after _fix_cuda_home: cpp_extension reads CUDA_HOME on import)
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0a"  # 9.0a: sm_90 SASS plus the wgmma / setmaxnreg of csrc/cuda/sm90


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


def cuda_include_dirs() -> list[str]:
    """Extra include dirs for torch's CUDA headers: a pip-installed toolkit (nvidia-* wheels)
    ships cuBLAS / cuSPARSE headers that a minimal system toolkit may lack."""
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "include", "cublas_v2.h")):
        return []
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = []
    for inc in sorted(glob.glob(os.path.join(site, "nvidia", "*", "include"))):
        if os.path.exists(os.path.join(inc, "cublas_v2.h")) or os.path.exists(os.path.join(inc, "cusparse.h")):
            found.append(inc)
    return found


def cxx_std() -> str:
    """C++ standard for the torch-facing sources: recent torch headers require C++20."""
    aten = os.path.join(os.path.dirname(torch.__file__), "include", "ATen", "ATen.h")
    try:
        with open(aten) as f:
            return "-std=c++20" if "C++20" in f.read() else "-std=c++17"
    except OSError:
        return "-std=c++17"


def extension():
    cxx_flags = ["-O3", cxx_std(), "-fopenmp", "-DPy_LIMITED_API=0x030A0000"]
    srcs = sources("csrc/api/checks.cpp") + sources("csrc/api/registration.cpp") + sources("csrc/api/cpu_ops.cpp")
    srcs += sources("csrc/api/sparse_ops.cpp")
    srcs += sources("csrc/cpu/**/*.cpp")
    common = dict(name="mla_ext._C", extra_link_args=["-fopenmp"], py_limited_api=True)
    if not want_cuda():
        return CppExtension(sources=srcs, extra_compile_args={"cxx": cxx_flags}, **common)

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    srcs += sources("csrc/api/cuda_ops.cpp") + sources("csrc/cuda/**/*.cu")
    srcs += sources("csrc/api/sparse_cuda_ops.cpp")
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "--use_fast_math", "-Xptxas=-v,-warn-spills",
                  "--expt-relaxed-constexpr"]
    # -idirafter: searched after the toolkit's own include dir, so only headers it lacks come from there.
    extra_inc = [flag for inc in cuda_include_dirs() for flag in ("-idirafter", inc)]
    return CUDAExtension(sources=srcs,
                         extra_compile_args={"cxx": cxx_flags + extra_inc + ["-DMLA_EXT_WITH_CUDA"], "nvcc": nvcc_flags},
                         **common)


def transformers_spec() -> str:
    """The supported transformers range, from mla_ext/integrations/transformers_range.py."""
    scope: dict = {}
    with open(os.path.join(ROOT, "mla_ext", "integrations", "transformers_range.py")) as f:
        exec(f.read(), scope)
    return scope["TRANSFORMERS_SPEC"]

class BuildExt(BuildExtension):
    """MLA_EXT_PREBUILT=<path of a built mla_ext/_C*.so> installs that library instead of
    compiling: the Makefile's vLLM venv reuses the .venv build when both venvs have the same
    torch (same version, same ABI), which saves a full rebuild (minutes on 2 cores)."""

    def build_extension(self, ext):
        prebuilt = os.environ.get("MLA_EXT_PREBUILT")
        if not prebuilt:
            return super().build_extension(ext)
        dest = self.get_ext_fullpath(ext.name)
        if os.path.abspath(prebuilt) != os.path.abspath(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(prebuilt, dest)


setup(
    name="mla_ext",
    version="0.1.0",
    description="Fast DeepSeek Multi-head Latent Attention (MLA) decode and paged latent-cache append for PyTorch",
    packages=find_packages(include=["mla_ext", "mla_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
    # vLLM runs every vllm.general_plugins entry point in each of its processes: registers the
    # mla_ext MLA backend (inert unless selected; see mla_ext/integrations/vllm.py).
    entry_points={"vllm.general_plugins": ["mla_ext = mla_ext.integrations.vllm:register"]},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    python_requires=">=3.10",
    # pip install 'mla_ext[hf]': a transformers release mla_ext.integrations.transformers supports.
    extras_require={"hf": ["transformers" + transformers_spec()]},
)
