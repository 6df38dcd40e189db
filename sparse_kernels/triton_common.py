"""Helpers shared by the Triton launchers (``<op>/triton_kernels.py``): autotune configs, operand
checks (the Triton rule itself is :func:`sparse_kernels.capability.triton_unsupported_reason`),
precision. Imports triton: only the launchers import this module."""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch
import triton

from .capability import triton_interpreting, triton_unsupported_reason

# Read once: triton itself decides at import whether it interprets.
_INTERPRET = triton_interpreting()

# The rows of a K-major copy (:func:`k_major`) are padded to a multiple of this, the largest
# BLOCK_M of any config, so that the vector-block kernels load whole row tiles of it with no mask
# along its contiguous axis (a mask that varies along it would break the 16-byte copies).
K_MAJOR_ROW_MULTIPLE = 256

# Input channels per program of the vector-block grad-input kernels: the narrowest tile of a
# 16-bit tl.dot output that fills whole 32-byte sectors; each step's weights fill one of its
# columns (the kernels' docstrings say why), so a wider tile would only waste more.
VECTOR_GRAD_INPUT_CHANNELS = 16


def autotune_configs(gpu_configs):
    """Autotune configs from ``(BLOCK_M, num_warps, num_stages)`` triples on a GPU.

    One fixed config under the interpreter (nothing to time there), and only the first
    GPU config with ``SPARSE_KERNELS_AUTOTUNE=0`` (correctness runs that should not
    spend minutes compiling and timing variants). Read when the kernels are defined.
    """
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1)]
    if os.environ.get("SPARSE_KERNELS_AUTOTUNE", "1") == "0":
        gpu_configs = gpu_configs[:1]
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=st) for m, w, st in gpu_configs]


def interpreting() -> bool:
    """Whether this process runs Triton kernels through the interpreter."""
    return _INTERPRET


def reduction_splits(base_programs: int, rows: int, device: torch.device) -> int:
    """Into how many chunks (of at least 256 rows) a grad-weight kernel splits its reduction
    over ``rows`` (batch rows or output pixels), so that the GPU has enough programs: with
    fewer than two waves of two programs per SM (``4 x SMs``) it splits until it has them.
    The partial sums are added afterwards in a fixed order: deterministic, no atomics. Under
    the interpreter the target is 8 programs, so that the tests exercise the split."""
    target = 8 if interpreting() else 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-target // base_programs), -(-rows // 256)))


def check_operands(
    name: str, dense: torch.Tensor, block_size: Tuple[int, ...], *others: torch.Tensor, dense_dims: int = 2
) -> None:
    """Refuses what the kernels cannot take, naming the shape, dtype or device.

    ``dense``: the activation (``dense_dims``-D); ``others``: tensors that must sit on its
    device (floating ones in its dtype); ``block_size``: ``(bo, bi)``.
    """
    if dense.dim() != dense_dims:
        raise ValueError(f"{name}: expected a {dense_dims}-D input, got shape {tuple(dense.shape)}")
    for t in others:
        if t.device != dense.device:
            raise ValueError(f"{name}: tensors on {dense.device} and {t.device}")
        if t.is_floating_point() and t.dtype != dense.dtype:
            raise TypeError(f"{name}: operands must share one dtype, got {dense.dtype} and {t.dtype}")
    reason = triton_unsupported_reason(dense.device, dense.dtype, tuple(block_size))
    if reason is not None:
        raise ValueError(f"{name}: {reason}")


def checked_bias(name: str, bias: Optional[torch.Tensor], features: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``bias`` ([features] in ``dtype``, or None) as the kernels read it: with unit stride."""
    if bias is None:
        return None
    if bias.shape != (features,) or bias.dtype != dtype:
        raise ValueError(f"{name}: bias must be [{features}] {dtype}, got {tuple(bias.shape)} {bias.dtype}")
    return bias.contiguous()


def precision_and_upcast(dtype: torch.dtype, conv: bool = False) -> Tuple[str, bool]:
    """``input_precision`` for ``tl.dot`` and whether to upcast tiles to fp32.

    fp32 follows torch: TF32 only where torch's setting for the dense op allows it, the
    CUDA matmul setting for linear, the cuDNN convolution setting (TF32 by default, as
    ``F.conv2d``) for conv.
    """
    tf32 = _conv_tf32_allowed() if conv else _matmul_tf32_allowed()
    precision = "tf32" if dtype == torch.float32 and tf32 and not _INTERPRET else "ieee"
    return precision, _INTERPRET and dtype == torch.bfloat16


def _matmul_tf32_allowed() -> bool:
    """torch's TF32 setting for CUDA matmuls, however it was set.

    torch >= 2.9 has ``fp32_precision`` (which also reflects ``allow_tf32``,
    ``set_float32_matmul_precision`` and the global setting); reading ``allow_tf32``
    raises there once the new API was used.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def _conv_tf32_allowed() -> bool:
    """torch's TF32 setting for cuDNN convolutions (``cudnn.conv.fp32_precision`` on
    torch >= 2.9, ``cudnn.allow_tf32`` before)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def k_major(x: torch.Tensor) -> torch.Tensor:
    """``x [M, C] -> [C, M_pad]``: the K-major copy the vector-block kernels gather input
    channels from (one channel's rows contiguous), rows zero-padded to ``M_pad``, the next
    multiple of :data:`K_MAJOR_ROW_MULTIPLE`. One read and one write of ``x``."""
    rows, channels = x.shape
    padded = triton.cdiv(max(rows, 1), K_MAJOR_ROW_MULTIPLE) * K_MAJOR_ROW_MULTIPLE
    copy = x.new_empty(channels, padded)
    copy[:, :rows].copy_(x.T)
    copy[:, rows:].zero_()
    return copy


def vector_step(pairs: int, groups: int, most: int = 64) -> int:
    """How many (live block, tap) pairs of one group a vector-block kernel takes per step (its
    ``BLOCK_K`` or ``BLOCK_S``): the next power of two of the mean per group (``pairs / groups``),
    from 16 (the smallest tensor-core reduction of 16-bit types) to ``most``, so that a group's
    last, partly masked step wastes little when groups have few live blocks."""
    mean = -(-pairs // max(groups, 1))
    return min(most, max(16, triton.next_power_of_2(max(mean, 1))))


def on_device(t: torch.Tensor):
    """Launch on the tensors' GPU: Triton launches on the current CUDA device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
