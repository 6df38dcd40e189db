"""Build script for the compiled extension ``sparse_kernels._C`` (csrc/). Metadata: pyproject.toml.

The C++ (CPU) sources are always built. The CUDA sources are added when torch is a CUDA
build and the CUDA toolkit is found; ``SPARSE_KERNELS_FORCE_CUDA=1`` makes a missing
toolkit an error, ``SPARSE_KERNELS_NO_CUDA=1`` skips CUDA. ``TORCH_CUDA_ARCH_LIST`` is
respected (default "8.0;9.0+PTX": machine code for A100 and H100/H200, and PTX that newer
GPUs compile at load time); ``MAX_JOBS`` bounds the parallel compile jobs.

The toolkit is looked for in ``CUDA_HOME``, ``CUDA_PATH``, /usr/local/cuda and
/usr/local/cuda-*: an ``nvcc`` on the PATH may be a wrapper outside the toolkit, from
which torch would guess the wrong ``CUDA_HOME`` (and fail to link cudart).
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import setup


def log(message: str) -> None:
    print(f"sparse_kernels build: {message}", file=sys.stderr)


def find_cuda_home():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for candidate in candidates:
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return os.path.realpath(candidate)
    return None


def nvcc_version(cuda_home: str) -> str:
    output = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    match = re.search(r"release (\d+\.\d+)", output.stdout)
    return match.group(1) if match else "unknown"


def cuda_include_dirs():
    """CUDA headers that torch's pip wheels install under site-packages/nvidia/*/include
    (ATen's CUDA headers include cusparse.h, for one)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted({os.path.dirname(h) for root in roots for h in glob.glob(os.path.join(root, "*", "include", "*.h"))})


def extension_modules():
    try:
        import torch
    except ImportError:
        log("torch is not importable: building without the compiled extension")
        return [], {}
    force = os.environ.get("SPARSE_KERNELS_FORCE_CUDA") == "1"
    cuda_home = find_cuda_home()
    if os.environ.get("SPARSE_KERNELS_NO_CUDA") == "1":
        use_cuda, why = False, "SPARSE_KERNELS_NO_CUDA=1"
    elif torch.version.cuda is None:
        use_cuda, why = False, "torch is a CPU build"
    elif cuda_home is None:
        use_cuda, why = False, "no CUDA toolkit (nvcc) found"
    else:
        use_cuda, why = True, f"CUDA toolkit {cuda_home}"
    if force and not use_cuda:
        raise RuntimeError(f"SPARSE_KERNELS_FORCE_CUDA=1 but CUDA cannot be built: {why}")
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    info = "cpu"
    if use_cuda:
        archs = " ".join(os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split())
        info += f";cuda={nvcc_version(cuda_home)};archs={archs}"
    info += f";torch={torch.__version__}"
    log(f"building sparse_kernels._C: {info} ({why})")
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    kwargs = {
        "define_macros": [("SPARSE_KERNELS_BUILD_INFO", f'"{info}"')],
        "extra_compile_args": {"cxx": ["-O3", "-fopenmp"], "nvcc": ["-O3"]},
        "extra_link_args": ["-fopenmp"],
    }
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["define_macros"].append(("SPARSE_KERNELS_WITH_CUDA", None))
        extension = CUDAExtension("sparse_kernels._C", sources, include_dirs=cuda_include_dirs(), **kwargs)
    else:
        kwargs["extra_compile_args"] = kwargs["extra_compile_args"]["cxx"]
        extension = CppExtension("sparse_kernels._C", sources, **kwargs)
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
