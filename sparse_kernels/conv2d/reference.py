"""Pure-torch references of the conv2d ops: the oracle of every test and the portable fallback.

Each scatters the live blocks into a dense weight ``[Cout, Cin, kh, kw]`` and calls the dense
torch op, so it costs what dense costs; its only job is to be obviously right.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..layout import BlockSparseLayout, from_dense, to_dense


def bsr_conv2d_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    layout: BlockSparseLayout,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
) -> torch.Tensor:
    """``F.conv2d(x, to_dense(values, layout), bias, stride, padding, dilation)``."""
    return F.conv2d(x, to_dense(values, layout), bias, stride, padding, dilation)


def bsr_conv2d_grad_input_reference(
    grad_out: torch.Tensor, values: torch.Tensor, layout: BlockSparseLayout, input_shape, stride, padding, dilation
) -> torch.Tensor:
    """``dx`` of the convolution: a transposed convolution of ``dy`` with the dense weight."""
    return torch.nn.grad.conv2d_input(input_shape, to_dense(values, layout), grad_out, stride, padding, dilation)


def bsr_conv2d_grad_weight_reference(
    grad_out: torch.Tensor, x: torch.Tensor, layout: BlockSparseLayout, kernel_size, stride, padding, dilation
) -> torch.Tensor:
    """The weight gradient at the live blocks. Returns [nnz, bo, bi, kh, kw]."""
    weight_shape = (*layout.shape, *kernel_size)
    dense = torch.nn.grad.conv2d_weight(x, weight_shape, grad_out, stride, padding, dilation)
    return from_dense(dense, layout)
