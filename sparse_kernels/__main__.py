"""``python -m sparse_kernels info``: what was built, the versions, and the device."""
import argparse
import platform

import torch

import sparse_kernels
from sparse_kernels import extension
from sparse_kernels.backend import requested_backend, triton_installed


def info() -> None:
    print(f"sparse_kernels {sparse_kernels.__version__}")
    built = extension.build_info()
    if built is None:
        print(f"compiled extension: missing ({extension.LOAD_ERROR})")
    else:
        details = ", ".join(f"{key} {value}" for key, value in built.items() if key != "devices")
        print(f"compiled extension: built for {built['devices']} ({details})")
        for op in extension.OPS:
            devices = [d for d in ("cpu", "cuda") if extension.has_kernel(op, d)]
            print(f"  sparse_kernels::{op}: {', '.join(devices) or 'no kernels'}")
        if extension.has_kernel("bsr_linear_cpu", "cpu"):
            from sparse_kernels import compiled

            print(f"  CPU block-sparse kernels: instruction set {compiled.isa()} "
                  "(SPARSE_KERNELS_CPU_ISA=generic|avx2|avx512 forces one)")
    triton_version = __import__("triton").__version__ if triton_installed() else "not installed"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
          f"python {platform.python_version()}")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        print(f"device: {name} (sm {capability}), {torch.cuda.device_count()} visible")
    else:
        print(f"device: CPU only ({platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"SPARSE_KERNELS_BACKEND: {requested_backend()}; fp32 block-32 ops run on: "
          f"{sparse_kernels.select_backend(torch.device('cpu'), torch.float32, (32, 32))} (CPU)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparse_kernels", description=__doc__)
    parser.add_argument("command", choices=["info"])
    parser.parse_args(argv)
    info()


if __name__ == "__main__":
    main()
