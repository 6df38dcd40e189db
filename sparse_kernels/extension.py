"""The compiled extension ``sparse_kernels._C`` (csrc/): loading it, and what it holds.

Importing ``_C`` registers ``torch.ops.sparse_kernels.{build_index, prune_and_regrow,
block_norms, build_info}`` with CPU kernels and, in a CUDA build, CUDA kernels; and the
block-sparse linear and conv2d kernels for CPU tensors (``bsr_*_cpu``, ``cpu_isa``; see
:mod:`sparse_kernels.compiled`). Without it every op has a pure-torch path
(:mod:`sparse_kernels.masks`, :mod:`sparse_kernels.reference`), slower and host-synchronising.
"""
from __future__ import annotations

import functools
from typing import Dict, Optional

import torch

try:
    from . import _C  # noqa: F401
except ImportError as error:
    LOADED, LOAD_ERROR = False, error
else:
    LOADED, LOAD_ERROR = True, None

# The mask ops have CPU and CUDA kernels; the block-sparse kernels here are CPU only.
MASK_OPS = ("build_index", "prune_and_regrow", "block_norms")
CPU_KERNEL_OPS = (
    "bsr_linear_cpu",
    "bsr_linear_grad_input_cpu",
    "bsr_linear_grad_weight_cpu",
    "bsr_conv2d_cpu",
    "bsr_conv2d_grad_input_cpu",
    "bsr_conv2d_grad_weight_cpu",
)
OPS = MASK_OPS + CPU_KERNEL_OPS
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, device_type: str) -> bool:
    """Whether the compiled ``sparse_kernels::<op>`` has a kernel for ``device_type``."""
    key = _DISPATCH_KEYS.get(device_type)
    return LOADED and key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"sparse_kernels::{op}", key)


def build_info() -> Optional[Dict[str, str]]:
    """What setup.py built, e.g. ``{"devices": "cpu,cuda", "cuda": "13.0", "archs": "8.0 9.0",
    "torch": ...}``; ``None`` when the extension is missing."""
    if not LOADED:
        return None
    parts = torch.ops.sparse_kernels.build_info().split(";")
    info = dict(part.partition("=")[::2] for part in parts[1:])
    info["devices"] = "cpu,cuda" if "cuda" in info else "cpu"
    return info


def missing_message() -> str:
    return (
        f"sparse_kernels: the compiled extension sparse_kernels._C is not available ({LOAD_ERROR}); "
        "mask updates and index builds use the slower pure-torch path. Reinstall with "
        "`pip install --no-build-isolation -e .` where torch is installed to build it."
    )
