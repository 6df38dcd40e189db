"""Keep the memory a training step frees for the next step: no page faults per step.

glibc's malloc hands memory back to the system when the top of its heap holds more than
``M_TRIM_THRESHOLD`` free bytes, and serves blocks above ``M_MMAP_THRESHOLD`` from fresh
mappings; by default both thresholds move with the allocation history. A training step frees
its activations at the end of the backward and allocates them again in the next forward, so,
depending on the heap's layout, every step can hand tens of megabytes back and fault them in
again, page by page: up to 5,000-10,000 minor faults per step in the demo UNet at 90% sparsity on
a Xeon, in some processes and not in others (``python -m benchmarks.page_faults``). The memory
is the activations autograd frees, so no workspace in the kernels can avoid it; fixing both
thresholds does. The process then keeps its peak heap, which every step reaches anyway.

``sparse-diffusion`` sets this for every command; a Python training loop calls
:func:`keep_freed_memory` once. ``SPARSE_DIFFUSION_MALLOC=system`` leaves glibc's defaults.
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory"]

# mallopt's parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit systems (half its heap size): blocks
# above it are mapped and unmapped each time; no activation of the bundled models is that large.
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of the heap beyond this goes back to the system.
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Fixes glibc's trim and mmap thresholds for this process (see the module's docstring).
    Returns whether they are set: False where the C library is not glibc, or where the
    environment says ``SPARSE_DIFFUSION_MALLOC=system``."""
    choice = os.environ.get("SPARSE_DIFFUSION_MALLOC", "keep")
    if choice not in ("keep", "system"):
        raise ValueError(f"SPARSE_DIFFUSION_MALLOC must be 'keep' or 'system', got {choice!r}")
    if choice == "system" or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    if not hasattr(libc, "gnu_get_libc_version"):  # musl: its malloc has no such thresholds
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
