"""``python -m sparse_kernels info``: what was built, the versions, and the device."""
import argparse
import platform
import sys

import torch

from sparse_kernels import extension, registry
from sparse_kernels.capability import requested_backend, select_backend, triton_installed


_KEYS = ("CPU", "CUDA", "Autograd", "AutocastCPU", "AutocastCUDA", "Meta")


def info() -> None:
    # The package root, which Python ran before this module (``-m`` runs a package's __init__
    # first): its version is read off it rather than imported, as a submodule must not import
    # its own package root.
    version = sys.modules["sparse_kernels"].__version__
    print(f"sparse_kernels {version}")
    built = extension.build_info()
    details = ", ".join(f"{key} {value}" for key, value in built.items() if key != "devices")
    print(f"compiled extension: built for {built['devices']} ({details})")
    print(f"CPU kernels: instruction set {extension.cpu_isa()} (SPARSE_KERNELS_CPU_ISA=generic|avx2|avx512 forces one)")
    registry.ops()  # the Python registrations too, so that the table below shows them
    print("kernels per dispatch key (compiled, or registered from Python):")
    for op in extension.MASK_OPS + extension.KERNEL_OPS + extension.NORM_OPS:
        name = f"sparse_kernels::{op}"
        keys = [k for k in _KEYS if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        print(f"  {name}: {', '.join(keys)}")
    triton_version = __import__("triton").__version__ if triton_installed() else "not installed"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
          f"python {platform.python_version()}")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        print(f"device: {name} (sm {capability}), {torch.cuda.device_count()} visible")
    else:
        print(f"device: CPU only ({platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"SPARSE_KERNELS_BACKEND: {requested_backend()}; fp32 block-32 ops on CPU run on: "
          f"{select_backend(torch.device('cpu'), torch.float32, (32, 32))}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sparse_kernels", description=__doc__)
    parser.add_argument("command", choices=["info"])
    parser.parse_args(argv)
    info()


if __name__ == "__main__":
    main()
