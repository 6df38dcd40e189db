"""Pure-torch references of the linear ops: the oracle of every test and the portable fallback.

Each scatters the live blocks into a dense weight and calls the dense torch op, so it
costs what dense costs; its only job is to be obviously right.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..layout import BlockSparseLayout, from_dense, to_dense


def bsr_linear_reference(
    x: torch.Tensor, values: torch.Tensor, layout: BlockSparseLayout, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``y = x @ to_dense(values, layout).T + bias``. x: [..., in] -> y: [..., out]."""
    return F.linear(x, to_dense(values, layout), bias)


def bsr_linear_grad_input_reference(
    grad_out: torch.Tensor, values: torch.Tensor, layout: BlockSparseLayout
) -> torch.Tensor:
    """``dx = dy @ W``. grad_out: [..., out] -> dx: [..., in]."""
    return grad_out @ to_dense(values, layout)


def bsr_linear_grad_weight_reference(
    grad_out: torch.Tensor, x: torch.Tensor, layout: BlockSparseLayout
) -> torch.Tensor:
    """The weight gradient ``dy.T @ x`` at the live blocks. Returns [nnz, bo, bi]."""
    grad_out_2d = grad_out.reshape(-1, grad_out.shape[-1])
    x_2d = x.reshape(-1, x.shape[-1])
    return from_dense(grad_out_2d.T @ x_2d, layout)

