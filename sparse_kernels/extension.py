"""The compiled extension ``sparse_kernels._C`` (csrc/): loading it, and what it holds.

Importing ``_C`` defines every op of the package in torch's dispatcher,
``torch.ops.sparse_kernels.*``: the block-sparse linear and conv2d ops (forward,
grad-input, grad-weight) with their CPU kernels, Autograd and Autocast kernels, and the
mask ops (``build_index``, ``prune_and_regrow``, ``block_norms``) with CPU and, in a CUDA
build, CUDA kernels. The Triton kernels (CUDA) and the fake kernels are registered from
Python (:mod:`sparse_kernels.ops`, :mod:`sparse_kernels.masks`). The package needs it: it is
built by ``pip install``, for CPU always.
"""
from __future__ import annotations

import functools
import platform
from typing import Dict

import torch

try:
    from . import _C  # noqa: F401
except ImportError as error:
    raise ImportError(
        f"sparse_kernels: the compiled extension sparse_kernels._C does not load ({error}). It is built "
        "against the installed torch: reinstall with `pip install --no-build-isolation -e .` (or "
        "`pip install --no-build-isolation sparse-diffusion`) where this torch is installed."
    ) from error

# The mask ops have CPU and (in a CUDA build) CUDA kernels; the block-sparse ops CPU kernels.
MASK_OPS = ("build_index", "prune_and_regrow", "block_norms")
KERNEL_OPS = (
    "bsr_linear",
    "bsr_linear_grad_input",
    "bsr_linear_grad_weight",
    "bsr_conv2d",
    "bsr_conv2d_grad_input",
    "bsr_conv2d_grad_weight",
)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@functools.lru_cache(maxsize=None)
def has_compiled_kernel(op: str, device_type: str) -> bool:
    """Whether ``sparse_kernels::<op>`` has a compiled kernel for ``device_type`` (looked up
    before Python registers any)."""
    key = _DISPATCH_KEYS.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"sparse_kernels::{op}", key)


# Read now, before the Python registrations of sparse_kernels.ops and .masks add their own.
for _op in MASK_OPS + KERNEL_OPS:
    for _device in _DISPATCH_KEYS:
        has_compiled_kernel(_op, _device)


def build_info() -> Dict[str, str]:
    """What setup.py built, e.g. ``{"devices": "cpu,cuda", "cuda": "13.0", "archs": "8.0 9.0",
    "torch": ...}``."""
    parts = torch.ops.sparse_kernels.build_info().split(";")
    info = dict(part.partition("=")[::2] for part in parts[1:])
    info["devices"] = "cpu,cuda" if "cuda" in info else "cpu"
    return info


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), e.g. ``AMD EPYC 9B45``."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with here: ``avx512``, ``avx2`` or ``generic``
    (``SPARSE_KERNELS_CPU_ISA`` forces one)."""
    return torch.ops.sparse_kernels.cpu_isa()
