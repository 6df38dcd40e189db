"""Which kernels run an op, and an override for tests.

Routing is torch's dispatcher's job: every op has one schema (csrc/ops.cpp) and a kernel per
dispatch key.

| tensors on | kernel | what it cannot take |
| --- | --- | --- |
| CPU | compiled C++ (csrc/cpu) | float64, block sides not multiples of 16: the masked-dense reference path, in C++ |
| CUDA | Triton (sparse_kernels/triton) | float64, block sides not powers of two >= 16: the pure-torch reference |

:func:`override` swaps the kernels of the CPU (and CUDA) dispatch keys for a while: the
pure-torch references, or the Triton kernels on CPU tensors under the interpreter
(``TRITON_INTERPRET=1`` before triton is imported). That is how the tests run the Triton
kernels without a GPU and compare every path. ``SPARSE_KERNELS_BACKEND=reference`` (or
``triton``) installs the override for the whole process when the package is imported.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

BACKENDS = ("auto", "triton", "compiled", "reference")
OVERRIDES = ("triton", "reference")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_active: List[str] = []  # the overrides in force, innermost last


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
    """Whether triton can be imported (looked up once)."""
    return importlib.util.find_spec("triton") is not None


def triton_unsupported_reason(
    device: torch.device, dtype: torch.dtype, block_size: Sequence[int]
) -> Optional[str]:
    """Why the Triton kernels cannot take this case, or ``None`` if they can."""
    if not triton_installed():
        return "triton is not installed"
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        return f"tensors on {device} need CUDA, or TRITON_INTERPRET=1 for the Triton interpreter on CPU"
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} is not one of fp32, fp16, bf16"
    for side in block_size:
        if side < 16 or side & (side - 1):
            return f"block size {tuple(block_size)} has a side that is not a power of two >= 16"
    return None


def compiled_unsupported_reason(dtype: torch.dtype, block_size: Sequence[int]) -> Optional[str]:
    """Why the compiled CPU kernels hand this case to their masked-dense path, or ``None``."""
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} is not one of fp32, fp16, bf16"
    if any(side < 16 or side % 16 for side in block_size):
        return f"block size {tuple(block_size)} has a side that is not a multiple of 16"
    return None


def select_backend(device: torch.device, dtype: torch.dtype, block_size: Tuple[int, int]) -> str:
    """What runs an op on ``device`` with ``dtype`` and ``block_size`` now: ``"compiled"``
    (the C++ kernels), ``"triton"`` or ``"reference"`` (a masked dense weight). It describes
    the dispatcher's choice (for reports); it does not make it."""
    device = torch.device(device)
    kind = _active[-1] if _active else None
    if kind == "reference":
        return "reference"
    if kind == "triton" or device.type == "cuda":
        return "triton" if triton_unsupported_reason(device, dtype, block_size) is None else "reference"
    return "compiled" if compiled_unsupported_reason(dtype, block_size) is None else "reference"


def active_override() -> Optional[str]:
    """The innermost :func:`override` in force, or ``None``."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def override(kind: str) -> Iterator[None]:
    """Runs the ops on other kernels inside the block.

    Args:
        kind: ``"reference"``: every op, CPU and CUDA, on its pure-torch reference;
            ``"triton"``: the block-sparse ops of CPU tensors on the Triton kernels (needs
            ``TRITON_INTERPRET=1`` before triton is imported), refusing what they cannot take.
    The compiled kernels come back when the block ends.
    """
    if kind not in OVERRIDES:
        raise ValueError(f"override must be one of {OVERRIDES}, got {kind!r}")
    if kind == "triton" and not triton_interpreting():
        raise ValueError("the Triton override runs CPU tensors under the interpreter: set TRITON_INTERPRET=1 "
                         "before triton is imported")
    library = _install(kind)
    _active.append(kind)
    try:
        yield
    finally:
        _active.pop()
        library._destroy()


def _install(kind: str) -> torch.library.Library:
    """A library fragment holding the override's kernels (destroying it restores the others)."""
    from . import masks
    from .ops import conv2d, linear

    library = torch.library.Library("sparse_kernels", "IMPL")
    if kind == "reference":
        kernels = {**linear.REFERENCE_KERNELS, **conv2d.REFERENCE_KERNELS, **masks.REFERENCE_KERNELS}
        devices = ("cpu", "cuda")
    else:
        kernels = {**linear.triton_kernels(strict=True), **conv2d.triton_kernels(strict=True)}
        devices = ("cpu",)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")  # replacing a kernel is the point
        for name, kernel in kernels.items():
            torch.library.register_kernel(f"sparse_kernels::{name}", devices, kernel, lib=library)
    return library


def _install_requested() -> None:
    """Installs the override ``SPARSE_KERNELS_BACKEND`` asks for, for the whole process."""
    requested = requested_backend()
    if requested in OVERRIDES:
        override(requested).__enter__()  # never exited: the process keeps it
