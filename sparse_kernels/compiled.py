"""Launchers of the compiled CPU kernels (csrc/cpu/linear.cpp, csrc/cpu/conv.cpp).

Each mirrors its Triton launcher in :mod:`sparse_kernels.triton`: the same arguments and
results, for CPU tensors. The kernels compute in fp32; fp16 and bf16 operands are widened
to fp32 on the way in and the result rounded once on the way out, so they accumulate in
fp32 as the GPU kernels do. Threads: ``torch.get_num_threads()``. The instruction set
(AVX-512, AVX2+FMA or the build's baseline) is picked at run time from what the CPU has;
``SPARSE_KERNELS_CPU_ISA=generic|avx2|avx512`` forces one.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import extension  # noqa: F401  (loads the ops)

_ops = torch.ops.sparse_kernels


def _fp32(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.dtype == torch.float32 else t.float()


def isa() -> str:
    """The instruction set the kernels run with here: ``avx512``, ``avx2`` or ``generic``."""
    return _ops.cpu_isa()


def bsr_linear_fwd(x: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor, col_idx: Tensor,
                   bias: Optional[Tensor]) -> Tensor:
    """``y = x @ W.T + bias`` for ``x [M, in]``, ``values [nnz, bo, bi]``."""
    return _ops.bsr_linear_cpu(_fp32(x), _fp32(values), _fp32(bias), row_ptr, row_slots, col_idx).to(x.dtype)


def bsr_linear_grad_input(grad_out: Tensor, values: Tensor, col_ptr: Tensor, col_slots: Tensor,
                          row_idx: Tensor) -> Tensor:
    """``dx = dy @ W`` for ``grad_out [M, out]``."""
    return _ops.bsr_linear_grad_input_cpu(_fp32(grad_out), _fp32(values), col_ptr, col_slots, row_idx).to(
        grad_out.dtype)


def bsr_linear_grad_weight(grad_out: Tensor, x: Tensor, row_idx: Tensor, col_idx: Tensor, col_slots: Tensor,
                           block_size: Sequence[int]) -> Tensor:
    """``dW = dy.T @ x`` at the live blocks: ``[nnz, bo, bi]``."""
    bo, bi = block_size
    return _ops.bsr_linear_grad_weight_cpu(_fp32(grad_out), _fp32(x), row_idx, col_idx, col_slots, bo, bi).to(x.dtype)


def bsr_conv2d_fwd(x: Tensor, values: Tensor, row_ptr: Tensor, row_slots: Tensor, col_idx: Tensor,
                   bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int]) -> Tensor:
    """``y = conv2d(x, W) + bias`` for ``x [N, Cin, H, W]``, ``values [nnz, bo, bi, kh, kw]``;
    ``y`` is stored like ``x`` (channels-last or contiguous)."""
    y = _ops.bsr_conv2d_cpu(_fp32(x), _fp32(values), _fp32(bias), row_ptr, row_slots, col_idx, list(stride),
                            list(padding), list(dilation))
    return y.to(x.dtype)


def bsr_conv2d_grad_input(grad_out: Tensor, values: Tensor, col_ptr: Tensor, col_slots: Tensor, row_idx: Tensor,
                          input_hw: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                          dilation: Sequence[int]) -> Tensor:
    """``dx`` of the convolution, ``[N, Cin, *input_hw]``, stored like ``grad_out``."""
    dx = _ops.bsr_conv2d_grad_input_cpu(_fp32(grad_out), _fp32(values), col_ptr, col_slots, row_idx,
                                        list(input_hw), list(stride), list(padding), list(dilation))
    return dx.to(grad_out.dtype)


def bsr_conv2d_grad_weight(grad_out: Tensor, x: Tensor, row_idx: Tensor, col_idx: Tensor, col_slots: Tensor,
                           block_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                           dilation: Sequence[int]) -> Tensor:
    """The weight gradient at the live blocks: ``[nnz, bo, bi, kh, kw]``."""
    dw = _ops.bsr_conv2d_grad_weight_cpu(_fp32(grad_out), _fp32(x), row_idx, col_idx, col_slots,
                                         list(block_shape), list(stride), list(padding), list(dilation))
    return dw.to(x.dtype)
