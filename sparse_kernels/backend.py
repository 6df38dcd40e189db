"""Which implementation runs an op: the Triton kernels, the compiled CPU kernels, or the
pure-torch reference.

| tensors on | default | forced with ``SPARSE_KERNELS_BACKEND`` |
| --- | --- | --- |
| CUDA | ``triton`` | ``reference`` |
| CPU | ``compiled`` (C++ in ``sparse_kernels._C``) | ``reference``; ``triton`` (needs ``TRITON_INTERPRET=1`` before triton is imported) |

Under ``TRITON_INTERPRET=1`` CPU tensors take the Triton kernels by default (that is how
the tests run them). Cases a kernel cannot take fall back to the reference by default and
raise when that kernel is forced: fp64 everywhere; for Triton, block sides that are not
powers of two >= 16; for the compiled kernels, block sides that are not multiples of 16
or an extension built without them. The variable is read at every call, so tests may
change it between calls.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional, Sequence, Tuple

import torch

BACKENDS = ("auto", "triton", "compiled", "reference")
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def requested_backend() -> str:
    """The value of ``SPARSE_KERNELS_BACKEND`` (default ``auto``), validated."""
    value = os.environ.get("SPARSE_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"SPARSE_KERNELS_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels on the host."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether triton can be imported (looked up once: ops ask on every call)."""
    return importlib.util.find_spec("triton") is not None


def triton_unsupported_reason(
    device: torch.device, dtype: torch.dtype, block_size: Sequence[int]
) -> Optional[str]:
    """Why the Triton kernels cannot take this case, or ``None`` if they can."""
    if not triton_installed():
        return "triton is not installed"
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        return f"tensors on {device} need CUDA, or TRITON_INTERPRET=1 for the Triton interpreter on CPU"
    if dtype not in _KERNEL_DTYPES:
        return f"dtype {dtype} is not one of fp32, fp16, bf16"
    for side in block_size:
        if side < 16 or side & (side - 1):
            return f"block size {tuple(block_size)} has a side that is not a power of two >= 16"
    return None


def compiled_unsupported_reason(
    device: torch.device, dtype: torch.dtype, block_size: Sequence[int]
) -> Optional[str]:
    """Why the compiled CPU kernels cannot take this case, or ``None`` if they can."""
    from . import extension

    if device.type != "cpu":
        return f"the compiled kernels run on CPU tensors, got {device}"
    if not all(extension.has_kernel(op, "cpu") for op in extension.CPU_KERNEL_OPS):
        return f"the extension sparse_kernels._C is not built with them ({extension.LOAD_ERROR or 'old build'})"
    if dtype not in _KERNEL_DTYPES:
        return f"dtype {dtype} is not one of fp32, fp16, bf16"
    if any(side < 16 or side % 16 for side in block_size):
        return f"block size {tuple(block_size)} has a side that is not a multiple of 16"
    return None


def select_backend(device: torch.device, dtype: torch.dtype, block_size: Tuple[int, int]) -> str:
    """``"triton"``, ``"compiled"`` or ``"reference"`` for an op on ``device`` with ``dtype``
    and ``block_size``."""
    requested = requested_backend()
    if requested == "reference":
        return "reference"
    device = torch.device(device)
    if requested == "compiled" or (requested == "auto" and device.type == "cpu" and not triton_interpreting()):
        reason = compiled_unsupported_reason(device, dtype, block_size)
        if reason is None:
            return "compiled"
        if requested == "compiled":
            raise ValueError(f"SPARSE_KERNELS_BACKEND=compiled, but the compiled kernels cannot run: {reason}")
        return "reference"
    reason = triton_unsupported_reason(device, dtype, block_size)
    if requested == "triton" and reason is not None:
        raise ValueError(f"SPARSE_KERNELS_BACKEND=triton, but the Triton kernels cannot run: {reason}")
    if reason is not None:
        return "reference"
    return "triton"
