"""Which kernels can take a case, each backend's rule asked in one place, and which run it now.

Routing is torch's dispatcher's job: every op has one schema (csrc/ops.cpp) and a kernel per
dispatch key. What the kernels of each key take:

* CPU tensors: the C++ kernels (csrc/cpu); their rule is :func:`cpu_kernels_take`, which C++
  answers. They hand fp64 and block sides that are not multiples of 16 to their masked-dense
  path, in C++.
* CUDA tensors: the Triton kernels (``<op>/triton_kernels.py``, and
  ``<op>/triton_vector_kernels.py`` for vector blocks ``(bo, 1)``); their rule is
  :func:`triton_unsupported_reason`. fp64, block sides that are not powers of two >= 16 and
  vector blocks other than ``(bo, 1)`` with ``bo`` a power of two from 8 to 128 run on the
  pure-torch reference.

Two things put other kernels in place of those defaults (:mod:`sparse_kernels.registry`
registers them): ``SPARSE_KERNELS_BACKEND=reference|triton`` for the whole process
(:func:`requested_backend`), and :func:`sparse_kernels.testing.override` for a block.
:func:`select_backend` says what runs a case, counting both.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import extension

BACKENDS = ("auto", "triton", "compiled", "reference")
OVERRIDES = ("triton", "reference")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The test overrides in force, innermost last: sparse_kernels.testing.override appends its kind
# on entry and pops it on exit (this module only reads it).
overrides_in_force: List[str] = []


# --------------------------------------------------------------------------- environment
def requested_backend() -> str:
    """The value of ``SPARSE_KERNELS_BACKEND`` (default ``auto``), validated. The registry reads
    it once, when it registers the kernels (the first op call); set it before that."""
    value = os.environ.get("SPARSE_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"SPARSE_KERNELS_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def triton_interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels on the host."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    """Whether triton can be imported (looked up once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


# The vector blocks (bo, 1) the Triton kernels take: bo a power of two in this range. Below 8 a
# group's tile is narrower than a tensor-core instruction's (n8); above 128 its fp32 accumulator
# [BLOCK_M, bo] no longer fits in registers (the square kernels tile such blocks; these do not).
TRITON_VECTOR_BLOCK_OUT = (8, 128)


# --------------------------------------------------------------------------- the rules
def is_vector_block(block_size: Sequence[int]) -> bool:
    """Whether ``(bo, bi)`` is a vector block: ``bo`` output channels x one input channel
    (x every tap of a convolution), ``bo > 1``."""
    return int(block_size[1]) == 1 and int(block_size[0]) > 1


def triton_unsupported_reason(
    device: torch.device, dtype: torch.dtype, block_size: Sequence[int]
) -> Optional[str]:
    """Why the Triton kernels cannot take this case, or ``None`` if they can: the Triton rule.

    Square and rectangular blocks: power-of-two sides >= 16 (``<op>/triton_kernels.py``).
    Vector blocks ``(bo, 1)``: ``bo`` a power of two from 8 to 128 (``<op>/triton_vector_kernels.py``,
    which gather the input channels one by one).
    """
    if not triton_installed():
        return "triton is not installed"
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        return f"tensors on {device} need CUDA, or TRITON_INTERPRET=1 for the Triton interpreter on CPU"
    if dtype not in KERNEL_DTYPES:
        return f"dtype {dtype} is not one of fp32, fp16, bf16"
    if is_vector_block(block_size):
        block_out = int(block_size[0])
        low, high = TRITON_VECTOR_BLOCK_OUT
        if block_out < low or block_out > high or block_out & (block_out - 1):
            return (f"vector block {tuple(block_size)}: the Triton kernels take (bo, 1) with bo a power of two "
                    f"from {low} to {high}")
        return None
    for side in block_size:
        if side < 16 or side & (side - 1):
            return f"block size {tuple(block_size)} has a side that is not a power of two >= 16"
    return None


def triton_takes(op: str, t: Tensor, block_size: Sequence[int], *, strict: bool) -> bool:
    """Whether the Triton kernels take ``op`` on ``t``'s device and dtype with ``block_size``;
    where they cannot, ``ValueError`` if ``strict`` (the Triton override) or ``False`` (the
    CUDA kernels then run the reference)."""
    reason = triton_unsupported_reason(t.device, t.dtype, tuple(block_size))
    if reason is not None and strict:
        raise ValueError(f"{op}: the Triton kernels cannot run this: {reason}")
    return reason is None


def cpu_kernels_take(dtype: torch.dtype, block_size: Sequence[int]) -> bool:
    """Whether the compiled CPU kernels take ``dtype`` with ``block_size`` (else they run their
    masked-dense path): the C++ kernels' own rule, asked of C++ (``sparse_kernels::cpu_kernels_take``).
    Needs the extension (:class:`~sparse_kernels.extension.ExtensionNotBuiltError` without it)."""
    extension.load()
    block_out, block_in = block_size
    return bool(torch.ops.sparse_kernels.cpu_kernels_take(dtype, int(block_out), int(block_in)))


# --------------------------------------------------------------------------- what runs now
def active_override() -> Optional[str]:
    """The kernels that run the ops in place of the defaults: the innermost
    :func:`sparse_kernels.testing.override` in force, else the process-wide
    ``SPARSE_KERNELS_BACKEND`` choice (``"reference"`` or ``"triton"``), else ``None``."""
    if overrides_in_force:
        return overrides_in_force[-1]
    requested = requested_backend()
    return requested if requested in OVERRIDES else None


def select_backend(device: torch.device, dtype: torch.dtype, block_size: Tuple[int, int]) -> str:
    """What runs an op on ``device`` with ``dtype`` and ``block_size`` now: ``"compiled"``
    (the C++ kernels), ``"triton"`` or ``"reference"`` (a masked dense weight). It describes
    the dispatcher's choice (for reports); it does not make it."""
    device = torch.device(device)
    kind = active_override()
    if kind == "reference":
        return "reference"
    if kind == "triton" or device.type == "cuda":
        return "triton" if triton_unsupported_reason(device, dtype, block_size) is None else "reference"
    return "compiled" if cpu_kernels_take(dtype, block_size) else "reference"
